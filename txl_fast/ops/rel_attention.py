"""Relative-position attention (Transformer-XL), batch-first.

    q: (B, Lq, H, D)   k, v: (B, Lk, H, D)   r: (Lk, H, D)   r_w_bias, r_r_bias: (H, D)
    -> out (B, Lq, H, D)

with Lk = mlen + Lq, row p of r the projected position embedding of distance Lk - 1 - p, and
the score of query i and key j

    scale * ( (q_i + r_w_bias) . k_j  +  (q_i + r_r_bias) . r[j + Lq - 1 - i] )

over the visible keys: distance d = i + mlen - j with 0 <= d (causal, memory included) and,
when ``window`` is given, d < window (HF's same_length mask). Invisible scores take the
dtype's most negative finite value, as in HF, so a row with no visible key is uniform.
``txl_fast.naive.rel_attention`` states the same maths literally.

HF's time-major tensors ``(L, B, H, D)`` are passed as ``x.transpose(0, 1)`` views: every path
works through strides and copies nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from txl_fast import backend, naive


def rel_shift(position_raw: torch.Tensor) -> torch.Tensor:
    """The Transformer-XL relative shift as a strided view, no pad-and-copy.

    position_raw: (..., Lq, Lk), entry [i, p] = (q_i + v) . r[p].
    returns the view (..., Lq, Lk) with  shifted[i, j] = position_raw[i, j + Lq - 1 - i].

    Entry [i, j] sits at flat offset (Lq - 1) + i * (Lk - 1) + j of each (Lq, Lk) block, inside the
    block for every (i, j). It is exact where j <= i + Lk - Lq (every causally visible key) and reads
    a neighbouring row's value elsewhere, where the causal mask overwrites it.
    """
    x = position_raw.contiguous()
    *batch, Lq, Lk = x.shape
    return x.as_strided((*batch, Lq, Lk), (*x.stride()[:-2], Lk - 1, 1), x.storage_offset() + Lq - 1)


def visibility_mask(Lq: int, Lk: int, window: Optional[int], device, cols: slice = slice(None)) -> torch.Tensor:
    """(Lq, Lk) bool, True where query i may attend key j (distance i + Lk - Lq - j in [0, window));
    only the key columns ``cols`` when given."""
    distance = torch.arange(Lq, device=device)[:, None] + (Lk - Lq) - torch.arange(Lk, device=device)[cols][None, :]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    return visible


def check_inputs(q, k, v, r, r_w_bias, r_r_bias, window) -> None:
    """Raise a ValueError naming the problem; nothing has run yet when this raises."""
    tensors = {"q": q, "k": k, "v": v, "r": r, "r_w_bias": r_w_bias, "r_r_bias": r_r_bias}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"rel_attention: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"rel_attention: {name} must be floating point, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"rel_attention: {name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"rel_attention: {name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4:
        raise ValueError(f"rel_attention: q must be (B, Lq, H, D), got shape {tuple(q.shape)}")
    B, Lq, H, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"rel_attention: k must be (B={B}, Lk, H={H}, D={D}), got {tuple(k.shape)}")
    Lk = k.shape[1]
    if v.shape != k.shape:
        raise ValueError(f"rel_attention: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if Lq < 1 or Lk < Lq:
        raise ValueError(f"rel_attention: need 1 <= Lq <= Lk (Lk = memory + Lq), got Lq={Lq}, Lk={Lk}")
    if r.shape != (Lk, H, D):
        raise ValueError(f"rel_attention: r must be (Lk={Lk}, H={H}, D={D}), got {tuple(r.shape)}")
    for name in ("r_w_bias", "r_r_bias"):
        if tensors[name].shape != (H, D):
            raise ValueError(f"rel_attention: {name} must be (H={H}, D={D}), got {tuple(tensors[name].shape)}")
    if window is not None and (not isinstance(window, int) or window < 0):
        raise ValueError(f"rel_attention: window must be None or an int >= 0, got {window!r}")


def _torch_scores(q, k, r, r_w_bias, r_r_bias, scale, window):
    """Masked scores (B, H, Lq, Lk), the efficient PyTorch way.

    The scale is folded into the two query terms (scale·(a + b) = scale·a + scale·b). The content
    matmul writes the scores, the rel-shifted position term (a strided view of its matmul's
    output) is added in place, and only the key columns that some query may not see are masked:
    the causal triangle after the memory (j > mlen) and, with a window, the triangle at the start
    (j < Lq + mlen - window). One full-size pass besides the matmul outputs, and no fresh tensor
    besides the two products: 5.6 against 9.6 ms for the earlier where-then-baddbmm (8 heads of a
    wt103 segment; a cached eval segment 1.15-1.23 s against 1.37-1.38 s, alternated in one process).
    Hidden entries hold finfo.min, as in HF, so a row with no visible key (window 0) is uniform.
    """
    B, H, Lq, Lk = q.shape[0], q.shape[2], q.shape[1], k.shape[1]
    qh = q.transpose(1, 2)                                                      # (B, H, Lq, D)
    content_q = ((qh + r_w_bias[:, None]) * scale).reshape(B * H, Lq, -1)       # (B*H, Lq, D)
    score = torch.bmm(content_q, k.permute(0, 2, 3, 1).reshape(B * H, -1, Lk)).view(B, H, Lq, Lk)
    score.add_(rel_shift(((qh + r_r_bias[:, None]) * scale) @ r.permute(1, 2, 0)))   # (B, H, Lq, Lk)
    mlen, lowest = Lk - Lq, torch.finfo(score.dtype).min
    for cols in (slice(mlen + 1, Lk), slice(0, 0 if window is None else min(Lk, Lq + mlen - window))):
        if cols.start < cols.stop:
            score[..., cols].masked_fill_(~visibility_mask(Lq, Lk, window, q.device, cols), lowest)
    return score.fill_(0) if window == 0 else score           # window 0: zero gradients, as HF's


def _torch_rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window, dropout_p=0.0):
    prob = torch.softmax(_torch_scores(q, k, r, r_w_bias, r_r_bias, scale, window), dim=-1)
    if dropout_p > 0:
        prob = torch.nn.functional.dropout(prob, p=dropout_p, training=True)
    out = (prob @ v.transpose(1, 2)).transpose(1, 2)                            # (B, Lq, H, D)
    return out, prob


# Score elements per chunk of the output-only torch path: 2**21 fp32 (8 MiB) with its temporaries
# stays near this machine's 32 MiB L3 and under glibc's 32 MiB mmap threshold (larger blocks are
# fresh pages, faulted in on every call), and (1, h, ...) slices merge into bmm batches without
# copies of k, v and r. Measured at the wt103 shape by scripts/bench_torch_attention.py (numbers in
# benchmarks/RESULTS.md): about 2.5x faster at batch 4 for eval steps, 6x for decode steps.
SCORE_CHUNK = 2**21


def _torch_rel_attention_out(q, k, v, r, r_w_bias, r_r_bias, scale, window):
    """The torch path's output (B, Lq, H, D), one (batch row, group of heads) at a time: the same
    arithmetic as ``_torch_rel_attention`` on slices small enough to stay in cache. Keys that no
    query sees (distance >= window even from query 0, the closest) are dropped first: they would only add
    zero probabilities, and a decode step with HF's same_length window is then left with no mask."""
    if window:
        first = max(0, k.shape[1] - q.shape[1] - window + 1)         # keys [0, first) are hidden from every query
        k, v, r = k[:, first:], v[:, first:], r[first:]
    B, Lq, H, D = q.shape
    chunks = -(-H * Lq * k.shape[1] // SCORE_CHUNK)                    # per batch row
    heads = -(-H // chunks)
    if B == 1 and heads >= H:
        return _torch_rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window)[0]
    out = q.new_empty(q.shape)
    for b in range(B):
        for h in range(0, H, heads):
            rows, cols = slice(b, b + 1), slice(h, h + heads)
            out[rows, :, cols] = _torch_rel_attention(
                q[rows, :, cols], k[rows, :, cols], v[rows, :, cols], r[:, cols], r_w_bias[cols], r_r_bias[cols],
                scale, window)[0]
    return out


class RelAttentionFunction(torch.autograd.Function):
    """The fused Triton kernels (``txl_fast.kernels.rel_attention``) under autograd.

    Forward saves the inputs (as given: strided views are not copied), the output and the row
    statistics m, l (B, H, Lq). Backward returns gradients for q, k, v, r, r_w_bias, r_r_bias,
    none for scale and window. The same launchers back the ``triton_op``
    ``txl_fast::rel_attention_triton`` (``txl_fast.ops.library``), launching through
    ``torch.library.wrap_triton`` there. Call it after ``check_inputs``; triton is imported lazily here.
    """

    @staticmethod
    def forward(ctx, q, k, v, r, r_w_bias, r_r_bias, scale, window):
        from txl_fast.kernels import rel_attention as kernels  # noqa: PLC0415 (needs triton)

        out, m, l = kernels.forward(q, k, v, r, r_w_bias, r_r_bias, scale, window)
        ctx.save_for_backward(q, k, v, r, r_w_bias, r_r_bias, out, m, l)
        ctx.scale, ctx.window = scale, window
        return out

    @staticmethod
    def backward(ctx, dout):
        from txl_fast.kernels import rel_attention as kernels  # noqa: PLC0415

        grads = kernels.backward(dout, *ctx.saved_tensors, ctx.scale, ctx.window)
        return (*grads, None, None)


def rel_attention(q, k, v, r, r_w_bias, r_r_bias, *, scale: float, window: Optional[int] = None) -> torch.Tensor:
    """Fused relative attention on the current backend; shapes in the module docstring."""
    check_inputs(q, k, v, r, r_w_bias, r_r_bias, window)
    name = backend.resolve(q)
    if name == "naive":
        return naive.rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window)[0]
    if name == "triton":
        return RelAttentionFunction.apply(q, k, v, r, r_w_bias, r_r_bias, scale, window)
    return _torch_rel_attention_out(q, k, v, r, r_w_bias, r_r_bias, scale, window)


def rel_attention_with_probs(
    q, k, v, r, r_w_bias, r_r_bias, *, scale: float, window: Optional[int] = None, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``rel_attention`` but also returns the probabilities (B, H, Lq, Lk), after dropout.

    Used for ``output_attentions=True`` and attention dropout in training; the fused kernel never
    materialises the probabilities, so this runs the naive or torch path.
    """
    check_inputs(q, k, v, r, r_w_bias, r_r_bias, window)
    if backend.get_backend() == "naive":
        out, prob = naive.rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window)
        if dropout_p > 0:
            prob = torch.nn.functional.dropout(prob, p=dropout_p, training=True)
            out = torch.einsum("bhij,bjhd->bihd", prob, v)
        return out, prob
    return _torch_rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window, dropout_p)
