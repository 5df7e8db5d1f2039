"""The loss terms by name: the registry with every family registered.

``get(name, **params)`` builds a term, ``available()`` lists the names; the terms themselves live
in their families' modules (``soft_targets``: hinton, dkd, virtual_teacher; ``hints``: fitnet, at;
``relational``: rkd, crd), on the base class and registry of ``edge_kd.distill.registry``.

>>> from edge_kd.distill import losses
>>> term = losses.get("hinton", temperature=4.0, weight=0.9)
>>> term.name, term.weight, losses.available()[:3]
('hinton', 0.9, ['at', 'crd', 'dkd'])
"""
from edge_kd.distill import hints, relational, soft_targets  # noqa: F401  (each registers its terms)
from edge_kd.distill.registry import LossTerm, available, get, needs_teacher, params_of, register
from edge_kd.distill.soft_targets import Hinton, soft_kl

__all__ = ["LossTerm", "available", "get", "needs_teacher", "params_of", "register", "Hinton", "soft_kl"]
