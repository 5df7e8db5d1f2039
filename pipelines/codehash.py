"""The edge-kd source a stage runs, and its hash: part of every stage's fingerprint.

A module's closure is every project module (``edge_kd``, ``pipelines``, ``models``) it can import:
read from the source with ``ast``, following ``import`` and ``from ... import`` statements at any
depth (a stage imports most of what it uses inside its functions), the packages above each module
included. Two kinds of import are not followed, as they run nothing a stage computes with:
``if TYPE_CHECKING:`` blocks, and a package's lazy names (the body of a module-level ``__getattr__``,
as in ``edge_kd.distill``: project code imports from the defining module instead). Files that are code
without being Python (the bundle README's templates) belong to the module that reads them: it names
them in a module-level ``CODE_DATA`` tuple of glob patterns, relative to its folder.

A stage's code is the closure of its own module (``pipelines.runner.stage_fingerprint``). The stages
receive the run's context and never import the modules that decide which stages run with which
settings (the recipe, the registry, the runner): those settings enter every fingerprint as values.
Editing any file of a stage's closure, a comment included, changes the stage's fingerprint, so its
result is made again; files outside it (the exporter, for a training stage) do not.

>>> from pipelines import codehash
>>> "edge_kd/tfmot/prune.py" in codehash.closure(["pipelines.stages.prune"])
True
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

#: the project's source tree, where modules are looked up when no ``root`` is given
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_kd", "pipelines", "models")


def module_file(name: str, root: Path | None = None) -> Path | None:
    """Returns the source file of project module ``name`` (a package's ``__init__.py``), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = Path(root or ROOT).joinpath(*name.split("."))
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
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and node in tree.body:
            return  # a package's lazy names (PEP 562)
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


def closure(modules, root: Path | None = None) -> dict[str, str]:
    """Returns {path relative to ``root``: sha256 of its bytes} of every project file ``modules`` can import."""
    root, seen, files, todo = Path(root or ROOT), set(), {}, list(modules)
    while todo:
        parts = todo.pop().split(".")
        # importing a.b.c runs a, a.b and a.b.c
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in seen:
                continue
            seen.add(mod)
            f = module_file(mod, root)
            if f is None:
                continue
            st = f.stat()
            digest, imports, data = _read(str(f), mod, st.st_mtime_ns, st.st_size)
            files[f.relative_to(root).as_posix()] = digest
            for pattern in data:
                for d in sorted(f.parent.glob(pattern)):
                    files[d.relative_to(root).as_posix()] = hashlib.sha256(d.read_bytes()).hexdigest()
            todo.extend(imports)
    return dict(sorted(files.items()))


@lru_cache(maxsize=None)
def _read(path: str, module: str, mtime_ns: int, size: int) -> tuple[str, tuple, tuple]:
    """Returns (sha256, imported names, ``CODE_DATA`` patterns) of one source file; cached while its modification
    time and size hold."""
    data = Path(path).read_bytes()
    tree = ast.parse(data, path)
    names = _imports(tree, module, Path(path).name == "__init__.py")
    return hashlib.sha256(data).hexdigest(), tuple(sorted(names)), _code_data(tree)


def _code_data(tree: ast.Module) -> tuple:
    """Returns the glob patterns of a module-level ``CODE_DATA = (...)`` (string constants), or ()."""
    for node in tree.body:
        if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.Tuple, ast.List))
                and any(isinstance(t, ast.Name) and t.id == "CODE_DATA"
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))):
            return tuple(e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return ()


def code_hash(modules, root: Path | None = None) -> str:
    """Returns one sha256 of the closure of ``modules``: it changes when any file the modules can import does."""
    h = hashlib.sha256()
    for path, digest in closure(modules, root).items():
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()
