"""Fused relative-position attention (Transformer-XL), forward and backward, in Triton.

Maths and shapes: ``txl_fast.ops.rel_attention`` (batch-first; q (B, Lq, H, D), k/v (B, Lk, H, D),
r (Lr, H, D), content_bias = r_w_bias and position_bias = r_r_bias (H, D)):
score(i, j) = scale * ((q_i + content_bias).k_j + (q_i + position_bias).r[j + Lq - 1 - i]), row p of
r the distance Lk - 1 - p. Key j is visible to query i when d = i + mlen - j lies in [dmin, dmax]
and key_starts[b] <= j < key_lengths[b], inside i's chunk with ``chunk_context``, and i is below
its row's query length (``_row_keys``, ``visibility``). ``txl_fast.naive`` is the literal validator.

``_fwd_kernel`` runs an online softmax over key tiles (SPLIT_K: over one chunk of the keys, merged
by ``_fwd_combine_kernel``); the backward is ``_bwd_delta_kernel``, ``_bwd_dq_kernel`` (loop over
key tiles) and ``_bwd_dkdv_kernel`` (loop over query tiles, dr by relaxed atomics). A tile's
position term is one band of r rows, multiplied once and skewed in registers (``_scores``,
``_unskew``). With ``FULL_TILES`` (off until a GPU times it) each loop is split into tiles no mask
touches and edge tiles (``full_tiles``). The design, the cost model and what is verified:
docs/kernels.md.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FILL = tl.constexpr(-1.0e30)          # finite fill for invisible scores (log2 domain)
LOG2E = 1.4426950408889634
TWO_LOG2E = tl.constexpr(2 * LOG2E)
DECODE_MAX_LQ = 16                    # Lq at or below this takes the split-over-keys path
DECODE_BLOCK_M = 16                   # the query tile of the decode path (tl.dot needs >= 16)
MAX_SPLITS = 16                       # split path: at most this many key chunks per query tile
TARGET_PROGRAMS = 264                 # split path: aim for ~2 programs per H100/H200 SM (132)
UNDERFILL_PROGRAMS = 132              # a tiled grid under this many programs splits over keys too
INTERPRET_UNDERFILL_PROGRAMS = 0      # under the interpreter only Lq <= DECODE_MAX_LQ splits (tests force it)
# The key loops split into full tiles (no mask) and edge tiles (``full_tiles``), as Triton's
# tutorial 06; off: three copies of the loop raise the register pressure, and ptxas spills past the
# AOT allowances (dkdv on sm_80 fp16 D 64: 692 B, fp32 up to 118 KB; the fp32 forward on sm_90,
# docs/kernels.md). On, the result is the same bit for bit; a GPU has to time it before it ships.
FULL_TILES = False


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
#
# With FULL_TILES every key loop is split as in Triton's tutorial 06 (``_attn_fwd_inner`` with
# STAGE; without, each kernel runs one masked loop, the leading-edge call over all tiles): the full
# tiles, whose every (query row, key) pair is visible (no mask: ``MASKED=False``), and the edge
# tiles around them (the band's ends, the key length, Lk, a split's end, a ragged last query
# tile), which apply the visibility masks. The three loops (leading edge, full, trailing edge)
# walk the same tiles in the same order as one masked loop would, so the sums are the same bit for
# bit (``full_tiles``).

@triton.jit
def _softcap(s, softcap):
    """softcap · tanh(s / softcap), both in the log2 domain; tanh(x) = 1 - 2 / (e^2x + 1), exact at
    both ends (e^2x overflowing to inf gives 1)."""
    return softcap - 2.0 * softcap / (tl.exp2(s * (TWO_LOG2E / softcap)) + 1.0)


@triton.jit
def _scores(q_content, q_pos, keys_t, band_t, qk_scale, softcap, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            ACC: tl.constexpr, PREC: tl.constexpr, QROWS: tl.constexpr, SOFTCAP: tl.constexpr):
    """Scores of one tile in the log2 domain, unmasked.

    q_content, q_pos: (BM, BD) = q + content bias, q + position bias in the dot dtype; keys_t:
    (BD, BN); band_t: (BD, BP) the r rows n0 - m0 + Lq - QROWS + [0, BP), QROWS <= BM the query
    rows the band serves (BM, or on the decode path the real query count rounded up). Position
    term: band[a, c - a + QROWS - 1] for local (a, c); rows a >= QROWS are padding (clamped index).
    SOFTCAP: capped by ``_softcap`` (softcap in the log2 domain).
    """
    tl.static_assert(QROWS <= BLOCK_M)
    tl.static_assert(band_t.shape[1] >= QROWS + BLOCK_N - 1)    # the band covers every skew
    s = tl.dot(q_content, keys_t, input_precision=PREC, out_dtype=ACC)         # (BM, BN)
    band = tl.dot(q_pos, band_t, input_precision=PREC, out_dtype=ACC)          # (BM, BP)
    skew = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None] + (QROWS - 1)
    if QROWS < BLOCK_M:
        skew = tl.maximum(skew, 0)
    s = (s + tl.gather(band, skew, axis=1)) * qk_scale
    if SOFTCAP:
        s = _softcap(s, softcap)
    return s


@triton.jit
def _row_keys(i, qlen, mlen, dmin, dmax, start, end, chunk_size, chunk_left, chunk_right, LOWER: tl.constexpr,
              UPPER: tl.constexpr, CHUNKED: tl.constexpr):
    """Keys [first, last) that query rows i (a vector) see, first >= last: none. Row i at position
    p = i + mlen sees j with dmin <= p - j (LOWER), p - j <= dmax (UPPER), inside its chunk's keys
    [(c - chunk_left) * chunk_size, (c + 1) * chunk_size + chunk_right), c = p // chunk_size
    (CHUNKED; chunk_left < 0: from key 0), and inside its batch row's keys [start, end); rows
    i >= qlen (padded queries) see none. Both ends are non-decreasing in i below qlen."""
    p = i + mlen
    first = p * 0 + start
    last = p * 0 + end
    if UPPER:
        first = tl.maximum(first, p - dmax)
    if LOWER:
        last = tl.minimum(last, p - dmin + 1)
    if CHUNKED:
        c = p // chunk_size
        first = tl.maximum(first, tl.where(chunk_left >= 0, (c - chunk_left) * chunk_size, 0))
        last = tl.minimum(last, (c + 1) * chunk_size + chunk_right)
    return first, tl.where(i < qlen, last, first)


@triton.jit
def _rows_seeing(j, Lq, qlen, mlen, dmin, dmax, start, end, chunk_size, chunk_left, chunk_right,
                 LOWER: tl.constexpr, UPPER: tl.constexpr, CHUNKED: tl.constexpr):
    """For key j >= 0 (``_row_keys``'s ends being monotone): rows [a, Lq) have last > j, rows
    [0, b) have first <= j, b <= qlen."""
    a = tl.where(end > j, 0, Lq)
    b = tl.where(start <= j, qlen, 0)
    if LOWER:
        a = tl.maximum(a, j - mlen + dmin)
    if UPPER:
        b = tl.minimum(b, j - mlen + dmax + 1)
    if CHUNKED:
        a = tl.maximum(a, tl.maximum(j - chunk_right, 0) // chunk_size * chunk_size - mlen)
        b = tl.minimum(b, tl.where(chunk_left >= 0, (j // chunk_size + chunk_left + 1) * chunk_size - mlen, b))
    return a, b


@triton.jit
def _visible(offs_m, offs_n, first, last, mlen, dmin, dmax, length, LOWER: tl.constexpr, UPPER: tl.constexpr,
             HAS_LENGTHS: tl.constexpr, PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BM, BN): PER_ROW, key offs_n inside each row's keys [first, last) (``_row_keys``); else
    dmin <= d (if LOWER), d <= dmax (if UPPER), key < length (if HAS_LENGTHS), for the distance
    d = i + mlen - j (first, last unused)."""
    if PER_ROW:
        visible = (offs_n[None, :] >= first[:, None]) & (offs_n[None, :] < last[:, None])
    else:
        dist = offs_m[:, None] + mlen - offs_n[None, :]
        visible = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
        if LOWER:
            visible = visible & (dist >= dmin)
        if UPPER:
            visible = visible & (dist <= dmax)
        if HAS_LENGTHS:
            visible = visible & (offs_n < length)[None, :]
    return visible


@triton.jit
def _row_bounds(ROWS, b, Lq, Lk, HAS_LENGTHS: tl.constexpr, ROW_BOUNDS: tl.constexpr):
    """Batch row b's keys [start, end) and query count: ROW_BOUNDS, ROWS (B, 3) int32; else [0, Lk)
    and Lq, the end from ROWS (B,) = key_lengths with HAS_LENGTHS."""
    start = tl.full([], 0, tl.int32)
    end = Lk
    qlen = Lq
    if ROW_BOUNDS:
        start = tl.load(ROWS + 3 * b)
        end = tl.load(ROWS + 3 * b + 1)
        qlen = tl.load(ROWS + 3 * b + 2)
    elif HAS_LENGTHS:
        end = tl.load(ROWS + b)
    return start, end, qlen


@triton.jit
def _rows_with_keys(Lq, mlen, dmin, dmax, length):
    """Without per-row ranges: query rows [0, end) see a key, rows [end, Lq) none (the empty rows).
    Row i sees the keys [max(0, i + mlen - dmax), min(length, i + mlen - dmin + 1)); with dmin <= 0
    the upper end is positive, so the range is empty when length is 0, dmin > dmax, or
    i + mlen - dmax >= length."""
    end = tl.minimum(Lq, tl.maximum(0, length - mlen + dmax))
    return tl.where((length > 0) & (dmin <= dmax), end, 0)


@triton.jit
def _key_range(m0, Lq, Lk, mlen, dmin, dmax, length, end, ALL_IF_EMPTY: tl.constexpr, BLOCK_M: tl.constexpr):
    """Without per-row ranges: keys [lo, hi) that hold every visible key of query rows
    [m0, m0 + BM); with ALL_IF_EMPTY (HF's uniform rows) all keys when one of these rows is empty
    (end: ``_rows_with_keys``)."""
    lo = tl.maximum(0, m0 + mlen - dmax)
    hi = tl.minimum(length, m0 + BLOCK_M + mlen - dmin)
    if ALL_IF_EMPTY:
        empty = tl.minimum(m0 + BLOCK_M, Lq) > end
        lo = tl.where(empty, 0, lo)
        hi = tl.where(empty, Lk, hi)
    return lo, hi


@triton.jit
def _full_key_tiles(lo, hi, m0, i_last, Lk, mlen, dmin, dmax, length, LOWER: tl.constexpr,
                    UPPER: tl.constexpr, BLOCK_N: tl.constexpr):
    """Without per-row ranges: the key tiles [a, b) of the loop over [lo, hi) that query rows
    [m0, i_last] see whole: j >= i_last + mlen - dmax (UPPER), j <= m0 + mlen - dmin (LOWER),
    j < min(length, Lk). A row that sees every key of a tile is not empty, so no full tile holds an
    empty row."""
    first = lo
    last = tl.minimum(hi, tl.minimum(length, Lk))
    if UPPER:
        first = tl.maximum(first, i_last + mlen - dmax)
    if LOWER:
        last = tl.minimum(last, m0 + mlen - dmin + 1)
    return full_tiles(lo, hi, first, last, BLOCK_N)


@triton.jit
def _tile_keys(first, last, rows, Lk, ALL_IF_EMPTY: tl.constexpr):
    """Of the query rows ``rows`` (BM bool) of a tile, keys [first, last) each: the keys [lo, hi)
    that hold every visible key, all Lk when one row sees none and ALL_IF_EMPTY (HF's uniform rows);
    and [full_first, full_last) the keys every row sees (empty when one sees none: an empty row is
    in no full tile)."""
    seen = rows & (first < last)
    empty = tl.max(tl.where(rows & (first >= last), 1, 0), 0) > 0
    lo = tl.min(tl.where(seen, first, Lk), 0)
    hi = tl.max(tl.where(seen, last, 0), 0)
    full_first = tl.max(tl.where(rows, first, 0), 0)
    full_last = tl.where(empty, full_first, tl.min(tl.where(rows, last, Lk), 0))
    if ALL_IF_EMPTY:
        lo = tl.where(empty, 0, lo)
        hi = tl.where(empty, Lk, hi)
    return lo, hi, full_first, full_last


@triton.jit
def full_tiles(start, stop, first, last, BLOCK: tl.constexpr):
    """The loop's tiles are start + k * BLOCK below stop; [a, b) those of them inside [first, last)
    (``a``, ``b`` on the same grid, start <= a <= b <= the grid's end), so that the loops over
    [start, a), [a, b), [b, stop) visit every tile once, in order. Divisions on non-negatives only."""
    grid_end = start + (tl.maximum(stop - start, 0) + BLOCK - 1) // BLOCK * BLOCK
    a = start + (tl.maximum(first - start, 0) + BLOCK - 1) // BLOCK * BLOCK
    b = start + tl.maximum(tl.minimum(last, stop) - start, 0) // BLOCK * BLOCK
    a = tl.minimum(a, grid_end)
    return a, tl.maximum(tl.minimum(b, grid_end), a)


@triton.jit
def _unskew(ds, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """(BM, BN) tile gradient -> (BM, BP) band gradient: band[a, pl] = ds[a, pl + a - BM + 1] or 0."""
    tl.static_assert(BLOCK_P >= BLOCK_M + BLOCK_N - 1)
    c = tl.arange(0, BLOCK_P)[None, :] + tl.arange(0, BLOCK_M)[:, None] - (BLOCK_M - 1)
    inside = (c >= 0) & (c < BLOCK_N)
    return tl.where(inside, tl.gather(ds, tl.where(inside, c, 0), axis=1), 0.0)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q_content, q_pos, k_base, v_base, r_base, start, stop, m0, offs_m, offs_d,
               dmask, skn, skd, svn, svd, srp, srd, Lq, Lk, Lr, mlen, dmin, dmax, length, first, last, chunk_end,
               qk_scale, softcap, MASKED: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr,
               HAS_LENGTHS: tl.constexpr, PER_ROW: tl.constexpr, SOFTCAP: tl.constexpr, SPLIT_K: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_P: tl.constexpr, QROWS: tl.constexpr):
    """Online softmax over the key tiles [start, stop) of one query tile; MASKED: the edge tiles
    (``_visible``, keys past Lk, the split's end), else tiles every row sees whole."""
    dtype = q_content.dtype
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kmask = dmask[:, None]          # full tiles: every key below Lk
        vmask = dmask[None, :]
        if MASKED:
            kmask = kmask & (offs_n < Lk)[None, :]
            vmask = vmask & (offs_n < Lk)[:, None]
        keys_t = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=kmask, other=0.0)  # (BD, BN)
        rows = n0 - m0 + Lq - QROWS + tl.arange(0, BLOCK_P)
        band_t = tl.load(r_base + rows[None, :] * srp + offs_d[:, None] * srd,
                         mask=((rows >= 0) & (rows < Lr))[None, :] & dmask[:, None], other=0.0)  # (BD, BP)
        s = _scores(q_content, q_pos, keys_t, band_t, qk_scale, softcap, BLOCK_M, BLOCK_N, ACC, PREC, QROWS, SOFTCAP)
        if MASKED:
            visible = _visible(offs_m, offs_n, first, last, mlen, dmin, dmax, length, LOWER, UPPER, HAS_LENGTHS,
                               PER_ROW, BLOCK_M, BLOCK_N)
            s = tl.where(visible, s, FILL)
            s = tl.where((offs_n < Lk)[None, :], s, float("-inf"))
            if SPLIT_K:
                s = tl.where((offs_n < chunk_end)[None, :], s, float("-inf"))  # next chunk's keys
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vals = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=vmask, other=0.0)  # (BN, BD)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), vals, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    return acc, l_i, m_i


