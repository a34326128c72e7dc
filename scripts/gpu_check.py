#!/usr/bin/env python3
"""The prepared H200 check (issue 15, section 5): one command says what works on a GPU and how fast.

THE COMMAND for the device tool (from the repository root; ~8 minutes with cold compiles):

    run(command="PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT", timeout_s=560)

It needs no installs on the machine's image (python 3.12, torch 2.11 CUDA, triton 3.6; no
sacremoses, no transformers peer): it puts the repository root on sys.path itself. It writes
$OUT/gpu_check.json after every record (a timeout keeps what was done) and prints a short table
last. Copy the JSON to benchmarks/ and the numbers into benchmarks/RESULTS.md as measured.

    python3 scripts/gpu_check.py --cpu-smoke --out DIR     # the CPU rehearsal (tests/test_gpu_check.py)

Stages, in order, each with its own time budget (``BUDGET_S``; the rest of a stage past its budget,
or past the run's deadline ``TOTAL_S``, is recorded as skipped); a record that raises is recorded with its one-line error and the script
goes on, except in stage 1, whose failure ends the run:

1. environment: GPU, SMs, clocks, versions; the ceilings measured here (device copy bandwidth,
   bf16 and fp32 matrix rates, TF32 off) that every timing is set against.
2. compile: every kernel warmed up at the exact shapes used later, first in a process pool (fills
   Triton's on-disk cache; compile seconds per case), then in this process (registers, spills,
   shared memory read from the compiled kernels the JIT cache holds).
3. correctness, each against the float64 ``txl_fast.naive`` reference on fresh random inputs and
   against the torch path (relative Frobenius errors, thresholds in ``LIMITS``): attention output
   and its 6 gradients per case and dtype; the adaptive softmax at the wt103 vocabulary (NLL, every
   gradient, log-probs, top-k); torch.compile(fullgraph=True) against eager; gradients bitwise
   repeatable (dr within 1e-6); the cached decode step's host syncs on CUDA (0 expected);
   generate(cuda_graph=True) against eager tokens; the bidirectional mode (Conformer encoders:
   the Triton kernels, and the torch path for comparison) with padding and a limited context.
4. timings (``triton.testing.do_bench`` medians) of attention (fused, torch path, SDPA on the
   content term alone: the floor, FlexAttention), the decode step, host time per decode step with
   and without CUDA graphs, a Conformer attention core (the Triton kernels, the torch path)
   against SDPA with a float position mask and against FlexAttention,
   the adaptive-softmax loss against a cuBLAS head GEMM, and end-to-end
   wt103 ``evaluate``; each with its roofline floor from ``txl_fast.bench.analytic`` on the
   ceilings of stage 1 (stage 5 of the issue: ``floor_ms`` and ``of_floor`` in every timing).

--cpu-smoke: TRITON_INTERPRET=1 (set before triton is imported), tiny shapes, fp16 as the low
precision (bf16 is broken in the interpreter), CPU timers instead of do_bench, Flex attention
eager, torch.compile with aot_eager: every stage's code runs, in well under 2 minutes; numbers
from it mean nothing. What it cannot rehearse: compiled kernels' metadata, CUDA graphs.

NaN poisoning: the kernels allocate their outputs, so the check fills freed allocator blocks with
NaN before each run (best effort: an output that reuses such a block and is left unwritten shows
as non-finite, and non-finite values always fail).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))           # a script run from the image without an install

# ---- every shape, in one table ---------------------------------------------------------------------
# attention cases: (name, B, Lq, mlen, H, D, window, Lr): Lk = mlen + Lq, Lr None = Lk (unclamped)
WT103 = dict(vocab_size=267735, cutoffs=[20000, 40000, 200000], div_val=4, d_model=1024, d_embed=1024, n_head=16,
             d_head=64, d_inner=4096, n_layer=18, mem_len=1600, clamp_len=1000, same_length=True, dropout=0.0)
SHAPES = {
    "gpu": dict(
        attention=[("odd 37x53 D48", 2, 37, 16, 3, 48, None, None),
                   ("wt103 eval, window, clamped r", 1, 128, 1600, 16, 64, 1600, 1001),
                   ("window 0", 2, 33, 20, 4, 64, 0, None),
                   ("decode Lq1", 4, 1, 1600, 16, 64, 1600, 1001),
                   ("decode Lq5", 4, 5, 300, 16, 64, 300, None),
                   ("D16", 2, 65, 70, 4, 16, 50, None),
                   ("D128", 2, 65, 70, 4, 128, None, 40)],
        dtypes=["float32", "float16", "bfloat16"],
        softmax=dict(vocab=267735, cutoffs=[20000, 40000, 200000], div_val=4, d_proj=1024, d_embed=1024, n=256),
        softmax_dtypes=["float32", "bfloat16"],
        topk=[1, 5],
        graph_model=dict(WT103, vocab_size=30000, cutoffs=[2000, 10000], n_layer=4, d_model=256, d_embed=256,
                         n_head=4, d_inner=512, mem_len=48, clamp_len=40),
        graph_tokens=80,
        bench_attention=dict(batches=[1, 8, 32], tgt=128, mem=1600, H=16, D=64, clamp=1000, dtype="float16"),
        bench_decode=dict(batches=[1, 32], mem=1600, H=16, D=64, dtype="float16"),
        bench_softmax=dict(rows=[128, 4096], dtype="float16"),
        model=WT103,
        bench_host=dict(prompt=16, tokens=96, dtype="float16"),
        bench_eval=dict(batches=[1, 32], segments={1: 8, 32: 4}, dtypes=["float16", "bfloat16"]),
        # bidirectional (Conformer) cases: (name, B, Lq, mlen, H, D, context); lengths ragged per batch row
        bidirectional=[("conformer 400", 8, 400, 0, 4, 64, None), ("limited context, memory", 4, 64, 32, 8, 64, (16, 4))],
        bench_bidirectional=[dict(B=8, L=400, H=4, D=64, dtype="float16"), dict(B=8, L=1500, H=8, D=64, dtype="float16")],
        compile_workers=8,
    ),
    "smoke": dict(
        attention=[("odd 7x12 D12", 2, 7, 5, 2, 12, None, None),
                   ("window, clamped r", 1, 9, 12, 2, 16, 12, 8),
                   ("window 0", 1, 5, 3, 2, 16, 0, None),
                   ("decode Lq1", 2, 1, 20, 2, 16, 20, 12)],
        dtypes=["float32", "float16", "bfloat16"],
        softmax=dict(vocab=300, cutoffs=[50, 100, 200], div_val=2, d_proj=32, d_embed=32, n=24),
        softmax_dtypes=["float32"],
        topk=[1, 5],
        graph_model=dict(WT103, vocab_size=97, cutoffs=[20, 50], n_layer=2, d_model=32, d_embed=32, n_head=4,
                         d_head=8, d_inner=48, div_val=2, mem_len=6, clamp_len=5),
        graph_tokens=6,
        bench_attention=dict(batches=[1], tgt=8, mem=16, H=2, D=16, clamp=12, dtype="float16"),
        bench_decode=dict(batches=[1], mem=16, H=2, D=16, dtype="float16"),
        bench_softmax=dict(rows=[16], dtype="float32"),
        model=dict(WT103, vocab_size=97, cutoffs=[20, 50], n_layer=2, d_model=32, d_embed=32, n_head=4, d_head=8,
                   d_inner=48, div_val=2, mem_len=12, clamp_len=10),
        bench_host=dict(prompt=4, tokens=3, dtype="float32"),
        bench_eval=dict(batches=[1], segments={1: 2}, dtypes=["float32"], tgt=8),
        bidirectional=[("conformer 13", 3, 13, 0, 2, 8, None), ("limited context, memory", 2, 6, 4, 2, 8, (3, 1))],
        bench_bidirectional=[dict(B=2, L=12, H=2, D=8, dtype="float32")],
        compile_workers=2,
        warm_cases=2,
    ),
}
BUDGET_S = {"gpu": {"environment": 40, "compile": 110, "correctness": 150, "timings": 170},
            "smoke": {"environment": 20, "compile": 60, "correctness": 120, "timings": 60}}
TOTAL_S = {"gpu": 470, "smoke": 300}      # no record starts later (the device command's limit is 560 s)
# relative Frobenius error against float64: (output, gradients); low precision also <= 2x the torch path's
LIMITS = {"float32": (1e-5, 3e-5), "float16": (1e-2, 1e-2), "bfloat16": (2e-2, 2e-2)}
BIDIRECTIONAL_DTYPES = ("float32", "bfloat16")
DR_REPEAT = 1e-6                    # dr is accumulated with atomics: bitwise repeatability is not promised
# NVIDIA's published Transformer-XL (PyTorch) wt103 inference figure on an A100, FP16, TorchScript,
# tokens/s by batch size, as quoted in issue 15: published, not measured here
PUBLISHED_A100 = {1: 11068, 32: 32162}


# ---- the record file -------------------------------------------------------------------------------
class Report:
    """Records in order, written to DIR/gpu_check.json after each one."""

    def __init__(self, out: Path, mode: str):
        self.path = out / "gpu_check.json"
        self.doc = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "records": []}
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def add(self, record: dict) -> dict:
        self.doc["records"].append(record)
        self.save()
        return record

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.path)


class Stage:
    """Runs a stage's records under its time budget and the run's deadline (``TOTAL_S`` after the
    start: records that ran long in earlier stages shorten the later ones): each record is a
    function returning a dict."""

    def __init__(self, report: Report, name: str, budget_s: float, deadline: float, fatal: bool = False):
        self.report, self.name, self.budget, self.fatal = report, name, budget_s, fatal
        self.start, self.deadline = time.perf_counter(), deadline

    def left(self) -> float:
        """Seconds left: of the stage's budget, and before the deadline."""
        now = time.perf_counter()
        return min(self.budget - (now - self.start), self.deadline - now)

    def run(self, name: str, fn, *args, **kwargs) -> dict:
        base = {"stage": self.name, "name": name}
        if self.left() <= 0:
            return self.report.add({**base, "status": "skipped",
                                    "why": f"stage budget {self.budget} s or the run's deadline spent"})
        t0 = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:                           # noqa: BLE001 (one record fails, the rest runs)
            line = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            record = self.report.add({**base, "status": "error", "error": line,
                                      "where": traceback.format_exc().strip().splitlines()[-3][:200]})
            if self.fatal:
                raise
            return record
        return self.report.add({**base, "status": "ok", **result, "seconds": round(time.perf_counter() - t0, 3)})


