"""The deployable bundle: one folder an app developer drops into an Android or iOS project.

A bundle holds the ``.tflite`` file, ``labels.txt``, ``manifest.json`` (everything needed to feed
the model: shapes, dtypes, the raw pixel → input mapping and the tensors' quantization, read from
the model itself), ``golden/`` test vectors (real images and the outputs LiteRT gives for them,
fed exactly as the manifest says) and a ``README.md`` with Kotlin and Swift snippets carrying this
model's numbers. ``python -m pipelines.verify BUNDLE`` checks a bundle against itself.

Example::

    import json
    from edge_kd import data
    from edge_kd.export.bundle import measured_from, pick, write_bundle

    rows = json.load(open("tflite_out/mnist-cnn/benchmark/models.json"))["models"]
    row = pick(rows)                                  # a ModelRow: the smallest int8 student within 0.5 pp
    b = data.load("mnist", limit_test=16)
    write_bundle("tflite_out/mnist-cnn/bundle", "tflite_out/mnist-cnn/" + row.path,
                 class_names=b.info.class_names, input_scale=b.info.input_scale,
                 input_offset=b.info.input_offset, channel_order="grayscale",
                 golden_x_raw=b.raw("test", range(16)), measured=measured_from(row),
                 recipe_hash="3f2a...", version="0.1.0")
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from edge_kd.bench.compat import runtime as compat_runtime
from edge_kd.bench.results import ModelRow, rows_of
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
LATENCY_KEYS = ("median_ms", "q1_ms", "q3_ms")  # per thread count in measured["latency_ms"]
# what write_bundle's ``measured`` must hold (measured_from adds the peak memory and its method)
MEASURED_KEYS = ("name", "accuracy", "latency_ms", "size_bytes", "gzip_bytes", "sparsity")


# -- choosing the model ------------------------------------------------------------------------------
def pick(models: list[ModelRow], tolerance_pp: float = 0.5, name: str | None = None,
         min_runtime: str | None = None) -> ModelRow:
    """Returns the results row to bundle: ``name``'s, else the smallest integer student within tolerance.

    The default is the smallest (``size_bytes``) student ``.tflite`` of an integer variant (int8,
    int8_mixed, int16x8) whose accuracy lies within ``tolerance_pp`` percentage points of the most
    accurate student ``.tflite``; where no integer one does, the smallest student ``.tflite`` of any
    variant within that tolerance. With ``min_runtime`` ("2.14"), only files that load on that
    TFLite runtime (their own ``min_runtime_version``) are candidates, and the tolerance is counted
    from the best of those. int16x8 files count as integer, though XNNPACK does not run them.
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
    best = max(m.accuracy for m in students)
    # 1e-9 keeps a model exactly at the tolerance edge in despite float rounding of accuracy - best.
    close = [m for m in students if m.accuracy >= best - tolerance_pp / 100.0 - 1e-9]
    integer = [m for m in close if m.variant in INTEGER]
    return min(integer or close, key=lambda m: (m.size_bytes, -m.accuracy, m.name))


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
    if not (isinstance(measured["accuracy"], (int, float)) and 0 <= measured["accuracy"] <= 1):
        raise ValueError(f"measured accuracy is a fraction 0..1 (as in models.json); got {measured['accuracy']!r}")

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
    name, in_shape, out_shape = m["model_file"], m["input_shape"], m["output_shape"]
    h, w, c = in_shape[1:]
    k = out_shape[-1]
    stem = name.rsplit(".", 1)[0]
    int_in, int_out = m["input_quantization"] is not None, m["output_quantization"] is not None
    meas = m["measured"]
    lat = ", ".join(f"{v['median_ms']:.3f} ms (IQR {v['q1_ms']:.3f}–{v['q3_ms']:.3f}) at {t} "
                    f"thread{'s' if str(t) != '1' else ''}"
                    for t, v in (meas.get("latency_ms") or {}).items()
                    if isinstance(v, dict) and all(k in v for k in LATENCY_KEYS))
    peak = meas.get("peak_memory_bytes")
    acc, gz = meas.get("accuracy"), meas.get("gzip_bytes")
    accuracy_text = f"accuracy {acc * 100:.2f} %" if isinstance(acc, (int, float)) else "accuracy not measured"
    gzip_text = f"{gz:,}" if isinstance(gz, int) else "?"
    pixels = ("one grey value per pixel (C = 1)" if m["channel_order"] == "grayscale"
              else "R, G, B per pixel, in that order (C = 3)")
    consts_kt = [f"const val INPUT_SCALE = {_f32(m['input_scale'])}f", f"const val INPUT_OFFSET = {_f32(m['input_offset'])}f"]
    consts_sw = [f"let inputScale: Float = {_f32(m['input_scale'])}", f"let inputOffset: Float = {_f32(m['input_offset'])}"]
    if int_in:
        iq = m["input_quantization"]
        consts_kt += [f"const val IN_Q_SCALE = {_f32(iq['scale'])}f", f"const val IN_ZERO_POINT = {iq['zero_point']}"]
        consts_sw += [f"let inQScale: Float = {_f32(iq['scale'])}", f"let inZeroPoint: Float = {iq['zero_point']}"]
    if int_out:
        oq = m["output_quantization"]
        consts_kt += [f"const val OUT_SCALE = {_f32(oq['scale'])}f", f"const val OUT_ZERO_POINT = {oq['zero_point']}"]
        consts_sw += [f"let outScale: Float = {_f32(oq['scale'])}", f"let outZeroPoint: Float = {oq['zero_point']}"]

    lines = [
        f"# {stem}: a {h}×{w} {m['channel_order']} image classifier for LiteRT (TensorFlow Lite)",
        "",
        f"Made by edge-kd {m['edge_kd_version']} (recipe `{m['recipe_hash']}`) from model `{meas.get('name')}`. "
        f"Measured on the test set: {accuracy_text}{', latency ' + lat if lat else ''}; "
        f"{m['model_size_bytes']:,} bytes ({gzip_text} gzipped)"
        + (f"; peak memory at inference {peak / 2 ** 20:.1f} MiB ({meas.get('memory_method')})" if peak else "")
        + (f". It loads on TFLite / LiteRT {m['min_runtime_version']} or newer (the file's own "
           "`min_runtime_version`)." if m["min_runtime_version"] else
           ". The file does not state the oldest runtime that loads it (no `min_runtime_version`)."),
        "",
        "## Files",
        "",
        f"- `{name}` — the model. sha256 `{m['model_sha256']}`.",
        f"- `{LABELS}` — the {k} class names, one per line; line i is output index i.",
        "- `manifest.json` — shapes, dtypes, the preprocessing and the tensors' quantization, read from the model.",
        f"- `{GOLDEN_INPUTS}` — {m['golden']['count']} real test images, raw uint8 pixels "
        f"{m['golden']['count']}×{h}×{w}×{c}.",
        f"- `{GOLDEN_OUTPUTS}` — the model's raw output tensors for them ({m['output_dtype']}, "
        f"{m['golden']['count']}×{k}); {'they must match bit for bit' if int_out else f'they must match within {FLOAT_ATOL:g}'} "
        "on LiteRT's CPU path. Feed the golden inputs through your app's code to check your preprocessing.",
        "",
        "Check the bundle on a desktop with `python -m pipelines.verify <this folder>`.",
        "",
        "## Input and output",
        "",
        f"- Input: one tensor {m['input_dtype']} `{in_shape}`, layout NHWC (rows, then columns, then channels), "
        f"{pixels}, batch 1.",
        f"- From a raw pixel value `raw` (0..255) to the model's float input: `x = raw * {_f32(m['input_scale'])} "
        f"+ {_f32(m['input_offset'])}` (float32).",
    ]
    if int_in:
        iq = m["input_quantization"]
        lines.append(f"- The input is {m['input_dtype']}: `q = clamp(round_half_to_even(x / {_f32(iq['scale'])}) "
                     f"{_signed(iq['zero_point'])}, -128, 127)` (float32 arithmetic).")
        cst = _affine_offset(m["raw_pixel_to_input"])
        if cst is not None:
            lines.append(f"  For this model that is exactly `q = raw {'-' if cst < 0 else '+'} {abs(cst)}` for every "
                         "raw value 0..255.")
        lines.append("  `manifest.json` → `raw_pixel_to_input` lists q for each raw value 0..255.")
    else:
        lines.append("- The input is float32: write x itself (4 bytes, native byte order).")
    if int_out:
        oq = m["output_quantization"]
        lines.append(f"- Output: {m['output_dtype']} `{out_shape}`; the score of class i is "
                     f"`(q[i] {_signed(-oq['zero_point'])}) * {_f32(oq['scale'])}`; the class is the arg-max.")
    else:
        lines.append(f"- Output: float32 `{out_shape}`, one score per class; the class is the arg-max.")

    # -- Kotlin
    if int_in:
        kt_fill = [
            f"    val input = ByteBuffer.allocateDirect({h * w * c}).order(ByteOrder.nativeOrder())",
            "    for (raw in pixels) {",
            "        val x = raw.toFloat() * INPUT_SCALE + INPUT_OFFSET",
            "        val q = Math.rint((x / IN_Q_SCALE).toDouble()).toInt() + IN_ZERO_POINT  // rint: half to even",
            "        input.put(q.coerceIn(-128, 127).toByte())",
            "    }",
        ]
    else:
        kt_fill = [
            f"    val input = ByteBuffer.allocateDirect(4 * {h * w * c}).order(ByteOrder.nativeOrder())",
            "    for (raw in pixels) input.putFloat(raw.toFloat() * INPUT_SCALE + INPUT_OFFSET)",
        ]
    if int_out:
        kt_out = [f"    val output = Array(1) {{ ByteArray({k}) }}",
                  "    interpreter.run(input, output)",
                  "    val scores = output[0].map { (it - OUT_ZERO_POINT) * OUT_SCALE }"]
    else:
        kt_out = [f"    val output = Array(1) {{ FloatArray({k}) }}",
                  "    interpreter.run(input, output)",
                  "    val scores = output[0]"]
    kt_pixels = "one grey value per pixel" if c == 1 else "R, G, B per pixel, in that order"
    kt_take = (["        val r = (p shr 16) and 0xFF",
                "        val g = (p shr 8) and 0xFF",
                "        val b = p and 0xFF",
                "        pixels[i] = (299 * r + 587 * g + 114 * b + 500) / 1000  // grey as ITU-R 601 luma"]
               if c == 1 else
               ["        pixels[3 * i] = (p shr 16) and 0xFF      // R",
                "        pixels[3 * i + 1] = (p shr 8) and 0xFF   // G",
                "        pixels[3 * i + 2] = p and 0xFF           // B  (the Bitmap's alpha is dropped)"])
    kt_photo = [
        f"// A photo of any size: scaled to {w}×{h} (the size the model was trained at), then {kt_pixels}.",
        "// edge-kd resized the training images bicubic with antialiasing; createScaledBitmap with filter = true",
        "// is bilinear: close, not bit-identical (the golden images are already at the model's size).",
        "fun pixelsOf(photo: Bitmap): IntArray {",
        "    // getPixels cannot read a HARDWARE bitmap (ImageDecoder's default): copy it to ARGB_8888 first",
        "    val readable = if (photo.config == Bitmap.Config.HARDWARE) photo.copy(Bitmap.Config.ARGB_8888, false) else photo",
        f"    val scaled = Bitmap.createScaledBitmap(readable, {w}, {h}, true)",
        f"    val argb = IntArray({w * h})",
        f"    scaled.getPixels(argb, 0, {w}, 0, 0, {w}, {h})  // row by row from the top, ARGB_8888",
        f"    val pixels = IntArray({h * w * c})",
        "    for (i in argb.indices) {",
        "        val p = argb[i]",
        *kt_take,
        "    }",
        "    return pixels",
        "}",
    ]
    kotlin = [
        "```kotlin",
        "// build.gradle: implementation(\"com.google.ai.edge.litert:litert:1.0.1\")  (or org.tensorflow:tensorflow-lite)",
        "// Put the model and labels.txt in src/main/assets; keep the model uncompressed: androidResources { noCompress += \"tflite\" }",
        "import android.content.Context",
        "import android.graphics.Bitmap",
        "import org.tensorflow.lite.Interpreter",
        "import java.io.FileInputStream",
        "import java.nio.ByteBuffer",
        "import java.nio.ByteOrder",
        "import java.nio.channels.FileChannel",
        "",
        *consts_kt,
        "",
        "fun loadInterpreter(context: Context): Interpreter {",
        f"    val fd = context.assets.openFd(\"{name}\")",
        "    val model = FileInputStream(fd.fileDescriptor).channel.use {",
        "        it.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)",
        "    }",
        "    return Interpreter(model, Interpreter.Options().setNumThreads(1))",
        "}",
        "",
        *kt_photo,
        "",
        f"// pixels: {h * w * c} raw values 0..255, row by row, {kt_pixels}",
        "fun classify(interpreter: Interpreter, pixels: IntArray): Int {",
        *kt_fill,
        "    input.rewind()",
        *kt_out,
        "    return scores.indices.maxByOrNull { scores[it] }!!  // index into labels.txt",
        "}",
        "```",
    ]

    # -- Swift
    if int_in:
        sw_fill = [
            "    let input: [Int8] = pixels.map { raw in",
            "        let x = Float(raw) * inputScale + inputOffset",
            "        let q = (x / inQScale).rounded(.toNearestOrEven) + inZeroPoint",
            "        return Int8(max(-128, min(127, q)))",
            "    }",
        ]
    else:
        sw_fill = ["    let input: [Float32] = pixels.map { Float($0) * inputScale + inputOffset }"]
    if int_out:
        sw_out = ["    let q = output.data.withUnsafeBytes { Array($0.bindMemory(to: Int8.self)) }",
                  "    let scores = q.map { (Float($0) - outZeroPoint) * outScale }"]
    else:
        sw_out = ["    let scores = output.data.withUnsafeBytes { Array($0.bindMemory(to: Float32.self)) }"]
    sw_pixels = "one grey value per pixel" if c == 1 else "R, G, B per pixel, in that order"
    # data: nil lets the context own its pixel memory (a Swift array's pointer would not outlive the call)
    if c == 1:
        sw_context = [f"    let context = CGContext(data: nil, width: {w}, height: {h}, bitsPerComponent: 8, "
                      f"bytesPerRow: {w},",
                      "                            space: CGColorSpaceCreateDeviceGray(),",
                      "                            bitmapInfo: CGImageAlphaInfo.none.rawValue)!"]
        sw_take = [f"    let grey = context.data!.bindMemory(to: UInt8.self, capacity: {w * h})",
                   f"    return Array(UnsafeBufferPointer(start: grey, count: {w * h}))  "
                   "// the device grey space: close to, not exactly, ITU-R 601 luma"]
    else:
        sw_context = [f"    let context = CGContext(data: nil, width: {w}, height: {h}, bitsPerComponent: 8, "
                      f"bytesPerRow: {w * 4},",
                      "                            space: CGColorSpaceCreateDeviceRGB(),",
                      "                            bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue)!"]
        sw_take = [f"    let rgba = context.data!.bindMemory(to: UInt8.self, capacity: {w * h * 4})",
                   f"    var pixels = [UInt8](); pixels.reserveCapacity({h * w * 3})",
                   f"    for i in 0..<{w * h} {{ pixels += [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]] }}  "
                   "// R, G, B; the fourth byte dropped",
                   "    return pixels"]
    sw_photo = [
        f"// A photo of any size: drawn into a {w}×{h} bitmap (the size the model was trained at; high-quality",
        "// interpolation, close to but not bit-identical with edge-kd's antialiased bicubic), rows from the top,",
        f"// then {sw_pixels}.",
        "func pixels(of photo: CGImage) -> [UInt8] {",
        *sw_context,
        "    context.interpolationQuality = .high",
        f"    context.draw(photo, in: CGRect(x: 0, y: 0, width: {w}, height: {h}))",
        *sw_take,
        "}",
    ]
    swift = [
        "```swift",
        "// Podfile: pod 'TensorFlowLiteSwift'. Add the model and labels.txt to the app target.",
        "import CoreGraphics",
        "import Foundation",
        "import TensorFlowLite",
        "",
        *consts_sw,
        "",
        f"let modelPath = Bundle.main.path(forResource: \"{stem}\", ofType: \"tflite\")!",
        "var options = Interpreter.Options()",
        "options.threadCount = 1",
        "let interpreter = try Interpreter(modelPath: modelPath, options: options)",
        "try interpreter.allocateTensors()",
        "",
        *sw_photo,
        "",
        f"// pixels: {h * w * c} raw values 0...255, row by row, {'one grey value per pixel' if c == 1 else 'R, G, B per pixel'}",
        "func classify(_ pixels: [UInt8]) throws -> Int {",
        *sw_fill,
        "    try interpreter.copy(input.withUnsafeBufferPointer { Data(buffer: $0) }, toInputAt: 0)",
        "    try interpreter.invoke()",
        "    let output = try interpreter.output(at: 0)",
        *sw_out,
        "    return scores.indices.max { scores[$0] < scores[$1] }!  // index into labels.txt",
        "}",
        "```",
    ]
    lines += ["", "## Android (Kotlin)", "", *kotlin, "", "## iOS (Swift)", "", *swift, "",
              "Both snippets compute in float32 in the same order as the formula in `manifest.json` "
              f"(`input_formula`), so they give the golden inputs' exact {'int8 values' if int_in else 'floats'}; "
              "run the golden images through `classify` once and compare with `golden/expected_outputs.npy`.", ""]
    return "\n".join(lines)
