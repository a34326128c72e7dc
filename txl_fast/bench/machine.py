"""This machine's measured rates: matrix-multiply FLOP/s and memory bandwidth, and a timer.

CPU: a float32 matmul (2048 x 2048 x 2048) and a 256 MiB tensor copy, timed with
``time.perf_counter``, median of a few repetitions after a warm-up (about a second in all).
CUDA: a bf16 matmul (8192^3) and a 1 GiB copy, timed with CUDA events by
``triton.testing.do_bench`` (median). A copy moves its size twice (read + write); that is the
bandwidth reported. These are achieved rates, the roofline the benchmarks are measured against,
not the vendor's peaks.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Machine:
    device: str                 # "cpu" or "cuda"
    name: str                   # CPU model or GPU name
    threads: int                # torch intra-op threads (CPU) / SM count (CUDA)
    matmul_flops: float         # measured FLOP/s of the matmul below
    matmul_dtype: str
    bandwidth: float            # measured bytes/s of a large copy (read + write)
    method: str                 # how it was timed

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        unit, scale = ("TFLOP/s", 1e12) if self.device == "cuda" else ("GFLOP/s", 1e9)
        return (f"{self.name} ({self.device}, {self.threads} {'SMs' if self.device == 'cuda' else 'threads'}): "
                f"{self.matmul_dtype} matmul {self.matmul_flops / scale:.1f} {unit}, "
                f"copy {self.bandwidth / 1e9:.1f} GB/s ({self.method})")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_time(fn: Callable[[], object], device: str = "cpu", reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()``: perf_counter on the CPU, CUDA events (do_bench, median) on CUDA."""
    if device == "cuda":
        from triton.testing import do_bench  # noqa: PLC0415 (CUDA only)

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(device: str = "cpu", size: int | None = None, copy_mib: int | None = None, reps: int = 5) -> Machine:
    """Measure matmul FLOP/s and copy bandwidth on ``device`` ("cpu" or "cuda")."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("measure('cuda') needs a CUDA device")
        size, copy_mib, dtype = size or 8192, copy_mib or 1024, torch.bfloat16
        props = torch.cuda.get_device_properties(0)
        name, threads, method = props.name, props.multi_processor_count, "CUDA events, do_bench median"
    else:
        size, copy_mib, dtype = size or 2048, copy_mib or 256, torch.float32
        name, threads = cpu_name(), torch.get_num_threads()
        method = f"perf_counter, median of {reps} after a warm-up"
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=device).to(dtype)
    b = torch.randn(size, size, generator=g, device=device).to(dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    t_mm = median_time(lambda: torch.mm(a, b, out=c), device, reps)
    del a, b, c
    n = copy_mib * 2**20 // 4
    src = torch.ones(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_copy = median_time(lambda: dst.copy_(src), device, reps)
    return Machine(device, name, threads, 2.0 * size**3 / t_mm, str(dtype).replace("torch.", ""),
                   2.0 * n * 4 / t_copy, method)


def versions() -> dict[str, str]:
    """Versions of everything the numbers depend on."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for name in ("triton", "transformers", "txl_fast", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    out["cpu_count"] = str(os.cpu_count())
    return out
