"""The exit-code audit (issue 14): each mistake a user can make, the code it exits with and the message it prints.

Every row of MISTAKES runs `job.cli.main([command])` in-process with an environment built from the tiny offline
Qwen3-VL, and asserts: the exit code; that the one-line message names the setting or row; no traceback for codes
2-4; and for rows marked `early`, that the job failed before any processor or model was loaded: the log lines
"loading processor" / "loading model weights" (job/model.py) never appear. S3 runs against moto's server on
127.0.0.1 and the Hub against a loopback HTTP server set as the Hub endpoint: real clients, real HTTP status codes.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import PROCESSOR_LOADED, REPO, TINY_PIXELS, TRACEBACK, WEIGHTS_LOADED, count_configs
from loopback import Account, free_port, serve, serve_hub

from job import cli, errors
from job.cards import ModelCards
from job.config.schema import build_cfg
from job.errors import DataError, ExitCode, find_job_error
from job.storage import s3 as s3io

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testingsecret", "AWS_DEFAULT_REGION": "us-east-1"}


class _SlowDownHandler(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint under a storm: every request gets 503 SlowDown (botocore retries, then gives up)."""

    def _reply(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (b'<?xml version="1.0"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _reply

    def log_message(self, *args):
        pass


# The loopback Hub's tokens (tests/loopback.py): `hf_write` may push to its user's namespace and to `org`, `hf_read`
# is a read-only token; `readers` is an organisation where the user may only read.
HUB_ACCOUNTS = {"hf_write": Account("me", orgs={"org": "write", "readers": "read"}),
                "hf_read": Account("me", role="read", token_name="read-only")}


@pytest.fixture(scope="module")
def hub_endpoint():
    with serve_hub(accounts=HUB_ACCOUNTS, namespaces=("readers",)) as server:
        yield server.url


def _hub_on(monkeypatch, url: str) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "ENDPOINT", url)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


@pytest.fixture(scope="module")
def slowdown_endpoint():
    url, server = serve(_SlowDownHandler)
    yield url
    server.shutdown()


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


# -- the table ---------------------------------------------------------------------------------------------------
@dataclass
class Mistake:
    id: str
    command: str
    env: dict[str, str | None]  # "{model}", "{data}", "{tmp}" are filled in; None unsets the variable
    code: int
    names: tuple[str, ...]  # the message must contain each of these
    early: bool = False  # fails before any processor or model is loaded
    setup: Callable[[Path, Path, Path], None] | None = None  # (tmp, model_dir, data_dir)
    not_in_message: tuple[str, ...] = ()
    needs: str | None = None  # "moto", "moto_iam", "hub": a loopback server
    extra_env: dict[str, str] = field(default_factory=dict)
    # what happens around the job (a fault where training would meet it): (tmp, data_dir, monkeypatch) -> context
    around: Callable[[Path, Path, pytest.MonkeyPatch], contextlib.AbstractContextManager] | None = None
    after_weights: bool = False  # the mistake can only show once training runs (the weights are loaded)


def _wrong_columns(tmp: Path, model: Path, data: Path) -> None:
    """The demo data with the columns named picture/question/text/answer: no row has image/query/target_json."""
    out = tmp / "renamed"
    out.mkdir()
    shutil.copytree(data / "images", out / "images")
    rename = {"image": "picture", "query": "question", "caption": "text", "target_json": "answer"}
    for name in ("train.jsonl", "validation.jsonl"):
        rows = [json.loads(line) for line in (data / name).read_text().splitlines() if line.strip()]
        (out / name).write_text("".join(json.dumps({rename.get(k, k): v for k, v in r.items()}) + "\n" for r in rows))


def _not_json(tmp: Path, model: Path, data: Path) -> None:
    out = tmp / "broken"
    out.mkdir()
    shutil.copytree(data / "images", out / "images")
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-3]  # line 5 cut short
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    (out / "validation.jsonl").write_text((data / "validation.jsonl").read_text())


def _one_missing_image(tmp: Path, model: Path, data: Path) -> None:
    """A parquet split whose row 3 points at an image that does not exist (paths relative to the dataset directory,
    whose images/ is a symlink)."""
    import datasets

    out = tmp / "pq"
    out.mkdir()
    (out / "images").symlink_to(data / "images")
    for split, name in (("train", "train.jsonl"), ("validation", "validation.jsonl")):
        rows = [json.loads(line) for line in (data / name).read_text().splitlines() if line.strip()]
        rows[3]["image"] = "images/gone.png"
        datasets.Dataset.from_list(rows).to_parquet(str(out / f"{split}.parquet"))