# ---- helpers ---------------------------------------------------------------------------------------
def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def finite(*tensors) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def poison(device) -> None:
    """Fill freed allocator blocks with NaN (best effort, see the module docstring)."""
    import torch

    if device.type == "cuda":
        blocks = [torch.full((n,), float("nan"), device=device) for n in (2**12, 2**16, 2**20, 2**24, 2**26)]
        del blocks


def bench_ms(fn, smoke: bool) -> float:
    """Median milliseconds of fn(): do_bench on a GPU, a CPU timer over 2 runs in the smoke."""
    if smoke:
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def roofline(ms: float, cost, ceilings: dict, es: int) -> dict:
    """The timing against its floor: max(FLOPs / matrix rate of the dtype, bytes / copy bandwidth)."""
    rate = ceilings["matmul_bf16_flops"] if es == 2 else ceilings["matmul_fp32_flops"]
    floor = max(cost.flops / rate, cost.bytes / ceilings["copy_bytes_per_s"])
    return {"ms": round(ms, 4), "floor_ms": round(1e3 * floor, 4),
            "of_floor": round(1e3 * floor / ms, 3) if ms else None}


# ---- stage 1: environment ------------------------------------------------------------------------
def environment(device, smoke: bool) -> dict:
    import torch
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False           # references and fp32 rates in true fp32
    torch.backends.cudnn.allow_tf32 = False
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "device": str(device), "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        try:
            q = "clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,driver_version"
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def ceilings(device, smoke: bool) -> dict:
    """Measured: device-to-device copy (bytes read + written per second), bf16 and fp32 matrix rates."""
    import torch

    n_copy = 2**20 if smoke else 2**30                     # bytes per buffer (1 GiB on the GPU)
    src = torch.randn(n_copy // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), smoke)
    out = {"copy_bytes_per_s": 2 * n_copy / (copy_ms * 1e-3)}
    for dtype, key, n in ((torch.bfloat16, "matmul_bf16_flops", 8192), (torch.float32, "matmul_fp32_flops", 8192)):
        n = 128 if smoke else n
        if smoke and dtype == torch.bfloat16:
            dtype = torch.float32                          # the CPU's bf16 matmul is no ceiling of anything here
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        out[key] = 2 * n**3 / (bench_ms(lambda: a @ b, smoke) * 1e-3)
    return {"copy_tb_per_s": round(out["copy_bytes_per_s"] / 1e12, 3),
            "bf16_tflops": round(out["matmul_bf16_flops"] / 1e12, 1),
            "fp32_tflops": round(out["matmul_fp32_flops"] / 1e12, 2), "values": out}


# ---- inputs ----------------------------------------------------------------------------------------
def attention_inputs(case, dtype, device, seed: int):
    """Fresh random inputs of an attention case, in ``dtype`` (never zero): q, k, v, r, u, w."""
    import torch

    _, B, Lq, mlen, H, D, window, Lr = case
    Lk = mlen + Lq
    g = torch.Generator(device=device).manual_seed(seed)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    return [t(B, Lq, H, D), t(B, Lk, H, D), t(B, Lk, H, D), t(Lr or Lk, H, D), t(H, D, scale=0.3), t(H, D, scale=0.3)]


def softmax_inputs(spec, dtype, device, seed: int):
    """hidden (N, d_proj), target (N,) with ignored labels, and the projected adaptive softmax's
    weights, biases, projs, cluster weight and bias (HF's layout, div_val clusters)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    bounds = [0, *spec["cutoffs"], spec["vocab"]]
    dims = [spec["d_embed"] // spec["div_val"] ** c for c in range(len(bounds) - 1)]
    weights = [t(hi - lo, d, scale=2 / math.sqrt(d)) for lo, hi, d in zip(bounds, bounds[1:], dims)]
    biases = [t(hi - lo, scale=0.5) for lo, hi in zip(bounds, bounds[1:])]
    projs = [t(spec["d_proj"], d, scale=1 / math.sqrt(spec["d_proj"])) for d in dims]
    C = len(bounds) - 2
    cluster = [t(C, dims[0], scale=2 / math.sqrt(dims[0])), t(C, scale=0.5)]
    n = spec["n"]
    target = torch.randint(0, spec["vocab"], (n,), generator=g, device=device)
    target[:: 7] = -100                                              # ignored labels
    target[1] = bounds[-1] - 1                                       # the last word of the last tail
    return t(n, spec["d_proj"]), target, (weights, biases, projs, *cluster)


# ---- stage 2: compile ------------------------------------------------------------------------------
def warm_cases(S: dict) -> list:
    """Every kernel launch of the later stages, as (kind, args) cases a worker can run alone (the
    smoke rehearses the first few: the interpreter compiles nothing)."""
    cases = [("attention", (case, dtype)) for case in S["attention"] for dtype in S["dtypes"]]
    b = S["bench_attention"]
    cases += [("attention", ((f"bench B{B}", B, b["tgt"], b["mem"], b["H"], b["D"], b["mem"], None), b["dtype"]))
              for B in b["batches"]]
    d = S["bench_decode"]
    cases += [("attention", ((f"decode B{B}", B, 1, d["mem"], d["H"], d["D"], d["mem"], None), d["dtype"]))
              for B in d["batches"]]
    cases += [("bidirectional", (case, dtype)) for case in S["bidirectional"] for dtype in BIDIRECTIONAL_DTYPES]
    cases += [("bidirectional", (("bench", spec["B"], spec["L"], 0, spec["H"], spec["D"], None), spec["dtype"]))
              for spec in S["bench_bidirectional"]]
    cases += [("softmax", (dtype, S["softmax"]["n"])) for dtype in S["softmax_dtypes"]]
    cases += [("softmax", (S["bench_softmax"]["dtype"], n)) for n in S["bench_softmax"]["rows"]]
    if "warm_cases" not in S:
        return cases
    kinds = [kind for kind, _ in cases]                      # the smoke: the first few of each kind
    return [c for i, c in enumerate(cases) if kinds[:i].count(c[0]) < S["warm_cases"]]


def warm(kind: str, args, smoke: bool) -> float:
    """Run one case's kernels once (forward and backward); its wall seconds (compiles included)."""
    import torch

    from txl_fast import ops, use_backend

    device = torch.device("cpu" if smoke else "cuda")
    t0 = time.perf_counter()
    with use_backend("triton"):
        if kind == "attention":
            case, dtype = args
            dtype = getattr(torch, dtype)
            if smoke and dtype == torch.bfloat16:
                return 0.0
            x = [t.requires_grad_() for t in attention_inputs(case, dtype, device, 0)]
            out = ops.rel_attention(*x, scale=case[5] ** -0.5, window=case[6])
            torch.autograd.grad(out, x, torch.randn_like(out))
        elif kind == "bidirectional":
            case, dtype = args
            dtype = getattr(torch, dtype)
            if smoke and dtype == torch.bfloat16:
                return 0.0
            x, lengths = bidirectional_inputs(case, dtype, device, 0)
            x = [t.requires_grad_() for t in x]
            out = ops.rel_attention(*x, scale=case[5] ** -0.5, causal=False, context=case[6], key_lengths=lengths,
                                    empty_rows="zero")
            torch.autograd.grad(out, x, torch.randn_like(out))
        else:
            dtype, n = args
            spec = dict(SHAPES["smoke" if smoke else "gpu"]["softmax"], n=n)
            hidden, target, params = softmax_inputs(spec, getattr(torch, dtype), device, 0)
            leaves = [hidden.requires_grad_(), *(p.requires_grad_() for p in _flat(params))]
            nll = ops.adaptive_nll(hidden, target, *params)
            torch.autograd.grad(nll.sum(), leaves)
            with torch.no_grad():
                ops.adaptive_log_softmax(hidden, *params)
                ops.adaptive_topk(hidden, 5, *params)
    synchronize(device)
    return time.perf_counter() - t0


def _flat(params) -> list:
    weights, biases, projs, cw, cb = params
    return [*weights, *biases, *projs, cw, cb]


def _warm_worker(item):
    kind, args, smoke = item
    try:
        return round(warm(kind, args, smoke), 3), None
    except Exception as exc:                               # noqa: BLE001 (reported by the parent)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def compile_pool(S: dict, smoke: bool, stage: Stage) -> dict:
    """The warm-up cases in a process pool: each worker compiles into Triton's on-disk cache. Cases
    not done when the stage's budget runs out are cancelled and the workers ended."""
    import concurrent.futures
    import multiprocessing

    cases = warm_cases(S)
    pool = concurrent.futures.ProcessPoolExecutor(S["compile_workers"], mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(_warm_worker, (kind, args, smoke)) for kind, args in cases]
    concurrent.futures.wait(futures, timeout=max(1.0, stage.left() - 15))
    workers = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:                      # this script's own children, still compiling
        if worker.is_alive():
            worker.terminate()
    per_case = [{"case": f"{kind} {_case_name(args)}", **(dict(zip(("seconds", "error"), f.result())) if f.done()
                                                           and not f.cancelled() else {"error": "not done in budget"})}
                for (kind, args), f in zip(cases, futures)]
    return {"cases": per_case, "failed_cases": sum(c["error"] is not None for c in per_case)}


def _case_name(args) -> str:
    return " ".join(str(a[0]) if isinstance(a, tuple) else str(a) for a in args)


def compile_in_process(S: dict, smoke: bool, stage: Stage) -> dict:
    """The same cases here (loads from the disk cache, or compiles what the pool did not), while the
    stage's budget lasts, then each compiled kernel's resources."""
    seconds = {}
    for kind, args in warm_cases(S):
        if stage.left() <= 0:
            seconds[f"{kind} {_case_name(args)}"] = "skipped: stage budget spent"
            continue
        seconds[f"{kind} {_case_name(args)}"] = round(warm(kind, args, smoke), 3)
    return {"load_seconds": seconds, "kernels": kernel_resources()}


def kernel_resources() -> list:
    """Registers, spills, shared memory of every compiled kernel in the JIT caches (none under the interpreter)."""
    from triton.runtime.jit import JITFunction

    from txl_fast.kernels import adaptive_softmax, adaptive_topk, rel_attention

    rows = []
    for module in (rel_attention, adaptive_softmax, adaptive_topk):
        for name, fn in vars(module).items():
            if not isinstance(fn, JITFunction):
                continue
            for entry in getattr(fn, "device_caches", {}).values():
                cache = next((e for e in entry if isinstance(e, dict)), {}) if isinstance(entry, tuple) else {}
                for kernel in cache.values():
                    if hasattr(kernel, "_init_handles"):
                        kernel._init_handles()
                    meta = kernel.metadata
                    rows.append({"kernel": f"{module.__name__.split('.')[-1]}.{name}",
                                 "regs": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
                                 "shared": getattr(meta, "shared", None), "warps": getattr(meta, "num_warps", None),
                                 "stages": getattr(meta, "num_stages", None)})
    return rows


# ---- stage 3: correctness --------------------------------------------------------------------------
def verdict(errors: dict, torch_errors: dict, dtype: str, all_finite: bool) -> dict:
    """pass/fail of named errors (``out`` or a gradient) against LIMITS[dtype] and 2x the torch path."""
    out_limit, grad_limit = LIMITS[dtype]
    failures = [] if all_finite else ["non-finite values"]
    for name, err in errors.items():
        limit = out_limit if name == "out" else grad_limit
        if not err <= limit:
            failures.append(f"{name} {err:.2e} > {limit:.0e}")
        if dtype != "float32" and name in torch_errors and not err <= 2 * torch_errors[name]:
            failures.append(f"{name} {err:.2e} > 2x torch {torch_errors[name]:.2e}")
    return {"status_check": "pass" if not failures else "fail", "failures": failures,
            "errors": {k: float(f"{v:.3e}") for k, v in errors.items()},
            "torch_errors": {k: float(f"{v:.3e}") for k, v in torch_errors.items()}}


GRADS = ("dq", "dk", "dv", "dr", "du", "dw")


def check_attention(case, dtype_name: str, device, smoke: bool) -> dict:
    import torch

    from txl_fast import naive, ops, use_backend

    dtype = getattr(torch, dtype_name)
    if smoke and dtype == torch.bfloat16:
        return {"status_check": "skipped", "why": "bf16 is broken in the Triton interpreter"}
    scale, window = case[5] ** -0.5, case[6]
    x = attention_inputs(case, dtype, device, seed=hash((case[0], dtype_name)) % 2**31)
    x64 = [t.double().requires_grad_() for t in x]                  # the reference of the rounded inputs
    ref = naive.rel_attention(*x64, scale, window)[0]
    dout = torch.randn_like(ref)
    refs = [ref, *torch.autograd.grad(ref, x64, dout)]

    def run(backend_name):
        leaves = [t.clone().requires_grad_() for t in x]
        poison(device)
        with use_backend(backend_name):
            out = ops.rel_attention(*leaves, scale=scale, window=window)
            return [out, *torch.autograd.grad(out, leaves, dout.to(dtype))]

    got, torch_got = run("triton"), run("torch")
    names = ("out", *GRADS)
    return verdict({n: rel_err(g, r) for n, g, r in zip(names, got, refs)},
                   {n: rel_err(g, r) for n, g, r in zip(names, torch_got, refs)}, dtype_name, finite(*got))


def bidirectional_inputs(case, dtype, device, seed: int):
    """q, k, v, r (Lk + Lq - 1 distances), u, w of a bidirectional case and its key lengths (B,):
    batch row b keeps Lk - 3 b keys, at least one."""
    import torch

    name, B, Lq, mlen, H, D, _ = case
    x = attention_inputs((name, B, Lq, mlen, H, D, None, 2 * Lq + mlen - 1), dtype, device, seed)
    Lk = Lq + mlen
    return x, torch.tensor([max(1, Lk - 3 * b) for b in range(B)], device=device)


def check_bidirectional(case, dtype_name: str, device, smoke: bool) -> dict:
    """The bidirectional mode (Conformer encoders) on the device: the Triton kernels against float64,
    output and every gradient, and the output without autograd; padded keys, zero empty rows; the
    torch path's errors beside them (low precision: within 2x of them)."""
    import torch

    from txl_fast import naive, ops, use_backend

    dtype = getattr(torch, dtype_name)
    if smoke and dtype == torch.bfloat16:
        return {"status_check": "skipped", "why": "bf16 is broken in the Triton interpreter"}
    context, D = case[6], case[5]
    x, lengths = bidirectional_inputs(case, dtype, device, seed=7)
    keys = torch.arange(x[1].shape[1], device=device)[None, :] < lengths[:, None]
    x64 = [t.double().requires_grad_() for t in x]
    ref = naive.rel_attention(*x64, D**-0.5, causal=False, context=context, key_mask=keys, empty_rows="zero")[0]
    dout = torch.randn_like(ref)
    refs = [ref, *torch.autograd.grad(ref, x64, dout)]
    mode = dict(scale=D**-0.5, causal=False, context=context, key_lengths=lengths, empty_rows="zero")

    def run(backend_name):
        leaves = [t.clone().requires_grad_() for t in x]
        poison(device)
        with use_backend(backend_name):
            out = ops.rel_attention(*leaves, **mode)
            got = [out, *torch.autograd.grad(out, leaves, dout.to(dtype))]
            with torch.no_grad():
                inference = ops.rel_attention(*x, **mode)
        errors = {n: rel_err(g, r) for n, g, r in zip(("out", *GRADS), got, refs)}
        errors["out_inference"] = rel_err(inference, ref)
        return errors, finite(*got, inference)

    (errors, all_finite), (torch_errors, _) = run("triton"), run("torch")
    return verdict(errors, torch_errors, dtype_name, all_finite)


def check_softmax(S: dict, dtype_name: str, device, smoke: bool) -> dict:
    """NLL and every gradient, and the log-probs, at the table's vocabulary, against float64."""
    import torch

    from txl_fast import naive, ops, use_backend

    dtype = getattr(torch, dtype_name)
    hidden, target, params = softmax_inputs(S["softmax"], dtype, device, seed=11)
    flat = [hidden, *_flat(params)]

    def unflat(ts):
        n = len(params[0])
        return ts[0], (ts[1 : 1 + n], ts[1 + n : 1 + 2 * n], ts[1 + 2 * n : 1 + 3 * n], ts[-2], ts[-1])

    leaves64 = [t.double().requires_grad_() for t in flat]
    h64, p64 = unflat(leaves64)
    ref = naive.adaptive_nll(h64, target, *p64)
    grad = torch.rand_like(ref) + 0.5
    refs = [ref, *torch.autograd.grad(ref, leaves64, grad)]
    with torch.no_grad():
        ref_logp = naive.adaptive_log_softmax(h64, *p64)

    def run(backend_name):
        leaves = [t.clone().requires_grad_() for t in flat]
        h, p = unflat(leaves)
        poison(device)
        with use_backend(backend_name):
            nll = ops.adaptive_nll(h, target, *p)
            grads = torch.autograd.grad(nll, leaves, grad.to(nll.dtype))
            with torch.no_grad():
                logp = ops.adaptive_log_softmax(h, *p)
        return [nll, *grads], logp

    (got, logp), (torch_got, torch_logp) = run("triton"), run("torch")
    n = len(params[0])
    names = ["out", "dhidden", *(f"dweight{c}" for c in range(n)), *(f"dbias{c}" for c in range(n)),
             *(f"dproj{c}" for c in range(n)), "dcluster_weight", "dcluster_bias"]
    errors = {nm: rel_err(g, r) for nm, g, r in zip(names, got, refs)}
    errors["logprobs"] = rel_err(logp, ref_logp)
    torch_errors = {nm: rel_err(g, r) for nm, g, r in zip(names, torch_got, refs)}
    torch_errors["logprobs"] = rel_err(torch_logp, ref_logp)
    return verdict(errors, torch_errors, dtype_name, finite(*got, logp))


def check_topk(S: dict, k: int, device, smoke: bool) -> dict:
    """adaptive_topk (triton) against the float64 full log-softmax's top k: same ids, close values."""
    import torch

    from txl_fast import naive, ops, use_backend

    hidden, _, params = softmax_inputs(S["softmax"], torch.float32, device, seed=12)
    with torch.no_grad():
        ref_values, ref_ids = naive.adaptive_log_softmax(hidden.double(), *[
            [t.double() for t in p] if isinstance(p, list) else p.double() for p in params]).topk(k, dim=1)
        with use_backend("triton"):
            values, ids = ops.adaptive_topk(hidden, k, *params)
    same = float((ids == ref_ids).double().mean())
    err = rel_err(values, ref_values)
    ok = same == 1.0 and err <= LIMITS["float32"][0] and finite(values)
    return {"status_check": "pass" if ok else "fail", "ids_equal": same, "errors": {"values": float(f"{err:.3e}")}}


def check_compile(S: dict, device, smoke: bool) -> dict:
    """torch.compile(fullgraph=True) of attention -> adaptive NLL, forward and backward, against eager."""
    import torch

    from txl_fast.ops import library

    case = S["attention"][0]
    q, k, v, r, u, w = [t.requires_grad_() for t in attention_inputs(case, torch.float32, device, 21)]
    B, Lq, H, D = q.shape
    spec = dict(S["softmax"], d_proj=H * D, n=B * Lq)
    _, target, params = softmax_inputs(spec, torch.float32, device, 22)
    leaves = [q, k, v, r, u, w, *(p.requires_grad_() for p in _flat(params))]

    def loss(q, k, v, r, u, w):
        out = library.rel_attention(q, k, v, r, u, w, scale=D ** -0.5, window=case[6])
        return library.adaptive_nll(out.reshape(B * Lq, H * D), target, *params).sum()

    eager = loss(q, k, v, r, u, w)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if smoke else "inductor")
    got = compiled(q, k, v, r, u, w)
    got_grads = torch.autograd.grad(got, leaves)
    compile_s = time.perf_counter() - t0
    errors = {"loss": rel_err(got, eager), **{f"grad{i}": rel_err(g, e) for i, (g, e) in
                                                 enumerate(zip(got_grads, eager_grads))}}
    worst = max(errors.values())
    return {"status_check": "pass" if worst <= LIMITS["float32"][1] and finite(got, *got_grads) else "fail",
            "worst_error": float(f"{worst:.3e}"), "compile_s": round(compile_s, 2)}


