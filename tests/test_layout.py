"""The package's folders are the stages of its data flow, and every import points down their order.

Walks the source of ``hf_vcon`` (no import of it needed): for each module, the hf_vcon modules it imports, at module
level or inside a function. A module may import from its own stage or a lower one, never a higher one, and the
runtime imports form no cycle. A new module in a new folder must be given a stage here.
"""

from __future__ import annotations

import ast
import os

import pytest

import hf_vcon

PACKAGE = os.path.dirname(os.path.abspath(hf_vcon.__file__))
# Lowest first. errors and version are the vocabulary every stage uses; the top-level API comes last.
STAGES = ["errors", "version", "utils", "compressors", "config", "layers", "patching", "integrations", "distill",
          "export", "training", "cli", "__main__", "__init__"]
TOP_LEVEL_LIMIT = 10


def _module_names() -> dict[str, str]:
    """Dotted module name (relative to hf_vcon, packages by their own name) → file path."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, file), PACKAGE)[:-3].split(os.sep)
                if parts[-1] == "__init__" and len(parts) > 1:
                    parts = parts[:-1]
                modules[".".join(parts)] = os.path.join(folder, file)
    return modules


MODULES = _module_names()


def _stage(module: str) -> int:
    return STAGES.index(module.split(".")[0])


def _is_package(module: str) -> bool:
    return MODULES[module].endswith("__init__.py") and module != "__init__"


def _under_type_checking(tree: ast.Module) -> set[int]:
    """Line numbers of the imports inside ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            lines.update(inner.lineno for child in node.body for inner in ast.walk(child) if hasattr(inner, "lineno"))
    return lines


def _imports(module: str) -> list[tuple[str, bool]]:
    """``(imported module, at run time)`` for every hf_vcon import of ``module``."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    annotations_only = _under_type_checking(tree)
    package = module.split(".") if _is_package(module) else module.split(".")[:-1]
    if module == "__init__":
        package = []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "hf_vcon":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                child = ".".join(base + [alias.name])
                target = child if child in MODULES else ".".join(base) or "__init__"
                found.append((target, node.lineno not in annotations_only))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hf_vcon":
                    found.append((".".join(alias.name.split(".")[1:]) or "__init__", node.lineno not in annotations_only))
    return found


def test_every_module_has_a_stage():
    unknown = sorted(module for module in MODULES if module.split(".")[0] not in STAGES)
    assert not unknown, f"give these modules a stage in STAGES (or move them into one): {unknown}"


def test_top_level_stays_small():
    top = sorted(module for module in MODULES if "." not in module and not _is_package(module))
    assert len(top) <= TOP_LEVEL_LIMIT, top


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_stages(module):
    upward = [target for target, _ in _imports(module) if _stage(target) > _stage(module)]
    assert not upward, f"hf_vcon.{module} (stage {STAGES[_stage(module)]!r}) imports higher stages: {upward}"


def test_no_import_cycle():
    graph = {module: {target for target, runtime in _imports(module) if runtime and target != module}
             for module in MODULES}
    # a package's __init__ may import its own modules; those modules importing the package is what would cycle
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError(f"import cycle: {' → '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_walker_sees_upward_and_circular_imports(tmp_path, monkeypatch):
    """The checks above can fail: a made-up package with one upward import and one cycle."""
    for name, source in {"utils/__init__.py": "", "utils/a.py": "from ..training import b\n",
                         "training/__init__.py": "", "training/b.py": "from ..utils import a\n"}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(source)
    fake = {"utils": str(tmp_path / "utils/__init__.py"), "utils.a": str(tmp_path / "utils/a.py"),
            "training": str(tmp_path / "training/__init__.py"), "training.b": str(tmp_path / "training/b.py")}
    monkeypatch.setattr(__import__(__name__), "MODULES", fake)
    assert [target for target, _ in _imports("utils.a")] == ["training.b"]
    with pytest.raises(AssertionError, match="higher stages"):
        test_imports_point_down_the_stages("utils.a")
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()
