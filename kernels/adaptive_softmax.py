"""Projected adaptive softmax (Transformer-XL's output layer), forward and backward, in Triton.

Maths, shapes and argument conventions: ``txl_fast.ops.adaptive_softmax`` (hidden (N, d_proj);
per cluster c = 0..C weights[c] (V_c, d_c), biases[c] (V_c,), projs[c] (d_proj, d_c) or None;
cluster_weight (C, d_0), cluster_bias (C,)). ``txl_fast.naive`` is the literal validator.

Rows are grouped by cluster on the device (no host sync) and each cluster's vocabulary is streamed
in tiles: ``_lse_fwd_kernel`` (per vocabulary split, the log-sum-exp and the target logit),
``_bwd_dh_kernel`` and ``_bwd_dw_kernel`` (dz = g * (softmax - onehot) recomputed tile by tile from
the saved log-sum-exp; one writer per output element), ``_logprob_kernel`` (log-probs written
straight into the (N, V) output). No rows x V_c tensor exists. The design, the cost model and what
is verified: docs/kernels.md.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100
TARGET_PROGRAMS = 264            # ~2 programs per H100 SM when choosing vocabulary splits
INTERPRET_TARGET_PROGRAMS = 8    # under the interpreter: few splits of several tiles each
DH_PARTIAL_BYTES = 64 << 20      # the dh kernel's per-split partials of one cluster stay under this


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def logits_tile(H, W, B, W2, B2, row_off, mmask, offs_n, V1, V2, D, shd, swv, swd, sw2v, sw2d, sb, sb2,
                 HAS_W2: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """z (BM, BN) = h . w_j + b_j for the rows at ``row_off`` (= row * stride, int64) and columns
    offs_n of the vocabulary [W (V1 rows); W2 (V2 rows)]; columns past V1 + V2 are -inf."""
    in1 = offs_n < V1
    cols1 = offs_n.to(tl.int64)
    if HAS_W2:
        in2 = (offs_n >= V1) & (offs_n < V1 + V2)
        cols2 = tl.where(in2, offs_n - V1, 0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < D
        h = tl.load(H + row_off[:, None] + offs_k[None, :] * shd, mask=mmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(W + cols1[None, :] * swv + offs_k[:, None] * swd, mask=in1[None, :] & kmask[:, None],
                     other=0.0)                                                   # (BK, BN)
        if HAS_W2:
            wt += tl.load(W2 + cols2[None, :] * sw2v + offs_k[:, None] * sw2d,
                          mask=in2[None, :] & kmask[:, None], other=0.0)
        acc += tl.dot(h, wt, input_precision="ieee", out_dtype=ACC)
    b = tl.load(B + cols1 * sb, mask=in1, other=0.0).to(ACC)
    if HAS_W2:
        b += tl.load(B2 + cols2 * sb2, mask=in2, other=0.0).to(ACC)
        valid = offs_n < V1 + V2
    else:
        valid = in1
    return tl.where(valid[None, :], acc + b[None, :], float("-inf"))


@triton.jit
def _lse_fwd_kernel(
    H, W, B, W2, B2, COL, LSE_PART, PICK, SPAN,
    V1, V2, D, vocab_per_split,
    shm, shd, swv, swd, sw2v, sw2d, sb, sb2, s_part,
    HAS_W2: tl.constexpr, HAS_COL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (row tiles, splits) over the rows i in [SPAN[0], SPAN[1]) (SPAN: two int32 on the
    device; row tiles past the span stream nothing). LSE_PART[split, i] = log-sum-exp of row i's
    logits over the split's columns [split * vps, +vps); with HAS_COL, PICK[i] = z[i, COL[i]]
    (written by the split holding COL[i]; by split 0 with value 0 when COL[i] < 0)."""
    split = tl.program_id(1)
    row_lo = tl.load(SPAN)
    row_hi = tl.load(SPAN + 1)
    row0 = row_lo + tl.program_id(0) * BLOCK_M
    if row0 >= row_hi:                                   # no row of the span in this tile
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < row_hi
    row_off = offs_m.to(tl.int64) * shm
    n_lo = split * vocab_per_split
    n_hi = tl.minimum(n_lo + vocab_per_split, V1 + V2)
    if HAS_COL:
        col = tl.load(COL + offs_m, mask=mmask, other=-1)
        pick = tl.zeros([BLOCK_M], ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    for n0 in range(n_lo, n_hi, BLOCK_N):               # vps is a multiple of BN: tiles stay in the split
        offs_n = n0 + tl.arange(0, BLOCK_N)
        z = logits_tile(H, W, B, W2, B2, row_off, mmask, offs_n, V1, V2, D, shd, swv, swd, sw2v, sw2d, sb, sb2,
                         HAS_W2, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        m_new = tl.maximum(m_i, tl.max(z, 1))            # finite: every tile holds a valid column
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
        if HAS_COL:
            pick += tl.sum(tl.where(offs_n[None, :] == col[:, None], z, 0.0), 1)
    tl.store(LSE_PART + split * s_part + offs_m, m_i + tl.log(l_i), mask=mmask)
    if HAS_COL:
        mine = ((col >= n_lo) & (col < n_hi)) | ((col < 0) & (split == 0))
        tl.store(PICK + offs_m, pick, mask=mmask & mine)


@triton.jit
def _dlogits(z, offs_n, col, lse, g):
    """dNLL/dz for one tile: g * (softmax - onehot(col)); 0 at -inf (masked) columns."""
    p = tl.exp(z - lse[:, None])
    return g[:, None] * (p - tl.where(offs_n[None, :] == col[:, None], 1.0, 0.0))


@triton.jit
def _bwd_dh_kernel(
    H, W, B, W2, B2, COL, LSE, G, DH, SPAN,
    V1, V2, D, vocab_per_split,
    shm, shd, swv, swd, sw2v, sw2d, sb, sb2, sdhs, sdhm,
    HAS_W2: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """Grid (row tiles, cdiv(D, BDO), vocabulary splits) over the rows i in [SPAN[0], SPAN[1])
    (tiles past the span do nothing). DH[split, i, o] = sum_j dz[i, j] w_j[o] over the split's
    columns [split * vps, +vps), for the program's rows and its chunk o of BDO columns of d; rows
    outside the span are not written. The host sums the splits in a fixed order."""
    dtype = H.dtype.element_ty
    row_hi = tl.load(SPAN + 1)
    row0 = tl.load(SPAN) + tl.program_id(0) * BLOCK_M
    if row0 >= row_hi:                                   # no row of the span in this tile
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < row_hi
    row_off = offs_m.to(tl.int64) * shm
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    omask = offs_o < D
    col = tl.load(COL + offs_m, mask=mmask, other=-1)
    lse = tl.load(LSE + offs_m, mask=mmask, other=0.0)
    g = tl.load(G + offs_m, mask=mmask, other=0.0)      # 0 on masked rows: dz = 0 there
    split = tl.program_id(2)
    dh = tl.zeros([BLOCK_M, BLOCK_DO], ACC)
    for n0 in range(split * vocab_per_split, tl.minimum((split + 1) * vocab_per_split, V1 + V2), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        z = logits_tile(H, W, B, W2, B2, row_off, mmask, offs_n, V1, V2, D, shd, swv, swd, sw2v, sw2d, sb, sb2,
                         HAS_W2, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        dz = _dlogits(z, offs_n, col, lse, g)
        in1 = offs_n < V1
        w = tl.load(W + offs_n.to(tl.int64)[:, None] * swv + offs_o[None, :] * swd,
                    mask=in1[:, None] & omask[None, :], other=0.0)                # (BN, BDO)
        if HAS_W2:
            in2 = (offs_n >= V1) & (offs_n < V1 + V2)
            cols2 = tl.where(in2, offs_n - V1, 0).to(tl.int64)
            w += tl.load(W2 + cols2[:, None] * sw2v + offs_o[None, :] * sw2d,
                         mask=in2[:, None] & omask[None, :], other=0.0)
        dh += tl.dot(dz.to(dtype), w, input_precision="ieee", out_dtype=ACC)
    tl.store(DH + split.to(tl.int64) * sdhs + offs_m.to(tl.int64)[:, None] * sdhm + offs_o[None, :],
             dh.to(DH.dtype.element_ty), mask=mmask[:, None] & omask[None, :])


@triton.jit
def _bwd_dw_kernel(
    H, W, B, W2, B2, COL, LSE, G, DW, DB, DW2, DB2, SPAN,
    V1, V2, D,
    shm, shd, swv, swd, sw2v, sw2d, sb, sb2, sdwv, sdw2v,
    HAS_W2: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """Grid (cdiv(V1 + V2, BN), cdiv(D, BDO)). For the program's vocabulary tile and d chunk:
    DW[j, o] = sum_i dz[i, j] h_i[o] over the rows i in [SPAN[0], SPAN[1]) (DW2 for the columns
    past V1), and, from the d-chunk-0 programs, DB[j] = sum_i dz[i, j]. An empty span writes zeros."""
    dtype = H.dtype.element_ty
    pid_d = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    omask = offs_o < D
    dw = tl.zeros([BLOCK_N, BLOCK_DO], ACC)
    db = tl.zeros([BLOCK_N], ACC)
    row_hi = tl.load(SPAN + 1)
    for m0 in range(tl.load(SPAN), row_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mmask = offs_m < row_hi
        row_off = offs_m.to(tl.int64) * shm
        col = tl.load(COL + offs_m, mask=mmask, other=-1)
        lse = tl.load(LSE + offs_m, mask=mmask, other=0.0)
        g = tl.load(G + offs_m, mask=mmask, other=0.0)
        z = logits_tile(H, W, B, W2, B2, row_off, mmask, offs_n, V1, V2, D, shd, swv, swd, sw2v, sw2d, sb, sb2,
                         HAS_W2, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        dz = _dlogits(z, offs_n, col, lse, g)                                     # (BM, BN)
        h = tl.load(H + row_off[:, None] + offs_o[None, :] * shd, mask=mmask[:, None] & omask[None, :], other=0.0)
        dw += tl.dot(tl.trans(dz.to(dtype)), h, input_precision="ieee", out_dtype=ACC)
        db += tl.sum(dz, 0)
    in1 = offs_n < V1
    first = pid_d == 0
    cols1 = offs_n.to(tl.int64)
    tl.store(DW + cols1[:, None] * sdwv + offs_o[None, :], dw.to(DW.dtype.element_ty),
             mask=in1[:, None] & omask[None, :])
    tl.store(DB + cols1, db.to(DB.dtype.element_ty), mask=in1 & first)
    if HAS_W2:
        in2 = (offs_n >= V1) & (offs_n < V1 + V2)
        cols2 = tl.where(in2, offs_n - V1, 0).to(tl.int64)
        tl.store(DW2 + cols2[:, None] * sdw2v + offs_o[None, :], dw.to(DW2.dtype.element_ty),
                 mask=in2[:, None] & omask[None, :])
        tl.store(DB2 + cols2, db.to(DB2.dtype.element_ty), mask=in2 & first)


@triton.jit
def _logprob_kernel(
    H, W, B, OFF, OUT,
    n_rows, V, D,
    shm, shd, swv, swd, sb, som, son,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(n_rows, BM), cdiv(V, BN)). OUT[i, j] = z[i, j] + OFF[i] (OFF = shift - lse)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < n_rows
    rows = offs_m.to(tl.int64)
    z = logits_tile(H, W, B, W, B, rows * shm, mmask, offs_n, V, 0, D, shd, swv, swd, 0, 0, sb, 0,
                     False, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    off = tl.load(OFF + offs_m, mask=mmask, other=0.0)
    tl.store(OUT + rows[:, None] * som + offs_n.to(tl.int64)[None, :] * son,
             (z + off[:, None]).to(OUT.dtype.element_ty), mask=mmask[:, None] & (offs_n < V)[None, :])


# ---------------------------------------------------------------------------------------------
# launch configurations
# ---------------------------------------------------------------------------------------------

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_k(d: int) -> int:
    return min(64, max(16, triton.next_power_of_2(d)))


def block_do(d: int) -> int:
    return min(128, max(16, triton.next_power_of_2(d)))


def configs(kernel: str, d: int, dtype: torch.dtype = torch.float16) -> dict:
    """Tiles and launch options of ``kernel`` for width d and input dtype. fp32 (ieee tl.dot runs
    on the FMA units, not tensor cores) takes smaller tiles: the 16-bit tiles spill heavily there.
    The head's dh (two weight blocks) uses BLOCK_N 32: at 64 it spills ~300 bytes on sm_90.
    Under the interpreter every tile is 16 or 32 wide so that small test shapes take many tiles."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32 if kernel != "dh" else 16, BLOCK_K=16,
                    **({} if kernel in ("lse", "logprob") else {"BLOCK_DO": 16}), num_warps=4, num_stages=1)
    if dtype == torch.float32:
        if kernel in ("lse", "logprob"):
            return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2)
        if kernel in ("dh", "dw"):
            return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, BLOCK_DO=min(64, block_do(d)), num_warps=4,
                        num_stages=2)
    if kernel in ("lse", "logprob"):
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k(d), num_warps=8, num_stages=3)
    if kernel == "dh":
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=block_k(d), BLOCK_DO=block_do(d), num_warps=8, num_stages=2)
    if kernel == "dw":
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k(d), BLOCK_DO=block_do(d), num_warps=8, num_stages=2)
    raise ValueError(kernel)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests replace it with NaN-filled canaried
    buffers to prove each element is written and nothing outside is)."""
    return torch.empty(shape, dtype=dtype, device=device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_supported(hidden: torch.Tensor) -> None:
    """Raise before any launch if the kernels cannot take these inputs (shapes are checked in ops)."""
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"adaptive softmax (triton): unsupported dtype {hidden.dtype}")
    if hidden.dtype == torch.float64 and not interpreting():
        raise ValueError("adaptive softmax (triton): float64 is supported under TRITON_INTERPRET=1 only (validation)")
    if hidden.dtype == torch.bfloat16 and interpreting():
        raise ValueError("adaptive softmax (triton): bfloat16 is broken in the Triton interpreter (triton issue 11584)")


def splits(vocab: int, row_tiles: int, block_n: int, cap: int = 1 << 30) -> tuple[int, int]:
    """(number of vocabulary splits, columns per split, a multiple of block_n): about
    TARGET_PROGRAMS programs with ``row_tiles`` programs per split, at most ``cap`` splits."""
    target = INTERPRET_TARGET_PROGRAMS if interpreting() else TARGET_PROGRAMS
    tiles = triton.cdiv(vocab, block_n)
    want = max(1, min(tiles, cap, triton.cdiv(target, max(row_tiles, 1))))
    per_split = triton.cdiv(tiles, want) * block_n
    return triton.cdiv(vocab, per_split), per_split


def _w2_args(w2, b2, w, b):
    """(W2, B2, V2, sw2v, sw2d, sb2) for an optional second vocabulary block (the head's clusters)."""
    if w2 is None:
        return w, b, 0, 0, 0, 0
    return w2, b2, w2.shape[0], w2.stride(0), w2.stride(1), b2.stride(0)


def direct(kernel):
    """The default ``launch``: the kernel itself, launched as it is called (eager)."""
    return kernel


def _full_span(n: int, device) -> torch.Tensor:
    """(0, n) as two int32 on the device (made there: no host-to-device copy): every row."""
    return torch.arange(2, dtype=torch.int32, device=device) * n


def segment_lse(h, w, b, w2=None, b2=None, col=None, span=None, launch=direct):
    """Log-sum-exp over the vocabulary [w; w2] of the rows of h (n, d) in ``span`` (two int32 on
    the device, every row when None), and with ``col`` (n,) int32 the logit at column col (0 where
    col < 0). Returns (lse (n,), pick (n,) or None) in the accumulation dtype; rows outside the span
    hold no value. ``launch``: ``direct``, or ``torch.library.wrap_triton`` inside a triton_op."""
    n, d = h.shape
    acc = acc_dtype(h.dtype)
    if n == 0:
        return h.new_zeros((0,), dtype=acc), (h.new_zeros((0,), dtype=acc) if col is not None else None)
    span = _full_span(n, h.device) if span is None else span
    W2, B2, V2, sw2v, sw2d, sb2 = _w2_args(w2, b2, w, b)
    V1 = w.shape[0]
    cfg = configs("lse", d, h.dtype)
    row_tiles = triton.cdiv(n, cfg["BLOCK_M"])                           # enough for any span
    n_splits, per_split = splits(V1 + V2, row_tiles, cfg["BLOCK_N"])
    part = _empty((n_splits, n), acc, h.device)
    pick = _empty((n,), acc, h.device) if col is not None else None
    launch(_lse_fwd_kernel)[(row_tiles, n_splits)](
        h, w, b, W2, B2, col if col is not None else part, part, pick if pick is not None else part, span,
        V1, V2, d, per_split,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), sw2v, sw2d, b.stride(0), sb2, part.stride(0),
        HAS_W2=w2 is not None, HAS_COL=col is not None, ACC=tl_acc(h.dtype), **cfg)
    lse = part[0] if n_splits == 1 else torch.logsumexp(part, 0)
    return lse, pick


def segment_dh(h, w, b, w2, b2, col, lse, g, span=None, launch=direct):
    """dL/dh (n, d) in the accumulation dtype for dz = g * (softmax - onehot(col)), for the rows in
    ``span`` (every row when None; the other rows are zero).

    The vocabulary is split across programs (a tail's span may hold a few row tiles only: one
    program per row tile streaming 160,000 words would leave the GPU idle): per-split partial dh
    in a (splits, n, d) buffer of at most DH_PARTIAL_BYTES, summed over the splits by torch in a
    fixed order (deterministic). Splits: ~TARGET_PROGRAMS programs counting the head's row tiles
    (span None: every row works) or a single row tile (a tail: its span is on the device)."""
    n, d = h.shape
    W2, B2, V2, sw2v, sw2d, sb2 = _w2_args(w2, b2, w, b)
    cfg = configs("dh", d, h.dtype)
    acc = acc_dtype(h.dtype)
    if n == 0:
        return torch.zeros((n, d), dtype=acc, device=h.device)
    d_chunks = triton.cdiv(d, cfg["BLOCK_DO"])
    working_tiles = triton.cdiv(n, cfg["BLOCK_M"]) if span is None else 1
    n_splits, per_split = splits(w.shape[0] + V2, working_tiles * d_chunks, cfg["BLOCK_N"],
                                  cap=max(1, DH_PARTIAL_BYTES // (n * d * 4)))
    if span is None:
        part, span = _empty((n_splits, n, d), acc, h.device), _full_span(n, h.device)
    else:
        part = torch.zeros((n_splits, n, d), dtype=acc, device=h.device)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), d_chunks, n_splits)
    launch(_bwd_dh_kernel)[grid](
        h, w, b, W2, B2, col, lse, g, part, span, w.shape[0], V2, d, per_split,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), sw2v, sw2d, b.stride(0), sb2,
        part.stride(0), part.stride(1), HAS_W2=w2 is not None, ACC=tl_acc(h.dtype), **cfg)
    return part[0] if n_splits == 1 else part.sum(0)


def segment_dw(h, w, b, w2, b2, col, lse, g, span=None, launch=direct):
    """(dW (V1, d), db (V1,), dW2 (V2, d) or None, db2 or None) in the parameters' dtype, summed
    over the rows in ``span`` (every row when None)."""
    n, d = h.shape
    W2, B2, V2, sw2v, sw2d, sb2 = _w2_args(w2, b2, w, b)
    V1 = w.shape[0]
    if n == 0:
        return (torch.zeros_like(w), torch.zeros_like(b), None if w2 is None else torch.zeros_like(w2),
                None if w2 is None else torch.zeros_like(b2))
    span = _full_span(n, h.device) if span is None else span
    cfg = configs("dw", d, h.dtype)
    dw = _empty((V1, d), w.dtype, h.device)
    db = _empty((V1,), b.dtype, h.device)
    dw2 = _empty((V2, d), w.dtype, h.device) if w2 is not None else dw
    db2 = _empty((V2,), b.dtype, h.device) if w2 is not None else db
    grid = (triton.cdiv(V1 + V2, cfg["BLOCK_N"]), triton.cdiv(d, cfg["BLOCK_DO"]))
    launch(_bwd_dw_kernel)[grid](
        h, w, b, W2, B2, col, lse, g, dw, db, dw2, db2, span, V1, V2, d,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), sw2v, sw2d, b.stride(0), sb2,
        dw.stride(0), dw2.stride(0),
        HAS_W2=w2 is not None, ACC=tl_acc(h.dtype), **cfg)
    return dw, db, (dw2 if w2 is not None else None), (db2 if w2 is not None else None)


def write_logprob(h, w, b, off, out, launch=direct):
    """out (n, V_c) (any strides) = h @ w^T + b + off[:, None]."""
    n, d = h.shape
    cfg = configs("logprob", d, h.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(w.shape[0], cfg["BLOCK_N"]))
    launch(_logprob_kernel)[grid](
        h, w, b, off, out, n, w.shape[0], d,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), b.stride(0), out.stride(0), out.stride(1),
        ACC=tl_acc(h.dtype), **cfg)


# ---------------------------------------------------------------------------------------------
# the two ops
# ---------------------------------------------------------------------------------------------

def _project(x, proj):
    return x if proj is None else x @ proj                               # (n, d_proj) -> (n, d_c)


def _bounds(weights) -> list[int]:
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w.shape[0])
    return bounds


def group_rows(target: torch.Tensor, bounds: Sequence[int]):
    """The rows grouped by the cluster of their target, on the device, with no host sync.

    Returns (cluster_of (N,) int64, ignored rows (-100) = the number of clusters; order (N,) int64,
    the rows sorted by cluster (stable); starts (n_clusters + 2,) int32: the rows of cluster c are
    order[starts[c]:starts[c + 1]], so ``starts[c:c + 2]`` is cluster c's span for the kernels).
    """
    n_clusters = len(bounds) - 1
    ignored = target == IGNORE_INDEX
    cluster_of = torch.zeros_like(target)
    for edge in bounds[1:-1]:                                           # compares with scalars: no copy
        cluster_of += target >= edge
    cluster_of = cluster_of.masked_fill(ignored, n_clusters)
    sorted_cluster, order = torch.sort(cluster_of, stable=True)
    ids = torch.arange(n_clusters + 2, dtype=sorted_cluster.dtype, device=target.device)
    starts = torch.searchsorted(sorted_cluster, ids, out_int32=True)
    return cluster_of, order, starts


def _head_col(target, cluster_of, bounds) -> torch.Tensor:
    """(N,) int32 column of each row's target in the head: the word itself (cluster 0), its
    cluster's column V_0 + c - 1 (tail c), -1 (ignored)."""
    head_col = torch.where(cluster_of == 0, target, bounds[1] + cluster_of - 1)
    return head_col.masked_fill(target == IGNORE_INDEX, -1).to(torch.int32)


def nll_forward(hidden, target, weights, biases, projs, cluster_weight, cluster_bias, launch=direct):
    """NLL (N,) in hidden's dtype, in row order, 0 at ignored rows; and the log-sum-exp of every
    cluster (n_clusters, N) in the accumulation dtype for the backward: row 0 the head's in row
    order, row c >= 1 tail c's in cluster order (order = ``group_rows``), valid on c's span.

    Every tail kernel is launched over all N rows sorted by cluster and reads its span from the
    device, so nothing waits for the host; the price is each tail's projection computed for all N
    rows (a small matmul next to the head's logits). Every tensor returned is allocated here.
    ``launch`` as for ``segment_lse``."""
    check_supported(hidden)
    bounds = _bounds(weights)
    n_clusters = len(weights)
    target = target.long()
    cluster_of, order, starts = group_rows(target, bounds)
    cw, cb = (cluster_weight, cluster_bias) if n_clusters > 1 else (None, None)
    lse0, pick0 = segment_lse(_project(hidden, projs[0]), weights[0], biases[0], cw, cb,
                              _head_col(target, cluster_of, bounds), launch=launch)
    lses, tail = [lse0], torch.zeros_like(lse0)                          # tail terms, cluster order
    if n_clusters > 1:
        x, t, sorted_cluster = (a.index_select(0, order) for a in (hidden, target, cluster_of))
    for c in range(1, n_clusters):
        col_c = (t - bounds[c]).to(torch.int32)
        lse_c, pick_c = segment_lse(_project(x, projs[c]), weights[c], biases[c], None, None, col_c,
                                    starts[c:c + 2], launch)
        in_c = sorted_cluster == c
        tail = torch.where(in_c, lse_c - pick_c, tail)
        lses.append(torch.where(in_c, lse_c, 0.0))                      # defined values off the span
    nll = (lse0 - pick0).index_add(0, order, tail)                      # (N,), row order
    nll = nll.masked_fill(target == IGNORE_INDEX, 0.0).to(hidden.dtype)
    return nll, torch.stack(lses)


def nll_backward(grad, hidden, target, weights, biases, projs, cluster_weight, cluster_bias, lse, needs,
                 launch=direct):
    """Gradients of sum(grad * nll) from the forward's ``lse``; the grouping and the projections
    are recomputed. ``needs`` names what to compute: dict with keys "hidden", "weights", "biases",
    "projs" (lists per cluster), "cluster" (cluster_weight / bias). Returns (dhidden, dweights,
    dbiases, dprojs, dcluster_weight, dcluster_bias), None where not needed; every tensor returned
    is allocated here. ``launch`` as for ``segment_lse``."""
    n_clusters = len(weights)
    dtype = hidden.dtype
    bounds = _bounds(weights)
    target = target.long()
    cluster_of, order, starts = group_rows(target, bounds)
    g = grad.to(lse.dtype).masked_fill(target == IGNORE_INDEX, 0.0).contiguous()
    dweights, dbiases, dprojs = [None] * n_clusters, [None] * n_clusters, [None] * n_clusters
    dcw = dcb = None
    need_h = [needs["hidden"] or needs["projs"][c] for c in range(n_clusters)]

    def param_grads(c, h, w2, b2, col, g_c, span):
        nonlocal dcw, dcb
        if needs["weights"][c] or needs["biases"][c] or (c == 0 and needs["cluster"]):
            dweights[c], dbiases[c], dw2, db2 = segment_dw(h, weights[c], biases[c], w2, b2, col, lse[c], g_c,
                                                           span, launch)
            if c == 0:
                dcw, dcb = dw2, db2

    def input_grads(c, x, h, w2, b2, col, g_c, span):
        """dh of cluster c -> (d proj_c, contribution to dhidden for the rows x)."""
        if not need_h[c]:
            return None
        dh = segment_dh(h, weights[c], biases[c], w2, b2, col, lse[c], g_c, span, launch).to(dtype)  # (n, d_c)
        if projs[c] is None:
            return dh
        if needs["projs"][c]:
            dprojs[c] = x.t() @ dh                                           # (d_proj, d_c)
        return dh @ projs[c].t() if needs["hidden"] else None

    cw, cb = (cluster_weight, cluster_bias) if n_clusters > 1 else (None, None)
    h0, col0 = _project(hidden, projs[0]), _head_col(target, cluster_of, bounds)
    param_grads(0, h0, cw, cb, col0, g, None)
    dhidden = input_grads(0, hidden, h0, cw, cb, col0, g, None)                   # (N, d_proj) or None
    if n_clusters > 1:
        x, t, g_sorted = (a.index_select(0, order) for a in (hidden, target, g))      # cluster order
        dx = torch.zeros_like(x) if needs["hidden"] else None
        for c in range(1, n_clusters):
            h_c, col_c, span = _project(x, projs[c]), (t - bounds[c]).to(torch.int32), starts[c:c + 2]
            param_grads(c, h_c, None, None, col_c, g_sorted, span)
            dx_c = input_grads(c, x, h_c, None, None, col_c, g_sorted, span)
            if needs["hidden"]:
                dx += dx_c
        if needs["hidden"]:
            dhidden = dhidden.index_add(0, order, dx)                        # back to row order
    return dhidden, dweights, dbiases, dprojs, dcw, dcb


def log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias, out: Optional[torch.Tensor] = None,
                launch=direct):
    """Log-probabilities (N, V) written once into ``out`` (allocated in hidden's dtype if None;
    any strides). Temporaries: (N, d_c) projections, (splits, N) lse partials, (N, C).
    ``launch`` as for ``segment_lse``."""
    check_supported(hidden)
    bounds = _bounds(weights)
    n, n_clusters = hidden.shape[0], len(weights)
    if out is None:
        out = torch.empty((n, bounds[-1]), dtype=hidden.dtype, device=hidden.device)
    if n == 0:
        return out
    acc = acc_dtype(hidden.dtype)
    cw, cb = (cluster_weight, cluster_bias) if n_clusters > 1 else (None, None)
    h0 = _project(hidden, projs[0])
    lse0, _ = segment_lse(h0, weights[0], biases[0], cw, cb, launch=launch)
    write_logprob(h0, weights[0], biases[0], (-lse0).contiguous(), out[:, : bounds[1]], launch)
    if n_clusters > 1:
        head_cluster = (h0.to(acc) @ cw.to(acc).t() + cb.to(acc)) - lse0[:, None]     # (N, C) log p(cluster)
    for c in range(1, n_clusters):
        h_c = _project(hidden, projs[c])
        lse_c, _ = segment_lse(h_c, weights[c], biases[c], launch=launch)
        write_logprob(h_c, weights[c], biases[c], (head_cluster[:, c - 1] - lse_c).contiguous(),
                      out[:, bounds[c]: bounds[c + 1]], launch)
    return out
