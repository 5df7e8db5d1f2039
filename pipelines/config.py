"""The settings of one compression run, validated before anything is trained or written."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from edge_kd.errors import UserError


@dataclasses.dataclass
class RunConfig:
    """Everything one run needs; ``validate`` turns a bad value into a one-line UserError."""

    data: str = "mnist"
    teacher: str | None = None
    trust_teacher: bool = False
    teacher_input_range: tuple[float, float] | None = None
    teacher_arch: str = "cnn_large"
    teacher_epochs: int = 5
    student: str = "cnn"
    student_width: float = 1.0
    epochs: int = 8
    batch_size: int = 128
    learning_rate: float = 2e-3
    temperature: float = 4.0
    alpha: float = 0.9
    seed: int = 0
    val_fraction: float = 0.1
    image_size: tuple[int, int] | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    int8_io: bool = True
    representative_samples: int = 500
    threads: tuple[int, ...] = (1, 2)
    out: str = "tflite_out"
    run_name: str | None = None

    def validate(self) -> "RunConfig":
        """Returns self after checking every value; raises UserError naming the first bad one."""
        _positive("--epochs", self.epochs, integer=True)
        if self.teacher is None:
            _positive("--teacher-epochs", self.teacher_epochs, integer=True)
        _positive("--batch-size", self.batch_size, integer=True)
        _positive("--learning-rate", self.learning_rate)
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature:g}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must be in [0, 1], got {self.alpha:g}")
        _positive("--student-width", self.student_width)
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction:g}")
        for key in ("limit_train", "limit_test", "representative_samples"):
            v = getattr(self, key)
            if v is not None:
                _positive("--" + key.replace("_", "-"), v, integer=True)
        if not self.threads or any(t < 1 for t in self.threads):
            raise UserError(f"--threads must be positive integers, got {','.join(map(str, self.threads))}")
        if self.teacher_input_range is not None:
            lo, hi = self.teacher_input_range
            if not hi > lo:
                raise UserError(f"--teacher-input-range must be LO,HI with HI > LO, got {lo:g},{hi:g}")
        if self.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name):
            raise UserError(f"--run-name must be letters, digits, '.', '_' or '-', got {self.run_name!r}")
        return self

    def resolved_run_name(self) -> str:
        """Returns the run folder's name: ``--run-name`` or ``<data>-<student>``."""
        if self.run_name:
            return self.run_name
        stem = Path(self.data[5:] if self.data.startswith("tfds:") else self.data).stem or "data"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}-{self.student}")

    def to_dict(self) -> dict:
        """Returns the settings as plain JSON-able data."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _positive(key, value, integer=False):
    if integer and (isinstance(value, bool) or int(value) != value):
        raise UserError(f"{key} must be a positive integer, got {value!r}")
    if not value > 0:
        raise UserError(f"{key} must be > 0, got {value!r}")