def _output_is_file(tmp: Path, model: Path, data: Path) -> None:
    (tmp / "a-file").write_text("not a directory\n")


def _adapterless_dir(tmp: Path, model: Path, data: Path) -> None:
    (tmp / "not-an-adapter").mkdir()


MISTAKES = [
    # config: every problem at once, before anything else
    Mistake("unknown_setting", "run", {"SFT_MAX_STEP": "5"}, 2, ("SFT_MAX_STEP", "did you mean SFT_MAX_STEPS"),
            early=True),
    Mistake("bad_attn_implementation", "run", {"SFT_ATTN_IMPLEMENTATION": "flash3"}, 2,
            ("SFT_ATTN_IMPLEMENTATION", "flash3"), early=True),
    Mistake("bad_number", "preflight", {"SFT_LEARNING_RATE": "fast"}, 2, ("SFT_LEARNING_RATE",), early=True),
    Mistake("save_steps_over_max_steps_both_set", "run", {"SFT_MAX_STEPS": "5", "SFT_SAVE_STEPS": "10"}, 2,
            ("SFT_SAVE_STEPS=10", "SFT_MAX_STEPS=5"), early=True),
    Mistake("checkpoint_uri_not_s3", "run", {"SFT_CHECKPOINT_URI": "my-bucket/ckpt"}, 2, ("SFT_CHECKPOINT_URI",),
            early=True),
    Mistake("bad_gate_spec", "run", {"SFT_PUSH_MIN_METRIC": "f1>0.7"}, 2, ("SFT_PUSH_MIN_METRIC",), early=True),
    Mistake("same_train_and_eval_split", "preflight", {"SFT_EVAL_SPLIT": "train"}, 2, ("SFT_EVAL_SPLIT",), early=True),
    # local paths that must exist
    Mistake("dataset_uri_unset", "preflight", {"SFT_DATASET_URI": None}, 2, ("SFT_DATASET_URI is not set",), early=True,
            not_in_message=("correct the file",)),
    Mistake("dataset_missing_absolute", "run", {"SFT_DATASET_URI": "/data/sarcasm"}, 2,
            ("SFT_DATASET_URI='/data/sarcasm'", "no such local path"), early=True),
    Mistake("dataset_missing_dotted", "run", {"SFT_DATASET_URI": "./data/sarcasm"}, 2,
            ("SFT_DATASET_URI='./data/sarcasm'", "no such local path", "working directory"), early=True),
    Mistake("model_path_typo", "run", {"SFT_MODEL_ID": "{model}-typo"}, 2,
            ("SFT_MODEL_ID=", "no such local model directory"), early=True),
    Mistake("model_dir_without_config", "preflight", {"SFT_MODEL_ID": "{data}"}, 2,
            ("SFT_MODEL_ID=", "no config.json"), early=True),
    Mistake("model_hub_id_not_cached_offline", "run", {"SFT_MODEL_ID": "tiny/modle"}, 2,
            ("SFT_MODEL_ID='tiny/modle'", "no such local path", "HF_HUB_OFFLINE=1"), early=True),
    Mistake("dataset_bad_s3_uri", "run", {"SFT_DATASET_URI": "s3://"}, 2, ("SFT_DATASET_URI='s3://'",), early=True),
    Mistake("eval_adapter_typo", "eval", {"SFT_EVAL_ADAPTER": "{tmp}/adaptr"}, 2,
            ("SFT_EVAL_ADAPTER=", "no such adapter", "SFT_EVAL_ADAPTER=none"), early=True),
    Mistake("eval_adapter_not_adapter", "eval", {"SFT_EVAL_ADAPTER": "{tmp}/not-an-adapter"}, 2,
            ("SFT_EVAL_ADAPTER=", "adapter_config.json"), early=True, setup=_adapterless_dir),
    # the output directory
    Mistake("output_dir_is_file", "run", {"SFT_OUTPUT_DIR": "{tmp}/a-file/out"}, 2, ("SFT_OUTPUT_DIR=", "is a file"),
            early=True, setup=_output_is_file),
    Mistake("output_dir_under_proc", "preflight", {"SFT_OUTPUT_DIR": "/proc/qwen3-sft-out"}, 2,
            ("SFT_OUTPUT_DIR=", "not writable"), early=True),
    # LoRA targets against the architecture on the meta device
    Mistake("lora_target_typo", "run", {"SFT_LORA_TARGET_MODULES": "q_prj,v_proj"}, 2,
            ("SFT_LORA_TARGET_MODULES", "q_prj", "did you mean 'q_proj'"), early=True),
    # data: after the processor (preflight needs it), before any weights
    Mistake("split_missing", "preflight", {"SFT_TRAIN_SPLIT": "trian"}, 2, ("'trian'", "SFT_TRAIN_SPLIT"),
            not_in_message=("correct the file",)),
    Mistake("columns_renamed", "preflight", {"SFT_DATASET_URI": "{tmp}/renamed"}, 2,
            ("picture, question, text, answer", "SFT_IMAGE_KEY", "SFT_QUERY_KEY", "SFT_TARGET_KEY"),
            setup=_wrong_columns, not_in_message=("SFT_BAD_ROWS=skip", "missing_field")),
    Mistake("line_not_json", "preflight", {"SFT_DATASET_URI": "{tmp}/broken"}, 2, ("train.jsonl:5", "not valid JSON"),
            setup=_not_json),
    Mistake("parquet_missing_image", "preflight", {"SFT_DATASET_URI": "{tmp}/pq", "SFT_TRAIN_SUBSET": None}, 2,
            ("train[3]", "gone.png", "relative to the dataset directory"), setup=_one_missing_image,
            not_in_message=("JSONL",)),
    Mistake("hub_dataset_offline", "run", {"SFT_DATASET_URI": "data/sarcasm"}, 2,
            ("SFT_DATASET_URI='data/sarcasm'", "no such local path", "HF_HUB_OFFLINE=1")),
    Mistake("hub_push_without_token", "run", {"SFT_HUB_REPO_ID": "me/adapter"}, 2,
            ("SFT_HUB_REPO_ID=me/adapter", "HF_HUB_OFFLINE=1")),
    # S3 over real HTTP (moto)
    Mistake("dataset_bucket_missing", "run", {"SFT_DATASET_URI": "s3://no-such-bucket-q3/sarcasm"}, 2,
            ("NoSuchBucket", "no-such-bucket-q3"), early=True, needs="moto"),
    Mistake("checkpoint_bucket_missing", "run", {"SFT_CHECKPOINT_URI": "s3://no-such-bucket-q3/ckpt"}, 2,
            ("NoSuchBucket", "no-such-bucket-q3"), needs="moto"),
    Mistake("s3_bad_credentials", "run", {"SFT_DATASET_URI": "s3://any-bucket/sarcasm"}, 2,
            ("InvalidAccessKeyId", "any-bucket"), early=True, needs="moto_iam"),
    # the Hub over real HTTP (loopback endpoint)
    Mistake("hub_model_401", "run", {"SFT_MODEL_ID": "org/private"}, 2,
            ("SFT_MODEL_ID='org/private'", "not found or no access"), early=True, needs="hub"),
    Mistake("hub_model_gated", "preflight", {"SFT_MODEL_ID": "org/gated"}, 2, ("SFT_MODEL_ID='org/gated'", "gated"),
            early=True, needs="hub"),
    Mistake("hub_dataset_401", "run", {"SFT_DATASET_URI": "org/private"}, 2, ("SFT_DATASET_URI='org/private'",),
            early=True, needs="hub"),
    Mistake("hub_model_503", "run", {"SFT_MODEL_ID": "org/down"}, 3, ("SFT_MODEL_ID='org/down'", "503"), early=True,
            needs="hub"),
    # issue 33: the push's access, checked after preflight, before the weights (job/storage/hub.py check_push_access;
    # every status and role of the check: tests/storage/test_hub.py)
    Mistake("hub_push_read_only_token", "run", {"SFT_HUB_REPO_ID": "me/adapter", "HF_TOKEN": "hf_read"}, 2,
            ("SFT_HUB_REPO_ID=me/adapter", "read-only token"), needs="hub"),
    Mistake("hub_push_repo_503", "run", {"SFT_HUB_REPO_ID": "org/down", "HF_TOKEN": "hf_write"}, 3,
            ("SFT_HUB_REPO_ID=org/down", "503"), needs="hub"),
    Mistake("export_push_read_only_token", "run",
            {"SFT_EXPORT": "true", "SFT_EXPORT_REPO_ID": "me/merged", "HF_TOKEN": "hf_read"}, 2,
            ("SFT_EXPORT_REPO_ID=me/merged", "read-only token"), needs="hub"),
    # issue 33: a gate on a metric the chosen SFT_EVAL_MODE does not measure, at config time
    Mistake("gate_exact_match_in_score_mode", "run",
            {"SFT_EVAL_MODE": "score", "SFT_PUSH_MIN_METRIC": "exact_match:0.8"}, 2,
            ("SFT_PUSH_MIN_METRIC=exact_match:0.8", "SFT_EVAL_MODE=score"), early=True),
    Mistake("gate_json_parse_rate_in_score_mode", "run",
            {"SFT_EVAL_MODE": "score", "SFT_PUSH_MIN_METRIC": "json_parse_rate:0.9"}, 2,
            ("SFT_PUSH_MIN_METRIC=json_parse_rate:0.9", "SFT_EVAL_MODE=score"), early=True),
    Mistake("gate_roc_auc_in_generate_mode", "export",
            {"SFT_EVAL_MODE": "generate", "SFT_PUSH_MIN_METRIC": "roc_auc:0.8"}, 2,
            ("SFT_PUSH_MIN_METRIC=roc_auc:0.8", "SFT_EVAL_MODE=generate"), early=True),
    Mistake("best_metric_in_generate_mode", "run",
            {"SFT_EVAL_STEPS": "2", "SFT_EVAL_MODE": "generate", "SFT_BEST_METRIC": "roc_auc"}, 2,
            ("SFT_BEST_METRIC=roc_auc", "SFT_EVAL_MODE=generate"), early=True),
]