def check_determinism(S: dict, device, smoke: bool) -> dict:
    """Every gradient twice on the same inputs: bitwise equal, dr within DR_REPEAT (atomics)."""
    import torch

    from txl_fast import ops, use_backend

    dtype = torch.float16 if smoke else torch.bfloat16
    worst = {}
    for case in S["attention"][:2]:
        x = attention_inputs(case, dtype, device, 31)
        dout = torch.randn(x[0].shape, device=device).to(dtype)
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in x]
            with use_backend("triton"):
                out = ops.rel_attention(*leaves, scale=case[5] ** -0.5, window=case[6])
                runs.append(torch.autograd.grad(out, leaves, dout))
        for name, a, b in zip(GRADS, *runs):
            worst[name] = max(worst.get(name, 0.0), rel_err(a, b))
    hidden, target, params = softmax_inputs(dict(S["softmax"], n=64), dtype if not smoke else torch.float32,
                                            device, 32)
    runs = []
    for _ in range(2):
        leaves = [hidden.clone().requires_grad_(), *(p.clone().requires_grad_() for p in _flat(params))]
        n = len(params[0])
        p = (leaves[1 : 1 + n], leaves[1 + n : 1 + 2 * n], leaves[1 + 2 * n : 1 + 3 * n], leaves[-2], leaves[-1])
        with use_backend("triton"):
            runs.append(torch.autograd.grad(ops.adaptive_nll(leaves[0], target, *p).sum(), leaves))
    worst["softmax"] = max(rel_err(a, b) for a, b in zip(*runs))
    bad = [n for n, e in worst.items() if e > (DR_REPEAT if n == "dr" else 0.0)]
    return {"status_check": "pass" if not bad else "fail", "failures": bad,
            "differences": {k: float(f"{v:.3e}") for k, v in worst.items()}}