# Arguments that change while generation fills the memory (one more key a step; the window, so
# dmax, is mlen + 1 until the memory is full; the decode split count follows Lk), or with every
# utterance of a Conformer (Lr, dmin = -(Lq - 1)): not specialised, or every new value divisible
# by 16 (or equal to 1) would compile another binary. They only bound loops and masks (every load
# is contiguous along D), so no vectorisation depends on them.
@triton.jit(do_not_specialize=["Lk", "Lr", "mlen", "dmin", "dmax", "chunk_size", "chunk_left", "chunk_right",
                               "keys_per_split", "n_splits"])
def _fwd_kernel(
    Q, K, V, R, CONTENT_BIAS, POSITION_BIAS, ROWS, O, M, L, MP, LP, AP,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
    srp, srh, srd, scbh, scbd, spbh, spbd, sob, som, soh, sod,
    H, Lq, Lk, Lr, mlen, dmin, dmax, chunk_size, chunk_left, chunk_right, keys_per_split, n_splits, qk_scale, softcap,
    HEAD_DIM: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ROW_BOUNDS: tl.constexpr, CHUNKED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ZERO_EMPTY: tl.constexpr, FULL_TILES: tl.constexpr, SPLIT_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_ROWS: tl.constexpr,
):
    """Tiled: grid (cdiv(Lq, BM), B*H), writes O, M, L. SPLIT_K: grid (n_splits, B*H, cdiv(Lq, BM)),
    query tile program_id(2), keys [split * keys_per_split, +keys_per_split), writes partials MP,
    LP, AP; SPLIT_ROWS (a power of 2, min(BM, next pow2 of Lq)) is the rows the r band serves, so
    that BLOCK_P = next pow2 of SPLIT_ROWS + BN - 1 (Lq 1: BN rows of r per key tile, not BM + BN - 1)."""
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    if SPLIT_K:
        m0 = tl.multiple_of(tl.program_id(2) * BLOCK_M, BLOCK_M)
        QROWS: tl.constexpr = SPLIT_ROWS
    else:
        m0 = tl.multiple_of(tl.program_id(0) * BLOCK_M, BLOCK_M)
        QROWS: tl.constexpr = BLOCK_M
    dtype = Q.dtype.element_ty
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    mmask = offs_m < Lq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=mmask[:, None] & dmask[None, :], other=0.0).to(ACC)
    content_bias = tl.load(CONTENT_BIAS + h * scbh + offs_d * scbd, mask=dmask, other=0.0).to(ACC)
    position_bias = tl.load(POSITION_BIAS + h * spbh + offs_d * spbd, mask=dmask, other=0.0).to(ACC)
    q_content = (q + content_bias[None, :]).to(dtype)
    q_pos = (q + position_bias[None, :]).to(dtype)

    # rows past Lq are never stored: they neither widen the range nor keep tiles from being full
    start, end, qlen = _row_bounds(ROWS, b, Lq, Lk, HAS_LENGTHS, ROW_BOUNDS)
    if ROW_BOUNDS or CHUNKED:
        first, last = _row_keys(offs_m, qlen, mlen, dmin, dmax, start, end, chunk_size, chunk_left, chunk_right,
                                LOWER, UPPER, CHUNKED)                              # (BM,) each
        lo, hi, full_first, full_last = _tile_keys(first, last, mmask, Lk, not ZERO_EMPTY)
        seen = first < last                                                         # (BM,)
    else:           # keys [0, end): the band alone bounds each row's keys (first, last unused)
        first, last = offs_m, offs_m
        rows_end = _rows_with_keys(Lq, mlen, dmin, dmax, end)
        lo, hi = _key_range(m0, Lq, Lk, mlen, dmin, dmax, end, rows_end, not ZERO_EMPTY, BLOCK_M)
        seen = offs_m < rows_end
    if SPLIT_K:
        split = tl.program_id(0)
        lo = tl.maximum(lo, split * keys_per_split)
        hi = tl.minimum(hi, (split + 1) * keys_per_split)
    full_lo, full_hi = hi, hi
    if FULL_TILES:
        if ROW_BOUNDS or CHUNKED:
            full_lo, full_hi = full_tiles(lo, hi, full_first, full_last, BLOCK_N)
        else:
            full_lo, full_hi = _full_key_tiles(lo, hi, m0, tl.minimum(m0 + BLOCK_M, Lq) - 1, Lk, mlen, dmin, dmax,
                                               end, LOWER, UPPER, BLOCK_N)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    r_base = R + h * srh
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for stage in tl.static_range(3 if FULL_TILES else 1):     # leading edge, full, trailing edge tiles
        start = lo if stage == 0 else (full_lo if stage == 1 else full_hi)
        stop = full_lo if stage == 0 else (full_hi if stage == 1 else hi)
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q_content, q_pos, k_base, v_base, r_base, start, stop, m0, offs_m, offs_d, dmask,
            skn, skd, svn, svd, srp, srd, Lq, Lk, Lr, mlen, dmin, dmax, end, first, last, hi, qk_scale, softcap,
            stage != 1, LOWER, UPPER, HAS_LENGTHS, ROW_BOUNDS or CHUNKED, SOFTCAP, SPLIT_K, ACC, PREC, BLOCK_M,
            BLOCK_N, BLOCK_P, QROWS)

    if ZERO_EMPTY:      # rows that see no key: l = 0 and zeros (they summed the fill of their tile)
        l_i = tl.where(seen, l_i, 0.0)
        acc = tl.where(seen[:, None], acc, 0.0)
    if SPLIT_K:
        # partials, layout (B*H, query tiles, n_splits, BM) and (..., BM, BD), contiguous
        row = ((pid_bh * tl.num_programs(2) + tl.program_id(2)) * n_splits + split) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(MP + row, m_i)
        tl.store(LP + row, l_i)
        tl.store(AP + row[:, None] * BLOCK_D + offs_d[None, :], acc)
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
        stat = pid_bh * Lq + offs_m
        tl.store(M + stat, m_i, mask=mmask)
        tl.store(L + stat, l_i, mask=mmask)


