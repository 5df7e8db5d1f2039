"""Check a deployable bundle against itself: ``python -m pipelines.verify BUNDLE_DIR``.

Checks that the model file hashes as the manifest says, that the manifest's input/output shape,
dtype and quantization are the model's own (read by the LiteRT interpreter), that its
``raw_pixel_to_input`` table is its formula's result, that ``labels.txt`` holds its class names, one
per model output, and that the golden images, prepared exactly as
the manifest says and run through LiteRT, give the expected outputs (integer outputs bit-exact,
float outputs within 1e-5). Prints one line; exit 0 when all holds, 1 naming what differs, 2 when
the bundle is malformed (a missing or unreadable file, a manifest lacking keys).

Example::

    $ python -m pipelines.verify tflite_out/mnist-cnn/bundle
    OK tflite_out/mnist-cnn/bundle: student-int8.tflite sha256 matches; input int8 [1, 28, 28, 1], output int8 [1, 10] as the manifest says; 16 golden outputs bit-exact

    >>> from pipelines.verify import verify
    >>> verify("tflite_out/mnist-cnn/bundle")   # [] when the bundle holds, else one string per problem
    []
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from edge_kd.errors import UserError, first_line
from edge_kd.export import bundle as B
from edge_kd.fileio import sha256_file

REQUIRED = ("model_file", "model_sha256", "input_shape", "input_dtype", "output_shape", "output_dtype",
            "input_quantization", "output_quantization", "input_scale", "input_offset")


class MalformedBundle(UserError):
    """The bundle lacks a file or a manifest key, or a file cannot be read."""


def load(bundle_dir) -> tuple[dict, Path, np.ndarray, np.ndarray]:
    """Returns (manifest, model path, golden inputs, expected outputs); a malformed bundle raises MalformedBundle."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise MalformedBundle(f"{root} is not a bundle folder")
    mpath = root / B.MANIFEST
    if not mpath.is_file():
        raise MalformedBundle(f"{root}: no {B.MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MalformedBundle(f"{mpath}: not readable JSON ({first_line(e)})") from None
    if not isinstance(manifest, dict):
        raise MalformedBundle(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise MalformedBundle(f"{mpath}: missing key(s) {', '.join(missing)}")
    name = manifest["model_file"]
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise MalformedBundle(f"{mpath}: model_file must be a file name inside the bundle, got {name!r}")
    model = root / name
    if not model.is_file():
        raise MalformedBundle(f"{root}: model file {name} named by the manifest is missing")
    golden = []
    for rel in (B.GOLDEN_INPUTS, B.GOLDEN_OUTPUTS):
        p = root / rel
        if not p.is_file():
            raise MalformedBundle(f"{root}: {rel} is missing")
        try:
            golden.append(np.load(p, allow_pickle=False))
        except (OSError, ValueError, EOFError) as e:
            raise MalformedBundle(f"{p}: not a readable .npy ({first_line(e)})") from None
    return manifest, model, golden[0], golden[1]


def verify(bundle_dir) -> list[str]:
    """Returns the problems found in the bundle (empty when it holds); a malformed bundle raises MalformedBundle."""
    return _check(bundle_dir)[0]


def _check(bundle_dir) -> tuple[list[str], str]:
    """Returns (problems, the success line's details)."""
    manifest, model, x_raw, expected = load(bundle_dir)
    problems = []
    digest = sha256_file(model)
    if digest != manifest["model_sha256"]:
        # Not what the manifest describes; a damaged file is not fed to the interpreter at all.
        return [f"{model.name} sha256 {digest[:12]}… differs from the manifest's {str(manifest['model_sha256'])[:12]}…"], ""
    try:
        it = B.batch1_interpreter(model)
    except (ValueError, RuntimeError) as e:
        problems.append(f"{model.name} does not load in LiteRT ({first_line(e)})")
        return problems, ""
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    real = {
        "input_shape": [int(d) for d in inp["shape"]], "input_dtype": np.dtype(inp["dtype"]).name,
        "output_shape": [int(d) for d in out["shape"]], "output_dtype": np.dtype(out["dtype"]).name,
        "input_quantization": B.quantization(inp), "output_quantization": B.quantization(out),
    }
    for key, value in real.items():
        if not _same(manifest[key], value):
            problems.append(f"manifest {key} {json.dumps(manifest[key])} differs from the model's {json.dumps(value)}")
    if problems:
        return problems, ""  # the golden run would only repeat these differences
    labels = _labels(Path(bundle_dir), manifest)
    names = manifest.get("class_names", labels)
    if labels != names:
        problems.append(f"{B.LABELS} ({len(labels)} lines) differs from the manifest's class_names ({len(names)})")
    if len(labels) != real["output_shape"][-1]:
        problems.append(f"{B.LABELS} has {len(labels)} class names for {real['output_shape'][-1]} model outputs")

    try:
        scale, offset = float(manifest["input_scale"]), float(manifest["input_offset"])
    except (TypeError, ValueError):
        raise MalformedBundle(f"manifest input_scale/input_offset must be numbers, got "
                              f"{manifest['input_scale']!r}, {manifest['input_offset']!r}") from None
    dtype, quant = manifest["input_dtype"], manifest["input_quantization"]
    lut = manifest.get("raw_pixel_to_input")
    if lut is not None:
        want = B.raw_to_input(np.arange(256, dtype=np.uint8), scale, offset, dtype, quant).tolist()
        if lut != want:
            bad = [r for r in range(256) if r >= len(lut) or lut[r] != want[r]]
            problems.append(f"manifest raw_pixel_to_input differs from its formula at {len(bad)} raw value(s), first {bad[0]}")
    if x_raw.dtype != np.uint8 or x_raw.ndim != 4 or list(x_raw.shape[1:]) != real["input_shape"][1:] or len(x_raw) == 0:
        problems.append(f"{B.GOLDEN_INPUTS} holds {x_raw.dtype} {list(x_raw.shape)}; expected uint8 "
                        f"[N, {', '.join(map(str, real['input_shape'][1:]))}]")
        return problems, ""
    want_shape = [len(x_raw), *real["output_shape"][1:]]
    if expected.dtype.name != real["output_dtype"] or list(expected.shape) != want_shape:
        problems.append(f"{B.GOLDEN_OUTPUTS} holds {expected.dtype.name} {list(expected.shape)}; expected "
                        f"{real['output_dtype']} {want_shape}")
        return problems, ""
    got = B.run_golden(it, B.raw_to_input(x_raw, scale, offset, dtype, quant))
    if np.issubdtype(expected.dtype, np.integer):
        wrong = got != expected
        d = np.abs(got.astype(np.int64) - expected.astype(np.int64))
        how = "bit-exact"
    else:
        d = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        wrong = ~(d <= B.FLOAT_ATOL)  # NaN counts as wrong
        how = f"within {B.FLOAT_ATOL:g} (max |diff| {float(np.nanmax(d, initial=0.0)):.2g})"
    if wrong.any():
        worst = np.nanmax(d, initial=0.0)
        images = int(wrong.reshape(len(got), -1).any(1).sum())
        problems.append(f"golden outputs differ at {int(wrong.sum())} of {wrong.size} values in {images} of {len(got)} "
                        f"images (max |diff| {worst:.3g}{'' if how == 'bit-exact' else f', allowed {B.FLOAT_ATOL:g}'})")
    line = (f"{model.name} sha256 matches; input {real['input_dtype']} {real['input_shape']}, output "
            f"{real['output_dtype']} {real['output_shape']} as the manifest says; {len(x_raw)} golden outputs {how}")
    return problems, line


def _labels(root: Path, manifest: dict) -> list[str]:
    path = root / B.LABELS
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MalformedBundle(f"{root}: {B.LABELS} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MalformedBundle(f"{path}: not readable UTF-8 text ({type(e).__name__})") from None


def _same(a, b) -> bool:
    if isinstance(b, dict) and isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a) == b  # JSON round-trips a double exactly
    return a == b


@contextlib.contextmanager
def _native_info_silenced():
    """Keeps LiteRT's C++ "INFO: Created TensorFlow Lite XNNPACK delegate" off stderr; anything else is replayed."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    captured = tempfile.TemporaryFile()
    os.dup2(captured.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        rest = [ln for ln in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not ln.startswith("INFO: ")]
        captured.close()
        if rest:
            sys.stderr.write("".join(rest))
            sys.stderr.flush()


def main(argv=None) -> int:
    """Runs the check on argv[0] (the bundle folder); returns the exit status 0, 1 or 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m pipelines.verify BUNDLE_DIR", file=sys.stderr if len(argv) != 1 else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        with _native_info_silenced():
            problems, line = _check(argv[0])
        if problems:
            print(f"FAIL {argv[0]}: {'; '.join(problems)}", file=sys.stderr)
            return 1
        print(f"OK {argv[0]}: {line}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
