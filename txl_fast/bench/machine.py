"""This machine, measured: its CPU flags, and the rates the benchmarks' floors are made of.

Measured in the same run as the benchmark (``measure``, 2-4 s on a 2-core CPU):
  - matmul FLOP/s in float32 and bfloat16, x @ W^T (as ``F.linear``) at the shapes a wt103 segment
    multiplies (128 rows by the (3072, 1024), (4096, 1024) and (1024, 4096) weights) and 2048^3;
  - read bandwidth: ``x.sum()`` over a float32 buffer of at least 4x the last-level cache (256 MiB
    at least), and over a buffer the size of one wt103 layer's weights (fp32, r_net left out);
  - copy bandwidth: ``dst.copy_(src)`` of the large buffer, counted as its size read + written.
Every rate is the best and the median of ``reps`` rounds, the measurements alternated inside each
round (a load that comes and goes hits them alike), after one warm-up round, timed with
``time.perf_counter``. On CUDA each is ``triton.testing.do_bench``'s list of CUDA-event times
instead (8192^3 squares, a 1 GiB buffer). These are achieved rates, the floors the benchmarks
compare against, not the vendor's peaks: ``matmul_rate(dtype)`` is the best over the shapes,
``read_rate`` the large buffer's best read.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Callable, ContextManager, Optional

import torch

from txl_fast import dtypes

MATMUL_DTYPES = ("float32", "bfloat16")          # and float16 on CUDA
# (rows, d_in, d_out) of x @ W^T: a wt103 segment's qkv, FF-in and FF-out products (and a square)
SEGMENT_SHAPES = ((128, 1024, 3072), (128, 1024, 4096), (128, 4096, 1024))


@dataclass
class Machine:
    device: str                 # "cpu" or "cuda"
    name: str                   # CPU model or GPU name
    threads: int                # torch intra-op threads (CPU) / SM count (CUDA)
    method: str                 # how it was timed
    flags: dict                 # CPU flag -> present (dtypes.CPU_FLAGS); {} on CUDA
    llc_bytes: Optional[int]    # last-level cache, None when unknown
    matmul: dict                # dtype -> "MxKxN" -> {"best", "median"} FLOP/s
    read: dict                  # "large" / "layer" -> {"bytes", "best", "median"} bytes/s read
    copy: dict                  # {"bytes", "best", "median"} bytes/s, read + written

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Machine":
        return cls(**d)

    def matmul_rate(self, dtype: str = "float32") -> float:
        """The floor's FLOP/s for ``dtype``: the best measured over the shapes."""
        if dtype not in self.matmul:
            raise ValueError(f"no {dtype} matmul rate was measured (measured: {', '.join(self.matmul)})")
        return max(r["best"] for r in self.matmul[dtype].values())

    @property
    def read_rate(self) -> float:
        """The floor's bytes/s: the best read of the large buffer."""
        return self.read["large"]["best"]

    def summary(self) -> str:
        """One line: the machine and its floors."""
        unit, scale = ("TFLOP/s", 1e12) if self.device == "cuda" else ("GFLOP/s", 1e9)
        flags = flags_line(self.flags)
        unit_name = "SMs" if self.device == "cuda" else "thread" if self.threads == 1 else "threads"
        where = f"{self.threads} {unit_name}" + (f"; {flags}" if flags else "")
        matmul = " / ".join(f"{dt} {self.matmul_rate(dt) / scale:.0f}" for dt in self.matmul)
        return (f"{self.name} ({self.device}, {where}): matmul {matmul} {unit}, read {self.read_rate / 1e9:.1f} GB/s "
                f"({self.read['large']['bytes'] / 2**20:.0f} MiB; one wt103 layer's weights "
                f"{self.read['layer']['best'] / 1e9:.1f}), copy {self.copy['best'] / 1e9:.1f} GB/s (best of "
                f"{self.method})")


def flags_line(flags: dict) -> str:
    """The flags that are on (``dtypes.cpu_flags()``), comma-separated, for a benchmark's machine line."""
    return ", ".join(f for f, on in flags.items() if on) or ("no AVX-512/AMX" if flags else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llc_bytes() -> Optional[int]:
    """Size of the CPU's last-level cache (sysfs), None when unknown."""
    root, best = "/sys/devices/system/cpu/cpu0/cache", (0, None)
    try:
        for index in os.listdir(root):
            if not index.startswith("index"):
                continue
            with open(f"{root}/{index}/level", encoding="ascii") as f:
                level = int(f.read())
            with open(f"{root}/{index}/size", encoding="ascii") as f:
                text = f.read().strip()
            size = int(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]] if text[-1].isalpha() else int(text)
            best = max(best, (level, size))
    except (OSError, ValueError, KeyError):
        return None
    return best[1]