# -- mistakes that only show once training runs (issue 33) -----------------------------------------------------------
# One optimizer step of 2 rows, no eval: the job reaches its first training step in-process in a few seconds.
TRAIN_STEP = {"SFT_MAX_STEPS": "1", "SFT_EVAL_PRE": "false", "SFT_EVAL_POST": "false", "SFT_PER_DEVICE_BATCH_SIZE": "2",
              "SFT_GRAD_ACCUM": "1", "SFT_GRADIENT_CHECKPOINTING": "false", "SFT_DATALOADER_NUM_WORKERS": "0",
              "SFT_LORA_DROPOUT": "0"}


@contextlib.contextmanager
def _oom_in_the_training_forward(tmp: Path, data: Path, monkeypatch) -> Iterator[None]:
    """torch's own OutOfMemoryError from the model's forward in a training step, as a GPU too small for the batch
    raises it (the pre-eval is off: the first forward in training mode is step 1's)."""
    import torch

    def out_of_memory(module, _args):
        if type(module).__name__ == "Qwen3VLForConditionalGeneration" and module.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (raised by the test)")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(out_of_memory)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _memory_for_no_row(tmp: Path, data: Path, monkeypatch) -> Iterator[None]:
    """tests/ceiling.py's ceiling at 8 tokens: torch's own OutOfMemoryError for every training forward, the micro-batch
    search's first (one row) included."""
    import ceiling

    handle = ceiling.install(8)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _train_images_gone_after_preflight(tmp: Path, data: Path, monkeypatch) -> Iterator[None]:
    """Every training image vanishes once preflight has read it (a volume changed under the job), when the weights
    start loading: each row passed preflight, and the collator meets its missing image at collate time, in one of the
    two dataloader workers."""
    copy = tmp / "vanishing"
    shutil.copytree(data, copy)
    rows = [json.loads(line) for line in (copy / "train.jsonl").read_text().splitlines() if line.strip()]
    monkeypatch.setenv("SFT_DATASET_URI", str(copy))

    class RemoveImages(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if WEIGHTS_LOADED in record.getMessage():
                for row in rows:
                    (copy / row["image"]).unlink(missing_ok=True)

    handler = RemoveImages()
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)


