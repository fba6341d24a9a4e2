"""Speed benchmarks for the Qwen3-VL SFT job (see README.md here). Run from the repository root as modules:
`python -m benchmarks.eval`, `python -m benchmarks.device.kit check`, ...

`REPO` is the repository root: its one definition, for the benchmarks and the tests (tests/helpers.py re-exports it;
pytest puts the root on sys.path, pyproject.toml `pythonpath`).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
