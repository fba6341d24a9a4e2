"""Object storage over the real S3 protocol (moto's server on 127.0.0.1), the gate and the model card.

The S3 server (s3_endpoint) and the job runs read here are shared: tests/runs.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from collections import Counter
from pathlib import Path

import pytest
from helpers import job_env
from runs_reference import CHECKPOINT_BUCKET, REFERENCE, STEPS
from s3_proxy import AWS_ENV, FaultProxy, s3_client

from job.data.layouts import SplitFiles, find_split
from job.errors import GateRefused, TransientError, UnsafeObjectKey, UserError
from job.outputs import FINAL_ARTIFACTS
from job.storage import s3 as s3io
from job.storage.checkpoints import RemoteCheckpoints


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def bucket(s3_endpoint, request):
    # Parametrized tests share a name's first 40 characters: the digest of the whole name tells them apart.
    digest = hashlib.sha256(request.node.name.encode()).hexdigest()[:8]
    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + "-" + digest
    s3io.client().create_bucket(Bucket=name)
    return name


def _fake_checkpoint(root: Path, step: int) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_data_round_trip_with_etag_cache(bucket, tiny_assets, tmp_path):
    s3 = s3io.client()
    # The tiny dataset's layout (the two splits and images/ below them) with 3 of its 272 images: the round trip and
    # the cache do not depend on how many files there are, and each transfer costs about 10 ms of CPU.
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_assets[1], data_dir, ignore=lambda d, names: sorted(names)[3:] if d.endswith("images") else [])
    assert len(list((data_dir / "images").iterdir())) == 3
    sizes = s3io.upload_dir(s3, data_dir, s3io.S3Uri(bucket, "sarcasm"))
    assert set(sizes) == {f"sarcasm/{rel}" for rel in _tree(data_dir)}
    dest = tmp_path / "cache"
    etags = s3io.download_prefix(s3, s3io.S3Uri(bucket, "sarcasm"), dest)
    assert set(etags) == _tree(data_dir)
    assert _tree(dest) == _tree(data_dir) | {".s3-manifest.json"}  # the bookkeeping is a dot file (never data)
    for rel in _tree(data_dir):
        assert (dest / rel).read_bytes() == (data_dir / rel).read_bytes()
    stamp = (dest / "train.jsonl").stat().st_mtime_ns
    s3io.download_prefix(s3, s3io.S3Uri(bucket, "sarcasm"), dest)  # second pull: size+ETag match, nothing fetched
    assert (dest / "train.jsonl").stat().st_mtime_ns == stamp
    (dest / "train.jsonl").write_text("changed")  # a corrupted cache entry is re-fetched
    s3io.download_prefix(s3, s3io.S3Uri(bucket, "sarcasm"), dest)
    assert (dest / "train.jsonl").read_bytes() == (data_dir / "train.jsonl").read_bytes()


def test_the_mirror_is_the_prefix_after_a_re_export(bucket, tmp_path):
    """A dataset re-exported from 2 parquet shards to 1, its validation.jsonl deleted: the local copy holds exactly the
    new objects (the loaders find 1 shard and no validation split), and the ETags returned are those of what is
    there."""
    s3, uri, dest = s3io.client(), s3io.S3Uri(bucket, "ds"), tmp_path / "cache"
    first = {"data/train-00000-of-00002.parquet": b"shard 0", "data/train-00001-of-00002.parquet": b"shard 1",
             "validation.jsonl": b"{}\n"}
    for rel, body in first.items():
        s3.put_object(Bucket=bucket, Key=f"ds/{rel}", Body=body)
    assert set(s3io.download_prefix(s3, uri, dest)) == set(first)
    (dest / "data/.train-00002-of-00002.parquet.part").write_bytes(b"cut short")  # a fetch killed half-way
    s3io.delete_prefix(s3, uri)
    s3.put_object(Bucket=bucket, Key="ds/data/train-00000-of-00001.parquet", Body=b"one shard")
    etags = s3io.download_prefix(s3, uri, dest)
    assert _tree(dest) == {"data/train-00000-of-00001.parquet", ".s3-manifest.json"}
    assert find_split(dest, "train") == SplitFiles("parquet", (dest / "data/train-00000-of-00001.parquet",))
    assert find_split(dest, "validation") is None
    listed = {o["Key"]: o["ETag"] for o in s3io.list_objects(s3, uri)}
    assert etags == {"data/train-00000-of-00001.parquet": listed["ds/data/train-00000-of-00001.parquet"]}
    expected = hashlib.sha256(f"ds/data/train-00000-of-00001.parquet={etags['data/train-00000-of-00001.parquet']};"
                              .encode()).hexdigest()
    assert s3io.etags_digest(uri, etags) == expected
    assert json.loads((dest / ".s3-manifest.json").read_text()) == {
        "data/train-00000-of-00001.parquet": [len(b"one shard"), etags["data/train-00000-of-00001.parquet"]]}


@pytest.mark.parametrize(("key", "why"), [
    ("ds/../../escape.txt", "has a '.' or '..' path segment"),
    ("ds/images/../../../escape.txt", "has a '.' or '..' path segment"),
    ("ds//tmp/escape.txt", "is absolute below the prefix"),
    ("ds/images//escape.txt", "has an empty path segment"),
    ("ds/./escape.txt", "has a '.' or '..' path segment"),
    ("ds/.s3-manifest.json", "is the mirror's own bookkeeping file"),
], ids=["dotdot", "deep-dotdot", "absolute", "empty-segment", "dot", "manifest"])
def test_a_key_that_would_land_outside_the_mirror_is_refused_before_anything_is_written(bucket, tmp_path, key, why):
    s3, uri = s3io.client(), s3io.S3Uri(bucket, "ds")
    s3.put_object(Bucket=bucket, Key="ds/train.jsonl", Body=b"{}\n")
    s3.put_object(Bucket=bucket, Key=key, Body=b"overwritten")
    assert key in {o["Key"] for o in s3io.list_objects(s3, uri)}  # the store kept the key as written
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeObjectKey, match=re.escape(f"object key {key!r} {why}")) as caught:
        s3io.download_prefix(s3, uri, cache / "datasets" / bucket / "ds")
    assert caught.value.key == key and caught.value.exit_code == 2
    assert not cache.exists() and not (Path("/tmp") / "escape.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # Checkpoint restore mirrors the same way: the same refusal, nothing written.
    checkpoint = f"ckpts/run-k/checkpoint-2/{key.removeprefix('ds/')}"
    for rel, body in (("COMPLETED", b"{}"), ("adapter_model.safetensors", b"w"), (None, b"overwritten")):
        s3.put_object(Bucket=bucket, Key=f"ckpts/run-k/checkpoint-2/{rel}" if rel else checkpoint, Body=body)
    with pytest.raises(UnsafeObjectKey, match=re.escape(repr(checkpoint))):
        RemoteCheckpoints(f"s3://{bucket}/ckpts", "run-k", keep=2).restore_latest(tmp_path / "checkpoints")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_marker_written_last_and_incomplete_never_chosen(bucket, tmp_path):
    remote = RemoteCheckpoints(f"s3://{bucket}/ckpts", "run-a", keep=5)
    remote.upload(_fake_checkpoint(tmp_path / "local", 2), 2)
    objects = s3io.list_objects(remote.s3, remote.run_uri.child("checkpoint-2"))
    marker = [o for o in objects if o["Key"].endswith("/COMPLETED")]
    assert len(marker) == 1 and len(objects) == 3
    assert all(o["LastModified"] <= marker[0]["LastModified"] for o in objects)
    # A newer prefix without its marker (upload died) must be ignored by a resuming pod.
    partial = _fake_checkpoint(tmp_path / "partial", 4)
    s3io.upload_dir(remote.s3, partial, remote.run_uri.child("checkpoint-4"))
    restored = remote.restore_latest(tmp_path / "restore")
    assert restored is not None and restored.name == "checkpoint-2"
    assert (restored / "COMPLETED").is_file()
    assert (restored / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "local/checkpoint-2/adapter_model.safetensors"
    ).read_bytes()


def test_retention_keeps_newest_complete(bucket, tmp_path):
    remote = RemoteCheckpoints(f"s3://{bucket}/ckpts", "run-r", keep=2)
    stale = _fake_checkpoint(tmp_path / "stale", 1)
    s3io.upload_dir(remote.s3, stale, remote.run_uri.child("checkpoint-1"))  # incomplete and older: removed
    for step in (2, 4, 6, 8):
        remote.upload(_fake_checkpoint(tmp_path / f"l{step}", step), step)
    complete, incomplete = remote._steps()
    assert complete == [6, 8] and incomplete == []
    remote.keep = 1
    remote.apply_retention()
    assert remote._steps() == ([8], [])


# What `final/` holds (docs/outputs.md, "In object storage"): the final artifacts, nothing else of SFT_OUTPUT_DIR.
FINAL_FILES = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
               "adapter/report/confusion.png", "training_meta.json", "metrics.json", "run_stamp.json",
               "eval/pre_metrics.json", "eval/pre_predictions.jsonl", "eval/pre_stamp.json", "eval/post_metrics.json",
               "eval/post_predictions.jsonl", "preflight_report.json", "report/confusion.png"}
NOT_FINAL = {"checkpoints/checkpoint-2/optimizer.pt", "checkpoints/checkpoint-2/COMPLETED",
             "checkpoints.replaced-20261201-000000-000000/checkpoint-2/adapter_model.safetensors",
             "replaced-20261201-000000-000000/adapter/adapter_model.safetensors",
             "best/adapter/adapter_model.safetensors", "best/best.json", "wandb/offline-run-1/files/config.yaml",
             "wandb/debug.log", ".upload-staging/x/COMPLETED", "resume_fingerprint.json", "resume_launch.json"}


def test_the_final_upload_is_the_final_artifacts_each_written_once(bucket, tmp_path, monkeypatch):
    """Every top-level name of a real output dir next to the final artifacts (the issue found checkpoints/, best/,
    wandb/ and merged/ in final/, 13 keys in 33 PUTs): final/ is exactly the artifacts, one PUT each, COMPLETED last;
    an export's upload adds merged/; a stale object of an earlier upload does not survive."""
    root = tmp_path / "out"
    for rel in FINAL_FILES | NOT_FINAL | {"merged/model.safetensors", "merged/config.json"}:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    s3io.client().put_object(Bucket=bucket, Key="runs/run-f/final/stale.json", Body=b"from an earlier upload")
    proxy = FaultProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        remote = RemoteCheckpoints(f"s3://{bucket}/runs", "run-f", keep=2)
        for names, merged in ((FINAL_ARTIFACTS, set()), ((*FINAL_ARTIFACTS, "merged"),
                                                          {"merged/model.safetensors", "merged/config.json"})):
            proxy.requests.clear()
            remote.upload_final(root, names, step=2)
            expected = {f"runs/run-f/final/{rel}" for rel in FINAL_FILES | merged | {"COMPLETED"}}
            keys = {o["Key"] for o in s3io.list_objects(remote.s3, s3io.S3Uri(bucket, "runs/run-f/final"))}
            assert keys == expected
            puts = Counter(path.removeprefix(f"/{bucket}/") for method, path in proxy.requests if method == "PUT")
            assert puts == Counter(expected)  # each object once, nothing else written anywhere
            assert [path for method, path in proxy.requests if method == "PUT"][-1].endswith("/final/COMPLETED")
    finally:
        proxy.close()