def small_model(config: dict, dtype, device):
    import torch

    from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel

    torch.manual_seed(0)
    with torch.device(device):
        model = TransfoXLLMHeadModel(TransfoXLConfig(**config))
    return model.to(dtype).eval()


def check_decode_syncs(S: dict, device, smoke: bool) -> dict:
    """Syncing ATen ops in one cached decode step (greedy, top-k, full row), both launch paths."""
    import contextlib

    import torch

    from txl_fast import backend
    from txl_fast.bench.syncs import SyncCounter
    from txl_fast.inference import decode_step
    from txl_fast.model import trusted_token_ids

    model = small_model(S["graph_model"], torch.float32, device)
    counts = {}
    for backend_name in ("triton", "torch"):
        for do_sample, top_k in ((False, 0), (True, 5), (True, 0)):
            ids = torch.randint(0, model.config.vocab_size, (2, 5), device=device)
            forced = backend.force_sync_free() if smoke else contextlib.nullcontext()
            with torch.no_grad(), backend.use_backend(backend_name), forced:
                _, cand, cache = decode_step(model.transformer, model.crit, ids, model.new_cache(2), False, 0)
                with trusted_token_ids(), SyncCounter() as syncs:
                    decode_step(model.transformer, model.crit, cand[:, :1], cache, do_sample, top_k)
            counts[f"{backend_name} sample={do_sample} top_k={top_k}"] = dict(syncs.ops)
    total = sum(sum(c.values()) for c in counts.values())
    return {"status_check": "pass" if total == 0 else "fail", "syncs": counts,
            "note": "CPU: CUDA formulations forced" if smoke else "CUDA"}


