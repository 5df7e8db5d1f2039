"""Distillation: the Distiller model, the loss terms by family, and the teacher adapters.

``from edge_kd.distill import Distiller, losses, hinton, adapt_teacher, ...`` works as always; each
name is imported from its module when first used, so importing one module of this package (the
Distiller, say) does not import every loss family. Code of this project imports from the defining
modules (``edge_kd.distill.distiller``, ``edge_kd.distill.losses``, ...): a stage's code hash
(``pipelines.codehash``) follows those imports, and never this package's lazy names.
"""
from __future__ import annotations

import importlib

#: each public name and the module that defines it
_PUBLIC = {"Distiller": "distiller", "alpha_weights": "distiller", "hinton": "soft_targets", "losses": None,
           "adapt_teacher": "teacher", "load_teacher": "teacher", "logits_model": "teacher"}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'edge_kd.distill' has no attribute {name!r}")
    module = importlib.import_module(f"edge_kd.distill.{_PUBLIC[name] or name}")
    return module if _PUBLIC[name] is None else getattr(module, name)
