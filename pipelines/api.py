"""``edge_kd.compress_model(...)``: the command's run, from Python (a notebook), on models and arrays in memory.

It runs what ``python -m pipelines.compress`` runs: the same recipe (the default, a file or a shipped recipe's
name), the same ``--set`` overrides, the same stages, fingerprints and resume. Models and arrays given in memory are written once to
``<out>/.inputs/`` under a name made of their content (a model's architecture and weights, the arrays' bytes),
and the recipe points at those files: a notebook cell run again with the same models and data finds the same
files and fingerprints, and skips what is finished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from edge_kd.errors import UserError


@dataclasses.dataclass
class RunResult:
    """What a run gave: its folder, one row per model (``edge_kd.bench.results.ModelRow``), the report, the
    bundle's folder (None without a bundle stage) and results.json as read."""

    run_dir: Path
    models: list
    report: Path
    bundle: Path | None
    results: dict

    def row(self, name: str):
        """Returns the row of model ``name`` (e.g. "qat-int8")."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r} in this run; it has {', '.join(m.name for m in self.models)}")


def compress_model(teacher=None, student=None, data=None, recipe=None, overrides=(), out="tflite_out",
                   name: str | None = None, stream=None) -> RunResult | None:
    """Runs the pipeline and returns its ``RunResult``.

    - ``teacher``: a model file (as ``--teacher``), a tf_keras or Keras 3 model, or None for the recipe's;
    - ``student``: a registry architecture (as ``--student``), a model file, a tf_keras or Keras 3 model, or None;
    - ``data``: a source as ``--data`` takes it, ``(x_train, y_train, x_test, y_test)`` arrays (uint8 pixels,
      N×H×W or N×H×W×C, integer labels), or None for the recipe's;
    - ``recipe``: a recipe file (default: the built-in one); ``overrides``: ``--set`` assignments;
    - ``out`` and ``name``: as ``--out`` and ``--run-name``; ``stream``: where progress goes (stdout).

    A user mistake raises ``UserError`` (one line); Ctrl-C raises ``KeyboardInterrupt`` after what finished was
    kept, as the command does. In a multi-worker job (``training.strategy: multi_worker``), which must be joined
    before TensorFlow runs (so the models come as files), a worker other than the chief returns None.
    """
    from pipelines import recipe as recipe_mod
    from pipelines.run import run

    out = Path(out)
    inputs = out / ".inputs"
    sets = []
    if data is not None:
        sets.append(f"data.source={json.dumps(str(_data_file(data, inputs)))}")
    if teacher is not None:
        sets += ["teacher.path=" + json.dumps(str(_model_file(teacher, inputs, "teacher")))]
    if student is not None:
        sets += ["student.options={}", "student.weights=null", "student.path=null"]
        if isinstance(student, str) and not student.lower().endswith((".keras", ".h5", ".hdf5")):
            sets.append(f"student.arch={json.dumps(student)}")
        else:
            sets.append(f"student.path={json.dumps(str(_model_file(student, inputs, 'student')))}")
    if name is not None:
        sets.append(f"name={json.dumps(name)}")
    r = recipe_mod.apply_overrides(recipe_mod.load(recipe), sets + list(overrides))
    run_dir = run(r, out=out, command="edge_kd.compress_model(...)", stream=stream or sys.stdout)
    if run_dir is None:  # a worker of a multi-worker job that is not its chief: the chief has the results
        return None
    from edge_kd.bench.results import rows_of

    results = json.loads((run_dir / "results.json").read_text())
    bundle = results.get("bundle") or None
    return RunResult(run_dir, rows_of(results["models"]), run_dir / "report.md",
                     run_dir / bundle["path"] if bundle else None, results)


def _model_file(model, inputs: Path, what: str) -> Path:
    """Returns the file ``model`` is: itself when a path; an in-memory model written once under a name made of its
    architecture and weights (a Keras 3 model rebuilt in tf_keras first). Layer names do not enter that name (Keras
    makes up new ones each time a cell builds the model again): the first file written keeps its names, so name
    the layers a term taps yourself."""
    if isinstance(model, (str, Path)):
        return Path(model)
    from edge_kd import keras3
    from edge_kd.keras import keras

    if keras3.is_keras3_model(model):
        model = keras3.to_tf_keras(model, f"{what} '{model.name}'")
    if not isinstance(model, keras.Model):
        raise UserError(f"{what}: give a model file, a tf_keras or a Keras 3 model, got {type(model).__name__}")
    h = hashlib.sha256(_architecture(model).encode())
    for w in model.get_weights():
        h.update(str((w.dtype, w.shape)).encode())
        h.update(np.ascontiguousarray(w).tobytes())
    return _written_once(inputs / f"{what}-{h.hexdigest()[:16]}.keras", model.save)


def _architecture(model) -> str:
    """Returns ``model``'s architecture as JSON with every layer's name (and the model's) replaced by its position:
    the names Keras makes up (functional_3, conv2d_7) change each time a notebook cell builds the model again."""
    config = json.loads(model.to_json())
    names = {layer.name: f"layer{i}" for i, layer in enumerate(model.layers)}
    names[model.name] = "model"

    def renamed(v):
        if isinstance(v, str):
            return names.get(v, v)
        if isinstance(v, list):
            return [renamed(u) for u in v]
        if isinstance(v, dict):
            return {k: renamed(u) for k, u in v.items()}
        return v

    return json.dumps(renamed(config), sort_keys=True)


def _data_file(data, inputs: Path) -> str | Path:
    """Returns the source ``data`` is: itself when a string or path; arrays written once as an .npz named by
    their bytes."""
    if isinstance(data, (str, Path)):
        return data
    if not isinstance(data, (tuple, list)) or len(data) != 4:
        raise UserError("data: give a source as --data takes it, or (x_train, y_train, x_test, y_test) arrays")
    arrays = dict(zip(("x_train", "y_train", "x_test", "y_test"), (np.asarray(a) for a in data)))
    h = hashlib.sha256()
    for key, a in arrays.items():
        h.update(f"{key}{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return _written_once(inputs / f"data-{h.hexdigest()[:16]}.npz", write)


def _written_once(path: Path, write) -> Path:
    """Returns ``path``, first made by ``write(temporary path)`` and moved into place whole if it is not there (its
    name is its content's digest, so a file already there holds what ``write`` would write)."""
    if not path.is_file():
        from edge_kd.fileio import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            write(tmp)
    return path
