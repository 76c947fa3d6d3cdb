"""The tree shows the architecture: the registry is derived from the method classes, imports run
one way (methods -> core), and the methods install as ``surgeon.passes``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import surgeon
import surgeon.passes
from surgeon.spec import METHODS, MethodSpec

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"surgeon": ROOT / "surgeon", "surgeon.passes": ROOT / "passes"}


def _modules() -> dict[str, Path]:
    """Every module of the library by its import name (``passes/`` is ``surgeon.passes``)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found.setdefault(".".join(parts), path)
    return found


MODULES = _modules()


def _runtime_imports(name: str, path: Path) -> set[str]:
    """The library modules ``name`` imports when it runs (imports in functions included,
    ``if TYPE_CHECKING:`` blocks left out: annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _runtime_imports(name, path) for name, path in MODULES.items()}


def _is_method_module(name: str) -> bool:
    return name.startswith("surgeon.passes.") and name.count(".") >= 3


def _family(name: str) -> str:
    return name.split(".")[2]


def test_every_registry_key_is_its_class_name_and_exported():
    assert METHODS
    for key, cls in METHODS.items():
        assert key == cls.name
        assert issubclass(cls, MethodSpec)
        assert getattr(surgeon, cls.__name__) is cls
        assert cls.__name__ in surgeon.__all__


def test_every_method_module_is_discovered_and_its_methods_registered():
    for name in MODULES:
        if not _is_method_module(name):
            continue
        module = sys.modules.get(name)
        assert module is not None, f"{name} was not imported by the registry"
        declared = [
            v
            for v in vars(module).values()
            if isinstance(v, type)
            and issubclass(v, MethodSpec)
            and v.__module__ == name
            and "name" in v.__dict__
        ]
        for cls in declared:
            assert METHODS[cls.name] is cls
    assert set(surgeon.passes.FAMILIES) == {
        p.name for p in PACKAGES["surgeon.passes"].iterdir() if (p / "__init__.py").exists()
    }


def test_design_methods_are_registered():
    expected = {"lora", "dora", "qlora", "adalora", "vera", "lokr", "loha", "ia3"}
    assert expected | {"prompt_tuning", "prefix_tuning", "ptuning_v2"} <= set(METHODS)


def test_imports_have_no_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            assert state.get(target) != 1, f"import cycle: {' -> '.join([*path, target])}"
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_core_never_imports_a_method():
    for name, targets in GRAPH.items():
        if name.startswith("surgeon.passes"):
            continue
        methods = sorted(t for t in targets if _is_method_module(t))
        assert not methods, f"{name} imports {methods}"


BUILT_OVER = {"routed": {"surgeon.passes.lowrank.lora"}}
"""Families whose methods are made of another family's adapters, and the modules they may read
them through: routed methods (X-LoRA, MoLE) mix trained LoRA experts, read as LoRA reads them."""


def test_methods_import_the_core_and_their_own_family_only():
    for name, targets in GRAPH.items():
        if not _is_method_module(name):
            continue
        for target in targets:
            if target == "surgeon.passes.fuse":
                raise AssertionError(f"{name} imports the fusion pass")
            if _is_method_module(target) and target not in BUILT_OVER.get(_family(name), ()):
                assert _family(target) == _family(name), f"{name} imports {target}"


def test_nothing_imports_a_bare_passes_package():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            assert not any(m == "passes" or m.startswith("passes.") for m in modules), name


def test_pyproject_installs_every_package_folder():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name in MODULES if (MODULES[name].name == "__init__.py")}
    assert set(setuptools["packages"]) == packages
    assert setuptools["package-dir"] == {"surgeon": "surgeon", "surgeon.passes": "passes"}
