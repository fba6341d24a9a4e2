"""The push to the Hub and its check before training (job/storage/hub.py), through huggingface_hub's real client
against the loopback Hub of tests/loopback.py: each status the Hub answers, and the exit code docs/operations.md's
table gives it (the codes below are literals from that table: 2 user error, 3 transient, 143 preempted)."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import yaml
from loopback import Account, free_port, serve_hub

from job import errors
from job.cards import ModelCards
from job.config.schema import build_cfg
from job.errors import Preempted, UserError, find_job_error
from job.storage import hub
from job.train.preemption import PreemptionGuard

CARD = ModelCards().qwen3_vl_8b_instruct
ACCOUNTS = {
    "hf_write": Account("me", orgs={"org": "write", "readers": "read"}),
    "hf_read": Account("me", role="read", token_name="read-only"),
    "hf_scoped": Account("me", role="fineGrained", scoped={"me/other": ("repo.content.read", "repo.write")},
                         token_name="scoped"),
}
TOO_BIG = "The file weights.bin is too large to be pushed as a regular file: use Git LFS"


@pytest.fixture()
def loopback(monkeypatch, tmp_path):
    """The loopback Hub with the accounts above; `me/existing` exists. HF_TOKEN is the write token."""
    with serve_hub(accounts=ACCOUNTS, namespaces=("readers", "others"),
                   rejects={"weights.bin": (422, TOO_BIG)}) as server:
        monkeypatch.setattr(hub_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", "hf_write")
        hub.push_adapter(_folder(tmp_path / "seed", {"adapter_config.json": "{}"}), "me/existing", True, "seed")
        yield server


def _folder(where: Path, files: dict[str, str]) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (where / name).write_text(text)
    return where


def _files(server, repo_id: str) -> dict[str, bytes]:
    repo = server.repos[repo_id]
    return repo.commits[repo.refs["main"]]


def _code_and_message(call) -> tuple[int, str]:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the outcome is the exit code and the message the job would print
        found = find_job_error(exc)
        return errors.exit_code_for(exc), str(found if found is not None else exc)
    return 0, ""


# -- the card -------------------------------------------------------------------------------------------------------
METRICS = {"pre": {"accuracy": 0.5, "macro_f1": 0.4, "n": 4}, "post": {"accuracy": 0.75, "macro_f1": 0.7, "n": 4}}


@pytest.mark.parametrize("base, said", [("/models/qwen3-vl-8b", "a local copy"),
                                        ("s3://models/qwen3-vl-8b", "an s3:// copy")])
def test_a_card_of_a_non_hub_base_model_is_accepted_and_says_what_the_base_was(loopback, tmp_path, base, said):
    """The Hub refuses (400) a card whose base_model is not a Hub model id; SFT_MODEL_ID may be a local path or an
    s3:// URI, so the card leaves base_model out of its metadata and names the base in its text."""
    cfg = build_cfg(CARD, {"SFT_MODEL_ID": base})
    lineage = {"base_model": base, "base_model_revision": "abc123", "dataset_uri": "/data", "fingerprint": "f"}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    hub.build_model_card(cfg, "run-1", METRICS, lineage).save(adapter / "README.md")
    (adapter / "adapter_config.json").write_text("{}")
    url = hub.push_adapter(adapter, "me/adapter", True, "run-1")
    assert url.startswith(f"{loopback.url}/me/adapter/commit/")
    pushed = _files(loopback, "me/adapter")
    assert set(pushed) == {"README.md", "adapter_config.json"}
    text = pushed["README.md"].decode()
    meta = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
    assert "base_model" not in meta and "base_model_revision" not in meta
    assert f"- base model: `{base}` revision `abc123`, {said} (SFT_MODEL_ID), not a Hub model id" in text


def test_a_hub_base_model_stays_in_the_card_metadata(loopback, tmp_path):
    cfg = build_cfg(CARD, {"SFT_MODEL_ID": "Qwen/Qwen3-VL-8B-Instruct"})
    card = hub.build_model_card(cfg, "run-1", METRICS, {"base_model": "Qwen/Qwen3-VL-8B-Instruct",
                                                        "base_model_revision": "abc123"})
    assert card.data.base_model == "Qwen/Qwen3-VL-8B-Instruct" and card.data.base_model_revision == "abc123"
    assert "- base model: `Qwen/Qwen3-VL-8B-Instruct` revision `abc123`\n" in card.text


# -- each status of the push ---------------------------------------------------------------------------------------
BAD_CARD = "---\nbase_model: /models/qwen3-vl-8b\nlibrary_name: peft\n---\n\n# a card\n"


