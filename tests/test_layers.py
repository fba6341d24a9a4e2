"""The import graph of job/: layers point down, and no module imports itself back through others.

Every `import job...` / `from job... import` counts, at module level and inside functions alike: a function-local
import hides a cycle from Python's import machinery, not from a reader. LAYERS lists job/'s modules from the
bottom up; a module may import its own layer and the ones below. A new module must be placed in LAYERS (the test
fails until it is).
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

# From the bottom up: what every module may use, then storage and data, the training parts, the checks that run
# before training, the flows, and the entry points. A prefix names a package and everything in it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("job.errors", "job.prompts", "job.cards", "job.utils"),
    ("job.config",),
    ("job.storage",),
    ("job.data.rows", "job.collators", "job.data.checks", "job.data.loaders", "job.data"),
    ("job.train.callbacks", "job.train.distributed", "job.train.model", "job.train.preemption", "job.train.resume",
     "job.train.sampler", "job.train.artifacts", "job.train.trainer", "job.train"),
    ("job.early_checks", "job.preflight_report", "job.preflight"),
    ("job.train.qwen3_vl_8b_sft", "job.evaluate"),
    ("job.cli", "job.__main__", "job.report", "job.tiny", "job"),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the job modules it imports (a `from job.x import name` of a submodule counts as job.x.name)."""
    modules = {_module_name(p): p for p in (REPO / "job").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name == "job" or a.name.startswith("job.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                    node.module == "job" or node.module.startswith("job.")):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                found |= subs or {node.module}
        graph[name] = found - {name}
    return graph


def _layer(module: str) -> int:
    best = None
    for index, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return best[0]


def test_every_module_has_a_layer():
    for module in _imports():
        _layer(module)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
            for module, targets in sorted(graph.items()) for target in sorted(targets)
            if _layer(target) > _layer(module)]


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif state.get(target) == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [module])
    return cycles


def test_no_module_imports_a_higher_layer():
    assert _upward(_imports()) == []


def test_no_import_cycles():
    assert _cycles(_imports()) == []


def test_the_checks_report_what_this_repository_used_to_have():
    """Not vacuous: the store reading the Trainer callbacks' marker (upward), and preflight and the flow importing
    each other (a cycle, hidden by a function-local import), as they did before job.storage.completed and
    job.collators' build_collators existed."""
    old = {"job.storage.checkpoints": {"job.train.callbacks"}, "job.train.callbacks": set(),
           "job.preflight": {"job.train.qwen3_vl_8b_sft"}, "job.train.qwen3_vl_8b_sft": {"job.preflight"}}
    assert _upward(old) == ["job.preflight (layer 5) imports job.train.qwen3_vl_8b_sft (layer 6)",
                            "job.storage.checkpoints (layer 2) imports job.train.callbacks (layer 4)"]
    assert _cycles(old) == ["job.preflight -> job.train.qwen3_vl_8b_sft -> job.preflight"]


def test_the_readme_lists_every_module():
    """README's tree of job/ names each module once, and nothing that is gone."""
    readme = (REPO / "README.md").read_text()
    tree = readme.split("```\njob/\n", 1)[1].split("```", 1)[0]
    listed = {line.split()[0] for line in tree.splitlines() if line.strip()}
    present = {str(p.relative_to(REPO / "job")) for p in (REPO / "job").rglob("*.py") if p.name != "__init__.py"
               or p.parent == REPO / "job"}
    assert listed == present