@triton.jit(do_not_specialize=["n_splits"])
def _fwd_combine_kernel(
    O, M, L, MP, LP, AP, sob, som, soh, sod, H, Lq, n_splits,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the split-over-keys partials of one (batch * head, query tile): grid (B*H, cdiv(Lq, BM))."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    tile = pid_bh * tl.num_programs(1) + tl.program_id(1)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for split in range(0, n_splits):
        row = (tile * n_splits + split) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_s = tl.load(MP + row)
        l_s = tl.load(LP + row)
        a_s = tl.load(AP + row[:, None] * BLOCK_D + offs_d[None, :])
        m_new = tl.maximum(m_i, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)      # chunks with no key: keep 0s
        alpha = tl.exp2(m_i - m_ref)
        beta = tl.exp2(m_s - m_ref)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new
    mmask = offs_m < Lq
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=mmask[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(M + pid_bh * Lq + offs_m, m_i, mask=mmask)
    tl.store(L + pid_bh * Lq + offs_m, l_i, mask=mmask)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, sob, som, soh, sod, sdb, sdm, sdh, sdd, H, Lq,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d o[b, i, h, d] * do[b, i, h, d]: grid (cdiv(Lq, BM), B*H)."""
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=mask, other=0.0)
    tl.store(DELTA + pid_bh * Lq + offs_m, tl.sum(o.to(ACC) * do.to(ACC), 1), mask=offs_m < Lq)


@triton.jit
def _row_stats(M, L, DELTA, stat, mmask, ZERO_EMPTY: tl.constexpr):
    """The forward's m, 1 / l and delta of rows ``stat``; a row with l = 0 (it sees no key, under
    ZERO_EMPTY) gets m = 0 and 1 / l = 0, so that its probabilities are 0, never NaN."""
    m_i = tl.load(M + stat, mask=mmask, other=0.0)
    l_i = tl.load(L + stat, mask=mmask, other=1.0)
    if ZERO_EMPTY:
        seen = l_i > 0
        m_i = tl.where(seen, m_i, 0.0)
        inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    else:
        inv_l = 1.0 / l_i
    return m_i, inv_l, tl.load(DELTA + stat, mask=mmask, other=0.0)


@triton.jit
def _dq_tiles(dq_c, dq_p, q_content, q_pos, do, m_i, inv_l, delta, k_base, v_base, r_base, start, stop, m0,
              offs_m, offs_d, dmask, mmask, skn, skd, svn, svd, srp, srd, Lq, Lk, Lr, mlen, dmin, dmax, length,
              first, last, scale, qk_scale, softcap, MASKED: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr,
              HAS_LENGTHS: tl.constexpr, PER_ROW: tl.constexpr, SOFTCAP: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """dq_content and dq_position over the key tiles [start, stop) of one query tile; MASKED: the
    edge tiles (``_visible``, keys past Lk, rows past Lq), else tiles every row sees whole."""
    dtype = q_content.dtype
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kmask = dmask[:, None]          # full tiles: every key below Lk
        if MASKED:
            kmask = kmask & (offs_n < Lk)[None, :]
        keys_t = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=kmask, other=0.0)  # (BD, BN)
        vals_t = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None] * svd, mask=kmask, other=0.0)  # (BD, BN)
        rows = n0 - m0 + Lq - BLOCK_M + tl.arange(0, BLOCK_P)
        band_t = tl.load(r_base + rows[None, :] * srp + offs_d[:, None] * srd,
                         mask=((rows >= 0) & (rows < Lr))[None, :] & dmask[:, None], other=0.0)  # (BD, BP)
        s = _scores(q_content, q_pos, keys_t, band_t, qk_scale, softcap, BLOCK_M, BLOCK_N, ACC, PREC, BLOCK_M,
                    SOFTCAP)
        if SOFTCAP:
            slope = 1.0 - (s / softcap) * (s / softcap)      # d capped / d score, before the masks
        if MASKED:
            visible = _visible(offs_m, offs_n, first, last, mlen, dmin, dmax, length, LOWER, UPPER, HAS_LENGTHS,
                               PER_ROW, BLOCK_M, BLOCK_N)
            s = tl.where(visible, s, FILL)
            s = tl.where((offs_n < Lk)[None, :], s, float("-inf"))
        p = tl.exp2(s - m_i[:, None]) * inv_l[:, None]
        dp = tl.dot(do, vals_t, input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * slope
        if MASKED:
            ds = tl.where(visible & mmask[:, None], ds, 0.0)
        ds = ds * scale
        dq_c += tl.dot(ds.to(dtype), tl.trans(keys_t), input_precision=PREC, out_dtype=ACC)
        ds_band = _unskew(ds, BLOCK_M, BLOCK_N, BLOCK_P)                         # (BM, BP)
        dq_p += tl.dot(ds_band.to(dtype), tl.trans(band_t), input_precision=PREC, out_dtype=ACC)
    return dq_c, dq_p


@triton.jit(do_not_specialize=["Lk", "Lr", "mlen", "dmin", "dmax", "chunk_size", "chunk_left", "chunk_right"])
def _bwd_dq_kernel(
    Q, K, V, R, CONTENT_BIAS, POSITION_BIAS, ROWS, DO, M, L, DELTA, DQ, DCB_PART, DPB_PART,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
    srp, srh, srd, scbh, scbd, spbh, spbd, sdb, sdm, sdh, sdd, sqgb, sqgm, sqgh, sqgd,
    H, Lq, Lk, Lr, mlen, dmin, dmax, chunk_size, chunk_left, chunk_right, n_tiles, scale, qk_scale, softcap,
    HEAD_DIM: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ROW_BOUNDS: tl.constexpr, CHUNKED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ZERO_EMPTY: tl.constexpr, FULL_TILES: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq for one query tile: grid (cdiv(Lq, BM), B*H). Also the partial sums of dq_content (the
    content bias's gradient) and dq_position (the position bias's) over the tile's rows into
    DCB_PART / DPB_PART, layout (B, n_tiles, H, BD)."""
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    m0 = tl.multiple_of(pid_m * BLOCK_M, BLOCK_M)
    dtype = Q.dtype.element_ty
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    mmask = offs_m < Lq
    tile_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=tile_mask, other=0.0).to(ACC)
    content_bias = tl.load(CONTENT_BIAS + h * scbh + offs_d * scbd, mask=dmask, other=0.0).to(ACC)
    position_bias = tl.load(POSITION_BIAS + h * spbh + offs_d * spbd, mask=dmask, other=0.0).to(ACC)
    q_content = (q + content_bias[None, :]).to(dtype)
    q_pos = (q + position_bias[None, :]).to(dtype)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=tile_mask, other=0.0).to(dtype)
    m_i, inv_l, delta = _row_stats(M, L, DELTA, pid_bh * Lq + offs_m, mmask, ZERO_EMPTY)

    # empty rows have zero score gradients: only the keys some row sees are visited; rows past Lq
    # (which see no key) feed the bias sums, so a ragged last query tile has edge tiles only
    start, end, qlen = _row_bounds(ROWS, b, Lq, Lk, HAS_LENGTHS, ROW_BOUNDS)
    if ROW_BOUNDS or CHUNKED:
        first, last = _row_keys(offs_m, qlen, mlen, dmin, dmax, start, end, chunk_size, chunk_left, chunk_right,
                                LOWER, UPPER, CHUNKED)                              # (BM,) each
        lo, hi, full_first, full_last = _tile_keys(first, last, offs_m >= 0, Lk, False)
    else:           # keys [0, end): the band alone bounds each row's keys (first, last unused)
        first, last = offs_m, offs_m
        lo, hi = _key_range(m0, Lq, Lk, mlen, dmin, dmax, end, Lq, False, BLOCK_M)
    full_lo, full_hi = hi, hi
    if FULL_TILES:
        if ROW_BOUNDS or CHUNKED:
            full_lo, full_hi = full_tiles(lo, hi, full_first, full_last, BLOCK_N)
        else:
            full_lo, full_hi = _full_key_tiles(lo, tl.where(m0 + BLOCK_M <= Lq, hi, lo), m0, m0 + BLOCK_M - 1, Lk,
                                               mlen, dmin, dmax, end, LOWER, UPPER, BLOCK_N)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    r_base = R + h * srh
    dq_c = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    dq_p = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for stage in tl.static_range(3 if FULL_TILES else 1):     # leading edge, full, trailing edge tiles
        start = lo if stage == 0 else (full_lo if stage == 1 else full_hi)
        stop = full_lo if stage == 0 else (full_hi if stage == 1 else hi)
        dq_c, dq_p = _dq_tiles(
            dq_c, dq_p, q_content, q_pos, do, m_i, inv_l, delta, k_base, v_base, r_base, start, stop, m0,
            offs_m, offs_d, dmask, mmask, skn, skd, svn, svd, srp, srd, Lq, Lk, Lr, mlen, dmin, dmax, end, first,
            last, scale, qk_scale, softcap, stage != 1, LOWER, UPPER, HAS_LENGTHS, ROW_BOUNDS or CHUNKED, SOFTCAP,
            ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_P)

    tl.store(DQ + b * sqgb + h * sqgh + offs_m[:, None] * sqgm + offs_d[None, :] * sqgd,
             (dq_c + dq_p).to(DQ.dtype.element_ty), mask=tile_mask)
    part = ((b * n_tiles + pid_m) * H + h) * BLOCK_D + offs_d
    tl.store(DCB_PART + part, tl.sum(dq_c, 0))
    tl.store(DPB_PART + part, tl.sum(dq_p, 0))