def check_graph_generate(S: dict, device, smoke: bool) -> dict:
    """generate(cuda_graph=True) against eager greedy tokens, past several cache layouts."""
    import torch

    from txl_fast import use_backend

    model = small_model(S["graph_model"], torch.float32, device)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), device=device)
    if device.type != "cuda":
        try:
            model.generate(prompt, 3, cuda_graph=True)
        except ValueError as exc:
            return {"status_check": "skipped", "why": f"CUDA only; on the CPU: {exc}"}
        return {"status_check": "fail", "why": "cuda_graph=True on the CPU did not raise"}
    result = {}
    for backend_name in ("triton", "torch"):
        with use_backend(backend_name):
            eager = model.generate(prompt, S["graph_tokens"])
            graphed = model.generate(prompt, S["graph_tokens"], cuda_graph=True)
        result[backend_name] = float((eager == graphed).double().mean())
    # the torch path's eager steps take HF's zero rows in closed form: rounding may flip a token there
    return {"status_check": "pass" if result["triton"] == 1.0 else "fail", "tokens_equal": result}


# ---- stage 4: timings ------------------------------------------------------------------------------
def time_attention(S: dict, B: int, ceilings: dict, device, smoke: bool, flex: bool = False) -> dict:
    """Eval shape: fused vs torch path vs SDPA (content term only: the floor); or (flex=True)
    FlexAttention, its compile seconds and its difference from the fused kernel's output."""
    import torch
    import torch.nn.functional as F

    from txl_fast import ops, use_backend
    from txl_fast.bench import analytic
    from txl_fast.ops.rel_attention import full_positions

    b = S["bench_attention"]
    dtype = getattr(torch, b["dtype"])
    Lq, mlen, H, D = b["tgt"], b["mem"], b["H"], b["D"]
    Lk, window, scale = mlen + Lq, mlen, D ** -0.5
    case = ("bench", B, Lq, mlen, H, D, window, None)
    q, k, v, r, u, w = attention_inputs(case, dtype, device, 41)
    r_clamped = r[Lk - (b["clamp"] + 1):].contiguous()                      # distances clamp .. 0
    r = full_positions(r_clamped, Lk).contiguous()        # written out, as the model stores them for the kernels
    for t in (q, k, v, r, r_clamped, u, w):
        t.requires_grad_()
    dout = torch.randn_like(q)

    def fused():
        with use_backend("triton"):
            return ops.rel_attention(q, k, v, r, u, w, scale=scale, window=window)

    def torch_path():
        with use_backend("torch"):
            return ops.rel_attention(q, k, v, r_clamped, u, w, scale=scale, window=window)

    qh, kh, vh = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]

    def sdpa():
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale)

    es = q.element_size()
    fwd = analytic.rel_attention(B, H, Lq, Lk, D, es, "fused")
    fwd_bwd = analytic.Cost(3.5 * fwd.flops, 3 * fwd.bytes)      # FlashAttention's count: backward 2.5x forward
    result = {"B": B, "shape": f"B{B} H{H} Lq{Lq} Lk{Lk} D{D} {b['dtype']}",
              "floor_model": "analytic.rel_attention fused; fwd+bwd = 3.5x its FLOPs, 3x its bytes"}
    paths = [("fused", fused, [q, k, v, r, u, w]), ("torch", torch_path, [q, k, v, r_clamped, u, w]),
             ("sdpa_content", sdpa, [qh, kh, vh])]
    if flex:
        flex_fn, result["flex_compile_s"], flex_q = flex_attention_fn(qh, kh, vh, r, u, w, mlen, window, scale,
                                                                      device, smoke)
        with torch.no_grad():                             # the same function? (flex against the kernels)
            result["flex_err_vs_fused"] = float(f"{rel_err(flex_fn().transpose(1, 2), fused()):.2e}")
        paths = [("flex", flex_fn, [flex_q, kh, vh])]
    for name, fn, inputs in paths:
        with torch.no_grad():
            result[f"{name}_fwd"] = roofline(bench_ms(fn, smoke), fwd, ceilings, es)
        if name == "flex" and smoke:
            result["flex_fwd_bwd"] = "n/a: FlexAttention has no backward on the CPU"
            continue
        grad = dout if name in ("fused", "torch") else dout.transpose(1, 2)
        result[f"{name}_fwd_bwd"] = roofline(
            bench_ms(lambda: torch.autograd.grad(fn(), inputs, grad), smoke), fwd_bwd, ceilings, es)
    return result


