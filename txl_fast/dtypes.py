"""The dtypes a model may run in on a device, and the one check every entry point makes.

    float32, float64   everywhere (float64: the validation dtype)
    bfloat16           everywhere; fast on a CPU with native bf16 matmul (AMX-BF16 or AVX512-BF16),
                       emulated (correct, slower than float32) on one without
    float16            on CUDA, and on a CPU only with native fp16 matmul (AVX512-FP16 or AMX-FP16)

``check_dtype`` turns a torch.dtype or its name into the torch.dtype, or raises before anything is
loaded: a TypeError for what is not a dtype, a ValueError naming the supported ones for the rest.
Nothing is ever cast to another dtype than the one asked for.
"""
from __future__ import annotations

import functools

import torch

# the /proc/cpuinfo flags that decide the matmul dtypes of a CPU
CPU_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> dict[str, bool]:
    """CPU_FLAGS -> present, from /proc/cpuinfo; elsewhere from torch's own CPU probes (the flags it
    has no probe for read False)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            present = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        present = None
    if present is not None:
        return {flag: flag in present for flag in CPU_FLAGS}
    probes = {"avx512f": "_is_avx512_supported", "avx512_bf16": "_is_avx512_bf16_supported",
              "amx_tile": "_is_amx_tile_supported", "amx_bf16": "_is_amx_tile_supported",
              "amx_fp16": "_is_amx_fp16_supported"}
    return {flag: bool(getattr(torch.cpu, probes.get(flag, ""), lambda: False)()) for flag in CPU_FLAGS}


def native_bf16_matmul(flags: dict | None = None) -> bool:
    """The CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return flags.get("amx_bf16", False) or flags.get("avx512_bf16", False)


def native_fp16_matmul(flags: dict | None = None) -> bool:
    """The CPU multiplies fp16 matrices in hardware (AVX512-FP16 or AMX-FP16)."""
    flags = cpu_flags() if flags is None else flags
    return flags.get("avx512_fp16", False) or flags.get("amx_fp16", False)


def check_device(device) -> torch.device:
    """A device a model may run on (cpu, cuda, cuda:N present here) -> torch.device; ValueError naming
    the problem otherwise (an unknown name, a device type we do not run on, CUDA absent)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available here (torch {torch.__version__}); use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def _device_type(device) -> str:
    return "cpu" if device is None else torch.device(device).type


def supported(device="cpu") -> list[str]:
    """Names of the dtypes a model may run in on ``device``."""
    fp16 = _device_type(device) == "cuda" or native_fp16_matmul()
    return [name for name in NAMES if name != "float16" or fp16]


def check_dtype(dtype, device="cpu") -> torch.dtype:
    """A torch.dtype or its name ("bfloat16", "torch.bfloat16") -> that torch.dtype, when a model may
    run in it on ``device``. TypeError when ``dtype`` is not a dtype, ValueError naming the supported
    ones when it is unknown or not supported here."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        raise TypeError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__} {dtype!r}")
    allowed = supported(device)
    if name not in allowed:
        why = ""
        if name == "float16":
            why = (" (float16 runs on CUDA, and on a CPU only with native fp16 matmul, AVX512-FP16 or AMX-FP16, "
                   "which this CPU lacks)")
        raise ValueError(f"dtype {name} is not supported on {_device_type(device)}{why}: "
                         f"use one of {', '.join(allowed)}")
    return NAMES[name]