def test_bucket_errors_are_user_errors_and_dead_endpoint_is_transient(s3_endpoint, monkeypatch):
    with pytest.raises(UserError, match="no-such-bucket"):
        s3io.probe_write(s3io.client(), s3io.S3Uri("no-such-bucket", "x"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(TransientError, match="after retries"):
        s3io.probe_write(s3io.client(), s3io.S3Uri("any", "x"))


@pytest.mark.slow
def test_missing_bucket_fails_run_before_training(s3_endpoint, tiny_assets, tmp_path, run_forked):
    env = job_env(tmp_path, tiny_assets, SFT_CHECKPOINT_URI="s3://missing-bucket/runs", **AWS_ENV,
                  AWS_ENDPOINT_URL=s3_endpoint)
    del env["SFT_RUN_ID"]  # a plain `docker run`: the run id is derived after preflight, before the store is probed
    proc = run_forked(["-m", "job", "run"], env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing-bucket" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out/checkpoints").glob("checkpoint-*"))
    derived = re.search(r"run id: (qwen3-sft-[0-9a-f]{12}) \(SFT_RUN_ID unset: derived from the data", proc.stdout)
    assert derived, proc.stdout[-2000:]


@pytest.mark.slow
def test_failed_preflight_writes_nothing_to_storage_or_hub(bucket, s3_endpoint, tiny_assets, tmp_path, run_forked):
    data = tmp_path / "data"
    shutil.copytree(tiny_assets[1], data)
    with open(data / "train.jsonl", "a") as f:
        f.write('{"id": "broken", "image": "images/train-00000.png", "query": "q", "target_json": "{not json"}\n')
    env = job_env(tmp_path, tiny_assets, SFT_DATASET_URI=str(data), SFT_TRAIN_SUBSET="100000",
                  SFT_CHECKPOINT_URI=f"s3://{bucket}/runs", SFT_HUB_REPO_ID="org/never-pushed",
                  AWS_ENDPOINT_URL=s3_endpoint, **AWS_ENV)  # HF_HUB_OFFLINE=1: any Hub call would fail differently
    proc = run_forked(["-m", "job", "run"], env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "preflight failed" in proc.stderr and "Traceback" not in proc.stderr
    line = len((data / "train.jsonl").read_text().splitlines())
    assert f"train: train.jsonl:{line}: field 'target_json'" in proc.stderr  # the appended line, named
    assert "HF_HUB_OFFLINE" not in proc.stderr  # the Hub was never asked for push access
    assert list(s3io.list_objects(s3io.client(), s3io.S3Uri(bucket, ""))) == []  # not even the write probe
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["preflight_report.json"]


def _final_keys(out: Path, final: str) -> set[str]:
    """final/'s keys for a finished run's output dir (docs/outputs.md): the files under the final artifacts' names,
    and COMPLETED; no checkpoint, W&B or staging file."""
    names = ("adapter", "eval", "report", "metrics.json", "training_meta.json", "preflight_report.json",
             "run_stamp.json")
    files = {p.relative_to(out).as_posix() for name in names for p in [out / name, *(out / name).rglob("*")]
             if p.is_file()}
    return {f"{final}/{rel}" for rel in files} | {f"{final}/COMPLETED"}


@pytest.mark.slow
def test_sigkill_then_same_run_id_resumes_from_s3(s3_resume_run, s3_endpoint):
    """Data from S3, checkpoints to S3; SIGKILL during an upload; a fresh pod (empty disk) resumes from the store.
    (Its exactness against the reference run: tests/train/test_resume_matrix.py.)"""
    run, bucket = s3_resume_run, s3_resume_run.bucket
    done, log = run.pod2, run.pod2.log
    assert done.returncode == 0, log[-3000:]
    meta = json.loads((done.out / "training_meta.json").read_text())
    assert meta["resumed_from"].endswith("checkpoint-2") and meta["global_step"] == STEPS
    assert "reusing the stored pre-eval metrics" in log
    final = f"runs/{run.run_id}/final"
    keys = {o["Key"] for o in s3io.list_objects(s3_client(s3_endpoint), s3io.S3Uri(bucket, final))}
    assert keys == _final_keys(done.out, final)
    for rel in ("adapter/adapter_model.safetensors", "adapter/README.md", "training_meta.json", "metrics.json",
                "eval/post_predictions.jsonl", "eval/pre_metrics.json", "eval/pre_stamp.json", "run_stamp.json"):
        assert f"{final}/{rel}" in keys, rel
    assert meta["dataset"]["uri"] == f"s3://{bucket}/data" and len(meta["dataset"]["version"]) == 64


@pytest.mark.slow
def test_gate_refuses_push_exit_4(pre_eval_off_run):
    """The shared run with SFT_EVAL_PRE=false also carries SFT_PUSH_MIN_METRIC=macro_f1:0.99 and S3 checkpoints."""
    run = pre_eval_off_run
    log = run.log
    assert run.returncode == 4, log[-2000:]
    assert "quality gate refused" in log and "Traceback" not in log
    metrics = json.loads((run.out / "metrics.json").read_text())
    assert metrics["gate"]["passed"] is False and "below SFT_PUSH_MIN_METRIC" in metrics["gate"]["reason"]
    assert metrics["gate"]["pushed_to"] is None
    final = f"runs/{REFERENCE['SFT_RUN_ID']}/final"
    keys = {o["Key"] for o in s3io.list_objects(s3_client(run.env["AWS_ENDPOINT_URL"]),
                                                 s3io.S3Uri(CHECKPOINT_BUCKET, final))}
    assert keys == _final_keys(run.out, final)  # artifacts kept in storage, and nothing else
    assert f"{final}/adapter/adapter_model.safetensors" in keys


def test_model_card_metadata_parses(tiny_assets, tmp_path):
    from huggingface_hub import ModelCard

    from job.cards import ModelCards
    from job.config.schema import build_cfg
    from job.prompts import Queries
    from job.storage.hub import build_model_card

    cfg = build_cfg(
        ModelCards().qwen3_vl_8b_instruct, {"SFT_DATASET_URI": "org/sarcasm", "HF_TOKEN": "hf_secret_abcdef"}
    )
    metrics = {"pre": {"accuracy": 0.5, "macro_f1": 0.4, "json_parse_rate": 0.9, "exact_match": 0.3, "n": 10},
               "post": {"accuracy": 0.9, "macro_f1": 0.85, "json_parse_rate": 1.0, "exact_match": 0.8, "n": 10}}
    lineage = {
        "base_model": "Qwen/Qwen3-VL-8B-Instruct",
        "base_model_revision": "abc123",
        "dataset_uri": "org/sarcasm",
        "dataset_is_hub": True,
        "dataset_version": "v1",
        "fingerprint": "f" * 64,
        "git_sha": None,
        "image_digest": None,
    }
    build_model_card(cfg, "run-1", metrics, lineage).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "Qwen/Qwen3-VL-8B-Instruct" and card.data.base_model_revision == "abc123"
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.datasets == ["org/sarcasm"] and "qlora" in card.data.tags
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {"accuracy": 0.9, "macro_f1": 0.85, "json_parse_rate": 1.0, "exact_match": 0.8}
    assert "model-index" in card.content and "PeftModel.from_pretrained" in card.text
    assert "hf_secret_abcdef" not in card.content
    # The default task wording is today's: sarcasm, with the seed's system prompt.
    assert card.data.tags == ["qwen3-vl", "qlora", "sft", "sarcasm-detection"]
    assert card.data.eval_results[0].dataset_name == "sarcasm eval split"
    assert card.text.startswith("\n# run-1: QLoRA adapter for Qwen/Qwen3-VL-8B-Instruct\n\nMultimodal sarcasm "
                                "detection: an image, a query and an optional caption in, a JSON verdict out.\n")
    assert cfg.data.system_prompt == Queries().SYSTEM_PROMPT and f"\n  {Queries().SYSTEM_PROMPT}\n" in card.text
    assert "- base model: `Qwen/Qwen3-VL-8B-Instruct` revision `abc123`" in card.text
    assert 'from_pretrained("Qwen/Qwen3-VL-8B-Instruct", revision="abc123", dtype="auto"' in card.text
    # No label set (generate mode without one): the labels are the training data's.
    assert "whose `label` is one of those of the training data, e.g.\n  `{\"label\": \"...\"}`" in card.text


COLOUR_METRICS = {
    "pre": None,
    "post": {"accuracy": 0.4, "macro_f1": 0.1, "json_parse_rate": 1.0, "exact_match": 0.4, "n": 12, "roc_auc": 0.6,
             "log_loss": 1.2, "ece": 0.1, "score_agreement": 1.0, "weighted_f1": 0.3,
             "per_class": {"red": {"precision": 0.4, "recall": 1.0, "f1": 0.57, "support": 5},
                           "blue": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 7}},
             "confusion_matrix": {"labels": ["blue", "red"], "columns": ["blue", "red", "unparsed"],
                                  "matrix": [[0, 7, 0], [0, 5, 0]]}},
    "label_set": {"field": "label", "labels": ["blue", "red"], "answers": {}, "scored": "full"},
    "best": {"metric": "macro_f1", "step": 5, "value": 0.38, "final_step": 20, "eval_steps": 5, "rows": 8,
             "history": [{"step": 5}, {"step": 10}, {"step": 15}, {"step": 20}]},
}
NO_REVISION = {"base_model": "Qwen/Qwen3-VL-8B-Instruct", "base_model_revision": None, "dataset_uri": "/data",
               "dataset_is_hub": False, "dataset_version": None, "fingerprint": "f" * 64, "git_sha": None,
               "image_digest": None}


def test_the_card_of_another_task(tmp_path):
    """SFT_TASK_NAME / SFT_TASK_DESCRIPTION word the card; the per-class table, the best step, the pictures (only
    when drawn), the exact prompt format and labels; and never a `revision None`."""
    from huggingface_hub import ModelCard

    from job.cards import ModelCards
    from job.config.schema import build_cfg
    from job.storage.hub import build_model_card

    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, {
        "SFT_TASK_NAME": "Colour", "SFT_TASK_DESCRIPTION": "The main colour of a photo, as JSON.",
        "SFT_HUB_REPO_ID": "org/colour", "SFT_SYSTEM_PROMPT": "Name the colour."})
    build_model_card(cfg, "run-1", COLOUR_METRICS, NO_REVISION).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert "sarcasm" not in card.content.lower()
    assert card.data.tags[-1] == "colour-classification" and card.data.eval_results[0].dataset_name == (
        "Colour eval split")
    assert {r.metric_type for r in card.data.eval_results} >= {"roc_auc", "log_loss"}
    text = card.text
    assert "The main colour of a photo, as JSON." in text and "| roc_auc | - | 0.6 |" in text
    assert "| red | 0.4000 | 1.0000 | 0.5700 | 5 |" in text and "| blue | 0 | 7 | 0 |" in text
    assert "This is the adapter of step 5: the best macro_f1 (0.3800) of 4 evals during training on 8 eval rows, " \
           "every 5 steps (SFT_EVAL_STEPS), scored from the label probabilities (no generation); " \
           "training ran to step 20." in " ".join(text.split())
    assert "None" not in card.content  # YAML and text: nothing unknown printed (base_model_revision None)
    assert "- system prompt, exactly:\n\n  ```text\n  Name the colour.\n  ```\n" in text
    assert "`CAPTION: <caption>`" in text and '"text": "<query>\\nCAPTION: <caption>"' in text
    assert "one of `blue`, `red`" in text and 'PeftModel.from_pretrained(base, "org/colour")' in text
    assert "![" not in text  # no pictures drawn: none linked
    with_pictures = {**COLOUR_METRICS, "report": {"dir": "report", "files": {"confusion": "report/confusion.png"}}}
    assert "![confusion matrices, pre and post](report/confusion.png)" in str(
        build_model_card(cfg, "run-1", with_pictures, NO_REVISION))