def time_bidirectional(spec: dict, ceilings: dict, device, smoke: bool, flex: bool = False) -> dict:
    """A Conformer self-attention core, ragged padding: the Triton kernels (``txl_fast``) and the
    torch path's inference and autograd paths vs the same maths through SDPA with the shifted
    position term as a float mask (what the speech libraries' fastest routes do), forward and
    forward + backward; or (flex=True) FlexAttention, its compile seconds and its difference from
    the kernels' output."""
    import torch
    import torch.nn.functional as F

    from txl_fast import ops, use_backend
    from txl_fast.bench import analytic
    from txl_fast.ops.rel_attention import rel_shift

    B, L, H, D = spec["B"], spec["L"], spec["H"], spec["D"]
    dtype = getattr(torch, spec["dtype"])
    (q, k, v, r, u, w), lengths = bidirectional_inputs(("bench", B, L, 0, H, D, None), dtype, device, seed=43)
    hidden = torch.arange(L, device=device)[None, :] >= lengths[:, None]                     # (B, L) padding
    scale = D ** -0.5
    for t in (q, k, v, r, u, w):
        t.requires_grad_()

    def on(backend_name):
        def attend():
            with use_backend(backend_name):
                return ops.rel_attention(q, k, v, r, u, w, scale=scale, causal=False, key_lengths=lengths,
                                         empty_rows="zero")
        return attend

    def sdpa_float_mask():
        qt = q.transpose(1, 2)                                                               # (B, H, L, D)
        position = rel_shift((qt + w[:, None]) @ r.permute(1, 2, 0), L) * scale              # (B, H, L, L)
        position = position.masked_fill(hidden[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(qt + u[:, None], k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=position, scale=scale)
        return out.transpose(1, 2)

    es = q.element_size()
    fwd = analytic.rel_attention(B, H, L, L, D, es, "fused")
    fwd_bwd = analytic.Cost(3.5 * fwd.flops, 3 * fwd.bytes)
    result = {"shape": f"B{B} H{H} L{L} D{D} {spec['dtype']}, ragged lengths",
              "floor_model": "analytic.rel_attention fused at Lq = Lk = L; fwd+bwd 3.5x FLOPs, 3x bytes"}
    dout = torch.randn_like(q)
    if flex:
        flex_fn, result["flex_compile_s"], flex_q = flex_bidirectional_fn(q, k, v, r, u, w, lengths, scale, device,
                                                                          smoke)
        with torch.no_grad():                             # the same function? (flex against the kernels)
            result["flex_err_vs_fused"] = float(f"{rel_err(flex_fn().transpose(1, 2), on('triton')()):.2e}")
            result["flex_fwd"] = roofline(bench_ms(flex_fn, smoke), fwd, ceilings, es)
        result["flex_fwd_bwd"] = "n/a: FlexAttention has no backward on the CPU" if smoke else roofline(
            bench_ms(lambda: torch.autograd.grad(flex_fn(), flex_q, dout.transpose(1, 2)), smoke), fwd_bwd, ceilings,
            es)
        return result
    for name, fn in (("txl_fast", on("triton")), ("torch_path", on("torch")), ("sdpa_float_mask", sdpa_float_mask)):
        with torch.no_grad():
            result[f"{name}_fwd"] = roofline(bench_ms(fn, smoke), fwd, ceilings, es)
        result[f"{name}_fwd_bwd"] = roofline(
            bench_ms(lambda: torch.autograd.grad(fn(), (q, k, v, r, u, w), dout), smoke), fwd_bwd, ceilings, es)
    return result


def flex_bidirectional_fn(q, k, v, r, u, w, lengths, scale, device, smoke: bool):
    """FlexAttention for a Conformer core: the shifted position term as a precomputed score tensor,
    key padding (one length per batch row) as a per-row block mask."""
    import torch

    from txl_fast.ops.rel_attention import rel_shift

    L = q.shape[1]
    qh, kh, vh = [t.detach().transpose(1, 2).contiguous() for t in (q, k, v)]              # (B, H, L, D)
    with torch.no_grad():                  # (B, H, L, L): scale * (q_i + pos_bias_v) . r_{i - j}
        position = rel_shift((qh + w.detach()[:, None]) @ r.detach().permute(1, 2, 0), L) * scale

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    return compiled_flex(qh + u.detach()[:, None], kh, vh, position, mask_mod, q.shape[0], scale, device, smoke)


def flex_attention_fn(qh, kh, vh, r, u, w, mlen, window, scale, device, smoke: bool):
    """FlexAttention with the position term as a precomputed score tensor (score_mod) and the
    causal + memory + same_length visibility as a block mask; its compile seconds apart."""
    import torch

    from txl_fast.ops.rel_attention import full_positions, visibility_mask

    B, H, Lq, D = qh.shape
    Lk = kh.shape[2]
    with torch.no_grad():          # (B, H, Lq, Lk): scale * (q_i + r_r_bias) . r_{distance(i, j)}, 0 where hidden
        rows = full_positions(r.detach(), Lk)                                        # (Lk, H, D)
        raw = ((qh.detach() + w.detach()[None, :, None]) @ rows.permute(1, 2, 0)) * scale     # (B, H, Lq, Lk)
        distance = (torch.arange(Lq, device=device)[:, None] + mlen - torch.arange(Lk, device=device)[None, :])
        index = (Lk - 1 - distance.clamp(0, Lk - 1)).expand(B, H, Lq, Lk)
        position = raw.gather(3, index).masked_fill(~visibility_mask(Lq, Lk, window, device), 0)

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx + mlen - kv_idx
        return (d >= 0) & (d < window)

    return compiled_flex(qh + u.detach()[None, :, None], kh, vh, position, mask_mod, None, scale, device, smoke)


def compiled_flex(q_content, kh, vh, position, mask_mod, batch, scale, device, smoke: bool):
    """FlexAttention of (B, H, Lq, D) queries (the content bias already added) with ``position``
    (B, H, Lq, Lk) added to the scores and ``mask_mod`` as the block mask (per batch row when
    ``batch`` is B, shared when None): the function, its compile seconds (forward, and backward on
    a GPU) and the query leaf its gradient is taken for."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + position[b, h, q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, batch, None, q_content.shape[2], kh.shape[2], device=str(device))
    run = flex_attention if smoke else torch.compile(flex_attention)
    # no gradient on the CPU, where FlexAttention has no backward
    qb = q_content.detach().requires_grad_(not smoke)
    kf, vf = (kh.detach(), vh.detach()) if smoke else (kh, vh)

    def flex():
        return run(qb, kf, vf, score_mod=score_mod, block_mask=block_mask, scale=scale)

    t0 = time.perf_counter()
    out = flex()
    if not smoke:
        torch.autograd.grad(out, [qb, kf, vf], torch.ones_like(out))
    return flex, round(time.perf_counter() - t0, 2), qb


def time_decode(S: dict, B: int, ceilings: dict, device, smoke: bool) -> dict:
    """One decode step's attention (Lq 1 over a full memory): fused vs torch path vs SDPA content."""
    import torch
    import torch.nn.functional as F

    from txl_fast import ops, use_backend
    from txl_fast.bench import analytic

    d = S["bench_decode"]
    dtype = getattr(torch, d["dtype"])
    case = ("decode", B, 1, d["mem"], d["H"], d["D"], d["mem"], None)
    q, k, v, r, u, w = attention_inputs(case, dtype, device, 51)
    scale = d["D"] ** -0.5
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    cost = analytic.rel_attention(B, d["H"], 1, k.shape[1], d["D"], q.element_size(), "fused")
    result = {"B": B, "shape": f"B{B} H{d['H']} Lq1 Lk{k.shape[1]} D{d['D']} {d['dtype']}"}
    with torch.no_grad():
        for name, backend_name in (("fused", "triton"), ("torch", "torch")):
            def step(backend_name=backend_name):
                with use_backend(backend_name):
                    return ops.rel_attention(q, k, v, r, u, w, scale=scale, window=d["mem"])
            result[name] = roofline(bench_ms(step, smoke), cost, ceilings, q.element_size())
        result["sdpa_content"] = roofline(bench_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=scale),
                                                   smoke), cost, ceilings, q.element_size())
    return result


