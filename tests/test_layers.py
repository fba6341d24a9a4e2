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

# From the bottom up: what every module may use (errors, prompts, cards, the metric table, the serve commands,
# utils); config; storage; data and collators; the model, the outputs, the eval core and the training parts; the
# checks before training and the commands' set-up (job.inputs); the flows (the run's steps beside it, eval, export);
# the entry points and the demo. A prefix names a package and everything in it (the longest prefix wins).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("job.errors", "job.prompts", "job.cards", "job.metric_table", "job.serving", "job.utils"),
    ("job.config",),
    ("job.storage",),
    ("job.data.rows", "job.data.labels", "job.collators", "job.data.checks", "job.data.holdout", "job.data.layouts",
     "job.data.loaders", "job.data"),
    ("job.patch_embed", "job.model", "job.outputs", "job.eval.metrics", "job.eval.score", "job.eval.generate",
     "job.eval.plots", "job.export.report", "job.export.merge"),
    ("job.train.callbacks", "job.train.best", "job.train.distributed", "job.train.preemption", "job.train.resume",
     "job.train.sampler", "job.train.trainer", "job.train.launch", "job.train.micro_batch", "job.train"),
    ("job.preflight", "job.inputs"),
    ("job.train.flow", "job.train.prepare", "job.train.finish", "job.train.rerun", "job.eval.command", "job.eval",
     "job.export.command", "job.export"),
    ("job.cli", "job.__main__", "job.demo", "job"),
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
           "job.preflight": {"job.train.flow"}, "job.train.flow": {"job.preflight"}}
    assert _upward(old) == ["job.preflight (layer 6) imports job.train.flow (layer 7)",
                            "job.storage.checkpoints (layer 2) imports job.train.callbacks (layer 5)"]
    assert _cycles(old) == ["job.preflight -> job.train.flow -> job.preflight"]


def test_the_docs_list_every_module():
    """docs/development.md's tree of job/ names each module once, and nothing that is gone."""
    page = (REPO / "docs" / "development.md").read_text()
    tree = page.split("```\njob/\n", 1)[1].split("```", 1)[0]
    listed = set()
    for line in tree.splitlines():  # "path  what it is", or "a.py, b.py, ...  what they are"
        for word in line.split():
            if not word.rstrip(",").endswith(".py"):
                break
            listed.add(word.rstrip(","))
    present = {str(p.relative_to(REPO / "job")) for p in (REPO / "job").rglob("*.py") if p.name != "__init__.py"
               or p.parent == REPO / "job"}
    assert listed == present


def test_no_module_is_an_alias():
    """Each module is its own code: none replaces itself in sys.modules with another (the aliases of the paths
    before 0.1.0 are gone; the seed's names are importable from `job`, the public API)."""
    swaps = [str(p.relative_to(REPO)) for p in (REPO / "job").rglob("*.py")
             if "sys.modules[__name__]" in p.read_text()]
    assert swaps == []


# Where a function may import a job module: the CLI's commands (so `config` and `--help` skip torch), the lazy
# public API. Anywhere else a local import would only hide a cycle or a layer.
LOCAL_IMPORTS_ALLOWED = {"job.cli", "job"}


def _local_job_imports() -> list[str]:
    found = []
    for path in (REPO / "job").rglob("*.py"):
        name = _module_name(path)
        if name in LOCAL_IMPORTS_ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        top = set(tree.body)
        for node in ast.walk(tree):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in top and any(
                    n == "job" or n.startswith("job.") for n in names):
                found.append(f"{name}:{node.lineno}")
    return sorted(found)


def test_job_modules_are_imported_at_module_level():
    assert _local_job_imports() == []


# Size limits (issue #15): a module a reader can hold in mind, a function that fits on a screen.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _oversized(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        text = path.read_text()
        name = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{name}: {len(text.splitlines())} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = (node.end_lineno or node.lineno) - first + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return found


def test_no_module_or_function_is_too_long():
    assert _oversized(sorted((REPO / "job").rglob("*.py"))) == []


def test_the_size_check_reports_what_this_repository_used_to_have(tmp_path):
    """Not vacuous: a 401-line module and a 61-line function (job/train/flow.py had 525 lines, build_cfg 94)."""
    long_module = tmp_path / "long.py"
    long_module.write_text("x = 1\n" * 401)
    long_function = tmp_path / "fn.py"
    long_function.write_text("def f():\n" + "    pass\n" * 60)
    assert [line.split(": ", 1)[1] for line in _oversized([long_module, long_function])] == [
        "401 lines (at most 400)", "61 lines (at most 60)"]


def test_tests_mirror_the_layout():
    """tests/<package>/ holds the tests of job/<package>/; what spans the job stays at the top of tests/."""
    folders = [p for p in (REPO / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    assert folders, "tests/ has no per-package folders"
    strays = [p.name for p in folders if not (REPO / "job" / p.name / "__init__.py").exists()]
    assert not strays, f"tests/{strays} mirror no package of job/"
    for folder in folders:
        assert list(folder.glob("test_*.py")), f"tests/{folder.name}/ holds no tests"