def test_the_cards_prompt_is_exact():
    """The card shows the system prompt verbatim (a multi-line one with backticks, in a fence that outlasts them), the
    example answer as target_text writes it, and a "How to use" code block that compiles; "" means no system turn."""
    from markdown_it import MarkdownIt

    from job.cards import ModelCards
    from job.config.schema import build_cfg
    from job.data.rows import target_text
    from job.storage.hub import build_model_card

    prompt = "Name the colour.\n\n  Answer with ```json``` only, e.g. `{...}`."
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, {"SFT_TASK_NAME": "colour", "SFT_SYSTEM_PROMPT": prompt})
    metrics = {**COLOUR_METRICS, "label_set": {**COLOUR_METRICS["label_set"], "labels": ["grün", "rot"]}}
    card = str(build_model_card(cfg, "run-1", metrics, NO_REVISION))
    fences = {t.info: t.content for t in MarkdownIt().parse(card) if t.type == "fence"}
    assert fences["text"] == prompt + "\n"
    compile(fences["python"], "how_to_use", "exec")
    assert f'"text": {json.dumps(prompt)}' in fences["python"]
    assert f"e.g.\n  `{target_text({'label': 'grün'}, 'row', 'target')}`" in card and "whose `label` is one of " \
        "`grün`, `rot`" in card
    # vLLM's server line (docs/export.md, "Serving recipes"), the 8B card's defaults: SFT_MAX_LENGTH 2048 + 256
    # new tokens, the pixel bounds 65536..1048576, LoRA r 16; no SFT_HUB_REPO_ID, so the adapter is a placeholder.
    assert fences["bash"] == (
        "python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen3-VL-8B-Instruct --enable-lora "
        "--lora-modules 'run-1=<this repo or directory>' --max-lora-rank 16 --max-model-len 2304 "
        "--limit-mm-per-prompt '{\"image\": 1}' "
        "--mm-processor-kwargs '{\"size\": {\"shortest_edge\": 65536, \"longest_edge\": 1048576}}' "
        "--override-generation-config '{\"top_k\": 1, \"max_new_tokens\": 256}'\n")
    empty = build_cfg(ModelCards().qwen3_vl_8b_instruct, {"SFT_SYSTEM_PROMPT": ""})
    card = str(build_model_card(empty, "run-1", COLOUR_METRICS, NO_REVISION))
    assert "- no system prompt (SFT_SYSTEM_PROMPT was empty)" in card and '"role": "system"' not in card


