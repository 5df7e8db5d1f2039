"""The deployable bundle: one folder an app developer drops into an Android or iOS project.

A bundle holds the ``.tflite`` file, ``labels.txt``, ``manifest.json`` (everything needed to feed
the model: shapes, dtypes, the raw pixel → input mapping and the tensors' quantization, read from
the model itself), ``golden/`` test vectors (real images and the outputs LiteRT gives for them,
fed exactly as the manifest says) and a ``README.md`` with Kotlin and Swift snippets carrying this
model's numbers (written from the templates in ``templates/``). ``python -m pipelines.verify BUNDLE``
checks a bundle against itself.

Example::

    import json
    from edge_kd import data
    from edge_kd.export.bundle import measured_from, pick, write_bundle

    rows = json.load(open("tflite_out/mnist-cnn/benchmark/models.json"))["models"]
    row = pick(rows)  # the smallest integer student within 0.5 pp on validation (benchmark.validation: true)
    b = data.load("mnist", limit_test=16)
    write_bundle("tflite_out/mnist-cnn/bundle", "tflite_out/mnist-cnn/" + row.path,
                 class_names=b.info.class_names, input_scale=b.info.input_scale,
                 input_offset=b.info.input_offset, channel_order="grayscale",
                 golden_x_raw=b.raw("test", range(16)), measured=measured_from(row),
                 recipe_hash="3f2a...", version="0.1.0")
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import string
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from edge_kd.bench.compat import runtime as compat_runtime
from edge_kd.bench.results import LATENCY_SUMMARY, ModelRow, rows_of
from edge_kd.errors import UserError
from edge_kd.fileio import sha256_file, staging_dir, swap_dir, umask

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
LABELS = "labels.txt"
GOLDEN_INPUTS = "golden/inputs.npy"
GOLDEN_OUTPUTS = "golden/expected_outputs.npy"
FLOAT_ATOL = 1e-5  # float golden outputs must reproduce within this; integer ones bit-exactly
CHANNEL_ORDERS = {"grayscale": 1, "RGB": 3}
IO_DTYPES = ("float32", "int8")  # the tensor types the snippets and golden vectors are written for
# per thread count in measured["latency_ms"]: the summary an app developer reads, not the rounds' diagnostics
LATENCY_KEYS = LATENCY_SUMMARY
# what write_bundle's ``measured`` must hold (measured_from adds the peak memory and its method)
MEASURED_KEYS = ("name", "accuracy", "latency_ms", "size_bytes", "gzip_bytes", "sparsity")


# -- choosing the model ------------------------------------------------------------------------------
def pick(models: list[ModelRow], tolerance_pp: float = 0.5, name: str | None = None,
         min_runtime: str | None = None) -> ModelRow:
    """Returns the results row to bundle: ``name``'s, else the smallest integer student within tolerance.

    The default is the smallest (``size_bytes``) student ``.tflite`` of an integer variant (int8,
    int8_mixed, int16x8) whose validation accuracy (``val_accuracy``) lies within ``tolerance_pp``
    percentage points of the best student ``.tflite``'s; where no integer one does, the smallest
    student ``.tflite`` of any variant within that tolerance. The choice is made on the validation
    split, never the test split, so the test accuracy the bundle reports stays an unbiased estimate;
    a candidate without ``val_accuracy`` is a ValueError (the benchmark measures it when asked). With
    ``min_runtime`` ("2.14"), only files that load on that TFLite runtime (their own
    ``min_runtime_version``) are candidates, and the tolerance is counted from the best of those.
    int16x8 files count as integer, though XNNPACK does not run them.
    """
    from edge_kd.bench.compat import loads_on, version_key
    from edge_kd.export.tflite import INTEGER

    tflite = [m for m in rows_of(models) if m.format == "tflite"]
    if min_runtime is not None:
        try:
            version_key(min_runtime)
        except ValueError as e:
            raise UserError(f"bundle min_runtime: {e}") from None
    if name is not None:
        for m in tflite:
            if m.name == name:
                if min_runtime is not None and not loads_on(m.min_runtime, min_runtime):
                    raise UserError(f"model '{name}' needs TFLite {m.min_runtime or '(unknown)'}; it does not load on "
                                    f"{min_runtime}, the bundle's min_runtime")
                return m
        names = ", ".join(m.name for m in tflite) or "none"
        raise UserError(f"unknown model '{name}' for the bundle; the tflite models of this run are: {names}")
    if not (isinstance(tolerance_pp, (int, float)) and tolerance_pp >= 0):
        raise UserError(f"bundle tolerance must be a number of percentage points >= 0, got {tolerance_pp!r}")
    students = [m for m in tflite if m.role == "student"]
    if min_runtime is not None:
        loadable = [m for m in students if loads_on(m.min_runtime, min_runtime)]
        if students and not loadable:
            raise UserError(f"no student .tflite of this run loads on TFLite {min_runtime}; they need: "
                            + ", ".join(f"{m.name} {m.min_runtime or '(unknown)'}" for m in students))
        students = loadable
    if not students:
        raise UserError("no student .tflite model in this run to bundle; "
                        f"tflite models: {', '.join(m.name for m in tflite) or 'none'}")
    unmeasured = [m.name for m in students if m.val_accuracy is None]
    if unmeasured:
        raise ValueError(f"the bundle's default pick compares validation accuracy (val_accuracy), which was not "
                         f"measured for {', '.join(unmeasured)}: measure it in the benchmark, or name the model")
    best = max(m.val_accuracy for m in students)
    # 1e-9 keeps a model exactly at the tolerance edge in despite float rounding of accuracy - best.
    close = [m for m in students if m.val_accuracy >= best - tolerance_pp / 100.0 - 1e-9]
    integer = [m for m in close if m.variant in INTEGER]
    return min(integer or close, key=lambda m: (m.size_bytes, -m.val_accuracy, m.name))


def measured_from(row: ModelRow) -> dict:
    """Returns the ``measured`` dict write_bundle takes, from one results row."""
    return {"name": row.name, "variant": row.variant, "accuracy": row.accuracy,
            "latency_ms": {str(t): {k: float(v[k]) for k in LATENCY_KEYS}
                           for t, v in (row.latency or {}).items() if v and all(k in v for k in LATENCY_KEYS)},
            "size_bytes": row.size_bytes, "gzip_bytes": row.gzip_bytes, "sparsity": row.sparsity,
            "peak_memory_bytes": (row.memory or {}).get("peak_bytes"),
            "memory_method": (row.memory or {}).get("method")}


# -- the preprocessing the manifest states (shared by the bundle writer and pipelines.verify) -------
def quantization(detail: dict) -> dict | None:
    """Returns ``{"scale", "zero_point"}`` of an interpreter tensor detail, or None for a float tensor."""
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer):
        return None
    scale, zero_point = detail["quantization"]
    return {"scale": float(scale), "zero_point": int(zero_point)}


def raw_to_input(raw, input_scale: float, input_offset: float, dtype: str, quant: dict | None) -> np.ndarray:
    """Returns the model input tensor for raw uint8 pixels, computed as the manifest's formula says."""
    # float32 throughout, in this order, so that an app doing the same Float arithmetic gets the same bits.
    x = np.asarray(raw).astype(np.float32) * np.float32(input_scale) + np.float32(input_offset)
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.integer):
        return x.astype(dt)
    if quant is None or not quant.get("scale"):
        raise ValueError(f"integer input ({dt.name}) needs a quantization scale; got {quant!r}")
    info = np.iinfo(dt)
    q = np.rint(x / np.float32(quant["scale"])) + np.float32(quant["zero_point"])  # rint: half to even
    return np.clip(q, info.min, info.max).astype(dt)