def time_call(fn: Callable[[], object], device: str = "cpu") -> tuple[float, object]:
    """(seconds, result) of one call of ``fn``: perf_counter, the device synchronised before and after
    on CUDA. The one clock every measurement of txl_fast.bench and benchmarks/ reads."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def alternated_times(fns: dict[str, Callable[[], object]], device: str = "cpu", reps: int = 5,
                     after_round: Optional[Callable[[], object]] = None, warmup: int = 1,
                     events: bool = True, around: Optional[Callable[[str], ContextManager]] = None
                     ) -> dict[str, list]:
    """Seconds of every ``fns`` entry: ``warmup`` rounds, then ``reps`` rounds each calling every
    entry once in turn (``time_call``; ``after_round()`` after each round, e.g. a probe of the
    machine; ``around(name)``: a context entered before the clock starts and left after it stops,
    e.g. ``harness.PeakMemory``); on CUDA do_bench's CUDA-event times, entry by entry, unless
    ``events`` is False (a long call: ``time_call``'s synchronised wall time, alternated as on the CPU)."""
    if device == "cuda" and events:
        from triton.testing import do_bench  # noqa: PLC0415 (CUDA only)

        return {k: [t / 1e3 for t in do_bench(fn, warmup=25, rep=100, return_mode="all")] for k, fn in fns.items()}
    times = {k: [] for k in fns}
    for rnd in range(reps + warmup):
        for k, fn in fns.items():
            with around(k) if around is not None else contextlib.nullcontext():
                seconds, _ = time_call(fn, device)
            if rnd >= warmup:
                times[k].append(seconds)
        if after_round is not None:
            after_round()
    return times


def median_time(fn: Callable[[], object], device: str = "cpu", reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (``alternated_times`` of one entry): perf_counter on the CPU, CUDA
    events (do_bench) on CUDA."""
    return statistics.median(alternated_times({"fn": fn}, device, reps, warmup=warmup)["fn"])


def best_time(fn: Callable[[], object], device: str = "cpu", reps: int = 5, warmup: int = 1) -> float:
    """Best seconds of ``fn()`` over ``reps`` calls after ``warmup`` (``alternated_times`` of one entry)."""
    return min(alternated_times({"fn": fn}, device, reps, warmup=warmup)["fn"])


def rate(work: float, seconds: list) -> dict:
    """{"best", "median"} of work / seconds."""
    return {"best": work / min(seconds), "median": work / statistics.median(seconds)}


def wt103_layer_bytes(es: int = 4) -> int:
    """Bytes of one wt103 layer's weights a decode step reads (r_net's output is cached)."""
    from txl_fast.bench import analytic  # noqa: PLC0415
    from txl_fast.config import TransfoXLConfig  # noqa: PLC0415

    cfg = TransfoXLConfig()
    p = analytic.parameter_count(cfg)
    return es * (p["layers"] - p["r_net"]) // cfg.n_layer


def measure(device: str = "cpu", reps: int = 5, square: Optional[int] = None, read_bytes: Optional[int] = None,
            shapes=SEGMENT_SHAPES) -> Machine:
    """Measure this machine (see the module docstring); ``square``, ``read_bytes`` and ``shapes``
    shrink it for tests."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("measure('cuda') needs a CUDA device")
        props = torch.cuda.get_device_properties(0)
        name, threads, flags, llc = props.name, props.multi_processor_count, {}, None
        square, read_bytes = square or 8192, read_bytes or 2**30
        method = "do_bench's CUDA-event times"
    else:
        name, threads, flags, llc = cpu_name(), torch.get_num_threads(), dtypes.cpu_flags(), llc_bytes()
        square, read_bytes = square or 2048, read_bytes or max(256 * 2**20, 4 * (llc or 0))
        method = f"{reps} alternated rounds after a warm-up, perf_counter"
    matmul_dtypes = MATMUL_DTYPES + (("float16",) if device == "cuda" else ())
    g = torch.Generator(device=device).manual_seed(0)
    fns, work = {}, {}          # (dtype, "MxKxN"), "read large", "read layer", "copy" -> a call, its FLOPs or bytes
    for dt in matmul_dtypes:
        for rows, d_in, d_out in ((square, square, square), *shapes):
            x = torch.randn(rows, d_in, generator=g, device=device).to(getattr(torch, dt))
            w = torch.randn(d_out, d_in, generator=g, device=device).to(getattr(torch, dt))
            out = torch.empty(rows, d_out, device=device, dtype=x.dtype)
            key = (dt, f"{rows}x{d_in}x{d_out}")
            fns[key] = lambda x=x, w=w, out=out: torch.mm(x, w.t(), out=out)
            work[key] = 2.0 * rows * d_in * d_out
    big = torch.ones(read_bytes // 4, device=device)
    layer = torch.ones(min(wt103_layer_bytes(), read_bytes) // 4, device=device)
    dst = torch.empty_like(big)
    fns["read large"], work["read large"] = big.sum, big.numel() * 4
    fns["read layer"], work["read layer"] = layer.sum, layer.numel() * 4
    fns["copy"], work["copy"] = (lambda: dst.copy_(big)), 2 * big.numel() * 4
    times = alternated_times(fns, device, reps)
    matmul = {dt: {} for dt in matmul_dtypes}
    for key in fns:
        if isinstance(key, tuple):
            matmul[key[0]][key[1]] = rate(work[key], times[key])
    read = {k: {"bytes": work[f"read {k}"], **rate(work[f"read {k}"], times[f"read {k}"])} for k in ("large", "layer")}
    copy = {"bytes": work["copy"], **rate(work["copy"], times["copy"])}
    return Machine(device, name, threads, method, flags, llc, matmul, read, copy)


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