@triton.jit
def _dkdv_tiles(dk, dv, keys_t, vals_t, content_bias, position_bias, q_base, do_base, r_base, dr_base, start,
                stop, n0, offs_n, offs_d, dmask, sqm, sqd, sdm, sdd, srp, srd, sdrp, Lq, Lk, Lr, mlen, dmin, dmax,
                start_key, end_key, qlen, chunk_size, chunk_left, chunk_right, stat_base, M, L, DELTA, scale,
                qk_scale, softcap, MASKED: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr,
                HAS_LENGTHS: tl.constexpr, ROW_BOUNDS: tl.constexpr, CHUNKED: tl.constexpr, SOFTCAP: tl.constexpr,
                ZERO_EMPTY: tl.constexpr, ACC: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """dk, dv and the r band's gradient over the query tiles [start, stop) of one key tile; MASKED:
    the edge tiles (visibility, rows past Lq), else tiles whose rows all see every key."""
    dtype = keys_t.dtype
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mmask = offs_m < Lq
        qmask = dmask[None, :]          # full tiles: every row below Lq
        if MASKED:
            qmask = qmask & mmask[:, None]
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qmask, other=0.0).to(ACC)
        q_content = q + content_bias[None, :]
        q_pos = q + position_bias[None, :]
        if MASKED:
            q_content = tl.where(mmask[:, None], q_content, 0.0)
            q_pos = tl.where(mmask[:, None], q_pos, 0.0)
        q_content = q_content.to(dtype)
        q_pos = q_pos.to(dtype)
        do = tl.load(do_base + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=qmask, other=0.0).to(dtype)
        m_i, inv_l, delta = _row_stats(M, L, DELTA, stat_base + offs_m, mmask, ZERO_EMPTY)
        rows = n0 - m0 + Lq - BLOCK_M + tl.arange(0, BLOCK_P)
        rmask = (rows >= 0) & (rows < Lr)
        band_t = tl.load(r_base + rows[None, :] * srp + offs_d[:, None] * srd,
                         mask=rmask[None, :] & dmask[:, None], other=0.0)           # (BD, BP)
        s = _scores(q_content, q_pos, keys_t, band_t, qk_scale, softcap, BLOCK_M, BLOCK_N, ACC, PREC, BLOCK_M,
                    SOFTCAP)
        if SOFTCAP:
            slope = 1.0 - (s / softcap) * (s / softcap)      # d capped / d score, before the masks
        if MASKED:
            first, last = offs_m, offs_m                # unused without per-row ranges
            if ROW_BOUNDS or CHUNKED:
                first, last = _row_keys(offs_m, qlen, mlen, dmin, dmax, start_key, end_key, chunk_size, chunk_left,
                                        chunk_right, LOWER, UPPER, CHUNKED)
            visible = _visible(offs_m, offs_n, first, last, mlen, dmin, dmax, end_key, LOWER, UPPER, HAS_LENGTHS,
                               ROW_BOUNDS or CHUNKED, BLOCK_M, BLOCK_N)
            s = tl.where(visible, s, FILL)
            s = tl.where((offs_n < Lk)[None, :], s, float("-inf"))
        p = tl.exp2(s - m_i[:, None]) * inv_l[:, None]
        if MASKED:
            p = tl.where(mmask[:, None], p, 0.0)
        dv += tl.dot(tl.trans(p.to(dtype)), do, input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, vals_t, input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * slope
        if MASKED:
            ds = tl.where(visible & mmask[:, None], ds, 0.0)
        ds = ds * scale
        dk += tl.dot(tl.trans(ds.to(dtype)), q_content, input_precision=PREC, out_dtype=ACC)
        ds_band = _unskew(ds, BLOCK_M, BLOCK_N, BLOCK_P)                         # (BM, BP)
        dr_band = tl.dot(tl.trans(ds_band.to(dtype)), q_pos, input_precision=PREC, out_dtype=ACC)  # (BP, BD)
        tl.atomic_add(dr_base + rows[:, None] * sdrp + offs_d[None, :], dr_band,
                      mask=rmask[:, None] & dmask[None, :], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["Lk", "Lr", "mlen", "dmin", "dmax", "chunk_size", "chunk_left", "chunk_right"])
def _bwd_dkdv_kernel(
    Q, K, V, R, CONTENT_BIAS, POSITION_BIAS, ROWS, DO, M, L, DELTA, DK, DV, DR,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
    srp, srh, srd, scbh, scbd, spbh, spbd, sdb, sdm, sdh, sdd,
    skgb, skgn, skgh, skgd, svgb, svgn, svgh, svgd, sdrp, sdrh,
    H, Lq, Lk, Lr, mlen, dmin, dmax, chunk_size, chunk_left, chunk_right, scale, qk_scale, softcap,
    HEAD_DIM: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ROW_BOUNDS: tl.constexpr, CHUNKED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ZERO_EMPTY: tl.constexpr, FULL_TILES: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv for one key tile (grid (cdiv(Lk, BN), B*H)), and dr by atomic adds into DR (Lr, H, BD)."""
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    n0 = tl.multiple_of(pid_n * BLOCK_N, BLOCK_N)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    nmask = offs_n < Lk
    keys_t = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=nmask[None, :] & dmask[:, None], other=0.0)            # (BD, BN)
    vals_t = tl.load(V + b * svb + h * svh + offs_n[None, :] * svn + offs_d[:, None] * svd,
                     mask=nmask[None, :] & dmask[:, None], other=0.0)            # (BD, BN)
    content_bias = tl.load(CONTENT_BIAS + h * scbh + offs_d * scbd, mask=dmask, other=0.0).to(ACC)
    position_bias = tl.load(POSITION_BIAS + h * spbh + offs_d * spbd, mask=dmask, other=0.0).to(ACC)

    key_start, key_end, qlen = _row_bounds(ROWS, b, Lq, Lk, HAS_LENGTHS, ROW_BOUNDS)
    if not (ROW_BOUNDS or CHUNKED):
        # keys [0, key_end): query rows that see a key j of this tile, j < key_end:
        # n0 - mlen + dmin <= i <= j - mlen + dmax, and i < end (rows past it see nothing); HF's
        # uniform rows see every key: all rows if any
        end = _rows_with_keys(Lq, mlen, dmin, dmax, key_end)
        q_lo = tl.maximum(0, n0 - mlen + dmin)
        n_end = tl.minimum(n0 + BLOCK_N, key_end)
        q_hi = tl.where(n_end > n0, tl.minimum(end, n_end - mlen + dmax), q_lo)
        if not ZERO_EMPTY:
            q_lo = tl.where(end < Lq, 0, q_lo)
            q_hi = tl.where(end < Lq, Lq, q_hi)
        # the query tiles whose rows (all below Lq) see every key of this tile (all below key_end):
        # i >= n0 + BN - 1 - mlen + dmin (LOWER), i <= n0 - mlen + dmax (UPPER)
        since_n1 = q_lo
        upto_n0 = tl.where(n0 + BLOCK_N <= tl.minimum(key_end, Lk), tl.minimum(q_hi, Lq), q_lo)
        if LOWER:
            since_n1 = tl.maximum(since_n1, n0 + BLOCK_N - 1 - mlen + dmin)
        if UPPER:
            upto_n0 = tl.minimum(upto_n0, n0 - mlen + dmax + 1)
    else:
        # query rows that see a key of this tile: last > n0 and first <= n0 + BN - 1 (``_rows_seeing``);
        # those that see it whole (the full tiles): rows [since_n1, upto_n0)
        q_lo, upto_n0 = _rows_seeing(n0, Lq, qlen, mlen, dmin, dmax, key_start, key_end, chunk_size, chunk_left,
                                     chunk_right, LOWER, UPPER, CHUNKED)
        since_n1, q_hi = _rows_seeing(n0 + BLOCK_N - 1, Lq, qlen, mlen, dmin, dmax, key_start, key_end, chunk_size,
                                      chunk_left, chunk_right, LOWER, UPPER, CHUNKED)
        q_lo = tl.maximum(q_lo, 0)
        q_hi = tl.minimum(q_hi, Lq)
        # HF's uniform rows see every key. The empty rows of a batch row are a prefix, rows [0, e0) with
        # last <= key_start, and a suffix, rows [e1, Lq) with first >= key_end or padded (each row's own
        # position lies inside its band or chunk, and both ends of its keys grow with i); every row
        # when no distance is visible (window 0). The range widens to take them (one loop: a second
        # loop over the empty rows alone made ptxas spill on sm_80).
        if not ZERO_EMPTY:
            e0, _ = _rows_seeing(key_start, Lq, qlen, mlen, dmin, dmax, key_start, key_end, chunk_size, chunk_left,
                                 chunk_right, LOWER, UPPER, CHUNKED)
            _, e1 = _rows_seeing(key_end - 1, Lq, qlen, mlen, dmin, dmax, key_start, key_end, chunk_size, chunk_left,
                                 chunk_right, LOWER, UPPER, CHUNKED)
            none = dmin > dmax
            q_lo = tl.where((e0 > 0) | none, 0, tl.where(e1 < Lq, tl.minimum(q_lo, tl.maximum(e1, 0)), q_lo))
            q_hi = tl.where((e1 < Lq) | none, Lq, tl.where(e0 > 0, tl.maximum(q_hi, tl.minimum(e0, Lq)), q_hi))
        q_hi = tl.maximum(q_hi, q_lo)
    full_lo, full_hi = q_hi, q_hi
    if FULL_TILES:
        full_lo, full_hi = full_tiles(q_lo, q_hi, since_n1, upto_n0, BLOCK_M)

    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    r_base = R + h * srh
    dr_base = DR + h * sdrh
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for stage in tl.static_range(3 if FULL_TILES else 1):     # leading edge, full, trailing edge tiles
        start = q_lo if stage == 0 else (full_lo if stage == 1 else full_hi)
        stop = full_lo if stage == 0 else (full_hi if stage == 1 else q_hi)
        dk, dv = _dkdv_tiles(
            dk, dv, keys_t, vals_t, content_bias, position_bias, q_base, do_base, r_base, dr_base, start, stop,
            n0, offs_n, offs_d, dmask, sqm, sqd, sdm, sdd, srp, srd, sdrp, Lq, Lk, Lr, mlen, dmin, dmax, key_start,
            key_end, qlen, chunk_size, chunk_left, chunk_right, pid_bh * Lq, M, L, DELTA, scale, qk_scale, softcap,
            stage != 1, LOWER, UPPER, HAS_LENGTHS, ROW_BOUNDS, CHUNKED, SOFTCAP, ZERO_EMPTY, ACC, PREC, BLOCK_M,
            BLOCK_N, BLOCK_P)

    out_mask = nmask[:, None] & dmask[None, :]
    tl.store(DK + b * skgb + h * skgh + offs_n[:, None] * skgn + offs_d[None, :] * skgd,
             dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b * svgb + h * svgh + offs_n[:, None] * svgn + offs_d[None, :] * svgd,
             dv.to(DV.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------

def block_p(block_m: int, block_n: int) -> int:
    return triton.next_power_of_2(block_m + block_n - 1)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel; keep() drops invalid ones.
# Measured in the AOT report (ptxas, sm_80/sm_90): 64 x 64 tiles spill 0.4-90 KB in every kernel
# (the (BM, BP) position band and the gather's shuffles), 32 x 64 still spills KBs in dq/dkdv,
# 32 x 32 spills at most ~2 KB; and each candidate multiplies the AOT compile. So one
# candidate per kernel is kept until a GPU can time the others (listed in UNTESTED_CANDIDATES).
FWD_CANDIDATES = [(32, 32, 4, 2)]
DQ_CANDIDATES = [(32, 32, 4, 2)]
DKDV_CANDIDATES = [(32, 32, 4, 2)]
DECODE_CANDIDATES = [(DECODE_BLOCK_M, 32, 4, 2)]   # fixed, not autotuned: BN is the split granularity
UNTESTED_CANDIDATES = [(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)]
INTERPRET_BLOCK = 16          # every tile 16 x 16 under the interpreter: small tests still take many tiles


def keep(kernel: str, block_m: int, block_n: int, num_warps: int, num_stages: int, bd: int) -> bool:
    """Whether a candidate configuration is valid for head block ``bd``: tl.dot needs every
    dimension >= 16, the decode tile is DECODE_BLOCK_M rows, and the fp32 tiles live across the key
    loop (the (BM, BP) band plus the (BM or BN, BD) accumulators) must stay under 16K elements
    (64 KB of registers per program). Shared memory is checked by the AOT report."""
    if min(block_m, block_n, bd) < 16:
        return False
    if kernel == "decode" and block_m != DECODE_BLOCK_M:
        return False
    accumulators = {"fwd": block_m, "decode": block_m, "dq": 2 * block_m, "dkdv": 2 * block_n}[kernel]
    return block_m * block_p(block_m, block_n) + accumulators * bd <= 16384


# fp32 backward at BLOCK_D 128: tf32x3 triples the dot operands; 32 x 32 needed 180-213 KB of shared
# memory (over sm_80's 163 KB), so these take 16 x 32 tiles and one stage
FP32_WIDE_BWD = [(16, 32, 4, 1)]


def configs(kernel: str, bd: int, dtype: str = "fp16") -> list[tuple[int, int, int, int]]:
    table = {"fwd": FWD_CANDIDATES, "dq": DQ_CANDIDATES, "dkdv": DKDV_CANDIDATES, "decode": DECODE_CANDIDATES}
    cands = table[kernel]
    if dtype == "fp32" and bd >= 128 and kernel in ("dq", "dkdv"):
        cands = FP32_WIDE_BWD
    return [c for c in cands if keep(kernel, *c, bd)]


def _autotuned(kernel_fn, name: str, bd: int, dtype: str, reset=None):
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_P": block_p(bm, bn)}, num_warps=nw, num_stages=ns)
            for bm, bn, nw, ns in configs(name, bd, dtype)]
    # tuned once per (heads, query length, head size, window flag, dtypes): Lk only changes while
    # the memory fills, and the best tile depends mostly on Lq and D
    return triton.autotune(cfgs, key=["H", "Lq", "HEAD_DIM", "LOWER", "UPPER", "HAS_LENGTHS", "ROW_BOUNDS", "CHUNKED",
                                      "SOFTCAP", "ZERO_EMPTY"],
                           reset_to_zero=reset)(kernel_fn)


_TUNED: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------

def _precision() -> str:
    """tl.dot precision for fp32 inputs (ignored for fp16/bf16): exact "ieee" under the interpreter;
    "tf32x3" on a GPU (three TF32 tensor-core products, ~fp32 accuracy): "ieee" lowers fp32 dots
    to FMA loops that spilled >100 KB and overflowed sm_80 shared memory in the AOT report."""
    return "ieee" if _interpreting() else "tf32x3"


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_offsets(**tensors) -> None:
    for name, t in tensors.items():
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if span >= 2**31:
            raise ValueError(f"rel_attention (triton): {name} spans {span} elements; offsets must fit in int32")


def check_supported(q: torch.Tensor) -> None:
    """Raise before any launch if the kernels cannot take these inputs (shapes checked elsewhere)."""
    D = q.shape[-1]
    if not 1 <= D <= 128:
        raise ValueError(f"rel_attention (triton): d_head must be in 1..128, got {D}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"rel_attention (triton): unsupported dtype {q.dtype}")
    if q.dtype == torch.float64 and not _interpreting():
        raise ValueError("rel_attention (triton): float64 is supported under TRITON_INTERPRET=1 only (validation)")
    if q.dtype == torch.bfloat16 and _interpreting():
        raise ValueError("rel_attention (triton): bfloat16 is broken in the Triton interpreter (triton issue 11584)")


def direct(kernel):
    """The default ``launch``: the kernel itself, launched as it is called (eager)."""
    return kernel


def _run(launch, kernel_fn, name, bd, grid, args, reset=None):
    """Autotuned launch on a GPU, fixed small tiles under the interpreter."""
    if _interpreting():
        bm = DECODE_BLOCK_M if name == "decode" else INTERPRET_BLOCK
        meta = {"BLOCK_M": bm, "BLOCK_N": INTERPRET_BLOCK, "BLOCK_P": block_p(bm, INTERPRET_BLOCK)}
        launch(kernel_fn)[grid(meta)](**args, **meta, num_warps=4, num_stages=1)
        return
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[args["Q"].dtype]
    key = (name, bd, dtype)
    if key not in _TUNED:
        _TUNED[key] = _autotuned(kernel_fn, name, bd, dtype, reset)
    launch(_TUNED[key])[grid](**args)


def split_plan(B: int, H: int, Lq: int, Lk: int, bd: int, dtype: torch.dtype):
    """None for the tiled path; else the split-over-keys (flash-decoding) launch, (BLOCK_M, BLOCK_N,
    num_warps, num_stages, query tiles, n_splits, keys_per_split): always for Lq <= DECODE_MAX_LQ
    (decode), and for longer queries when the tiled grid, cdiv(Lq, BM) * B * H programs, would
    underfill the GPU (fewer than UNDERFILL_PROGRAMS: wt103 eval at batch 1 is 4 * 16 = 64
    programs). Splits: ~TARGET_PROGRAMS programs, at most MAX_SPLITS per query tile."""
    dt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    interp = _interpreting()
    if Lq <= DECODE_MAX_LQ:
        bm, bn, nw, ns = configs("decode", bd, dt)[0]
    else:
        bm, bn, nw, ns = configs("fwd", bd, dt)[0]
        if triton.cdiv(Lq, bm) * B * H >= (INTERPRET_UNDERFILL_PROGRAMS if interp else UNDERFILL_PROGRAMS):
            return None
    if interp:
        bm, bn, nw, ns = (DECODE_BLOCK_M if Lq <= DECODE_MAX_LQ else INTERPRET_BLOCK), INTERPRET_BLOCK, 4, 1
    q_tiles = triton.cdiv(Lq, bm)
    n_key_tiles = triton.cdiv(Lk, bn)
    want = max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, q_tiles * B * H), n_key_tiles))
    keys_per_split = triton.cdiv(n_key_tiles, want) * bn
    return bm, bn, nw, ns, q_tiles, triton.cdiv(Lk, keys_per_split), keys_per_split


def visibility(Lq: int, Lk: int, window, causal: bool = True, context=None) -> dict:
    """The kernels' visibility arguments: key j is visible to query i when d = i + mlen - j lies in
    [dmin, dmax] (dmin <= 0 always: the kernels rely on it), LOWER / UPPER saying which bound a
    score must be checked against (constexpr: the causal mode without a window checks d >= 0 only,
    the bidirectional mode without context nothing). Causal: [0, window - 1]; bidirectional:
    [-right, left] for context (left, right), every distance -(Lq - 1) … Lk - 1 without."""
    if causal:
        upper = Lk - 1 if window is None else min(window, Lk) - 1
        return dict(dmin=0, dmax=upper, LOWER=True, UPPER=window is not None)
    if context is None:
        return dict(dmin=-(Lq - 1), dmax=Lk - 1, LOWER=False, UPPER=False)
    left, right = context
    return dict(dmin=-min(right, Lq - 1), dmax=min(left, Lk - 1), LOWER=True, UPPER=True)


def _mode_args(q, k, r, window, causal, context, key_lengths, empty_rows, dummy, key_starts=None,
               query_lengths=None, chunk_context=None, softcap=None) -> dict:
    """The kernel arguments of the attention mode, shared by every kernel but delta. Each feature is
    a constexpr, so that a launch without it compiles as before it existed. Per batch row, with
    key_starts or query_lengths (ROW_BOUNDS): ROWS (B, 3) int32, keys [key_starts, key_lengths) and
    query_lengths (each None: 0, Lk, Lq), built here; else ROWS is key_lengths (HAS_LENGTHS) or
    ``dummy``, a pointer never read. chunk_context (C, L, R) (bidirectional) sets CHUNKED; softcap
    (> 0) sets SOFTCAP, passed in the log2 domain."""
    Lq, Lk = q.shape[1], k.shape[1]
    Lr = Lk if causal else Lk + Lq - 1
    if r.shape[0] != Lr:
        raise ValueError(f"rel_attention (triton): r must have {Lr} rows (one per distance), got {r.shape[0]}")
    if empty_rows not in ("uniform", "zero"):
        raise ValueError(f"rel_attention (triton): empty_rows must be 'uniform' or 'zero', got {empty_rows!r}")
    per_row = {"key_starts": (key_starts, 0), "key_lengths": (key_lengths, Lk), "query_lengths": (query_lengths, Lq)}
    for name, (t, _) in per_row.items():
        if t is not None and (t.dtype != torch.int32 or t.shape != (q.shape[0],) or t.device != q.device):
            raise ValueError(f"rel_attention (triton): {name} must be an int32 tensor (B,) on q's device")
    if chunk_context is not None and causal:
        raise ValueError("rel_attention (triton): chunk_context needs causal=False")
    row_bounds = key_starts is not None or query_lengths is not None
    rows = dummy if key_lengths is None else key_lengths
    if row_bounds:
        rows = torch.stack([torch.full((q.shape[0],), fill, dtype=torch.int32, device=q.device) if t is None else t
                            for t, fill in per_row.values()], dim=1)                  # (B, 3)
    chunk_size, chunk_left, chunk_right = chunk_context or (1, -1, 0)
    return dict(ROWS=rows, Lr=Lr, mlen=Lk - Lq, **visibility(Lq, Lk, window, causal, context),
                HAS_LENGTHS=key_lengths is not None, ROW_BOUNDS=row_bounds,
                CHUNKED=chunk_context is not None, chunk_size=chunk_size, chunk_left=chunk_left,
                chunk_right=chunk_right, softcap=(softcap or 1.0) * LOG2E, SOFTCAP=softcap is not None,
                ZERO_EMPTY=empty_rows == "zero")


def forward(q, k, v, r, content_bias, position_bias, scale: float, window, launch=direct, *, causal: bool = True, context=None,
            key_lengths=None, empty_rows: str = "uniform", key_starts=None, query_lengths=None, chunk_context=None,
            softcap=None):
    """Returns out (B, Lq, H, D) in q's dtype and the row statistics m, l (B, H, Lq) in the
    accumulation dtype, all three allocated here.

    Mode: causal with ``window`` (None or an int), or bidirectional (``causal=False``, r with
    Lk + Lq - 1 rows) with ``context`` (None or (left, right)); ``key_lengths`` int32 (B,) or None
    (key j of batch row b visible only if j < key_lengths[b]), ``key_starts`` int32 (B,) or None
    (only if j >= key_starts[b]), ``query_lengths`` int32 (B,) or None (queries i >= query_lengths[b]
    see no key), ``chunk_context`` (C, L, R) or None (bidirectional: ``txl_fast.ops.rel_attention``),
    ``softcap`` (a score s is capped to softcap · tanh(s / softcap) before the masks) or None;
    ``empty_rows`` "uniform" (HF: a row that sees no key is uniform over the Lk keys) or "zero"
    (zeros, l = 0).

    ``launch(kernel)`` gives what is launched: ``direct`` (the kernel itself) from the autograd
    Function, ``torch.library.wrap_triton`` from the ``triton_op`` (``txl_fast.ops.library``), so
    that tracing records each launch. Inputs are only read."""
    check_supported(q)
    _check_offsets(q=q, k=k, v=v, r=r)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    bd = block_d(D)
    acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    m = torch.empty((B, H, Lq), dtype=acc_t, device=q.device)
    l = torch.empty((B, H, Lq), dtype=acc_t, device=q.device)
    mode = _mode_args(q, k, r, window, causal, context, key_lengths, empty_rows, dummy=m, key_starts=key_starts,
                      query_lengths=query_lengths, chunk_context=chunk_context, softcap=softcap)
    common = dict(
        Q=q, K=k, V=v, R=r, CONTENT_BIAS=content_bias, POSITION_BIAS=position_bias, O=out, M=m, L=l, **mode,
        **dict(zip(("sqb", "sqm", "sqh", "sqd"), q.stride())),
        **dict(zip(("skb", "skn", "skh", "skd"), k.stride())),
        **dict(zip(("svb", "svn", "svh", "svd"), v.stride())),
        **dict(zip(("srp", "srh", "srd"), r.stride())),
        scbh=content_bias.stride(0), scbd=content_bias.stride(1),
        spbh=position_bias.stride(0), spbd=position_bias.stride(1),
        **dict(zip(("sob", "som", "soh", "sod"), out.stride())),
        H=H, Lq=Lq, Lk=Lk, qk_scale=scale * LOG2E, HEAD_DIM=D, ACC=_acc_dtype(q.dtype), PREC=_precision(), BLOCK_D=bd,
        FULL_TILES=FULL_TILES,
    )
    plan = split_plan(B, H, Lq, Lk, bd, q.dtype)
    if plan is not None:
        bm, bn, nw, ns, q_tiles, n_splits, keys_per_split = plan
        mp = torch.empty((B * H, q_tiles, n_splits, bm), dtype=acc_t, device=q.device)
        lp = torch.empty_like(mp)
        ap = torch.empty((B * H, q_tiles, n_splits, bm, bd), dtype=acc_t, device=q.device)
        args = dict(common, MP=mp, LP=lp, AP=ap, keys_per_split=keys_per_split, n_splits=n_splits, SPLIT_K=True)
        # the split tile is fixed (BN = the split granularity), so it is not autotuned; the r band
        # serves the real queries only (SPLIT_ROWS)
        split_rows = min(bm, triton.next_power_of_2(Lq))
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_P": block_p(split_rows, bn), "SPLIT_ROWS": split_rows}
        launch(_fwd_kernel)[(n_splits, B * H, q_tiles)](**args, **meta, num_warps=nw, num_stages=ns)
        launch(_fwd_combine_kernel)[(B * H, q_tiles)](
            O=out, M=m, L=l, MP=mp, LP=lp, AP=ap, **dict(zip(("sob", "som", "soh", "sod"), out.stride())),
            H=H, Lq=Lq, n_splits=n_splits, HEAD_DIM=D, ACC=_acc_dtype(q.dtype), BLOCK_M=bm, BLOCK_D=bd,
            num_warps=4)
    else:
        dummy = m  # partial buffers are unused on the tiled path (SPLIT_K=False compiles their stores away)
        args = dict(common, MP=dummy, LP=dummy, AP=dummy, keys_per_split=0, n_splits=0, SPLIT_K=False, SPLIT_ROWS=0)
        _run(launch, _fwd_kernel, "fwd", bd, lambda META: (triton.cdiv(Lq, META["BLOCK_M"]), B * H), args)
    return out, m, l


def backward(do, q, k, v, r, content_bias, position_bias, out, m, l, scale: float, window, launch=direct, *, causal: bool = True,
             context=None, key_lengths=None, empty_rows: str = "uniform", key_starts=None, query_lengths=None,
             chunk_context=None, softcap=None):
    """Gradients (dq, dk, dv, dr, d content_bias, d position_bias), contiguous, in the inputs' dtypes, from the forward's
    out, m and l; ``launch`` and the mode as for ``forward``. Every buffer a kernel writes is
    allocated here."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    bd = block_d(D)
    acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
    acc = _acc_dtype(q.dtype)
    mode = _mode_args(q, k, r, window, causal, context, key_lengths, empty_rows, dummy=m, key_starts=key_starts,
                      query_lengths=query_lengths, chunk_context=chunk_context, softcap=softcap)
    _check_offsets(do=do)
    delta = torch.empty((B, H, Lq), dtype=acc_t, device=q.device)
    dq = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Lk, H, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Lk, H, D), dtype=v.dtype, device=q.device)
    dr_acc = torch.zeros((mode["Lr"], H, bd), dtype=acc_t, device=q.device)     # atomics target
    min_bm = 16
    n_tiles = triton.cdiv(Lq, min_bm)                                       # enough for any BLOCK_M
    dcb_part = torch.zeros((B, n_tiles, H, bd), dtype=acc_t, device=q.device)      # per-tile bias sums
    dpb_part = torch.zeros_like(dcb_part)

    dm = 32
    launch(_bwd_delta_kernel)[(triton.cdiv(Lq, dm), B * H)](
        O=out, DO=do, DELTA=delta, **dict(zip(("sob", "som", "soh", "sod"), out.stride())),
        **dict(zip(("sdb", "sdm", "sdh", "sdd"), do.stride())), H=H, Lq=Lq,
        HEAD_DIM=D, ACC=acc, BLOCK_M=dm, BLOCK_D=bd, num_warps=4)

    common = dict(
        Q=q, K=k, V=v, R=r, CONTENT_BIAS=content_bias, POSITION_BIAS=position_bias, DO=do, M=m, L=l, DELTA=delta, **mode,
        **dict(zip(("sqb", "sqm", "sqh", "sqd"), q.stride())),
        **dict(zip(("skb", "skn", "skh", "skd"), k.stride())),
        **dict(zip(("svb", "svn", "svh", "svd"), v.stride())),
        **dict(zip(("srp", "srh", "srd"), r.stride())),
        scbh=content_bias.stride(0), scbd=content_bias.stride(1),
        spbh=position_bias.stride(0), spbd=position_bias.stride(1),
        **dict(zip(("sdb", "sdm", "sdh", "sdd"), do.stride())),
        H=H, Lq=Lq, Lk=Lk, scale=scale, qk_scale=scale * LOG2E, HEAD_DIM=D, ACC=acc, PREC=_precision(), BLOCK_D=bd,
        FULL_TILES=FULL_TILES,
    )
    _run(launch, _bwd_dq_kernel, "dq", bd, lambda META: (triton.cdiv(Lq, META["BLOCK_M"]), B * H), dict(
        common, DQ=dq, DCB_PART=dcb_part, DPB_PART=dpb_part, n_tiles=n_tiles,
        **dict(zip(("sqgb", "sqgm", "sqgh", "sqgd"), dq.stride()))))
    _run(launch, _bwd_dkdv_kernel, "dkdv", bd, lambda META: (triton.cdiv(Lk, META["BLOCK_N"]), B * H), dict(
        common, DK=dk, DV=dv, DR=dr_acc,
        **dict(zip(("skgb", "skgn", "skgh", "skgd"), dk.stride())),
        **dict(zip(("svgb", "svgn", "svgh", "svgd"), dv.stride())),
        sdrp=dr_acc.stride(0), sdrh=dr_acc.stride(1)), reset=["DR"])
    dr = dr_acc[..., :D].to(r.dtype).contiguous()                           # (Lr, H, D)
    d_content_bias = dcb_part.sum((0, 1))[:, :D].to(content_bias.dtype).contiguous()     # (H, D)
    d_position_bias = dpb_part.sum((0, 1))[:, :D].to(position_bias.dtype).contiguous()
    return dq, dk, dv, dr, d_content_bias, d_position_bias
