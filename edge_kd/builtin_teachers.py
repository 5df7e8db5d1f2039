"""The teachers shipped inside the package, named ``builtin:<name>`` wherever a teacher file is asked for.

Each was trained once by ``scripts/train_teacher.py`` with the recipe named beside it; its training
record (command, history, test accuracy, wall time) is the ``.json`` next to the ``.keras`` file.
"""
from __future__ import annotations

from pathlib import Path

from edge_kd.errors import UserError

FOLDER = Path(__file__).parent / "_data" / "teachers"
#: name → (file in FOLDER, the recipe that trained it)
BUILTIN_TEACHERS = {
    "fashion_mnist": ("fashion_mnist_resnet8w2.keras", "pipelines/recipes/fashion_mnist_teacher.yaml"),
    "cifar10": ("cifar10_fastcnn.keras", "pipelines/recipes/cifar10_teacher.yaml"),
}
PREFIX = "builtin:"


def resolve(path: str) -> str:
    """Returns ``path``, or for ``builtin:<name>`` the absolute path of that shipped teacher."""
    if not str(path).startswith(PREFIX):
        return path
    name = str(path)[len(PREFIX):]
    if name not in BUILTIN_TEACHERS:
        raise UserError(f"must be a .keras/.h5 file or one of the built-in teachers "
                        f"({', '.join(PREFIX + n for n in BUILTIN_TEACHERS)}), got {str(path)!r}")
    return str(FOLDER / BUILTIN_TEACHERS[name][0])


def name_of(path) -> str | None:
    """Returns ``builtin:<name>`` when ``path`` is a shipped teacher's file, else None."""
    for name, (file, _) in BUILTIN_TEACHERS.items():
        if Path(path).resolve() == (FOLDER / file).resolve():
            return PREFIX + name
    return None