def test_gate_rules():
    from job.storage.hub import gate_decision

    pre, post = {"macro_f1": 0.6, "accuracy": 0.7}, {"macro_f1": 0.65, "accuracy": 0.6}
    assert gate_decision({"pre": pre, "post": post}, "macro_f1:0.6", True)[0] is True
    assert gate_decision({"pre": pre, "post": post}, "macro_f1:0.7", True) == (
        False,
        "post macro_f1=0.6500 is below SFT_PUSH_MIN_METRIC 0.7",
    )
    passed, reason = gate_decision({"pre": pre, "post": post}, "accuracy:0.5", True)
    assert not passed and "below pre accuracy=0.7000" in reason
    assert gate_decision({"pre": pre, "post": post}, "accuracy:0.5", False)[0] is True
    assert gate_decision({"pre": pre, "post": None}, None, True)[0] is False


def test_a_gate_on_roc_auc_is_checked_before_any_weights():
    """roc_auc:... gates on scoring mode's ROC-AUC: a run that could not measure it is exit 2 before the weights
    (config, then the label set and the eval split's labels), never a refusal (exit 4) after the training."""
    import datasets

    from job.cards import ModelCards
    from job.config.schema import build_cfg
    from job.errors import ConfigError, DataError
    from job.eval.score import LabelSet
    from job.storage.hub import gate_decision
    from job.train.prepare import check_gate_measurable

    card = ModelCards().qwen3_vl_8b_instruct
    with pytest.raises(ConfigError, match="SFT_EVAL_MODE=generate turns scoring off"):
        build_cfg(card, {"SFT_PUSH_MIN_METRIC": "roc_auc:0.8", "SFT_EVAL_MODE": "generate"})
    cfg = build_cfg(card, {"SFT_PUSH_MIN_METRIC": "roc_auc:0.8"})
    targets = [json.dumps({"label": v}) for v in ("red", "blue", "red")]
    labels = LabelSet.from_targets(targets, "label")
    with pytest.raises(DataError, match="no label set to score"):
        check_gate_measurable(cfg.hub, cfg.data, None, datasets.Dataset.from_dict({"target_json": targets}))
    with pytest.raises(DataError, match=r"one gold label \(red\), so ROC-AUC is undefined"):
        check_gate_measurable(cfg.hub, cfg.data, labels, datasets.Dataset.from_dict({"target_json": targets[:1] * 2}))
    check_gate_measurable(cfg.hub, cfg.data, labels, datasets.Dataset.from_dict({"target_json": targets}))
    weighted = build_cfg(card, {"SFT_PUSH_MIN_METRIC": "weighted_f1:0.5"})
    check_gate_measurable(weighted.hub, weighted.data, None, None)  # every eval measures it
    metrics = {"pre": {"roc_auc": 0.5}, "post": {"roc_auc": 0.75}}
    refused = (False, "post roc_auc=0.7500 is below SFT_PUSH_MIN_METRIC 0.8")
    assert gate_decision(metrics, "roc_auc:0.8", True) == refused
    assert gate_decision(metrics, "roc_auc:0.7", True) == (True, "post roc_auc=0.7500 passed (>= 0.7)")


