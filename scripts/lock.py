"""Regenerate the pinned environments from pyproject.toml (`make lock`; pip only, downloads metadata only).

    python scripts/lock.py image   # docker/constraints.txt: the image (Python 3.12, torch 2.8.0 CUDA 12.8, flash-attn)
    python scripts/lock.py dev     # requirements.lock: `make install` and CI (torch 2.14.1), from the image's pins
    python scripts/lock.py         # both, image first

requirements.lock holds the image's versions of every package the two share, except the CPU/GPU split (torch,
torchvision, triton and the nvidia/cuda wheels): the dev resolution runs with the image's other pins as constraints.
It covers Python 3.11 and 3.12 (environment markers where a package differs, e.g. numpy 2.5 needs Python 3.12, so 3.11
gets the newest release that supports it). Python 3.10 is not covered: transformers >= 5.21 needs 3.11.
Resolved for Linux x86_64 wheels (--only-binary); a pin that Linux does not need (nvidia-*) is ignored elsewhere,
since `make install` uses the lock as constraints (`pip install -c requirements.lock -e '.[test]'`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_FILE = ROOT / "docker" / "constraints.txt"
DEV_FILE = ROOT / "requirements.lock"

# The image stack moves together (docker/constraints.txt's header says why these versions).
IMAGE_PYTHON = "3.12"
# The image ships the demo (its smoke test builds the tiny model) and the report's pictures (matplotlib).
IMAGE_REQUIREMENTS = ["torch==2.8.0", "torchvision==0.23.0", "liger-kernel==0.8.5", "einops", "ninja", "pip", "wheel",
                      f"{ROOT}[demo,report]"]
IMAGE_BUILD_ONLY = ["flash-attn==2.8.3"]  # no wheel on PyPI: built in the image against the torch above
DEV_PYTHONS = ("3.11", "3.12")
DEV_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "pip", f"{ROOT}[test]"]
GPU_SPLIT = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]
IMAGE_HEADER_END = "# -- pins (scripts/lock.py writes everything below) --"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(python: str, requirements: list[str], constraints: dict[str, str]) -> dict[str, str]:
    """{name: version} pip would install on Linux x86_64 for `python`; drops a constraint that cannot install there."""
    constraints = dict(constraints)
    while True:
        with tempfile.TemporaryDirectory() as tmp:
            cfile, report = Path(tmp) / "c.txt", Path(tmp) / "report.json"
            cfile.write_text("".join(f"{n}=={v}\n" for n, v in constraints.items()))
            abi = "cp" + python.replace(".", "")
            command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                       "--report", str(report), "--only-binary=:all:", "--python-version", python,
                       "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
                       *(f"--platform={p}" for p in PLATFORMS), "-c", str(cfile), *requirements]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                found = json.loads(report.read_text())["install"]
                return {i["metadata"]["name"]: i["metadata"]["version"] for i in found
                        if canonical(i["metadata"]["name"]) != "qwen3-sft"}
        missing = re.search(r"(?:No matching distribution found for|The user requested \(constraint\)) "
                            r"([A-Za-z0-9_.-]+)==", done.stdout + done.stderr)
        if missing is None or canonical(missing.group(1)) not in {canonical(n) for n in constraints}:
            sys.exit(f"pip could not resolve for Python {python}:\n{(done.stdout + done.stderr)[-4000:]}")
        name = next(n for n in constraints if canonical(n) == canonical(missing.group(1)))
        print(f"  Python {python}: {name}=={constraints.pop(name)} does not install there (no wheel for that Python); "
              f"resolving {name} freely", file=sys.stderr)


def pins(path: Path) -> dict[str, str]:
    return dict(line.split(";")[0].strip().split("==", 1) for line in path.read_text().splitlines()
                if "==" in line and not line.startswith("#"))


def lock_image() -> None:
    resolved = resolve(IMAGE_PYTHON, IMAGE_REQUIREMENTS, {})
    header = IMAGE_FILE.read_text().split(IMAGE_HEADER_END)[0]
    lines = [f"{n}=={v}" for n, v in sorted(resolved.items(), key=lambda item: canonical(item[0]))]
    build = (
        "# Build-only: flash-attn has no wheel on PyPI, so it is built --no-build-isolation against the torch above."
    )
    IMAGE_FILE.write_text(header + IMAGE_HEADER_END + "\n" + "\n".join([*lines, build, *IMAGE_BUILD_ONLY]) + "\n")
    print(f"wrote {IMAGE_FILE.relative_to(ROOT)} ({len(lines)} pins)")


def lock_dev() -> None:
    image = {n: v for n, v in pins(IMAGE_FILE).items() if not GPU_SPLIT.match(canonical(n))}
    per_python = {python: resolve(python, DEV_REQUIREMENTS, image) for python in DEV_PYTHONS}
    names = sorted({canonical(n): n for r in per_python.values() for n in r}.items())
    lines = []
    for key, name in names:
        versions = {py: next((v for n, v in r.items() if canonical(n) == key), None) for py, r in per_python.items()}
        if len(set(versions.values())) == 1:
            lines.append(f"{name}=={versions[DEV_PYTHONS[0]]}")
        else:
            lines += [f'{name}=={v} ; python_version == "{py}"' for py, v in versions.items() if v is not None]
    header = (
        f"# The dev/CI environment (make install): Python {', '.join(DEV_PYTHONS)} on Linux x86_64.\n"
        "# Generated by `make lock` (scripts/lock.py) from pyproject.toml and docker/constraints.txt: the image's\n"
        "# versions except torch, torchvision, triton and the nvidia/cuda wheels. Do not edit by hand.\n"
    )
    DEV_FILE.write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {DEV_FILE.relative_to(ROOT)} ({len(lines)} lines)")


if __name__ == "__main__":
    targets = sys.argv[1:] or ["image", "dev"]
    unknown = set(targets) - {"image", "dev"}
    if unknown:
        sys.exit(f"usage: {sys.argv[0]} [image] [dev] (unknown: {', '.join(sorted(unknown))})")
    for target in ("image", "dev"):
        if target in targets:
            {"image": lock_image, "dev": lock_dev}[target]()