@contextlib.contextmanager
def _sigterm_during_the_push(tmp: Path, data: Path, monkeypatch) -> Iterator[None]:
    """SIGTERM while the loopback Hub holds the adapter's commit. The job's guard sets SIGTERM/SIGINT to SIG_IGN once
    preempted (its process is on the way out) and its watchdog sleeps SFT_PREEMPT_GRACE_S: this process lives on, so
    the handlers are restored afterwards and the budget (3600 s) outlives the session."""
    released = threading.Event()

    def signal_then_hold(repo_id: str, files: dict[str, bytes]) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        released.wait(30)  # failsafe: released as soon as the job has returned

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with serve_hub(accounts=HUB_ACCOUNTS, on_commit=signal_then_hold) as server:
        _hub_on(monkeypatch, server.url)
        try:
            yield
        finally:
            released.set()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        assert server.repos["me/adapter"].commits  # created; the commit was held, never answered


@contextlib.contextmanager
def _sigterm_when_the_weights_load(tmp: Path, data: Path, monkeypatch) -> Iterator[None]:
    """SIGTERM as `eval` starts loading the weights. Without a guard over the command, this process's own handler
    (set here first) turns it into an error that is no 143, instead of letting the default action end the session."""

    class Signal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if WEIGHTS_LOADED in record.getMessage():
                os.kill(os.getpid(), signal.SIGTERM)

    def unguarded(signum, frame):
        raise RuntimeError("SIGTERM reached no preemption guard")

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, unguarded)
    handler = Signal()
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        for sig, previous in handlers.items():
            signal.signal(sig, previous)


