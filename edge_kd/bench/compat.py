"""Where a ``.tflite`` file will load: its minimum runtime version and op versions, read from the file itself.

The converter stamps every model with a ``min_runtime_version`` metadata entry: the oldest TensorFlow
Lite runtime whose kernels implement every (op, version) pair the model uses, looked up in the
converter's own op-version table. ``runtime`` reads that entry and each operator code's version
from the flatbuffer (LiteRT's own schema module), so no interpreter is built and nothing is guessed.

Example::

    from edge_kd.bench.compat import loads_on, runtime
    r = runtime("student-dynamic.tflite")   # {"min_runtime": "2.17.0", "ops": {"FULLY_CONNECTED": 12, ...}}
    loads_on(r["min_runtime"], "2.14")      # False: an app pinned to TFLite 2.14 cannot load it
"""
from __future__ import annotations

import re
from pathlib import Path

from ai_edge_litert import schema_py_generated as schema

MIN_RUNTIME_KEY = "min_runtime_version"
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")


def runtime(path_or_bytes) -> dict:
    """Returns ``{"min_runtime", "ops"}``: the file's minimum runtime version (None if unstamped) and {op: version}.

    ``ops`` holds the highest version of each op the model uses; custom ops appear as ``CUSTOM:<name>``.
    """
    data = _read(path_or_bytes)
    model = schema.Model.GetRootAsModel(data, 0)
    ops: dict[str, int] = {}
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 live only in builtin_code; older files carry them in deprecated_builtin_code.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")
        if builtin == schema.BuiltinOperator.CUSTOM:
            name = f"CUSTOM:{(code.CustomCode() or b'?').decode(errors='replace')}"
        ops[name] = max(ops.get(name, 0), int(code.Version()))
    min_runtime = None
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() and entry.Name().decode() == MIN_RUNTIME_KEY:
            buf = model.Buffers(entry.Buffer())
            raw = bytes(buf.DataAsNumpy().tobytes()) if buf.DataLength() else _at(data, buf)
            min_runtime = raw.split(b"\0", 1)[0].decode("ascii", errors="replace").strip() or None
    return {"min_runtime": min_runtime, "ops": dict(sorted(ops.items()))}


def version_key(version: str) -> tuple[int, int, int]:
    """Returns ``"2.14"`` as (2, 14, 0), for comparing runtime versions; a malformed one is a ValueError."""
    v = str(version).strip()
    if not _VERSION.match(v):
        raise ValueError(f"a runtime version looks like 2.14 or 2.14.0; got {version!r}")
    parts = [int(p) for p in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def loads_on(min_runtime, target) -> bool:
    """Returns whether a model needing ``min_runtime`` loads on runtime ``target`` (an unstamped model: False)."""
    if min_runtime is None:
        return False  # nothing says where it loads: never promise it does
    return version_key(min_runtime) <= version_key(target)


def _read(path_or_bytes) -> bytes:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes)
    path = Path(path_or_bytes)
    if not path.is_file():
        raise FileNotFoundError(f"no TFLite model at {path}")
    return path.read_bytes()


def _at(data: bytes, buf) -> bytes:
    """Returns a buffer stored outside the flatbuffer (files over 2 GB keep buffers after it, by offset)."""
    offset, size = int(buf.Offset()), int(buf.Size())
    return data[offset:offset + size] if offset > 1 else b""