@pytest.mark.parametrize("token, repo, files, code, names", [
    # 400: the card's metadata (the file and the field the Hub names)
    ("hf_write", "me/adapter", {"README.md": BAD_CARD}, 2, ("HTTP 400", "README.md", "base_model")),
    # 422: a file the Hub refuses
    ("hf_write", "me/adapter", {"weights.bin": "x"}, 2, ("HTTP 422", "weights.bin")),
    ("hf_nobody", "me/adapter", {"a.json": "{}"}, 2, ("401",)),  # a token the Hub does not know
    ("hf_read", "me/existing", {"a.json": "{}"}, 2, ("403",)),  # a read-only token, on a repo that exists
    ("hf_write", "readers/adapter", {"a.json": "{}"}, 2, ("403",)),  # the user may only read in that org
    ("hf_write", "nowhere/adapter", {"a.json": "{}"}, 2, ("404",)),  # no such namespace
    ("hf_write", "org/down", {"a.json": "{}"}, 3, ("503",)),  # the Hub is down
])
def test_each_status_of_the_push_has_its_code(loopback, monkeypatch, tmp_path, token, repo, files, code, names):
    monkeypatch.setenv("HF_TOKEN", token)
    folder = _folder(tmp_path / "push", files)
    got, message = _code_and_message(lambda: hub.push_adapter(folder, repo, True, "run-1"))
    assert got == code, message
    assert f"Hub push to {repo} (SFT_HUB_REPO_ID)" in message and "\n" not in message, message
    for name in names:
        assert name in message, message
    assert all(set(files).isdisjoint(_files(loopback, r)) for r in loopback.repos)  # nothing landed


def test_a_refused_connection_is_transient(monkeypatch, tmp_path):
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_write")
    got, message = _code_and_message(lambda: hub.push_adapter(tmp_path, "me/adapter", True, "run-1"))
    assert got == 3 and "me/adapter" in message, message
    got, message = _code_and_message(lambda: hub.check_push_access("me/adapter"))
    assert got == 3 and "SFT_HUB_REPO_ID=me/adapter" in message, message


# -- the check before training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("token, repo, code, names", [
    ("hf_write", "me/adapter", 0, ()),  # the user's own namespace; the push creates the repo
    ("hf_write", "me/existing", 0, ()),
    ("hf_write", "org/new", 0, ()),  # an organisation where the user may write
    ("hf_read", "me/adapter", 2, ("read-only token", "'read-only'")),
    ("hf_scoped", "me/adapter", 2, ("fine-grained token without the repo.write permission", "'me/adapter'")),
    ("hf_scoped", "me/other", 0, ()),
    ("hf_write", "readers/adapter", 2, ("has the role 'read' in 'readers'",)),
    ("hf_write", "others/adapter", 2, ("is not a member of 'others'",)),
    ("hf_nobody", "me/adapter", 2, ("401",)),
    ("hf_write", "org/down", 3, ("503",)),  # whoami answers, the repo's metadata does not
])
def test_push_access_is_checked_before_training(loopback, monkeypatch, token, repo, code, names):
    monkeypatch.setenv("HF_TOKEN", token)
    got, message = _code_and_message(lambda: hub.check_push_access(repo))
    assert got == code, message
    if code:
        assert f"SFT_HUB_REPO_ID={repo}" in message and "\n" not in message, message
    for name in names:
        assert name in message, message


def test_the_export_repo_is_named_in_its_check(loopback, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_read")
    with pytest.raises(UserError, match=r"SFT_EXPORT_REPO_ID=me/merged: HF_TOKEN \('read-only'\) is a read-only token"):
        hub.check_push_access("me/merged", "SFT_EXPORT_REPO_ID")


# -- a signal during the push ----------------------------------------------------------------------------------------
def test_a_signal_during_the_push_is_preempted_143(monkeypatch, tmp_path):
    """SIGTERM while the Hub holds the commit: the guard's Preempted reaches the contract (143), not the push's own
    error handling (it was exit 3), and the commit never lands."""
    released = threading.Event()

    def signal_then_hold(repo_id: str, files: dict[str, bytes]) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        released.wait(30)  # failsafe: the test releases it once the push has raised

    with serve_hub(accounts=ACCOUNTS, on_commit=signal_then_hold) as server:
        monkeypatch.setattr(hub_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", "hf_write")
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
        guard = PreemptionGuard(3600)  # the watchdog must not end this process: disarmed below
        try:
            with pytest.raises(Preempted) as raised, guard:
                hub.push_adapter(tmp_path, "me/adapter", True, "run-1")
        finally:
            released.set()
            guard.disarm()
        assert guard.signal == signal.SIGTERM
        assert errors.exit_code_for(raised.value) == 143
        assert _files(server, "me/adapter") == {}  # created, nothing committed