MISTAKES += [
    Mistake("out_of_memory_at_step_1", "run", TRAIN_STEP, 2,
            ("out of GPU memory at training step 1 on a batch of 2 row(s)", "(visual tokens included)",
             "SFT_PER_DEVICE_BATCH_SIZE=2", "SFT_MAX_LENGTH=512", "SFT_IMAGE_MAX_PIXELS=16384",
             "SFT_GRADIENT_CHECKPOINTING=false"), around=_oom_in_the_training_forward, after_weights=True,
            not_in_message=("expandable_segments",)),
    Mistake("auto_micro_batch_where_no_row_fits", "run", {**TRAIN_STEP, "SFT_PER_DEVICE_BATCH_SIZE": "auto"}, 2,
            ("SFT_PER_DEVICE_BATCH_SIZE=auto: not even one row fits in GPU memory: the longest row, ",
             " tokens (visual tokens included), ran out of memory", "SFT_MAX_LENGTH=512", "SFT_IMAGE_MAX_PIXELS=16384",
             "SFT_GRADIENT_CHECKPOINTING=false"), around=_memory_for_no_row, after_weights=True,
            not_in_message=("SFT_PER_DEVICE_BATCH_SIZE=2", "training step")),
    Mistake("row_error_in_a_dataloader_worker", "run", {**TRAIN_STEP, "SFT_DATALOADER_NUM_WORKERS": "2"}, 2,
            ("train.jsonl:", "'image'"), around=_train_images_gone_after_preflight, after_weights=True,
            not_in_message=("DataLoader worker", "Original Traceback")),
    Mistake("sigterm_during_the_hub_push", "run",
            {**TRAIN_STEP, "SFT_HUB_REPO_ID": "me/adapter", "HF_TOKEN": "hf_write", "SFT_EVAL_POST": "true",
             "SFT_EVAL_MODE": "generate", "SFT_EVAL_SUBSET": "2", "SFT_EVAL_MAX_NEW_TOKENS": "2",
             "SFT_EVAL_BATCH_SIZE": "2", "SFT_PUSH_REQUIRE_IMPROVEMENT": "false", "SFT_PREEMPT_GRACE_S": "3600"},
            143, ("preempted by SIGTERM",),
            around=_sigterm_during_the_push, after_weights=True),
    Mistake("sigterm_during_eval", "eval", {"SFT_EVAL_ADAPTER": "none", "SFT_PREEMPT_GRACE_S": "3600"}, 143,
            ("preempted by SIGTERM",), around=_sigterm_when_the_weights_load, after_weights=True),
]


