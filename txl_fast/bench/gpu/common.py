"""What every stage of the GPU check shares: errors against a reference, the timer (``bench_ms``,
over ``txl_fast.bench.machine``'s), the roofline of a timing, and the random inputs of every case
(attention, bidirectional attention, the adaptive softmax, a small model)."""
from __future__ import annotations

import math

import torch

from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel
from txl_fast.bench.machine import median_time


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def poison(device) -> None:
    """Fill freed allocator blocks with NaN (best effort: an output that reuses such a block and is left
    unwritten shows as non-finite, and non-finite values always fail)."""
    if device.type == "cuda":
        blocks = [torch.full((n,), float("nan"), device=device) for n in (2**12, 2**16, 2**20, 2**24, 2**26)]
        del blocks


def bench_ms(fn, smoke: bool) -> float:
    """Median milliseconds of fn() (``machine.median_time``): do_bench's CUDA-event times on a GPU, the
    CPU clock over 2 runs after a warm-up in the smoke."""
    return 1e3 * median_time(fn, "cpu", reps=2) if smoke else 1e3 * median_time(fn, "cuda")


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def roofline(ms: float, cost, ceilings: dict, es: int) -> dict:
    """The timing against its floor: max(FLOPs / matrix rate of the dtype, bytes / copy bandwidth)."""
    rate = ceilings["matmul_bf16_flops"] if es == 2 else ceilings["matmul_fp32_flops"]
    floor = max(cost.flops / rate, cost.bytes / ceilings["copy_bytes_per_s"])
    return {"ms": round(ms, 4), "floor_ms": round(1e3 * floor, 4),
            "of_floor": round(1e3 * floor / ms, 3) if ms else None}


def attention_inputs(case, dtype, device, seed: int):
    """Fresh random inputs of an attention case, in ``dtype`` (never zero): q, k, v, r, u, w."""
    _, B, Lq, mlen, H, D, window, Lr = case
    Lk = mlen + Lq
    g = torch.Generator(device=device).manual_seed(seed)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    return [t(B, Lq, H, D), t(B, Lk, H, D), t(B, Lk, H, D), t(Lr or Lk, H, D), t(H, D, scale=0.3), t(H, D, scale=0.3)]


def softmax_inputs(spec, dtype, device, seed: int):
    """hidden (N, d_proj), target (N,) with ignored labels, and the projected adaptive softmax's
    weights, biases, projs, cluster weight and bias (HF's layout, div_val clusters)."""
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


def bidirectional_inputs(case, dtype, device, seed: int):
    """q, k, v, r (Lk + Lq - 1 distances), u, w of a bidirectional case and its key lengths (B,):
    batch row b keeps Lk - 3 b keys, at least one."""
    name, B, Lq, mlen, H, D, _ = case
    x = attention_inputs((name, B, Lq, mlen, H, D, None, 2 * Lq + mlen - 1), dtype, device, seed)
    Lk = Lq + mlen
    return x, torch.tensor([max(1, Lk - 3 * b) for b in range(B)], device=device)


def flat_params(params) -> list:
    weights, biases, projs, cw, cb = params
    return [*weights, *biases, *projs, cw, cb]


def small_model(config: dict, dtype, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = TransfoXLLMHeadModel(TransfoXLConfig(**config))
    return model.to(dtype).eval()
