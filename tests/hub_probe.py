"""`python tests/hub_probe.py SCENARIOS_JSON`: load Hub datasets through the job's own code, one scenario each.

Run by tests/storage/test_sources.py in a fresh interpreter whose HF_ENDPOINT (read by huggingface_hub at import)
points at the loopback Hub of tests/loopback.py. Each scenario is an SFT_* environment (plus HF_TOKEN or not): the job's
`localize` downloads the snapshot with the real client, the loaders read both splits. Prints one JSON object:
scenario -> {"code": 0, "commit", "train_ids", "eval_ids", "captions", "images_exist", "labels" (with
SFT_TARGET_FORMAT=label, the label column as job/data/labels.py reads it), "targets" (the training verdicts)} or
{"code", "message"}.
No torch: the probe imports the config, storage and data layers only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from job.cards import ModelCards
from job.config.schema import build_cfg
from job.data.labels import label_column, with_verdicts
from job.data.loaders import _load_eval_dataset, load_train_dataset
from job.errors import exit_code_for
from job.storage.sources import localize


def probe(env: dict[str, str]) -> dict:
    token = env.pop("HF_TOKEN", None)
    if token:
        os.environ["HF_TOKEN"] = token
    else:
        os.environ.pop("HF_TOKEN", None)
    try:
        cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, env)
        sources = localize(cfg)
        data, path, seed = cfg.data, sources.dataset_path, cfg.train.seed
        train, evals = load_train_dataset(data, path, seed), _load_eval_dataset(data, path, seed)
        labels = label_column({"train": train, "eval": evals}, data, path)
    except Exception as exc:  # noqa: BLE001 - the scenario's outcome is its exit code and message
        return {"code": exit_code_for(exc), "message": str(exc)}
    images = [v for v in train["image"] if isinstance(v, str)]
    return {"code": 0, "commit": sources.dataset_commit, "train_ids": list(train["row_id"]),
            "eval_ids": list(evals["row_id"]), "captions": list(train[data.caption_key]),
            "images_exist": all(Path(v).is_file() for v in images),
            "labels": labels.to_json() if labels is not None else None,
            "targets": list(with_verdicts(train, labels)[data.target_key])}


if __name__ == "__main__":
    scenarios = json.loads(sys.argv[1])
    print(json.dumps({name: probe(dict(env)) for name, env in scenarios.items()}))
