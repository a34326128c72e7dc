"""The k most probable words of one adaptive-softmax cluster, streamed, in Triton (next-token path).

    cluster_topk(h (n, d), w (V, d), b (V,), k) -> lse (n,), ids (n, min(k, V)) best first

The vocabulary is streamed as the loss kernel streams it (``kernels/adaptive_softmax.py``:
``logits_tile``, vocabulary splits): per row an online log-sum-exp and a running top-K of the
logits, K = next power of two >= k. A candidate is one int64 key, the high 32 bits an
order-preserving image of the fp32 logit, the low 32 bits the column (``_pack``), so ``tl.topk`` on
keys selects logits and carries their columns; the splits' candidates are merged on the host. The
keys only select: the caller recomputes the winners' logits in the accumulation dtype. The design,
the cost and what is verified: docs/kernels.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from txl_fast.kernels.adaptive_softmax import (
    acc_dtype,
    interpreting,
    logits_tile,
    splits,
    tl_acc,
    block_k,
    check_supported,
)

MAX_K = 64                       # larger k: the torch scan (``txl_fast.ops.adaptive_topk``)
LOW_BITS = 0xFFFFFFFF


@triton.jit
def _pack(z, offs_n):
    """(BM, BN) fp32 logits and their columns -> int64 keys ordered like the logits."""
    bits = z.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)                      # negative floats: reverse their order
    return (key.to(tl.int64) << 32) | offs_n.to(tl.int64)[None, :]


@triton.jit
def _topk_fwd_kernel(
    H, W, B, LSE_PART, TOP_PART,
    n_rows, V, D, vocab_per_split,
    shm, shd, swv, swd, sb, s_part, s_top,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K: tl.constexpr,
):
    """Grid (cdiv(n_rows, BM), splits). Over the split's columns [split * vps, + vps):
    LSE_PART[split, i] = log-sum-exp of row i's logits; TOP_PART[i, split * K : + K] = the keys of
    its K largest logits (fewer real columns than K: keys of -inf)."""
    split = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < n_rows
    row_off = offs_m.to(tl.int64) * shm
    n_lo = split * vocab_per_split
    n_hi = tl.minimum(n_lo + vocab_per_split, V)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    best = tl.full([BLOCK_M, K], -9223372036854775807 - 1, tl.int64)        # below every key
    for n0 in range(n_lo, n_hi, BLOCK_N):               # vps is a multiple of BN: tiles stay in the split
        offs_n = n0 + tl.arange(0, BLOCK_N)
        z = logits_tile(H, W, B, W, B, row_off, mmask, offs_n, V, 0, D, shd, swv, swd, 0, 0, sb, 0,
                         False, ACC, BLOCK_M, BLOCK_N, BLOCK_K)                 # (BM, BN), -inf past V
        m_new = tl.maximum(m_i, tl.max(z, 1))            # finite: every tile holds a valid column
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
        tile_best = tl.topk(_pack(z.to(tl.float32), offs_n), K)                 # (BM, K)
        best = tl.topk(tl.reshape(tl.join(best, tile_best), [BLOCK_M, 2 * K]), K)
    tl.store(LSE_PART + split * s_part + offs_m, m_i + tl.log(l_i), mask=mmask)
    offs_k = split * K + tl.arange(0, K)
    tl.store(TOP_PART + offs_m.to(tl.int64)[:, None] * s_top + offs_k[None, :], best, mask=mmask[:, None])


def configs(d: int, dtype: torch.dtype, K: int) -> dict:
    """Generation has few rows: 16-row tiles. BLOCK_N >= K (a tile's top-K needs K columns)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=max(32, K), BLOCK_K=16, num_warps=4, num_stages=1)
    block_n = 64 if dtype == torch.float32 else 128
    return dict(BLOCK_M=16, BLOCK_N=max(block_n, K), BLOCK_K=16 if dtype == torch.float32 else block_k(d),
                num_warps=4, num_stages=2)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernel writes is allocated here (tests poison it with NaN and canaries)."""
    return torch.empty(shape, dtype=dtype, device=device)


def direct(kernel):
    """The default ``launch``: the kernel itself, launched as it is called (eager)."""
    return kernel


def cluster_topk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int,
                 launch=direct) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (n,) in the accumulation dtype, ids (n, min(k, V)) int64, largest logit first) of the
    logits h @ w^T + b, streamed. 1 <= k <= MAX_K. ``launch(kernel)`` gives what is launched (the
    kernel itself; a recorder in the ahead-of-time report)."""
    check_supported(h)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"adaptive top-k (triton): k must be in [1, {MAX_K}], got {k}")
    n, d = h.shape
    V = w.shape[0]
    acc = acc_dtype(h.dtype)
    if n == 0:
        return h.new_zeros((0,), dtype=acc), torch.zeros((0, min(k, V)), dtype=torch.int64, device=h.device)
    K = triton.next_power_of_2(k)
    cfg = configs(d, h.dtype, K)
    row_tiles = triton.cdiv(n, cfg["BLOCK_M"])
    n_splits, per_split = splits(V, row_tiles, cfg["BLOCK_N"])
    part = _empty((n_splits, n), acc, h.device)
    top = _empty((n, n_splits * K), torch.int64, h.device)
    launch(_topk_fwd_kernel)[(row_tiles, n_splits)](
        h, w, b, part, top, n, V, d, per_split,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), b.stride(0), part.stride(0), top.stride(0),
        ACC=tl_acc(h.dtype), K=K, **cfg)
    lse = part[0] if n_splits == 1 else torch.logsumexp(part, 0)
    keys = top.topk(min(k, V), dim=1).values                                   # (n, k), best first
    return lse, keys & LOW_BITS