@pytest.fixture()
def cli_env(monkeypatch, tiny_assets, tmp_path, request):
    """Set the environment of one in-process job.cli.main call; the root handler it adds goes afterwards."""
    handlers = list(logging.getLogger().handlers)
    model_dir, data_dir = tiny_assets

    def apply(env: dict[str, str | None]) -> None:
        for key in [k for k in os.environ if k.startswith("SFT_")]:
            monkeypatch.delenv(key)
        base = {"SFT_MODEL_ID": str(model_dir), "SFT_DATASET_URI": str(data_dir),
                "SFT_OUTPUT_DIR": str(tmp_path / "out"), "SFT_RUN_ID": "audit", "SFT_MAX_LENGTH": "512",
                "SFT_WANDB_ENABLED": "false", **TINY_PIXELS,
                # preflight checks these rows only: the data cases need a few rows, not 272
                "SFT_TRAIN_SUBSET": "8", "SFT_EVAL_SUBSET": "4"}
        for key, value in {**base, **env}.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value.format(model=model_dir, data=data_dir, tmp=tmp_path))
        monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))

    yield apply
    for handler in logging.getLogger().handlers:
        if handler not in handlers:
            logging.getLogger().removeHandler(handler)


def _loopback(case: Mistake, request, monkeypatch) -> None:
    if case.needs in ("moto", "moto_iam"):
        endpoint = request.getfixturevalue("moto_endpoint")
        for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "2"}.items():
            monkeypatch.setenv(key, value)
        if case.needs == "moto_iam":  # moto checks credentials like AWS: "testing" is no known access key
            from moto.core.authorization import enable_iam_authentication

            ctx = enable_iam_authentication()
            ctx.__enter__()
            request.addfinalizer(lambda: ctx.__exit__(None, None, None))
    elif case.needs == "hub":
        _hub_on(monkeypatch, request.getfixturevalue("hub_endpoint"))


