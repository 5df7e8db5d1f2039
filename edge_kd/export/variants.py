"""The names of the TFLite variants edge-kd makes, and their kinds: the one list of them.

Importable without TensorFlow, so that a recipe's schema (``stages.export.variants``,
``search.variants``) is built from it; ``edge_kd.export.tflite`` converts to each.
"""
from __future__ import annotations

from typing import Literal

VARIANTS = ("fp32", "fp16", "dynamic", "dynamic_compat", "int8", "int8_mixed", "int16x8")
CALIBRATED = ("int8", "int8_mixed", "int16x8")  # the variants that need representative data
INTEGER = CALIBRATED  # the variants whose activations are integers (their per-layer error is measured)
#: the variants a search candidate may ship: the ones that quantize and load on current runtimes
#: (fp32 and fp16 are not compressions; dynamic_compat is dynamic for runtimes before 2.17)
SEARCHABLE = ("int8", "int16x8", "dynamic", "int8_mixed")

Variant = Literal[VARIANTS]
SearchableVariant = Literal[SEARCHABLE]