def run_golden(interpreter: Interpreter, model_inputs: np.ndarray) -> np.ndarray:
    """Returns the raw output tensors (N, ...) for prepared inputs, run one sample at a time at batch 1."""
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    ys = []
    for sample in model_inputs:
        interpreter.set_tensor(inp["index"], sample[None, ...])
        interpreter.invoke()
        ys.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(ys)


def batch1_interpreter(model_path) -> Interpreter:
    """Returns an allocated LiteRT interpreter (default XNNPACK, 1 thread) of the model with batch 1."""
    it = Interpreter(model_path=str(model_path), num_threads=1)
    inp = it.get_input_details()
    if len(inp) != 1 or len(it.get_output_details()) != 1:
        raise ValueError(f"a bundle holds a one-input, one-output model; {Path(model_path).name} has "
                         f"{len(inp)} inputs and {len(it.get_output_details())} outputs")
    if int(inp[0]["shape"][0]) != 1:
        it.resize_tensor_input(inp[0]["index"], [1, *[int(d) for d in inp[0]["shape"][1:]]])
    it.allocate_tensors()
    return it


# -- writing the bundle --------------------------------------------------------------------------------
def write_bundle(dest_dir, model_path, *, class_names, input_scale: float, input_offset: float,
                 channel_order: str | None = None, golden_x_raw, measured: dict, recipe_hash: str,
                 version: str) -> Path:
    """Writes the bundle folder ``dest_dir`` atomically (replacing an existing one); returns its path.

    ``channel_order`` is "grayscale" or "RGB" (inferred from the channel count when None);
    ``golden_x_raw`` are real uint8 test images N×H×W×C; ``measured`` holds the benchmark figures
    (see ``measured_from``; accuracy a fraction 0..1). On Linux the new folder is swapped in with one
    atomic rename; elsewhere the old one steps aside for it.
    """
    dest, model_path = Path(dest_dir), Path(model_path)
    if not model_path.is_file():
        raise UserError(f"no model file to bundle at {model_path}")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"bundle destination {dest} exists and is not a folder")
    it = batch1_interpreter(model_path)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    in_dtype, out_dtype = np.dtype(inp["dtype"]).name, np.dtype(out["dtype"]).name
    for what, dt in (("input", in_dtype), ("output", out_dtype)):
        if dt not in IO_DTYPES:
            raise ValueError(f"bundles are written for {' or '.join(IO_DTYPES)} model I/O; the {what} of "
                             f"{model_path.name} is {dt}")
    in_shape, out_shape = [int(d) for d in inp["shape"]], [int(d) for d in out["shape"]]
    if len(in_shape) != 4:
        raise ValueError(f"a bundle holds an image model with N×H×W×C input; {model_path.name} takes {in_shape}")
    channels = in_shape[3]
    if channel_order is None:
        channel_order = next((k for k, c in CHANNEL_ORDERS.items() if c == channels), None)
    if channel_order not in CHANNEL_ORDERS or CHANNEL_ORDERS[channel_order] != channels:
        raise ValueError(f"channel_order must be one of {', '.join(CHANNEL_ORDERS)} and match the model's "
                         f"{channels} channel(s); got {channel_order!r}")
    class_names = [str(c) for c in class_names]
    if len(class_names) != out_shape[-1]:
        raise ValueError(f"{len(class_names)} class names for a model with {out_shape[-1]} outputs")
    if any("\n" in c or "\r" in c or c != c.strip() or not c for c in class_names):
        raise ValueError("class names must be non-empty single lines without surrounding spaces")
    golden_x_raw = np.asarray(golden_x_raw)
    if golden_x_raw.dtype != np.uint8 or golden_x_raw.shape[1:] != tuple(in_shape[1:]) or len(golden_x_raw) == 0:
        raise ValueError(f"golden_x_raw must be raw uint8 images N×{'×'.join(map(str, in_shape[1:]))} with N >= 1; "
                         f"got {golden_x_raw.dtype} {golden_x_raw.shape}")
    missing = [k for k in MEASURED_KEYS if k not in measured]
    if missing:
        raise ValueError(f"measured lacks {', '.join(missing)}; it needs {', '.join(MEASURED_KEYS)}")
    if measured["accuracy"] is not None and not (isinstance(measured["accuracy"], (int, float))
                                                 and 0 <= measured["accuracy"] <= 1):
        raise ValueError(f"measured accuracy is a fraction 0..1 (as in models.json), or None where the run had no "
                         f"test set; got {measured['accuracy']!r}")

    in_q, out_q = quantization(inp), quantization(out)
    runtime = compat_runtime(model_path)
    model_inputs = raw_to_input(golden_x_raw, input_scale, input_offset, in_dtype, in_q)
    expected = run_golden(it, model_inputs)
    manifest = {
        "bundle_format": BUNDLE_FORMAT,
        "model_file": model_path.name,
        "model_sha256": sha256_file(model_path),
        "model_size_bytes": model_path.stat().st_size,
        # read from the file: the oldest TFLite runtime that loads it, and the op versions that decide it
        "min_runtime_version": runtime["min_runtime"],
        "op_versions": runtime["ops"],
        "input_shape": in_shape,
        "input_dtype": in_dtype,
        "output_shape": out_shape,
        "output_dtype": out_dtype,
        "layout": "NHWC",
        "channel_order": channel_order,
        "input_scale": float(input_scale),
        "input_offset": float(input_offset),
        "input_quantization": in_q,
        "output_quantization": out_q,
        "input_formula": _input_formula(input_scale, input_offset, in_dtype, in_q),
        "output_formula": _output_formula(out_dtype, out_q),
        # Integer inputs depend on the raw pixel alone: the table is the formula's result, no rounding to get wrong.
        "raw_pixel_to_input": (raw_to_input(np.arange(256, dtype=np.uint8), input_scale, input_offset, in_dtype,
                                            in_q).tolist() if in_q is not None else None),
        "class_names": class_names,
        "labels_file": LABELS,
        "measured": _jsonable(dict(measured)),
        "recipe_hash": str(recipe_hash),
        "edge_kd_version": str(version),
        "golden": {"inputs": GOLDEN_INPUTS, "expected_outputs": GOLDEN_OUTPUTS, "count": int(len(golden_x_raw)),
                   "compare": "bit-exact" if out_q is not None else f"abs diff <= {FLOAT_ATOL:g}",
                   "run": "LiteRT CPU (default XNNPACK delegate), 1 thread, batch 1, one image at a time"},
    }

    work = staging_dir(dest)
    try:
        shutil.copyfile(model_path, work / model_path.name)
        (work / LABELS).write_text("".join(c + "\n" for c in class_names), encoding="utf-8")
        (work / "golden").mkdir()
        _save_npy(work / GOLDEN_INPUTS, golden_x_raw)
        _save_npy(work / GOLDEN_OUTPUTS, expected)
        (work / "README.md").write_text(_readme(manifest), encoding="utf-8")
        # The manifest last: a folder with one is complete.
        (work / MANIFEST).write_text(_dumps(manifest), encoding="utf-8")
        mode = 0o777 & ~umask()
        for p in [work, *work.rglob("*")]:
            os.chmod(p, mode if p.is_dir() else mode & 0o666)
        swap_dir(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dest


def _save_npy(path: Path, array: np.ndarray):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    path.write_bytes(buf.getvalue())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _dumps(obj) -> str:
    """Indented JSON with lists of numbers kept on one line (the 256-entry table stays readable)."""
    text = json.dumps(obj, indent=2)
    # Only lists json.dumps broke over lines ("[" then a newline, impossible inside a JSON string).
    return re.sub(r"\[\n\s*(-?[\d.eE+-]+(?:,\n\s*-?[\d.eE+-]+)*)\n\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def _signed(v: int) -> str:
    return f"- {-v}" if v < 0 else f"+ {v}"


def _f32(v) -> str:
    """The shortest decimal that parses back to the same float32 (what Kotlin/Swift literals need)."""
    return str(np.float32(v))


def _input_formula(scale, offset, dtype, q) -> str:
    x = f"x = float32(raw) * {_f32(scale)} + {_f32(offset)}"
    if q is None:
        return f"{x}  (float32 arithmetic; raw is the 0..255 pixel value)"
    info = np.iinfo(np.dtype(dtype))
    return (f"{x}; q = clamp(round_half_to_even(x / {_f32(q['scale'])}) {_signed(q['zero_point'])}, {info.min}, {info.max}) "
            f"as {dtype}  (float32 arithmetic; raw is the 0..255 pixel value)")


def _output_formula(dtype, q) -> str:
    if q is None:
        return "score = y (float32); class = argmax(score)"
    return f"score = (q {_signed(-q['zero_point'])}) * {_f32(q['scale'])}; class = argmax(score) = argmax(q)"


def _affine_offset(lut) -> int | None:
    """Returns c where the lookup table is exactly q = raw + c, else None."""
    if lut is None:
        return None
    c = lut[0]
    return c if all(v == r + c for r, v in enumerate(lut)) else None


def _readme(m: dict) -> str:
    """Returns README.md's text for manifest ``m``: templates/bundle_readme.md, filled in.

    The prose is all in the templates; this works out the figures and picks the parts that apply: one
    parts file each for the channel order (``bundle_readme_grayscale.md``, ``..._rgb.md``), the input
    dtype (``bundle_readme_int8_input.md``, ``..._float32_input.md``) and the output dtype, and the
    phrases of ``bundle_readme_measured.md`` that the measurement has figures for.
    """
    h, w, c = m["input_shape"][1:]
    meas = m["measured"]
    v = {"stem": m["model_file"].rsplit(".", 1)[0], "h": h, "w": w, "c": c, "k": m["output_shape"][-1],
         "n_pixels": h * w, "n_values": h * w * c, "rgbx_row_bytes": w * 4, "rgbx_bytes": h * w * 4,
         "channel_order": m["channel_order"], "version": m["edge_kd_version"], "recipe_hash": m["recipe_hash"],
         "model_name": meas.get("name"), "model_file": m["model_file"], "model_sha256": m["model_sha256"],
         "size_bytes": f"{m['model_size_bytes']:,}",
         "gzip_bytes": f"{meas['gzip_bytes']:,}" if isinstance(meas.get("gzip_bytes"), int) else "?",
         "labels_file": LABELS, "golden_inputs": GOLDEN_INPUTS, "golden_outputs": GOLDEN_OUTPUTS,
         "golden_count": m["golden"]["count"], "float_atol": f"{FLOAT_ATOL:g}",
         "input_dtype": m["input_dtype"], "output_dtype": m["output_dtype"],
         "input_shape": m["input_shape"], "output_shape": m["output_shape"],
         "input_scale": _f32(m["input_scale"]), "input_offset": _f32(m["input_offset"]),
         "min_runtime_version": m["min_runtime_version"], "memory_method": meas.get("memory_method")}
    iq, oq = m["input_quantization"], m["output_quantization"]
    if iq is not None:
        v.update(in_q_scale=_f32(iq["scale"]), in_zero_point=iq["zero_point"],
                 in_zero_point_term=_signed(iq["zero_point"]))
    if oq is not None:
        v.update(out_q_scale=_f32(oq["scale"]), out_zero_point=oq["zero_point"],
                 out_zero_point_term=_signed(-oq["zero_point"]))
    offset = _affine_offset(m["raw_pixel_to_input"])
    v["raw_offset_term"] = _signed(offset) if offset is not None else None

    said = _parts("bundle_readme_measured.md")
    acc, peak = meas.get("accuracy"), meas.get("peak_memory_bytes")
    v["accuracy_percent"] = f"{acc * 100:.2f}" if isinstance(acc, (int, float)) else None
    v["accuracy"] = _fill(said["accuracy" if v["accuracy_percent"] else "no_accuracy"], v)
    items = [_fill(said["latency_item"], {"median_ms": f"{t['median_ms']:.3f}", "q1_ms": f"{t['q1_ms']:.3f}",
                                          "q3_ms": f"{t['q3_ms']:.3f}", "threads": n,
                                          "plural_s": "s" if str(n) != "1" else ""})
             for n, t in (meas.get("latency_ms") or {}).items()
             if isinstance(t, dict) and all(k in t for k in LATENCY_KEYS)]
    v["latency_items"] = ", ".join(items)
    v["latency"] = _fill(said["latency"], v) if items else ""
    v["peak_mib"] = f"{peak / 2 ** 20:.1f}" if peak else None
    v["peak_memory"] = _fill(said["peak_memory"], v) if peak else ""
    v["runtime"] = _fill(said["runtime" if m["min_runtime_version"] else "no_runtime"], v)

    for name in (m["channel_order"].lower(), f"{m['input_dtype']}_input", f"{m['output_dtype']}_output"):
        v.update({part: _fill(text, v) for part, text in _parts(f"bundle_readme_{name}.md").items()})
    if offset is None:
        v["input_affine"] = ""  # the table is no plain shift of the raw value: only manifest.json's list says it
    return _fill(_template("bundle_readme.md"), v)


_TEMPLATES = Path(__file__).parent / "templates"  # shipped as package data beside this module
#: files beside this module that are part of its code: pipelines.codehash hashes them with it
CODE_DATA = ("templates/*.md",)


@functools.cache
def _template(name: str) -> str:
    return (_TEMPLATES / name).read_text(encoding="utf-8")


def _parts(name: str) -> dict[str, str]:
    """Returns {part: text} of a parts template: each part is the text after its ``<!-- part: NAME -->`` line up
    to the next such line, less its last newline (the text before the first one is a comment for maintainers)."""
    chunks = re.split(r"^<!-- part: (\w+) -->\n", _template(name), flags=re.M)
    return {chunks[i]: chunks[i + 1].removesuffix("\n") for i in range(1, len(chunks), 2)}


def _fill(text: str, values: dict) -> str:
    """Returns template ``text`` with its ``$name`` placeholders filled (``$$`` is a plain ``$``, as in Swift's
    ``$0``); a line that holds only a placeholder whose value is empty (a part that does not apply) is left out."""
    text = re.sub(r"^\$(\w+)\n", lambda p: "" if values[p.group(1)] == "" else p.group(0), text, flags=re.M)
    return string.Template(text).substitute(values)