def _params(cases: list[Mistake]) -> list:
    """Cases that load the processor (and scan rows) take seconds each: they run in the slow tier."""
    return [pytest.param(c, id=c.id, marks=() if c.early else pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("case", _params(MISTAKES))
def test_mistake_exits_with_its_code_and_one_message(case: Mistake, cli_env, tiny_assets, tmp_path, request,
                                                     monkeypatch, caplog, capsys):
    if case.setup is not None:
        case.setup(tmp_path, *tiny_assets)
    cli_env(case.env)
    _loopback(case, request, monkeypatch)
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    configs = count_configs(monkeypatch)
    with case.around(tmp_path, tiny_assets[1], monkeypatch) if case.around else contextlib.nullcontext():
        code = cli.main([case.command])
    seconds = time.monotonic() - started
    # What this process's exit would do for a job process: a failed step's DataLoader workers (which ignore SIGTERM)
    # are ended; alive, they would keep the session's zygote from closing (they inherited its pipe).
    if "job.train.preemption" in sys.modules:  # the command got as far as training
        sys.modules["job.train.preemption"].end_dataloader_workers()
    err = capsys.readouterr().err
    logged = "\n".join(caplog.messages)
    assert code == case.code, err[-3000:]
    # One config per process: SFT_* parsed once, the config built once (none from an invalid environment).
    assert configs["parsed"] == 1 and configs["built"] == 1 - configs["refused"], configs
    message = err[err.index("qwen3-sft: error: "):] if "qwen3-sft: error: " in err else err
    for name in case.names:
        assert name in message, message
    for wrong in case.not_in_message:
        assert wrong not in message, message
    if case.code in (2, 3, 4):
        assert TRACEBACK not in err, err[-3000:]
    # every mistake in the table is caught before the weights load, but those that only training can show
    assert (WEIGHTS_LOADED in logged) == case.after_weights, logged[-2000:]
    if case.early:
        assert PROCESSOR_LOADED not in logged, logged[-2000:]
        # Recorded, not asserted (timings on a shared machine are noise): the log lines above are the proof.
        request.node.user_properties.append(("seconds_to_fail", round(seconds, 2)))


def test_the_audit_covers_at_least_40_mistakes():
    assert len(MISTAKES) >= 40 and len({c.id for c in MISTAKES}) == len(MISTAKES)


# -- classification with real clients ----------------------------------------------------------------------------
@pytest.mark.slow  # botocore's backoff between attempts
def test_s3_upload_storm_is_transient_and_names_the_object(slowdown_endpoint, monkeypatch, tmp_path):
    """The final upload under a 503 SlowDown storm: botocore retries, boto3 raises S3UploadFailedError: exit 3, one
    line naming the store and the object, through our uploader and raw boto3 alike."""
    for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": slowdown_endpoint, "AWS_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    with pytest.raises(Exception) as ours:
        s3io.upload_dir(s3io.client(), tmp_path, s3io.S3Uri.parse("s3://ckpt-store/run-1"))
    with pytest.raises(Exception) as raw:
        s3io.client().upload_file(str(tmp_path / "adapter" / "adapter_model.safetensors"), "ckpt-store", "run-1/m.json")
    assert type(raw.value).__name__ == "S3UploadFailedError"
    for exc, key in ((ours.value, "run-1/adapter/adapter_model.safetensors"), (raw.value, "run-1/m.json")):
        assert errors.exit_code_for(exc) == ExitCode.TRANSIENT
        message = str(find_job_error(exc))
        assert "ckpt-store" in message and key in message and "\n" not in message, message


def test_collate_wrapping_keeps_the_code_of_its_cause():
    """'Qwen3 collate failed' wraps the original error; the code follows the cause: DataError 2, a bug 1."""
    def wrapped(cause: Exception) -> RuntimeError:
        try:
            try:
                raise cause
            except Exception as exc:
                raise RuntimeError(f"Qwen3 collate failed: {exc}") from exc
        except RuntimeError as outer:
            return outer

    code_for = errors.exit_code_for
    assert code_for(wrapped(DataError("train.jsonl:3: bad"))) == ExitCode.USER
    assert code_for(wrapped(FileNotFoundError(2, "No such file or directory", "/data/x.png"))) == ExitCode.USER
    assert code_for(wrapped(ValueError("absolute aspect ratio must be smaller than 200"))) == ExitCode.INTERNAL
    assert code_for(wrapped(KeyError("bug"))) == ExitCode.INTERNAL


# -- save interval, report ---------------------------------------------------------------------------------------
def test_short_run_save_interval_follows_max_steps():
    card = ModelCards().qwen3_vl_8b_instruct
    assert build_cfg(card, {"SFT_MAX_STEPS": "5"}).train.save_steps == 5
    assert build_cfg(card, {"SFT_SAVE_STEPS": "80"}).train.save_steps == 80
    assert build_cfg(card, {"SFT_MAX_STEPS": "500"}).train.save_steps == 50


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job.demo.report", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_report_reads_every_metrics_file_and_prints_usage(tmp_path):
    from job.demo.report import format_metrics, main

    scalars = {"accuracy": 0.5, "macro_f1": 0.25, "json_parse_rate": 1.0, "exact_match": 0.5, "n": 4}
    table = format_metrics(scalars, "standalone_metrics")
    assert "standalone" in table and "nan" not in table
    both = format_metrics({"pre": scalars, "post": {**scalars, "accuracy": 0.75}})
    assert "0.750" in both and "nan" not in both
    scored = {**scalars, "json_parse_rate": None, "roc_auc": 0.8, "per_class": {
        "red": {"precision": 0.5, "recall": 1.0, "f1": 0.667, "support": 2}}}  # score-only mode: no parse rate
    best = {"step": 4, "final_step": 6, "metric": "macro_f1", "value": 0.25, "history": [{"step": 2}, {"step": 4}]}
    table = format_metrics({"pre": None, "post": scored, "best": best})
    assert "roc_auc" in table and "red" in table
    assert "best step: 4 of 6 by macro_f1=0.250 of the label probabilities (evals at steps 2, 4)" in table
    assert "json_parse_rate            -           -" in table
    assert main([]) == 2
    (tmp_path / "x.json").write_text("[1, 2]")
    assert main([str(tmp_path / "x.json")]) == 2


@pytest.mark.slow
def test_report_cli_without_a_file_prints_usage():
    proc = _report()
    assert proc.returncode == 2 and "usage: python -m job.demo.report" in proc.stderr and TRACEBACK not in proc.stderr


# -- eval applies the preflight policy -----------------------------------------------------------------------------
def _thin_image_in_eval(tmp: Path, model: Path, data: Path) -> None:
    """Six eval rows, the third with a 2000x5 image (the processor refuses aspect ratios over 200)."""
    from PIL import Image

    out = tmp / "thin"
    shutil.copytree(data, out)
    rows = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines() if line.strip()][:6]
    Image.new("RGB", (2000, 5), "white").save(out / "images" / "thin.png")
    rows[2]["image"] = "images/thin.png"
    (out / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


EVAL_ENV = {"SFT_DATASET_URI": "{tmp}/thin", "SFT_EVAL_SUBSET": None, "SFT_EVAL_MAX_NEW_TOKENS": "4",
            "SFT_EVAL_BATCH_SIZE": "6"}


@pytest.mark.slow  # loads the processor and checks the rows
def test_eval_fail_policy_names_the_bad_row_before_weights(cli_env, tiny_assets, tmp_path, caplog, capsys):
    _thin_image_in_eval(tmp_path, *tiny_assets)
    cli_env(EVAL_ENV)
    caplog.set_level(logging.INFO)
    assert cli.main(["eval"]) == 2
    err = capsys.readouterr().err
    assert "validation.jsonl:3" in err and "SFT_BAD_ROWS" in err and TRACEBACK not in err, err[-2000:]
    assert WEIGHTS_LOADED not in "\n".join(caplog.messages)


@pytest.mark.slow  # loads the tiny model and generates
def test_eval_skip_policy_scores_the_rest_and_names_the_skipped_row(cli_env, tiny_assets, tmp_path, capsys):
    _thin_image_in_eval(tmp_path, *tiny_assets)
    cli_env({**EVAL_ENV, "SFT_BAD_ROWS": "skip", "SFT_MAX_BAD_FRACTION": "0.5", "SFT_EVAL_ADAPTER": "none"})
    assert cli.main(["eval"]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "skipped 1 bad row(s)" in out and "validation.jsonl:3" in out, out
    assert "eval (base model)" in out
    metrics = json.loads((tmp_path / "out" / "eval" / "standalone_metrics.json").read_text())
    assert metrics["n"] == 5
    report = json.loads((tmp_path / "out" / "eval" / "standalone_preflight_report.json").read_text())
    assert report["splits"]["eval"]["skipped_row_ids"] == ["validation.jsonl:3"]
    assert not (tmp_path / "out" / "preflight_report.json").exists()  # a run's report is never overwritten


@pytest.mark.slow
def test_subprocess_hub_endpoint_401_is_exit_2_before_the_processor(hub_endpoint, tiny_assets, tmp_path):
    """The same contract through the real entry point, with HF_ENDPOINT set as a user would."""
    from helpers import job_env, run_job

    env = job_env(tmp_path, tiny_assets, SFT_MODEL_ID="org/private", HF_ENDPOINT=hub_endpoint, HF_HUB_OFFLINE="0")
    proc = run_job(["run"], env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "SFT_MODEL_ID='org/private'" in proc.stderr and TRACEBACK not in proc.stderr
    assert PROCESSOR_LOADED not in proc.stderr and WEIGHTS_LOADED not in proc.stderr


# -- out of memory (issue 33) -----------------------------------------------------------------------------------------
def test_an_out_of_memory_error_is_exit_2_everywhere_and_a_late_one_says_why_it_came_late():
    """A training step's OOM is OutOfMemory (the run above); one after the first steps is exit 2 as well, with the
    fragmentation advice; torch's OutOfMemoryError anywhere else (eval, export) is exit 2 naming the eval settings."""
    import torch

    from job.errors import OutOfMemory

    late = OutOfMemory(40, 2, 1900, {"SFT_PER_DEVICE_BATCH_SIZE": "2", "SFT_MAX_LENGTH": "2048"})
    assert errors.exit_code_for(late) == 2
    assert str(late).startswith("out of GPU memory at training step 40 on a batch of 2 row(s) whose longest sequence "
                                "is 1900 tokens (visual tokens included)")
    assert "SFT_PER_DEVICE_BATCH_SIZE=2, SFT_MAX_LENGTH=2048" in str(late)
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in str(late)
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        except torch.OutOfMemoryError as exc:
            raise RuntimeError("evaluate_qwen3 failed: CUDA out of memory") from exc
    except RuntimeError as wrapped:
        assert errors.exit_code_for(wrapped) == 2
        assert "SFT_EVAL_BATCH_SIZE" in str(find_job_error(wrapped))