def time_host_per_step(S: dict, ceilings: dict, device, smoke: bool) -> dict:
    """wt103-config model, batch 1: generate's tokens/s and one decode step's host microseconds,
    eager and replayed from a CUDA graph."""
    import torch

    from txl_fast import use_backend
    from txl_fast.bench import analytic
    from txl_fast.config import TransfoXLConfig
    from txl_fast.inference import GRAPH_SLACK, GraphedDecode, decode_step
    from txl_fast.model import trusted_token_ids

    h = S["bench_host"]
    model = small_model(S["model"], getattr(torch, h["dtype"]), device)
    prompt = torch.randint(0, model.config.vocab_size, (1, h["prompt"]), device=device)
    result = {}
    with use_backend("triton"):
        for graph in ([False, True] if device.type == "cuda" else [False]):
            model.generate(prompt, 4, cuda_graph=graph)                          # warm (and capture)
            synchronize(device)
            t0 = time.perf_counter()
            model.generate(prompt, h["tokens"], cuda_graph=graph)
            synchronize(device)
            key = "generate_tok_per_s_graph" if graph else "generate_tok_per_s"   # graph: captures included
            result[key] = round(h["tokens"] / (time.perf_counter() - t0), 1)
        with torch.no_grad():
            _, cand, cache = decode_step(model.transformer, model.crit, prompt, model.new_cache(1), False, 0)
            ids = cand[:, :1]
            with trusted_token_ids():
                def host_us(fn, n=10):
                    times = []
                    for _ in range(n):
                        synchronize(device)
                        t0 = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - t0)
                    synchronize(device)
                    return round(1e6 * statistics.median(times), 1)
                result["host_us_eager"] = host_us(lambda: decode_step(model.transformer, model.crit, ids, cache,
                                                                      False, 0))
                if device.type == "cuda":
                    cache.fix_for_graphs(1, GRAPH_SLACK)
                    graphed = GraphedDecode(lambda x: decode_step(model.transformer, model.crit, x, cache,
                                                                   False, 0)[:2], cache, ids)
                    for _ in range(GRAPH_SLACK + 2):
                        graphed(ids)                                            # capture every layout
                    result["host_us_graph"] = host_us(lambda: graphed(ids))
    cfg = TransfoXLConfig(**S["model"])
    step = analytic.generated_token(cfg, 1, cfg.mem_len, cached=True, es=next(model.parameters()).element_size())
    result["floor_ms_per_token"] = round(1e3 * max(step.flops / ceilings["matmul_bf16_flops"],
                                                   step.bytes / ceilings["copy_bytes_per_s"]), 4)
    return result


def time_softmax(S: dict, n: int, ceilings: dict, device, smoke: bool) -> dict:
    """Adaptive-softmax loss forward+backward (triton, torch path) vs the head's cuBLAS GEMMs."""
    import torch

    from txl_fast import ops, use_backend
    from txl_fast.bench import analytic
    from txl_fast.config import TransfoXLConfig

    b = S["bench_softmax"]
    dtype = getattr(torch, b["dtype"])
    spec = dict(S["softmax"], n=n)
    hidden, target, params = softmax_inputs(spec, dtype, device, 61)
    leaves = [hidden.requires_grad_(), *(p.requires_grad_() for p in _flat(params))]
    cfg = TransfoXLConfig(**{**WT103, "vocab_size": spec["vocab"], "cutoffs": spec["cutoffs"],
                             "div_val": spec["div_val"], "d_model": spec["d_proj"], "d_embed": spec["d_embed"]})
    es = hidden.element_size()
    fwd = analytic.adaptive_softmax(n, cfg, es, labels=True, share=analytic.uniform_share(cfg))
    fwd_bwd = analytic.Cost(3 * fwd.flops, 2 * fwd.bytes)
    result = {"N": n, "dtype": b["dtype"], "floor_model": "analytic.adaptive_softmax; fwd+bwd = 3x FLOPs, 2x bytes"}
    for name in ("triton", "torch"):
        def loss(name=name):
            with use_backend(name):
                return torch.autograd.grad(ops.adaptive_nll(hidden, target, *params).sum(), leaves)
        result[name] = roofline(bench_ms(loss, smoke), fwd_bwd, ceilings, es)
    h0 = (hidden @ params[2][0]).detach()                                     # (N, d_0): the head's input
    w0, g = params[0][0].detach(), torch.randn(n, params[0][0].shape[0], device=device, dtype=dtype)

    def head_gemms():
        return h0 @ w0.t(), g @ w0, g.t() @ h0                                 # logits, dh, dW
    head = analytic.linear(n, w0.shape[1], w0.shape[0], es) * 3
    result["cublas_head_gemms"] = roofline(bench_ms(head_gemms, smoke), head, ceilings, es)
    return result