def test_refused_gate_never_reaches_the_hub(tmp_path, monkeypatch):
    """publish with a repo set and a failing gate raises GateRefused without calling the Hub at all."""
    from job.cards import ModelCards
    from job.config.schema import build_cfg
    from job.train.finish import publish
    from job.train.prepare import RunPaths

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any Hub call would now fail loudly with a different error
    cfg = build_cfg(
        ModelCards().qwen3_vl_8b_instruct, {"SFT_HUB_REPO_ID": "org/repo", "SFT_PUSH_MIN_METRIC": "accuracy:0.9"}
    )
    paths = RunPaths(tmp_path).create()
    metrics = {"pre": {"accuracy": 0.1}, "post": {"accuracy": 0.5}}
    with pytest.raises(GateRefused, match="below SFT_PUSH_MIN_METRIC"):
        publish(cfg, paths, "run-x", None, metrics)
    assert json.loads((tmp_path / "metrics.json").read_text())["gate"]["pushed_to"] is None


def test_push_path_stops_at_hub_boundary_offline(tmp_path, monkeypatch):
    from job.storage.hub import check_push_access, push_adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        check_push_access("org/repo")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        push_adapter(tmp_path, "org/repo", True, "run-x")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match="needs HF_TOKEN"):
        check_push_access("org/repo")
