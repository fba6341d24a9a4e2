"""Render the single-GPU run from k8s/kustomization.yaml for `kubectl apply -f -`, without a kustomize binary.

    python k8s/render.py --image REGISTRY/qwen3-sft:TAG --run-id qwen3-sft-abc123 --dataset s3://bucket/data
    python k8s/render.py env      # the ConfigMap's settings as `export KEY=value` lines (CI preflight)

IMAGE, RUN_ID and DATASET may come from the environment instead. The resources listed in kustomization.yaml are
loaded in order and its `namespace:` and `images:` are applied, the subset of kustomize this directory uses; any
other kustomize feature is refused rather than silently ignored. Then the run is filled in: the Job is named after
the run id (its pods read SFT_RUN_ID back from the job-name label), the trainer gets SFT_DATASET_URI, and an image
pinned by digest (`repo@sha256:...`) is also recorded as SFT_IMAGE_DIGEST. Needs only PyYAML.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CONTAINER = "trainer"
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images"}
# The run id names the Job, and Kubernetes copies the Job name into a label value: a DNS-1123 label.
RUN_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def load_kustomization(directory: Path = HERE) -> tuple[dict, list[dict]]:
    """The kustomization and its resources, in the listed order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KEYS
    if unsupported:
        raise SystemExit(f"render.py: kustomization.yaml uses {sorted(unsupported)}; render with kustomize instead")
    docs = []
    for name in kustomization.get("resources", []):
        docs.extend(d for d in yaml.safe_load_all((directory / name).read_text()) if d)
    return kustomization, docs


def containers(doc: dict) -> list[dict]:
    """The containers of a workload's pod template (none for a ConfigMap or ServiceAccount)."""
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def split_image(ref: str) -> tuple[str, str]:
    """`repo[:tag][@digest]` -> (repo, the rest including its separator)."""
    name, at, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon:] + at + digest
    return name, at + digest


def apply_kustomize_images(docs: list[dict], images: list[dict]) -> None:
    """kustomize's `images:` transformer: newName, newTag and digest for containers whose image name matches."""
    for override in images:
        for doc in docs:
            for container in containers(doc):
                repo, suffix = split_image(container["image"])
                if repo != override["name"]:
                    continue
                if "digest" in override:
                    suffix = "@" + override["digest"]
                elif "newTag" in override:
                    suffix = ":" + str(override["newTag"])
                container["image"] = override.get("newName", repo) + suffix


def set_env(container: dict, name: str, value: str) -> None:
    """Set a literal env var, replacing an existing entry so the list keeps one per name."""
    env = [e for e in container.setdefault("env", []) if e["name"] != name]
    env.append({"name": name, "value": value})
    container["env"] = env


def the_job(docs: list[dict]) -> dict:
    jobs = [d for d in docs if d.get("kind") == "Job"]
    if len(jobs) != 1:
        raise SystemExit(f"render.py: expected exactly one Job in the kustomization, found {len(jobs)}")
    return jobs[0]


def trainer(job: dict) -> dict:
    for container in containers(job):
        if container["name"] == CONTAINER:
            return container
    raise SystemExit(f"render.py: the Job has no container named {CONTAINER!r}")


def fill_run(docs: list[dict], image: str, run_id: str, dataset: str) -> None:
    """Image, Job name (= run id) and dataset for one run; the digest too when the image is pinned by one."""
    if not RUN_ID_RE.match(run_id):
        raise SystemExit(f"render.py: run id {run_id!r} must be a DNS-1123 label (a-z, 0-9, '-', at most 63)")
    if not dataset:
        raise SystemExit("render.py: the dataset (--dataset or DATASET) is empty")
    job = the_job(docs)
    job["metadata"]["name"] = run_id
    container = trainer(job)
    container["image"] = image
    set_env(container, "SFT_DATASET_URI", dataset)
    if "@sha256:" in image:
        set_env(container, "SFT_IMAGE_DIGEST", image.partition("@")[2])


def render(image: str, run_id: str, dataset: str, namespace: str | None = None, directory: Path = HERE) -> list[dict]:
    kustomization, docs = load_kustomization(directory)
    apply_kustomize_images(docs, kustomization.get("images", []))
    fill_run(docs, image, run_id, dataset)
    namespace = namespace or kustomization.get("namespace")
    if namespace:
        for doc in docs:
            doc["metadata"]["namespace"] = namespace
    return docs


def config_env(directory: Path = HERE) -> dict[str, str]:
    """The ConfigMap's data: the settings every run gets through envFrom."""
    _, docs = load_kustomization(directory)
    maps = [d for d in docs if d.get("kind") == "ConfigMap"]
    return {k: str(v) for m in maps for k, v in (m.get("data") or {}).items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=["manifest", "env"], default="manifest",
                        help="manifest (default): the resources for kubectl apply; env: the ConfigMap as exports")
    parser.add_argument("--image", default=os.environ.get("IMAGE"), help="image reference (default: $IMAGE)")
    parser.add_argument("--run-id", default=os.environ.get("RUN_ID"), help="run id = Job name (default: $RUN_ID)")
    parser.add_argument("--dataset", default=os.environ.get("DATASET"), help="SFT_DATASET_URI (default: $DATASET)")
    parser.add_argument("--namespace", default=os.environ.get("NAMESPACE"), help="namespace for every resource")
    args = parser.parse_args(argv)
    if args.what == "manifest":
        missing = [flag for flag in ("image", "run_id", "dataset") if not getattr(args, flag)]
        if missing:
            parser.error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.what == "env":
        for key, value in config_env().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    docs = render(args.image, args.run_id, args.dataset, args.namespace)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False, default_flow_style=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
