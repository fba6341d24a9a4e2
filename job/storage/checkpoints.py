"""Checkpoints in object storage: `{uri}/{run_id}/checkpoint-N/`, valid only once `COMPLETED` is written last.

Upload runs on one background thread so training continues while the previous checkpoint goes up. The Trainer's
files are hard-linked into a staging snapshot first: the Trainer may rotate (delete) its local checkpoint while the
upload is still running, and it never rewrites a file in place, so the links stay valid.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from job.storage import s3 as s3io
from job.storage.completed import COMPLETED, checkpoint_step, write_completed_marker

log = logging.getLogger(__name__)
UPLOAD_ATTEMPTS = 3  # whole-checkpoint attempts, each after botocore's per-request retries (job/storage/s3.py)


class RemoteCheckpoints:
    def __init__(self, uri: str, run_id: str, keep: int, client=None, concurrency: int = s3io.DEFAULT_CONCURRENCY):
        self.run_uri = s3io.S3Uri.parse(uri).child(run_id)
        self.keep = keep
        self.concurrency = concurrency  # parallel transfers per file (SFT_S3_CONCURRENCY)
        self.s3 = client or s3io.client()

    def _steps(self) -> tuple[list[int], list[int]]:
        """(complete, incomplete) checkpoint steps under the run prefix, ascending."""
        keys = [o["Key"][len(self.run_uri.prefix) + 1:] for o in s3io.list_objects(self.s3, self.run_uri)]
        dirs = {k.split("/", 1)[0] for k in keys if k.startswith("checkpoint-") and "/" in k}
        done = {k.split("/", 1)[0] for k in keys if k.endswith(f"/{COMPLETED}")}
        steps = sorted((checkpoint_step(Path(d)), d in done) for d in dirs if checkpoint_step(Path(d)) >= 0)
        return [s for s, ok in steps if ok], [s for s, ok in steps if not ok]

    def upload(self, local: Path, step: int) -> None:
        target = self.run_uri.child(f"checkpoint-{step}")
        started = time.monotonic()

        def upload_all() -> dict[str, int]:
            # A prefix left by an interrupted upload of the same step (another pod, killed mid-upload) may hold
            # objects this checkpoint does not have: the new one replaces it rather than merging into it.
            s3io.delete_prefix(self.s3, target)
            sizes = s3io.upload_dir(self.s3, local, target, skip=(COMPLETED,), concurrency=self.concurrency)
            s3io.verify_sizes(self.s3, target, sizes)  # every object there, whole, before the marker
            return sizes

        sizes = s3io.with_retries(f"upload of checkpoint-{step}", upload_all, UPLOAD_ATTEMPTS)
        # Written last: a reader that sees COMPLETED knows every object above is whole.
        s3io.put_text(
            self.s3,
            target,
            target.key(COMPLETED),
            json.dumps({"step": step, "objects": len(sizes), "time": time.time()}),
        )
        log.info("checkpoint-%d uploaded to %s (%d objects, %.1fs, %d request retries)", step, target, len(sizes),
                 time.monotonic() - started, s3io.retries_taken(self.s3))
        self.apply_retention()

    def apply_retention(self) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones and stale incomplete prefixes."""
        complete, incomplete = self._steps()
        if not complete:
            return
        newest = complete[-1]
        doomed = complete[:-self.keep] + [s for s in incomplete if s < newest]
        for step in doomed:
            s3io.delete_prefix(self.s3, self.run_uri.child(f"checkpoint-{step}"))
            log.info("retention: deleted %s/checkpoint-%d", self.run_uri, step)

    def restore_latest(self, local_dir: Path) -> Path | None:
        complete, incomplete = self._steps()
        for step in incomplete:
            log.warning("ignoring %s/checkpoint-%d: no COMPLETED marker (interrupted upload)", self.run_uri, step)
        if not complete:
            return None
        return self.restore(local_dir, complete[-1])

    def restore(self, local_dir: Path, step: int) -> Path:
        """Download checkpoint-`step` (COMPLETED in the store) into local_dir, unless it is there and COMPLETED."""
        dest = local_dir / f"checkpoint-{step}"
        if (dest / COMPLETED).is_file():
            return dest
        s3io.with_retries(f"download of checkpoint-{step}",
                          lambda: s3io.download_prefix(self.s3, self.run_uri.child(f"checkpoint-{step}"), dest,
                                                       concurrency=self.concurrency),
                          UPLOAD_ATTEMPTS)
        (dest / s3io.MANIFEST).unlink(missing_ok=True)
        write_completed_marker(dest, step)
        log.info("restored checkpoint-%d from %s", step, self.run_uri)
        return dest

    def move_aside(self) -> str | None:
        """SFT_RESUME=never: copy this run's objects to `{run_id}.replaced-<time>/` and delete them here."""
        objects = s3io.list_objects(self.s3, self.run_uri)
        if not objects:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = s3io.S3Uri(self.run_uri.bucket, f"{self.run_uri.prefix}.replaced-{stamp}")
        for obj in objects:
            rel = obj["Key"][len(self.run_uri.prefix) + 1:]
            s3io.copy_object(self.s3, self.run_uri.bucket, obj["Key"], target.key(rel))
        s3io.delete_prefix(self.s3, self.run_uri)
        log.warning("SFT_RESUME=never: moved %d objects of %s aside to %s", len(objects), self.run_uri, target)
        return str(target)

    def read_run_file(self, name: str) -> str | None:
        """The text of `{run_id}/name` (a file of the run beside its checkpoints); None when there is none."""
        return s3io.get_text(self.s3, self.run_uri, self.run_uri.key(name))

    def write_run_file(self, name: str, text: str) -> None:
        s3io.put_text(self.s3, self.run_uri, self.run_uri.key(name), text)

    def final_step(self) -> int | None:
        """The global step of the complete final upload (None when there is none, or it predates the step field)."""
        marker = s3io.get_text(self.s3, self.run_uri.child("final"), self.run_uri.child("final").key(COMPLETED))
        return None if marker is None else json.loads(marker).get("step")

    def upload_final(self, root: Path, names: tuple[str, ...], step: int | None = None) -> str:
        """Replace `final/` with exactly the top-level entries `names` of root (a folder with all its files, a file as
        itself), each object written once per attempt, and COMPLETED last. Nothing else of root goes up: not the
        checkpoints, best/, W&B's files or what SFT_RESUME=never moved aside."""
        target = self.run_uri.child("final")
        # The marker first (a reader never sees a COMPLETED final/ being replaced), then what an earlier upload left
        # (another set of names: the merged/ of an export, a file this run does not have).
        s3io.delete_key(self.s3, target, target.key(COMPLETED))
        s3io.delete_prefix(self.s3, target)

        def upload_all() -> dict[str, int]:
            sizes: dict[str, int] = {}
            for name in names:
                path = root / name
                if path.is_dir():
                    sizes.update(s3io.upload_dir(self.s3, path, target.child(name), concurrency=self.concurrency))
                elif path.is_file():
                    sizes.update(s3io.upload_file(self.s3, path, target, name, concurrency=self.concurrency))
            s3io.verify_sizes(self.s3, target, sizes)
            return sizes

        sizes = s3io.with_retries("final upload", upload_all, UPLOAD_ATTEMPTS)
        s3io.put_text(self.s3, target, target.key(COMPLETED),
                      json.dumps({"objects": len(sizes), "step": step, "time": time.time()}))
        log.info("final upload to %s: %d objects, %d request retries", target, len(sizes), s3io.retries_taken(self.s3))
        return str(target)
