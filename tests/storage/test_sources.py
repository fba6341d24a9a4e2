"""Hub datasets through the real huggingface_hub client (issue 18): a loopback server speaking the Hub's endpoints
(tests/loopback.py), HF_ENDPOINT pointed at it, no patched functions.

HF_ENDPOINT is read when huggingface_hub is imported, so the clients run in fresh interpreters (not the zygote of
tests/runs.py), both started when the module's first test needs them and run side by side:
- one probe process (tests/hub_probe.py: config, storage and data layers, no torch) tries every scenario: a revision
  pin over two commits, the default branch, `hf://datasets/...` with a folder, SFT_DATASET_CONFIG, push_to_hub's
  `data/` parquet shards, an imagefolder in a private repo with and without HF_TOKEN, a Hub answering 503;
- one `python -m job preflight` on the pinned revision: the early repo check, the download and the printed commit.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, SARCASM_QUERY, job_env, sarcasm_card_dataset
from loopback import Repo, commit_sha, serve_hub
from PIL import Image

TOKEN = "hf_loopback_reader_token"
V1, V2 = commit_sha("pinned-v1"), commit_sha("pinned-v2")
pytestmark = pytest.mark.slow  # fresh interpreters


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64 + seed % 7, 48), ((seed * 40) % 256, 90, 160)).save(buf, "PNG")
    return buf.getvalue()


def _row(i: int, tag: str) -> dict:
    return {"query": "Is this post sarcastic?", "caption": f"{tag} post {i}",
            "target_json": json.dumps({"label": ("sarcastic", "not_sarcastic")[i % 2]})}


def _parquet(rows: int, tag: str, start: int = 0) -> bytes:
    """A parquet shard as push_to_hub writes it: the images embedded as bytes."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), **{k: datasets.Value("string") for k in
                                                                ("query", "caption", "target_json")}})
    ds = datasets.Dataset.from_list([{"image": {"bytes": _png(i), "path": None}, **_row(i, tag)}
                                     for i in range(start, start + rows)], features=features)
    buf = io.BytesIO()
    ds.to_parquet(buf)
    return buf.getvalue()


def _shards(prefix: str, train: int, tag: str) -> dict[str, bytes]:
    return {f"{prefix}train-00000-of-00001.parquet": _parquet(train, tag),
            f"{prefix}validation-00000-of-00001.parquet": _parquet(2, tag, 100)}


