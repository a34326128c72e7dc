"""Stage 5 of the GPU check: Parakeet / FastConformer attention (transformers 5's
``ParakeetEncoderAttention`` after its projections: 8 heads of 128, bidirectional, key padding) at
long lengths. Correctness of the Triton kernels at head size 128 (``correctness.check_bidirectional``,
the float64 reference), then per length and dtype: the fused op, HF's route (position scores
(B, H, T, 2T - 1), pad-and-view shift, finfo.min where hidden, SDPA with the float mask: O(T²)
memory, run only where its predicted peak fits the free memory) and FlexAttention (the shifted
position term precomputed as a (B, H, T, T) score tensor, so O(T²) too; forward only), each timed
(``common.bench_ms``) against the maths' roofline floor, with its peak memory.

``parakeet(S, ceilings, device, smoke, left)`` lists the records as (name, function, arguments);
``left()`` is the stage's seconds left (``record.Run.left``): a path whose benchmark would outrun
it, or a FlexAttention record that would eat the reserve kept for the longest lengths, is skipped
and says so. Design and predicted numbers: docs/conformer.md, benchmarks/RESULTS.md.
"""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from txl_fast import ops, use_backend
from txl_fast.bench import analytic
from txl_fast.bench.gpu.common import bench_ms, rel_err, roofline, synchronize
from txl_fast.bench.gpu.correctness import check_bidirectional
from txl_fast.bench.gpu.timings import compiled_flex
from txl_fast.bench.machine import time_call

GB = 1e9
CALLS_PER_BENCH = 8          # do_bench's calls for a call longer than its 100 ms window: 5 to estimate, 1 + 1, and ours


def parakeet(S: dict, ceilings: dict, device, smoke: bool, left) -> list:
    """Every record of the stage, in the order they run: the correctness checks, the fused op and
    HF's route up to the longest length, FlexAttention, then the longest length (its HF route, when
    it fits, is the run's last and riskiest call: a (B, H, T, T) mask past 2^31 elements)."""
    p = S["parakeet"]
    out = parakeet_checks(S, device, smoke)
    *shorter, longest = p["frames"]
    out += [(f"parakeet T{T} {dtype}", time_parakeet, (p, T, dtype, ceilings, device, smoke, left))
            for T in shorter for dtype in p["dtypes"]]
    out += [(f"parakeet flex T{T} {dtype}", time_parakeet_flex, (p, T, dtype, ceilings, device, smoke, left))
            for dtype in p["flex_dtypes"] for T in p["frames"]]
    out += [(f"parakeet T{longest} {dtype}", time_parakeet, (p, longest, dtype, ceilings, device, smoke, left))
            for dtype in reversed(p["dtypes"])]                  # bf16 last: its HF route fits an H200
    return out


def parakeet_checks(S: dict, device, smoke: bool) -> list:
    """The correctness records (``correctness.check_bidirectional`` at Parakeet's head size, ragged
    key lengths): also tests of tests/test_gpu_correctness.py."""
    p = S["parakeet"]
    return [(f"parakeet check {case[0]} {dtype}", check_bidirectional, (case, dtype, device, smoke))
            for case in p["checks"] for dtype in p["check_dtypes"]]


def parakeet_inputs(p: dict, T: int, dtype, device, seed: int):
    """q, k, v (B, T, H, D), r (2T - 1, H, D) (row p: distance T - 1 - p), u, w (H, D) in ``dtype``,
    fresh and never zero, and the key lengths (B,) int32: every frame valid (a batch of one)."""
    B, H, D = p["B"], p["H"], p["D"]
    g = torch.Generator(device=device).manual_seed(seed)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    lengths = torch.full((B,), T, dtype=torch.int32, device=device)
    return [t(B, T, H, D), t(B, T, H, D), t(B, T, H, D), t(2 * T - 1, H, D), t(H, D, scale=0.3),
            t(H, D, scale=0.3)], lengths


