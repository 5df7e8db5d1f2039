"""What ``training.mixed_precision`` takes on this host: the one rule, with no TensorFlow in it (a stage's key reads
it, and so every stage's code would otherwise hold the training code)."""
from __future__ import annotations

from pathlib import Path

#: the policies of ``training.mixed_precision``: float16 for GPUs (with loss scaling), bfloat16 for CPUs that compute
#: it natively (AVX512_BF16 or AMX; float32's range, so no loss scaling)
MIXED = {"float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


def mixed_policy(setting, gpu: bool, cpu_flags: frozenset | None = None) -> tuple[str | None, str]:
    """Returns the Keras policy of ``training.mixed_precision`` (``False``, ``True``, ``"float16"``, ``"bfloat16"``)
    on this host, None for float32, and why in a few words. ``True`` takes the fast one here: float16 on a GPU,
    bfloat16 on a CPU that computes it natively, else none (bfloat16 is emulated, and slower, on other CPUs)."""
    if setting is False:
        return None, "off"
    if setting is not True:
        return MIXED[setting], "asked for"
    if gpu:
        return MIXED["float16"], "a GPU"
    flags = cpu_flags if cpu_flags is not None else _cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return MIXED["bfloat16"], "a CPU with " + " and ".join(sorted(flags & {"avx512_bf16", "amx_bf16"}))
    return None, "this CPU has no native bfloat16 (AVX512_BF16 or AMX)"


def _cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())
