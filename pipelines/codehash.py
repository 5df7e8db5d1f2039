"""The edge-kd source a stage runs, and its hash: part of every stage's fingerprint.

A module's closure is every project module (``edge_kd``, ``pipelines``, ``models``) it can import:
read from the source with ``ast``, following ``import`` and ``from ... import`` statements at any
depth (a stage imports most of what it uses inside its functions), the packages above each module
included, ``if TYPE_CHECKING:`` blocks and the orchestration modules (``ORCHESTRATION``) left out. Editing any file of a stage's closure, a comment
included, changes the stage's fingerprint, so its result is made again; files outside it (the
exporter, for a training stage) do not.

>>> from pipelines import codehash
>>> "edge_kd/compress/prune.py" in codehash.closure(["pipelines.stages.prune"])
True
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_kd", "pipelines", "models")
#: Modules that decide which stages run and with which settings, not what a stage computes from them: the
#: settings they produce enter every fingerprint as values, so their source is not followed.
ORCHESTRATION = frozenset({"pipelines.registry", "pipelines.recipe", "pipelines.runner", "pipelines.run",
                           "pipelines.compress", "pipelines.codehash", "pipelines.verify"})


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """Returns the source file of project module ``name`` (a package's ``__init__.py``), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Returns the absolute names of the modules (or module.attribute) a module's source imports."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            found.add(prefix)
            found.update(f"{prefix}.{a.name}" for a in node.names if a.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_type_checking(test) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def closure(modules, root: Path = ROOT) -> dict[str, str]:
    """Returns {path relative to ``root``: sha256 of its bytes} of every project file ``modules`` can import."""
    root, seen, files, todo = Path(root), set(), {}, list(modules)
    while todo:
        parts = todo.pop().split(".")
        # importing a.b.c runs a, a.b and a.b.c
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in seen or mod in ORCHESTRATION:
                continue
            seen.add(mod)
            f = module_file(mod, root)
            if f is None:
                continue
            st = f.stat()
            digest, imports = _read(str(f), mod, st.st_mtime_ns, st.st_size)
            files[f.relative_to(root).as_posix()] = digest
            todo.extend(imports)
    return dict(sorted(files.items()))


@lru_cache(maxsize=None)
def _read(path: str, module: str, mtime_ns: int, size: int) -> tuple[str, tuple]:
    """Returns (sha256, imported names) of one source file; cached while its modification time and size hold."""
    data = Path(path).read_bytes()
    names = _imports(ast.parse(data, path), module, Path(path).name == "__init__.py")
    return hashlib.sha256(data).hexdigest(), tuple(sorted(names))


def code_hash(modules, root: Path = ROOT) -> str:
    """Returns one sha256 of the closure of ``modules``: it changes when any file the modules can import does."""
    h = hashlib.sha256()
    for path, digest in closure(modules, root).items():
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()