def hf_attention(q, k, v, r, u, w, valid, scale: float):
    """HF's ParakeetEncoderAttention core under sdpa, in plain torch: q, k, v (B, T, H, D), r (2T - 1,
    H, D), u = bias_u, w = bias_v (H, D), valid (B, 1, T, T) bool (valid query AND valid key) -> (B, T, H, D)."""
    B, T, H, D = q.shape
    qh = q.transpose(1, 2)                                                                 # (B, H, T, D)
    bd = (qh + w[:, None]) @ r.permute(1, 2, 0)                                            # (B, H, T, 2T - 1)
    bd = F.pad(bd, (1, 0)).view(B, H, -1, T)[:, :, 1:].view(B, H, T, 2 * T - 1)            # HF's _rel_shift
    bd = bd[..., :T] * scale                                                               # (B, H, T, T)
    bd = bd.masked_fill_(valid.logical_not(), torch.finfo(bd.dtype).min)
    out = F.scaled_dot_product_attention(qh + u[:, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=bd,
                                         scale=scale)
    return out.transpose(1, 2)                                                             # (B, T, H, D)


def hf_peak_bytes(B: int, H: int, T: int, es: int) -> int:
    """HF's route's predicted peak beyond its inputs: the raw position scores (T x (2T - 1)) and
    their padded copy (T x 2T) alive together while ``_rel_shift`` pads, per (batch row, head)."""
    return B * H * T * (4 * T - 1) * es


def hf_cost(B: int, H: int, T: int, D: int, es: int) -> analytic.Cost:
    """HF's route's own floor: the position product over all 2T - 1 distances and SDPA's two
    products; bytes: the raw scores written, padded (read, written), sliced and scaled (read,
    written), masked in place (read, written), read by SDPA (11 T² per batch row and head), the
    bool mask read, q, k, v, r, out."""
    flops = 2.0 * B * H * T * (2 * T - 1) * D + 4.0 * B * H * T * T * D
    io = es * (4 * B * T * H * D + (2 * T - 1) * H * D)
    return analytic.Cost(flops, es * 11.0 * B * H * T * T + B * T * T + io)


def free_bytes(p: dict, device) -> int:
    """Free device memory after freeing the allocator's cache; the plan's ``memory_cap`` in the smoke."""
    gc.collect()
    if device.type != "cuda":
        return p["memory_cap"]
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def with_peak(fn, device):
    """One call of ``fn`` -> (its wall seconds, its peak bytes allocated beyond what was allocated
    before it: torch.cuda.max_memory_allocated after a reset; None on the CPU, the absolute peak)."""
    if device.type != "cuda":
        seconds, _ = time_call(fn)
        return seconds, None, None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    seconds, _ = time_call(fn, "cuda")
    peak = torch.cuda.max_memory_allocated(device)
    return seconds, peak - base, peak


def timed(fn, cost, ceilings: dict, es: int, device, smoke: bool, left) -> dict:
    """One path: a first call (its peak memory), then its do_bench median against the maths' floor
    ``cost``, unless the benchmark would outrun the stage's time left."""
    with torch.no_grad():
        first_s, extra, peak = with_peak(fn, device)
        result = {"first_call_s": round(first_s, 4),
                  "peak_extra_gb": None if extra is None else round(extra / GB, 4),
                  "peak_gb": None if peak is None else round(peak / GB, 3)}
        if CALLS_PER_BENCH * first_s > left():
            return {**result, "skipped": f"timing needs ~{CALLS_PER_BENCH * first_s:.0f} s, {left():.0f} s left"}
        return {**result, **roofline(bench_ms(fn, smoke), cost, ceilings, es)}


def time_parakeet(p: dict, T: int, dtype_name: str, ceilings: dict, device, smoke: bool, left) -> dict:
    """The fused op (Triton kernels) and HF's route at T frames: time, floor, peak memory; HF's
    route skipped when its predicted peak exceeds the free memory (the record says both)."""
    dtype = getattr(torch, dtype_name)
    B, H, D = p["B"], p["H"], p["D"]
    (q, k, v, r, u, w), lengths = parakeet_inputs(p, T, dtype, device, seed=T)
    scale, es = D ** -0.5, q.element_size()
    maths = analytic.rel_attention(B, H, T, T, D, es, "fused")
    result = {"shape": f"B{B} H{H} T{T} D{D} {dtype_name}, bidirectional, key lengths",
              "floor_model": "analytic.rel_attention fused at Lq = Lk = T (the maths), every path"}

    def fused():
        with use_backend("triton"):
            return ops.rel_attention(q, k, v, r, u, w, scale=scale, causal=False, key_lengths=lengths,
                                     empty_rows="zero")
    result["fused"] = timed(fused, maths, ceilings, es, device, smoke, left)
    valid = torch.arange(T, device=device) < lengths[:, None]                              # (B, T)
    valid = (valid[:, :, None] & valid[:, None, :])[:, None]                               # (B, 1, T, T), as HF's
    need, free = hf_peak_bytes(B, H, T, es), free_bytes(p, device)
    result["hf_predicted_extra_gb"] = round(need / GB, 4)
    if need > p["memory_share"] * free:
        result["hf_sdpa_float_mask"] = {"skipped": f"predicted {need / GB:.3g} GB > {p['memory_share']:.0%} "
                                                   f"of free {free / GB:.3g} GB"}
        return result
    hf = timed(lambda: hf_attention(q, k, v, r, u, w, valid, scale), maths, ceilings, es, device, smoke, left)
    if "ms" in hf:
        hf["own_floor_ms"] = roofline(hf["ms"], hf_cost(B, H, T, D, es), ceilings, es)["floor_ms"]
    result["hf_sdpa_float_mask"] = hf
    with torch.no_grad():
        result["hf_err_vs_fused"] = float(f"{rel_err(hf_attention(q, k, v, r, u, w, valid, scale), fused()):.2e}")
    return result


def position_scores(q, r, w, scale: float, chunk_bytes: int):
    """(B, H, T, T): scale * (q_i + w) . r[j + T - 1 - i], in q's dtype, built a block of query rows
    at a time (each block's (rows, 2T - 1) products within ``chunk_bytes``): no T x 2T tensor."""
    B, T, H, D = q.shape
    out = torch.empty(B, H, T, T, dtype=q.dtype, device=q.device)
    rows = max(1, chunk_bytes // (B * H * (2 * T - 1) * q.element_size()))
    j = torch.arange(T, device=q.device)
    for i0 in range(0, T, rows):
        i = torch.arange(i0, min(i0 + rows, T), device=q.device)
        raw = (q[:, i0:i0 + len(i)].transpose(1, 2) + w[:, None]) @ r.permute(1, 2, 0)    # (B, H, rows, 2T - 1)
        index = (j[None, :] + T - 1 - i[:, None]).expand(B, H, len(i), T)
        out[:, :, i0:i0 + len(i)] = raw.gather(3, index) * scale
    return out


def time_parakeet_flex(p: dict, T: int, dtype_name: str, ceilings: dict, device, smoke: bool, left) -> dict:
    """FlexAttention at T frames, forward: the position term precomputed as a (B, H, T, T) score tensor
    (``position_scores``, not timed), key lengths as a block mask; its compile seconds, time, floor,
    peak memory of the call and its difference from the fused op. Skipped when the score tensor
    would pass 2^31 elements (indexing in generated kernels not verified there), exceed the free
    memory, or when the stage's reserve for the longest length would be eaten."""
    dtype = getattr(torch, dtype_name)
    B, H, D = p["B"], p["H"], p["D"]
    es = torch.finfo(dtype).bits // 8
    elements, free = B * H * T * T, free_bytes(p, device)
    result = {"shape": f"B{B} H{H} T{T} D{D} {dtype_name}", "position_tensor_gb": round(elements * es / GB, 4),
              "floor_model": "analytic.rel_attention fused at Lq = Lk = T (the maths)"}
    if elements >= p["flex_max_elements"]:
        return {**result, "skipped": f"score tensor of {elements:.3g} elements >= {p['flex_max_elements']:.3g}"}
    if elements * es + p["chunk_bytes"] > p["memory_share"] * free:
        return {**result, "skipped": f"score tensor {elements * es / GB:.3g} GB > {p['memory_share']:.0%} "
                                     f"of free {free / GB:.3g} GB"}
    if left() < p["reserve_s"]:
        return {**result, "skipped": f"{left():.0f} s left, {p['reserve_s']} s kept for T{p['frames'][-1]}"}
    (q, k, v, r, u, w), lengths = parakeet_inputs(p, T, dtype, device, seed=T)
    scale = D ** -0.5
    with torch.no_grad():
        position = position_scores(q, r, w, scale, p["chunk_bytes"])                      # (B, H, T, T)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q + u, k, v))                    # (B, H, T, D)
    # a fresh compile per length: the timings stage compiled flex 5 times, dynamo's recompile limit is 8
    torch._dynamo.reset()
    flex, result["flex_compile_s"], _ = compiled_flex(qh, kh, vh, position, mask_mod, B, scale, device, smoke,
                                                      backward=False)
    maths = analytic.rel_attention(B, H, T, T, D, es, "fused")
    result["flex"] = timed(flex, maths, ceilings, es, device, smoke, left)
    if "ms" in result["flex"]:
        own = analytic.Cost(4.0 * elements * D, es * (elements + 4 * B * T * H * D))
        result["flex"]["own_floor_ms"] = roofline(result["flex"]["ms"], own, ceilings, es)["floor_ms"]
    with torch.no_grad(), use_backend("triton"):
        fused = ops.rel_attention(q, k, v, r, u, w, scale=scale, causal=False, key_lengths=lengths, empty_rows="zero")
        result["flex_err_vs_fused"] = float(f"{rel_err(flex().transpose(1, 2), fused):.2e}")
    return result
