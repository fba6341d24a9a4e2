"""What the job sends to W&B, read back from a real offline run's own log (`run-<id>.wandb`), in-process: one run
costs about 2 s (wandb-core starts, writes, exits)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import wandb
from wandb.proto.wandb_internal_pb2 import Record

from job.utils.tracking import finish, init_wandb, log_confusion_matrix, log_metrics

# The .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB-log records in 32 KiB blocks, each
# record a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) before its bytes, a block's tail
# shorter than a header zero-padded; the records are wandb_internal_pb2.Record protobufs.
BLOCK, HEADER = 32768, 7


def wandb_records(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:HEADER]
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left < HEADER or (kind == 0 and length == 0):
            pos += left  # the zero padding to the next block
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


CONFUSION = {"labels": ["blue", "red"], "columns": ["blue", "red", "unparsed"], "matrix": [[0, 7, 0], [1, 4, 0]]}
POST = {"n": 12, "accuracy": 0.33, "roc_auc": None, "eval_mode": "both", "scored": True, "confusion_matrix": CONFUSION,
        "calibration": {"bins": [{"lo": 0.0, "hi": 0.1, "count": 0, "confidence": None, "accuracy": None}]},
        "per_class": {"blue": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 7},
                      "red": {"precision": 0.36, "recall": 0.8, "f1": 0.5, "support": 5}}}


def test_wandb_gets_scalars_per_class_and_the_confusion_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = init_wandb("track-1", {"lr": 1e-4}, enabled=True, output_dir=str(tmp_path))
    try:
        log_metrics(run, "gen_eval/post_", POST)
        log_confusion_matrix(run, "gen_eval/post_confusion_matrix", CONFUSION)
    finally:
        finish(run)
        wandb.teardown()  # the service process ends here, not at pytest's exit
    (log,) = tmp_path.glob("wandb/offline-run-*-track-1/run-track-1.wandb")
    records = wandb_records(log)
    metrics, matrix = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                       for r in records if r.WhichOneof("record_type") == "history"]
    ours = {k: v for k, v in metrics.items() if not k.startswith("_")}
    assert ours == {"gen_eval/post_n": 12, "gen_eval/post_accuracy": 0.33,
                    **{f"gen_eval/post_per_class/{label}/{k}": v for label, c in POST["per_class"].items()
                       for k, v in c.items()}}
    # Each a single key with a number: W&B charts it (a nested dict would be split into keys, a None dropped).
    assert all(type(v) in (int, float) for v in ours.values())
    # The matrix as a W&B table, its file beside the run's other media: rows gold, columns predicted and unparsed.
    # (W&B splits the table's reference into one item per field: nested_key [key, field].)
    table = {k.split("/", 2)[2]: v for k, v in matrix.items() if k.startswith("gen_eval/post_confusion_matrix/")}
    assert table["_type"] == "table-file" and (table["nrows"], table["ncols"]) == (2, 4), table
    saved = json.loads((log.parent / "files" / table["path"]).read_text())
    assert saved == {"columns": ["gold", "blue", "red", "unparsed"], "data": [["blue", 0, 7, 0], ["red", 1, 4, 0]]}


def test_no_run_logs_nothing():
    """W&B off (init_wandb returned None): every call is a no-op."""
    log_metrics(None, "gen_eval/post_", POST)
    log_confusion_matrix(None, "gen_eval/post_confusion_matrix", CONFUSION)
    finish(None)