def _imagefolder() -> dict[str, bytes]:
    files = {}
    for split, n, start in (("train", 4, 0), ("validation", 2, 100)):
        rows = [{"file_name": f"{i}.png", **_row(i, "img")} for i in range(start, start + n)]
        files.update({f"{split}/{r['file_name']}": _png(i) for i, r in zip(range(start, start + n), rows, strict=True)})
        files[f"{split}/metadata.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return files


# The configurations a dataset card declares: by data_files per split, and by data_dir.
CONFIGS_CARD = b"""---
configs:
- config_name: french
  data_files:
  - split: train
    path: sarcasm/fr/train-*
  - split: validation
    path: sarcasm/fr/validation-*
- config_name: english
  data_dir: sarcasm/en
---
"""


def _repos(sarcasm: dict[str, bytes]) -> dict[str, Repo]:
    readme = {"README.md": b"---\nlicense: mit\n---\n"}
    return {
        # #35: the public sarcasm datasets' shape (tests/helpers.py sarcasm_card_dataset), configurations en and zh.
        "org/sarcasm": Repo({commit_sha("sarcasm"): sarcasm}, {"main": commit_sha("sarcasm")}),
        # Two commits: v1 (a tag) has 5 training rows, main moved on to 7. The pinned one is what is read.
        "org/pinned": Repo({V1: {**readme, **_shards("data/", 5, "v1")}, V2: {**readme, **_shards("data/", 7, "v2")}},
                           {"main": V2, "v1": V1}),
        "org/nested": Repo({commit_sha("nested"): {"README.md": CONFIGS_CARD, **_shards("sarcasm/fr/", 3, "fr"),
                                                   **_shards("sarcasm/en/", 4, "en")}},
                           {"main": commit_sha("nested")}),
        # One split on the Hub (push_to_hub of a single Dataset): the eval rows are held out of it.
        "org/train-only": Repo({commit_sha("train-only"): {"data/train-00000-of-00001.parquet": _parquet(20, "one")}},
                               {"main": commit_sha("train-only")}),
        "org/secret-images": Repo({commit_sha("images"): _imagefolder()}, {"main": commit_sha("images")}, TOKEN),
    }


SCENARIOS = {
    "pinned": {"SFT_DATASET_URI": "org/pinned", "SFT_DATASET_REVISION": "v1"},
    "pinned_by_commit": {"SFT_DATASET_URI": "hf://datasets/org/pinned", "SFT_DATASET_REVISION": V1},
    "default_branch": {"SFT_DATASET_URI": "org/pinned"},
    "folder_and_config": {"SFT_DATASET_URI": "hf://datasets/org/nested/sarcasm", "SFT_DATASET_CONFIG": "fr"},
    "declared_config": {"SFT_DATASET_URI": "org/nested", "SFT_DATASET_CONFIG": "french"},
    "declared_data_dir": {"SFT_DATASET_URI": "org/nested", "SFT_DATASET_CONFIG": "english"},
    "unknown_config": {"SFT_DATASET_URI": "hf://datasets/org/nested/sarcasm", "SFT_DATASET_CONFIG": "de"},
    "unknown_revision": {"SFT_DATASET_URI": "org/pinned", "SFT_DATASET_REVISION": "v9"},
    "one_split": {"SFT_DATASET_URI": "org/train-only", "SFT_EVAL_HOLDOUT": "4"},
    "private_with_token": {"SFT_DATASET_URI": "org/secret-images", "HF_TOKEN": TOKEN},
    "private_without_token": {"SFT_DATASET_URI": "org/secret-images"},
    "private_wrong_token": {"SFT_DATASET_URI": "org/secret-images", "HF_TOKEN": "hf_wrong"},
    "gated": {"SFT_DATASET_URI": "org/gated"},
    "hub_down": {"SFT_DATASET_URI": "org/down"},
    "class_labels": {"SFT_DATASET_URI": "org/sarcasm", "SFT_DATASET_CONFIG": "zh", "SFT_TARGET_FORMAT": "label",
                     "SFT_TARGET_KEY": "text_label", "SFT_QUERY_TEXT": SARCASM_QUERY, "SFT_CAPTION_KEY": "text",
                     "SFT_EVAL_SPLIT": "test"},
    "unknown_language": {"SFT_DATASET_URI": "org/sarcasm", "SFT_DATASET_CONFIG": "zhh"},
}


@pytest.fixture(scope="module")
def hub_runs(tiny_assets, tmp_path_factory):
    """Both processes, side by side: (probe results, the preflight's CompletedProcess, its directory)."""
    tmp = tmp_path_factory.mktemp("hub")
    built = sarcasm_card_dataset(tmp / "sarcasm")
    sarcasm = {p.relative_to(built).as_posix(): p.read_bytes() for p in sorted(built.rglob("*")) if p.is_file()}
    with serve_hub(_repos(sarcasm)) as hub:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SFT_", "HF_"))}
        base.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp / "hf"), HF_HUB_DISABLE_XET="1",
                    PYTHONPATH=str(REPO), HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
        probe_env = {**base, "HF_HOME": str(tmp / "hf-probe")}
        probe = subprocess.Popen([sys.executable, str(REPO / "tests" / "hub_probe.py"), json.dumps(SCENARIOS)],
                                 env=probe_env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        env = job_env(tmp, tiny_assets, base, SFT_DATASET_URI="org/pinned", SFT_DATASET_REVISION="v1",
                      HF_HUB_OFFLINE="0")
        preflight = subprocess.Popen([sys.executable, "-m", "job", "preflight"], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = probe.communicate(timeout=300)
        assert probe.returncode == 0, err[-3000:]
        pre_out, pre_err = preflight.communicate(timeout=300)
        yield json.loads(out.splitlines()[-1]), (preflight.returncode, pre_out, pre_err), tmp, list(hub.requests)


def test_a_revision_pin_reads_the_pinned_commit(hub_runs):
    results = hub_runs[0]
    for name in ("pinned", "pinned_by_commit"):
        pinned = results[name]
        assert pinned["code"] == 0 and pinned["commit"] == V1, pinned
        assert len(pinned["train_ids"]) == 5 and all(c.startswith("v1 ") for c in pinned["captions"])
        assert pinned["train_ids"][0] == "train[0]" and len(pinned["eval_ids"]) == 2  # push_to_hub's data/ shards
    head = results["default_branch"]
    assert head["commit"] == V2 and len(head["train_ids"]) == 7 and head["captions"][0].startswith("v2 ")


def test_a_folder_of_the_repo_and_a_named_configuration(hub_runs):
    results = hub_runs[0]
    fr = results["folder_and_config"]
    assert fr["code"] == 0 and len(fr["train_ids"]) == 3 and fr["captions"][0].startswith("fr ")
    french, english = results["declared_config"], results["declared_data_dir"]
    assert french["code"] == 0 and len(french["train_ids"]) == 3 and french["captions"][0].startswith("fr "), french
    assert english["code"] == 0 and len(english["train_ids"]) == 4 and english["captions"][0].startswith("en "), english
    unknown = results["unknown_config"]
    assert unknown["code"] == 2 and "SFT_DATASET_CONFIG='de'" in unknown["message"] and "en, fr" in unknown["message"]
    assert results["unknown_revision"]["code"] == 2 and "org/pinned" in results["unknown_revision"]["message"]


def test_the_cards_configuration_and_class_labels_of_a_hub_dataset(hub_runs):
    """#35 on the Hub: the card's `zh` configuration (data_files globs per split, its `test` split evaluated) and its
    ClassLabel names, read as from a local directory or an s3:// mirror (tests/data/test_labels.py)."""
    found = hub_runs[0]["class_labels"]
    assert found["code"] == 0, found
    assert found["train_ids"] == [f"train[{i}]" for i in range(6)] and len(found["eval_ids"]) == 2
    assert found["captions"] == [f"zh post {i} of train" for i in range(6)]
    assert found["labels"] == {"column": "text_label", "format": "label", "kind": "class_label", "label_field": "label",
                               "names": ["non-sarcastic", "sarcastic"], "names_from": "the column's ClassLabel feature"}
    assert found["targets"] == ['{"label": "non-sarcastic"}', '{"label": "sarcastic"}'] * 3
    unknown = hub_runs[0]["unknown_language"]
    assert unknown["code"] == 2 and unknown["message"] == (
        "SFT_DATASET_CONFIG='zhh': SFT_DATASET_URI='org/sarcasm' (no such local path, so the Hub dataset "
        "org/sarcasm) declares no such configuration and has no such folder (it has: en, zh); did you mean 'zh'? "
        "unset it or name one of them")


def test_a_hub_dataset_with_one_split_is_held_out(hub_runs):
    one = hub_runs[0]["one_split"]
    assert one["code"] == 0 and len(one["eval_ids"]) == 4 and len(one["train_ids"]) == 16, one
    assert not set(one["eval_ids"]) & set(one["train_ids"])


def test_a_private_imagefolder_needs_the_token(hub_runs):
    results = hub_runs[0]
    ok = results["private_with_token"]
    assert ok["code"] == 0 and ok["train_ids"][0] == "train/metadata.jsonl:1" and ok["images_exist"], ok
    for name in ("private_without_token", "private_wrong_token", "gated"):
        failed = results[name]
        repo = SCENARIOS[name]["SFT_DATASET_URI"]
        assert failed["code"] == 2 and f"SFT_DATASET_URI='{repo}'" in failed["message"], failed
    assert "HF_TOKEN" in results["private_without_token"]["message"]


def test_a_hub_answering_503_is_transient(hub_runs):
    down = hub_runs[0]["hub_down"]
    assert down["code"] == 3 and "org/down" in down["message"], down


def test_preflight_checks_the_repo_downloads_the_pin_and_prints_its_commit(hub_runs):
    _, (code, out, err), tmp, requests = hub_runs
    assert code == 0, err[-3000:]
    assert f"dataset: Hub org/pinned revision v1 = commit {V1}" in out
    report = json.loads((tmp / "out" / "preflight_report.json").read_text())
    assert report["ok"] and report["splits"]["train"]["rows"] == 5
    assert ("GET", "/api/datasets/org/pinned/revision/v1") in requests  # the early check, before the processor
    snapshot = tmp / "hf" / "hub" / "datasets--org--pinned" / "snapshots" / V1
    assert (snapshot / "data" / "train-00000-of-00001.parquet").is_file()
