"""job/utils/redact.py: secrets never reach logs, metadata, W&B config or model cards."""

from __future__ import annotations

import io
import logging

import pytest

from job.utils.redact import (
    REDACTED,
    SECRET_ENV_VARS,
    THIRD_PARTY_LOG_NOISE,
    SecretFilter,
    redact,
    scrub,
    secret_values,
    setup_logging,
)

TOKEN = "hf_supersecret123"


@pytest.fixture(autouse=True)
def _no_secret_env(monkeypatch):
    """Secrets in the shell running pytest must not change what these tests see."""
    for name in SECRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def capture_logger():
    """A private logger whose only handler carries SecretFilter and writes formatted output to a buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(SecretFilter())
    logger = logging.getLogger("test_redact.capture")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    yield logger, buf
    logger.removeHandler(handler)


# ------------------------------------------------------------------------------------------ key rules


@pytest.mark.parametrize("key", [
    "hf_token", "HF_TOKEN", "wandb_api_key", "aws_secret_access_key", "aws_access_key_id", "aws_session_token",
    "token", "password", "db_passwd", "client_secret", "credentials", "gcp_credential",
])
def test_secret_keys_are_blanked(key):
    out = redact({key: "some-value-here", "other": "kept"}, secrets=[])
    assert out == {key: REDACTED, "other": "kept"}


@pytest.mark.parametrize("key", [
    "max_new_tokens", "stop_tokens", "num_tokens", "tokenizer", "token_count", "pad_token_id", "api_key_hint",
    "learning_rate", "secretary", "passwordless",
])
def test_ordinary_keys_are_kept(key):
    assert redact({key: 256}, secrets=[]) == {key: 256}


def test_realistic_cfg_keeps_token_settings():
    cfg = {
        "eval": {"max_new_tokens": 256, "stop_tokens": ["<|im_end|>", "<|endoftext|>"]},
        "hub": {"hf_token": TOKEN, "repo": "org/model"},
        "wandb": {"wandb_api_key": "0123456789abcdef", "enabled": True},
        "s3": [{"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG", "bucket": "b"}],
    }
    out = redact(cfg, secrets=[])
    assert out["eval"] == cfg["eval"]
    assert out["hub"] == {"hf_token": REDACTED, "repo": "org/model"}
    assert out["wandb"] == {"wandb_api_key": REDACTED, "enabled": True}
    assert out["s3"] == [{"aws_secret_access_key": REDACTED, "bucket": "b"}]


@pytest.mark.parametrize("empty", [None, ""])
def test_unset_secret_key_is_left_as_is(empty):
    """A missing token shows as missing (useful when debugging auth), not as a redacted value."""
    assert redact({"hf_token": empty}, secrets=[]) == {"hf_token": empty}


def test_redact_returns_copy_and_keeps_types():
    cfg = {"hub": {"hf_token": TOKEN}, "modules": ("q_proj", "v_proj"), "steps": 7, "lr": 2e-4, "flag": True}
    out = redact(cfg, secrets=[])
    assert cfg["hub"]["hf_token"] == TOKEN  # input untouched
    assert out is not cfg and out["hub"] is not cfg["hub"]
    assert isinstance(out["modules"], tuple) and out["modules"] == ("q_proj", "v_proj")
    assert out["steps"] == 7 and out["lr"] == 2e-4 and out["flag"] is True


# ---------------------------------------------------------------------------------------- value rules


def test_secret_value_from_env_is_scrubbed_from_nested_strings(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    obj = {
        "cmd": ["--push", f"https://user:{TOKEN}@huggingface.co/org/model"],
        "notes": ({"msg": f"using {TOKEN} twice: {TOKEN}"},),
        "plain": "nothing secret",
        "count": 3,
    }
    out = redact(obj)  # secrets=None: read from os.environ
    assert TOKEN not in repr(out)
    assert out["cmd"][1] == f"https://user:{REDACTED}@huggingface.co/org/model"
    assert out["notes"][0]["msg"] == f"using {REDACTED} twice: {REDACTED}"
    assert out["plain"] == "nothing secret"
    assert out["count"] == 3


def test_every_secret_env_var_is_scrubbed(monkeypatch):
    values = {name: f"value-of-{name.lower()}-0123" for name in SECRET_ENV_VARS}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    text = " ".join(values.values())
    out = redact({"log": text})["log"]
    assert all(v not in out for v in values.values())
    assert out.count(REDACTED) == len(SECRET_ENV_VARS)


def test_secret_values_reads_only_secret_vars_and_skips_short_ones():
    env = {"HF_TOKEN": TOKEN, "WANDB_API_KEY": "abc", "AWS_SESSION_TOKEN": "", "SFT_MODEL_ID": "Qwen/Qwen3-VL-8B"}
    assert secret_values(env) == [TOKEN]


def test_secret_values_defaults_to_os_environ(monkeypatch):
    assert secret_values() == []
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert secret_values() == ["0123456789abcdef"]


def test_short_secret_values_do_not_redact_ordinary_words(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "a")
    assert redact({"split": "validation"}) == {"split": "validation"}


def test_scrub_with_explicit_secrets():
    assert scrub(f"a {TOKEN} b {TOKEN}", [TOKEN]) == f"a {REDACTED} b {REDACTED}"
    assert scrub("no secret here", [TOKEN]) == "no secret here"
    assert scrub(TOKEN, []) == TOKEN


# ---------------------------------------------------------------------------------------- SecretFilter


def test_secret_filter_scrubs_message_and_args(monkeypatch, capture_logger):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    logger, buf = capture_logger
    logger.info("logging in with %s", TOKEN)
    logger.warning(f"inline {TOKEN}")
    out = buf.getvalue()
    assert TOKEN not in out
    assert f"INFO logging in with {REDACTED}" in out
    assert f"WARNING inline {REDACTED}" in out


def test_secret_filter_scrubs_exception_traceback(monkeypatch, capture_logger):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    logger, buf = capture_logger
    try:
        raise RuntimeError(f"401 for token {TOKEN}")
    except RuntimeError:
        logger.exception("upload failed")
    out = buf.getvalue()
    assert "upload failed" in out and "Traceback" in out and "RuntimeError: 401 for token" in out
    assert TOKEN not in out


def test_secret_filter_scrubs_stack_info(monkeypatch, capture_logger):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    logger, buf = capture_logger

    def hf_supersecret123_frame():  # the token appears in the stack text as a function name
        logger.warning("here", stack_info=True)

    hf_supersecret123_frame()
    out = buf.getvalue()
    assert "Stack (most recent call last)" in out
    assert TOKEN not in out


def test_secret_filter_with_caplog(monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.handler.addFilter(SecretFilter())
    try:
        with caplog.at_level(logging.INFO, logger="test_redact.caplog"):
            logging.getLogger("test_redact.caplog").info("token=%s", TOKEN)
    finally:
        caplog.handler.filters.clear()
    assert TOKEN not in caplog.text
    assert [r.getMessage() for r in caplog.records] == [f"token={REDACTED}"]


def test_secret_filter_never_drops_records_and_leaves_them_alone_without_secrets():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "value %s", ("abc",), None)
    assert SecretFilter().filter(record) is True
    assert record.msg == "value %s" and record.args == ("abc",)


def test_setup_logging_installs_one_secret_filter(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    root = logging.getLogger()
    before_handlers, before_level = list(root.handlers), root.level
    try:
        setup_logging()
        setup_logging()  # idempotent
        added = [h for h in root.handlers if h not in before_handlers]
        with_filter = [h for h in root.handlers if any(isinstance(f, SecretFilter) for f in h.filters)]
        assert len(with_filter) == 1
        assert len(added) <= 1
        logging.getLogger("job.test").warning("token %s", TOKEN)
        err = capsys.readouterr().err
        if added:  # our handler wrote to the (captured) stderr
            assert f"token {REDACTED}" in err
        assert TOKEN not in err
    finally:
        for h in list(root.handlers):
            if h not in before_handlers:
                root.removeHandler(h)
        root.setLevel(before_level)


def test_setup_logging_drops_only_the_named_library_noise(monkeypatch, capsys):
    """bitsandbytes' kernels-community notice goes; any other record of that logger, and the same text from another
    logger, still prints."""

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    setup_logging()
    name, prefix = THIRD_PARTY_LOG_NOISE[0]
    logging.getLogger(name).warning("%s: No module named 'kernels'", prefix)
    logging.getLogger(name).warning("a real bitsandbytes problem")
    logging.getLogger("job.other").warning("%s: quoted elsewhere", prefix)
    err = capsys.readouterr().err
    assert "No module named 'kernels'" not in err
    assert "a real bitsandbytes problem" in err and "quoted elsewhere" in err
    setup_logging()  # idempotent: one filter per logger
    assert len(logging.getLogger(name).filters) == 1
