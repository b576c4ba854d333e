"""The import graph of peg/: imports run one way (docs/architecture.md), no cycles, `llm` never imports `mine`."""

from __future__ import annotations

import ast
import functools
import graphlib
from pathlib import Path

PEG = Path(__file__).resolve().parents[1] / "peg"

# Lowest first; a module may import its own package and anything in a lower layer, nothing else.
LAYERS = (
    ("peg", "peg.errors", "peg.console", "peg.process"),
    ("peg.config", "peg.progress", "peg.store.files"),  # store.files: atomic writes, sha256 (no peg imports)
    ("peg.model", "peg.data", "peg.store", "peg.losses"),
    ("peg.runtime",),
    ("peg.eval",),  # below train: evaluation during training scores with `peg eval`'s metrics code
    ("peg.train", "peg.mine", "peg.llm"),
    ("peg.pipeline",),
    ("peg.k8s",),
    ("peg.operator",),
    ("peg.cli",),
    ("peg.__main__",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PEG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layered unit a module belongs to: its package under peg/ (or the top-level module)."""
    known = {name for layer in LAYERS for name in layer}
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def layer(name: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if name in names)


@functools.cache
def imports() -> dict[tuple[str, str], int]:
    """(module, peg module it imports) -> line, for every import statement, also those inside functions."""
    modules = {module_name(p): p for p in PEG.rglob("*.py")}
    graph: dict[tuple[str, str], int] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target == "peg" or target.startswith("peg."):
                    while target not in modules:
                        target = target.rpartition(".")[0]
                    if target != name:
                        graph.setdefault((name, target), node.lineno)
    return graph


def package_imports(module: str) -> set[str]:
    """What importing `module` runs besides it: the `__init__` of each package above it (not `peg`'s)."""
    parts = module.split(".")
    return {".".join(parts[:n]) for n in range(2, len(parts))}


def test_no_import_cycle():
    """No cycle, counting that importing peg.x.y runs peg/x/__init__.py first (a package's own
    modules importing each other through its `__init__` is no cycle)."""
    sorter = graphlib.TopologicalSorter()
    for a, b in imports():
        for target in {b} | package_imports(b):
            if not (a == target or a.startswith(f"{target}.")):
                sorter.add(a, target)
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None


def test_imports_run_downward_only():
    upward = [
        f"{a}:{line} imports {b} ({unit(a)} may not import {unit(b)})"
        for (a, b), line in imports().items()
        if unit(a) != unit(b) and layer(unit(b)) >= layer(unit(a))
    ]
    assert not upward, "\n".join(upward)


def test_llm_and_eval_do_not_import_mine_and_pipeline_uses_only_its_stages():
    graph = imports()
    offenders = [f"{a} -> {b}" for a, b in graph if unit(b) == "peg.mine" and unit(a) in ("peg.llm", "peg.eval")]
    assert not offenders, offenders
    pipeline = [f"{a} -> {b}" for a, b in graph if unit(a) == "peg.pipeline" and b not in ("peg.mine", "peg.mine.stage")
                and unit(b) == "peg.mine"]
    assert not pipeline, pipeline


def test_the_walk_sees_lazy_imports():
    graph = imports()
    assert ("peg.pipeline.stages", "peg.mine.stage") in graph  # imported inside a function
    assert ("peg.cli", "peg.pipeline") in graph


def private_imports(root: Path = PEG) -> list[str]:
    """`module:line imports _name from other` for every import of a private name (`_x`, not a
    dunder) from another peg module, also inside functions."""
    def dotted(path: Path) -> str:
        parts = path.relative_to(root.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {dotted(p): p for p in root.rglob("*.py")}
    found = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = node.module or ""
            if node.level:
                source = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], source]).strip(".")
            if not source.startswith("peg") or source == name:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{name}:{node.lineno} imports {alias.name} from {source}")
    return found


def test_no_private_name_is_imported_across_modules():
    offenders = private_imports()
    assert not offenders, "a private name is that module's own; make it public where it is shared:\n" + "\n".join(offenders)


def test_the_private_import_check_sees_one(tmp_path):
    (tmp_path / "peg").mkdir()
    (tmp_path / "peg" / "a.py").write_text("def _helper():\n    pass\n")
    (tmp_path / "peg" / "b.py").write_text("def f():\n    from peg.a import _helper\n")
    assert private_imports(tmp_path / "peg") == ["peg.b:2 imports _helper from peg.a"]
