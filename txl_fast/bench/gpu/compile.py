"""Stage 2 of the GPU check: every kernel warmed up at the exact shapes used later, first in a process
pool (fills Triton's on-disk cache; compile seconds per case), then in this process (registers,
spills, shared memory read from the compiled kernels the JIT cache holds). ``left()``: the seconds
the stage has left (``record.Run.left``)."""
from __future__ import annotations

import concurrent.futures
import multiprocessing

import torch

from txl_fast import ops, use_backend
from txl_fast.bench.gpu.common import attention_inputs, bidirectional_inputs, flat_params, softmax_inputs
from txl_fast.bench.gpu.plan import BIDIRECTIONAL_DTYPES, SHAPES
from txl_fast.bench.machine import time_call


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
    pk = S["parakeet"]                                     # its check, and its shortest length (split forward)
    cases += [("bidirectional", (case, dtype)) for case in pk["checks"] for dtype in pk["check_dtypes"]]
    cases += [("bidirectional", ((f"parakeet T{pk['frames'][0]}", pk["B"], pk["frames"][0], 0, pk["H"], pk["D"], None),
                                 dtype)) for dtype in pk["dtypes"]]
    cases += [("softmax", (dtype, S["softmax"]["n"])) for dtype in S["softmax_dtypes"]]
    cases += [("softmax", (S["bench_softmax"]["dtype"], n)) for n in S["bench_softmax"]["rows"]]
    if "warm_cases" not in S:
        return cases
    kinds = [kind for kind, _ in cases]                      # the smoke: the first few of each kind
    return [c for i, c in enumerate(cases) if kinds[:i].count(c[0]) < S["warm_cases"]]


def warm(kind: str, args, smoke: bool) -> float:
    """Run one case's kernels once (forward and backward); its wall seconds (compiles included)."""
    device = torch.device("cpu" if smoke else "cuda")
    if smoke and kind != "softmax" and args[1] == "bfloat16":
        return 0.0                                       # bf16 is broken in the Triton interpreter
    return time_call(lambda: run_case(kind, args, device), device.type)[0]


def run_case(kind: str, args, device) -> None:
    """One warm-up case's kernels, forward and backward (``warm_cases``)."""
    smoke = device.type == "cpu"
    with use_backend("triton"):
        if kind == "attention":
            case, dtype = args
            dtype = getattr(torch, dtype)
            x = [t.requires_grad_() for t in attention_inputs(case, dtype, device, 0)]
            out = ops.rel_attention(*x, scale=case[5] ** -0.5, window=case[6])
            torch.autograd.grad(out, x, torch.randn_like(out))
        elif kind == "bidirectional":
            case, dtype = args
            dtype = getattr(torch, dtype)
            x, lengths = bidirectional_inputs(case, dtype, device, 0)
            x = [t.requires_grad_() for t in x]
            out = ops.rel_attention(*x, scale=case[5] ** -0.5, causal=False, context=case[6], key_lengths=lengths,
                                    empty_rows="zero")
            torch.autograd.grad(out, x, torch.randn_like(out))
        else:
            dtype, n = args
            spec = dict(SHAPES["smoke" if smoke else "gpu"]["softmax"], n=n)
            hidden, target, params = softmax_inputs(spec, getattr(torch, dtype), device, 0)
            leaves = [hidden.requires_grad_(), *(p.requires_grad_() for p in flat_params(params))]
            nll = ops.adaptive_nll(hidden, target, *params)
            torch.autograd.grad(nll.sum(), leaves)
            with torch.no_grad():
                ops.adaptive_log_softmax(hidden, *params)
                ops.adaptive_topk(hidden, 5, *params)


def _warm_worker(item):
    kind, args, smoke = item
    try:
        return round(warm(kind, args, smoke), 3), None
    except Exception as exc:                               # noqa: BLE001 (reported by the parent)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def compile_pool(S: dict, smoke: bool, left) -> dict:
    """The warm-up cases in a process pool: each worker compiles into Triton's on-disk cache. Cases
    not done when the stage's budget runs out are cancelled and the workers ended."""
    cases = warm_cases(S)
    pool = concurrent.futures.ProcessPoolExecutor(S["compile_workers"], mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(_warm_worker, (kind, args, smoke)) for kind, args in cases]
    concurrent.futures.wait(futures, timeout=max(1.0, left() - 15))
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


def compile_in_process(S: dict, smoke: bool, left) -> dict:
    """The same cases here (loads from the disk cache, or compiles what the pool did not), while the
    stage's budget lasts, then each compiled kernel's resources."""
    seconds = {}
    for kind, args in warm_cases(S):
        if left() <= 0:
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