def time_evaluate(S: dict, B: int, dtype_name: str, ceilings: dict, device, smoke: bool) -> dict:
    """End-to-end evaluate() tokens/s of a random-weight model of the table's config, both backends,
    on HF's zero memory (init_mems="zeros": every segment attends to a full memory, the steady state)."""
    import torch

    from txl_fast import use_backend
    from txl_fast.bench import analytic
    from txl_fast.config import TransfoXLConfig
    from txl_fast.inference import evaluate

    e = S["bench_eval"]
    tgt = e.get("tgt", 128)
    model = small_model(S["model"], getattr(torch, dtype_name), device)
    cfg = TransfoXLConfig(**S["model"])
    stream = torch.randint(0, cfg.vocab_size, (B * e["segments"][B] * tgt + B,))
    step = analytic.eval_segment(cfg, B, tgt, cfg.mem_len, cached=True, es=2 if dtype_name != "float32" else 4)
    floor_s = step.time_on(analytic.Device("measured", ceilings["matmul_bf16_flops"] if dtype_name != "float32"
                                           else ceilings["matmul_fp32_flops"], ceilings["copy_bytes_per_s"]))
    out = {"B": B, "dtype": dtype_name, "floor_tok_per_s": round(B * tgt / floor_s, 1),
           "published_a100_fp16_torchscript": PUBLISHED_A100.get(B), "published_note": "NVIDIA's figure, not ours"}
    for backend_name in ("triton", "torch"):
        with use_backend(backend_name):
            kwargs = dict(tgt_len=tgt, mem_len=cfg.mem_len, clamp_len=cfg.clamp_len, batch_size=B, progress=False,
                          init_mems="zeros")
            evaluate(model, stream[: B * tgt + B], **kwargs)                      # warm
            synchronize(device)
            result = evaluate(model, stream, **kwargs)
        out[f"{backend_name}_tok_per_s"] = round(result.tokens_per_s, 1)
        out[f"{backend_name}_of_floor"] = round(result.tokens_per_s / out["floor_tok_per_s"], 3)
    return out


# ---- the run ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="the CPU rehearsal: interpreter, tiny shapes")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"                 # before triton is first imported
    import torch

    mode = "smoke" if smoke else "gpu"
    S, budgets = SHAPES[mode], BUDGET_S[mode]
    deadline = time.perf_counter() + TOTAL_S[mode]
    report = Report(args.out, mode)
    if not smoke and not torch.cuda.is_available():
        report.add({"stage": "environment", "name": "cuda", "status": "error", "error": "no CUDA device"})
        return 1
    device = torch.device("cpu" if smoke else "cuda")

    stage = Stage(report, "environment", budgets["environment"], deadline, fatal=True)
    env = stage.run("versions", environment, device, smoke)
    ceil = stage.run("ceilings", ceilings, device, smoke)
    if env["status"] != "ok" or ceil["status"] != "ok":
        return 1
    ceil = ceil["values"]

    stage = Stage(report, "compile", budgets["compile"], deadline)
    stage.run("process pool", compile_pool, S, smoke, stage)
    stage.run("in process + resources", compile_in_process, S, smoke, stage)

    stage = Stage(report, "correctness", budgets["correctness"], deadline)
    for case in S["attention"]:
        for dtype in S["dtypes"]:
            stage.run(f"attention {case[0]} {dtype}", check_attention, case, dtype, device, smoke)
    for dtype in S["softmax_dtypes"]:
        stage.run(f"adaptive softmax V{S['softmax']['vocab']} N{S['softmax']['n']} {dtype}", check_softmax, S,
                  dtype, device, smoke)
    for k in S["topk"]:
        stage.run(f"adaptive top-k k={k}", check_topk, S, k, device, smoke)
    for case in S["bidirectional"]:
        for dtype in BIDIRECTIONAL_DTYPES if not smoke else ("float32",):
            stage.run(f"bidirectional {case[0]} {dtype}", check_bidirectional, case, dtype, device, smoke)
    stage.run("decode step host syncs", check_decode_syncs, S, device, smoke)
    stage.run("generate cuda_graph vs eager", check_graph_generate, S, device, smoke)
    stage.run("gradients repeat", check_determinism, S, device, smoke)
    stage.run("torch.compile fullgraph fwd+bwd", check_compile, S, device, smoke)

    stage = Stage(report, "timings", budgets["timings"], deadline)
    for B in S["bench_decode"]["batches"]:
        stage.run(f"decode attention B{B}", time_decode, S, B, ceil, device, smoke)
    stage.run("host per decode step B1", time_host_per_step, S, ceil, device, smoke)
    for n in S["bench_softmax"]["rows"]:
        stage.run(f"softmax loss fwd+bwd N{n}", time_softmax, S, n, ceil, device, smoke)
    for B in S["bench_eval"]["batches"]:
        for dtype in S["bench_eval"]["dtypes"]:
            stage.run(f"evaluate B{B} {dtype}", time_evaluate, S, B, dtype, ceil, device, smoke)
    for B in S["bench_attention"]["batches"]:
        stage.run(f"attention eval B{B}", time_attention, S, B, ceil, device, smoke)
    for spec in S["bench_bidirectional"]:
        stage.run(f"conformer attention B{spec['B']} L{spec['L']} H{spec['H']}", time_bidirectional, spec, ceil,
                  device, smoke)
    for B in S["bench_attention"]["batches"]:      # last: each shape is a cold torch.compile
        stage.run(f"flex attention eval B{B}", time_attention, S, B, ceil, device, smoke, flex=True)
    for spec in S["bench_bidirectional"]:
        stage.run(f"flex conformer attention B{spec['B']} L{spec['L']} H{spec['H']}", time_bidirectional, spec, ceil,
                  device, smoke, flex=True)

    print_table(report.doc["records"])
    failed = [r for r in report.doc["records"] if r["status"] == "error" or r.get("status_check") == "fail"]
    return 1 if failed else 0


def print_table(records: list) -> None:
    print(f"{'stage':<12} {'record':<46} {'status':<8} summary")
    for r in records:
        status = r.get("status_check", r["status"]) if r["status"] == "ok" else r["status"]
        if r["status"] == "error":
            summary = r["error"][:70]
        elif "errors" in r:
            summary = f"worst err {max(r['errors'].values()):.1e}" + (f"; {r['failures'][0]}" if r.get("failures") else "")
        elif "worst_error" in r:
            summary = f"err {r['worst_error']:.1e}, compile {r['compile_s']} s"
        else:
            summary = ", ".join(f"{k}={_short(v)}" for k, v in r.items()
                                if k not in ("stage", "name", "status", "seconds", "values", "floor_model")
                                and not isinstance(v, (list, dict)))[:90]
            summary += "".join(f" {k}={v['ms']}ms({v['of_floor']})" for k, v in r.items()
                               if isinstance(v, dict) and "ms" in v)[:120]
        print(f"{r['stage']:<12} {r['name'][:46]:<46} {status:<8} {summary}")


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v


if __name__ == "__main__":
    sys.exit(main())
