"""The results row: one measured model, as the benchmark writes it and the bundle, report and benchmarks read it.

``models.json`` and ``results.json`` hold a ``models`` list of these rows as plain JSON objects;
``ModelRow.from_dict`` reads one back (and refuses one that lacks a field or has a stray one).

>>> row = ModelRow(name="student-int8", role="student", format="tflite", variant="int8", path="tflite/s.tflite",
...                accuracy=0.99, size_bytes=23000, gzip_bytes=18000, params=17178, macs=1470528,
...                input_scale=1 / 255, input_offset=0.0)
>>> ModelRow.from_dict(row.to_dict()) == row
True
"""
from __future__ import annotations

import dataclasses
from typing import Optional

ROLES = ("teacher", "student", "baseline")
FORMATS = ("keras", "tflite")
#: the figures a latency measurement quotes: the median over rounds and its interquartile range
LATENCY_SUMMARY = ("median_ms", "q1_ms", "q3_ms")
#: the fields of one latency measurement, per thread count in ``ModelRow.latency``
#: (``edge_kd.bench.litert.latency_rounds`` makes them, and repeats the thread count as ``threads``)
LATENCY_FIELDS = (*LATENCY_SUMMARY, "min_ms", "max_ms", "init_ms", "first_ms", "rounds", "runs")


@dataclasses.dataclass
class ModelRow:
    """One model of a run and what was measured of it. Accuracy and sparsity are fractions 0..1."""

    name: str
    role: str  # teacher, student or baseline
    format: str  # keras or tflite
    variant: str  # fp32, fp16, dynamic or int8
    path: str  # relative to the run folder (a user's teacher: absolute)
    accuracy: Optional[float]  # top-1 on the whole test set; None: the run had no test set
    size_bytes: int
    gzip_bytes: int
    params: int
    macs: int
    input_scale: float  # the model's float input is raw_pixel * input_scale + input_offset
    input_offset: float
    stage: Optional[str] = None  # the stage whose model this is
    sparsity: Optional[float] = None  # exact zeros in the conv/dense kernels of the .tflite
    latency: Optional[dict] = None  # {threads: {LATENCY_FIELDS}} for .tflite rows (interleaved rounds)
    parity: Optional[dict] = None  # the .tflite against its Keras model
    ops: Optional[dict] = None  # the .tflite's ops and XNNPACK fallbacks
    sparsity_layers: Optional[dict] = None  # {Keras layer: sparsity} of the .tflite's kernels
    gap_to_teacher: Optional[float] = None  # teacher accuracy minus this one's (fraction)
    min_runtime: Optional[str] = None  # the oldest TFLite runtime that loads the .tflite (its own metadata)
    op_versions: Optional[dict] = None  # {op: version} of the .tflite
    memory: Optional[dict] = None  # {peak_bytes, method}: peak memory at inference
    layer_error: Optional[dict] = None  # per-layer error against float (integer variants; edge_kd.bench.layer_error)
    float_layers: Optional[list] = None  # the layers an int8_mixed file keeps in float
    calibration: Optional[str] = None  # what a calibrated .tflite was calibrated on: "train" or "synthetic" images
    val_accuracy: Optional[float] = None  # top-1 on the whole validation split (benchmark.validation)

    def __post_init__(self):
        if self.role not in ROLES or self.format not in FORMATS:
            raise ValueError(f"a results row has role in {ROLES} and format in {FORMATS}; got {self.role!r}, "
                             f"{self.format!r} for {self.name!r}")

    def to_dict(self) -> dict:
        """Returns the row as a plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelRow":
        """Returns the row of plain dict ``d``; a missing required field or an unknown one is a ValueError."""
        if isinstance(d, cls):
            return d
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing, unknown = sorted(required - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"results row {d.get('name', '?')!r}: missing {', '.join(missing) or 'nothing'}; "
                             f"unknown {', '.join(unknown) or 'nothing'}")
        return cls(**d)


def rows_of(models: list) -> list[ModelRow]:
    """Returns ``models`` (rows or their dicts, as in results.json) as ModelRows."""
    return [ModelRow.from_dict(m) for m in models]
