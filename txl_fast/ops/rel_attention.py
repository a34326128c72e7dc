"""Relative-position attention (Transformer-XL), batch-first.

    q: (B, Lq, H, D)   k, v: (B, Lk, H, D)   r: (Lr, H, D), 1 <= Lr <= Lk   r_w_bias, r_r_bias: (H, D)
    -> out (B, Lq, H, D)

with Lk = mlen + Lq, row p of r the projected position embedding of distance Lr - 1 - p, every
distance >= Lr - 1 taking row 0 (Transformer-XL's clamp_len: Lr = clamp_len + 1 passes only the
distinct rows; Lr = Lk is HF's unclamped layout), and the score of query i and key j

    scale * ( (q_i + r_w_bias) . k_j  +  (q_i + r_r_bias) . r[Lr - 1 - min(d, Lr - 1)] )

over the visible keys: distance d = i + mlen - j with 0 <= d (causal, memory included) and,
when ``window`` is given, d < window (HF's same_length mask). Invisible scores take the
dtype's most negative finite value, as in HF, so a row with no visible key is uniform.
``txl_fast.naive.rel_attention`` states the same maths literally.

**Bidirectional mode** (``causal=False``; the Conformer encoders of speech recognisers): r holds
the Lr = Lk + Lq - 1 rows of every distance Lk - 1 … -(Lq - 1) (row p: distance Lk - 1 - p), and
a key is visible when ``context=(left, right)`` is None or -right <= d <= left. In either mode
``key_lengths`` (B,) (keys j >= key_lengths[b] are padding) or ``key_mask`` (B, Lk) bool (True:
visible) hide keys per batch row (causal, ``key_mask`` may also be (B, Lq, Lk), per query: documents
packed back to back in a row, each query seeing only its own), and ``empty_rows="zero"`` gives a row with no visible key zero
probabilities (what SpeechBrain, ESPnet and NeMo give) instead of HF's uniform row.
``chunk_context=(C, L, R)`` (bidirectional, instead of ``context``): query i at position
p = i + (Lk - Lq), in chunk c = p // C, sees the keys (c - L)·C <= j < (c + 1)·C + R (L = -1: every
earlier chunk; NeMo's chunked_limited context is (right + 1, left // (right + 1), 0)).
``query_lengths`` (B,): queries i >= query_lengths[b] are padding, rows with no visible key.
``softcap``: every score s becomes softcap · tanh(s / softcap) before the masking (Gemma's audio
encoders).

``uniform_keys=n`` promises that keys 0 .. n-1 of every batch row are one key, and their values
one value (HF's zero-filled initial memory, as the inference cache stores it). The torch path,
when no gradient is wanted, then takes them in closed form from row n-1 (a row no window hides
while any of them is visible): one key whose position score is the log-sum-exp of their n
position scores. Every other path (autograd, naive, triton) computes over all keys and gives the
same result when the promise holds; a broken promise changes only the closed form's result.

HF's time-major tensors ``(L, B, H, D)`` are passed as ``x.transpose(0, 1)`` views: every path
works through strides and copies nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from txl_fast import backend, naive
from txl_fast.ops import compiled_decode, library


def rel_shift(position_raw: torch.Tensor, klen: int) -> torch.Tensor:
    """The Transformer-XL relative shift as a strided view, no pad-and-copy.

    position_raw: (..., Lq, klen + Lq - 1), column p the score of distance klen - 1 - p (so the
    last Lq - 1 columns are the negative distances, the future keys).
    returns the view (..., Lq, klen) with shifted[i, j] = position_raw[i, j + Lq - 1 - i], the
    score of distance i + (klen - Lq) - j.

    Entry [i, j] sits at flat offset (Lq - 1) + i * (W - 1) + j of each (Lq, W) block, W the raw
    width: inside row i for every (i, j), so every entry is exact, and a mask written into the raw
    columns (a window's far distances, the future) is a mask of the view.
    """
    *batch, Lq, W = position_raw.shape
    if W != klen + Lq - 1:
        raise ValueError(f"rel_shift: raw scores of {W} distances, need klen + Lq - 1 = {klen + Lq - 1}")
    x = position_raw.contiguous()
    return x.as_strided((*batch, Lq, klen), (*x.stride()[:-2], W - 1, 1), x.storage_offset() + Lq - 1)


def chunk_keys(chunk_context, position):
    """Keys [lo, hi) of the queries at ``position`` (an int or a tensor of them) under
    chunk_context (C, L, R), unclipped: lo = (c - L)·C (0 when L = -1), hi = (c + 1)·C + R, c = p // C."""
    size, left, right = chunk_context
    chunk = position // size
    return ((chunk - left) * size if left >= 0 else chunk * 0), (chunk + 1) * size + right


def visibility_mask(Lq: int, Lk: int, window: Optional[int], device, causal: bool = True, context=None,
                    chunk_context=None) -> torch.Tensor:
    """(Lq, Lk) bool, True where query i may attend key j by position alone: causal, the distance
    d = i + Lk - Lq - j in [0, window); bidirectional, -right <= d <= left for context (left, right),
    or j in the keys of i's chunk (``chunk_keys``)."""
    position = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
    distance = position - torch.arange(Lk, device=device)[None, :]
    if not causal:
        if chunk_context is not None:
            lo, hi = chunk_keys(chunk_context, position)                 # (Lq, 1) each
            j = torch.arange(Lk, device=device)
            return (j >= lo) & (j < hi)
        if context is None:
            return torch.ones(Lq, Lk, dtype=torch.bool, device=device)
        return (distance <= context[0]) & (distance >= -context[1])
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    return visible


def check_inputs(q, k, v, r, r_w_bias, r_r_bias, window, uniform_keys: int = 0, *, causal: bool = True,
                 context=None, key_lengths=None, key_mask=None, empty_rows: str = "uniform", chunk_context=None,
                 query_lengths=None, softcap=None) -> None:
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
    if not isinstance(causal, bool):
        raise ValueError(f"rel_attention: causal must be True or False, got {causal!r}")
    if causal and (r.dim() != 3 or not 1 <= r.shape[0] <= Lk or r.shape[1:] != (H, D)):
        raise ValueError(f"rel_attention: r must be (Lr, H={H}, D={D}) with 1 <= Lr <= Lk={Lk}, got {tuple(r.shape)}")
    if not causal and r.shape != (Lk + Lq - 1, H, D):
        raise ValueError(f"rel_attention: with causal=False r must be (Lk + Lq - 1 = {Lk + Lq - 1}, H={H}, D={D}), "
                         f"the distances Lk - 1 … -(Lq - 1), got {tuple(r.shape)}")
    for name in ("r_w_bias", "r_r_bias"):
        if tensors[name].shape != (H, D):
            raise ValueError(f"rel_attention: {name} must be (H={H}, D={D}), got {tuple(tensors[name].shape)}")
    if window is not None and (not causal or not isinstance(window, int) or window < 0):
        raise ValueError(f"rel_attention: window must be None or an int >= 0 (causal mode; causal=False takes "
                         f"context=(left, right)), got {window!r}")
    if context is not None and (causal or not isinstance(context, (tuple, list)) or len(context) != 2
                                or not all(isinstance(c, int) and c >= 0 for c in context)):
        raise ValueError(f"rel_attention: context must be None or (left, right) ints >= 0, with causal=False; "
                         f"got {context!r}")
    if chunk_context is not None:
        if causal or context is not None:
            raise ValueError("rel_attention: chunk_context needs causal=False and no context")
        if (not isinstance(chunk_context, (tuple, list)) or len(chunk_context) != 3
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in chunk_context)
                or chunk_context[0] < 1 or chunk_context[1] < -1 or chunk_context[2] < 0):
            raise ValueError(f"rel_attention: chunk_context must be (C >= 1, L >= -1, R >= 0) ints, "
                             f"got {chunk_context!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
                                or not 0 < softcap < float("inf")):
        raise ValueError(f"rel_attention: softcap must be None or a finite number > 0, got {softcap!r}")
    if query_lengths is not None:
        if (not isinstance(query_lengths, torch.Tensor) or query_lengths.shape != (B,)
                or query_lengths.dtype.is_floating_point or query_lengths.dtype == torch.bool):
            raise ValueError(f"rel_attention: query_lengths must be an integer tensor of shape (B={B},)")
        if query_lengths.device != q.device:
            raise ValueError(f"rel_attention: query_lengths is on {query_lengths.device} but q is on {q.device}")
        if not torch.compiler.is_compiling() and ((query_lengths < 0) | (query_lengths > Lq)).any():
            raise ValueError(f"rel_attention: query_lengths must lie in [0, Lq={Lq}], got {query_lengths.tolist()}")
    if not isinstance(uniform_keys, int) or not 0 <= uniform_keys <= Lk:
        raise ValueError(f"rel_attention: uniform_keys must be an int in [0, Lk={Lk}], got {uniform_keys!r}")
    if uniform_keys and (not causal or key_lengths is not None or key_mask is not None or query_lengths is not None):
        raise ValueError("rel_attention: uniform_keys (the inference cache's promise) needs causal=True, "
                         "no key padding and no query_lengths")
    if empty_rows not in ("uniform", "zero"):
        raise ValueError(f"rel_attention: empty_rows must be 'uniform' (HF) or 'zero', got {empty_rows!r}")
    if key_lengths is not None and key_mask is not None:
        raise ValueError("rel_attention: give key_lengths or key_mask, not both")
    if key_lengths is not None:
        if (not isinstance(key_lengths, torch.Tensor) or key_lengths.shape != (B,)
                or key_lengths.dtype.is_floating_point or key_lengths.dtype == torch.bool):
            raise ValueError(f"rel_attention: key_lengths must be an integer tensor of shape (B={B},)")
        if key_lengths.device != q.device:
            raise ValueError(f"rel_attention: key_lengths is on {key_lengths.device} but q is on {q.device}")
        if not torch.compiler.is_compiling() and ((key_lengths < 0) | (key_lengths > Lk)).any():
            raise ValueError(f"rel_attention: key_lengths must lie in [0, Lk={Lk}], got {key_lengths.tolist()}")
    if key_mask is not None:
        if (not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool
                or key_mask.shape not in ((B, Lk), (B, Lq, Lk))):
            raise ValueError(f"rel_attention: key_mask must be a bool tensor of shape (B={B}, Lk={Lk}) or, per query, "
                             f"(B, Lq={Lq}, Lk), True = visible")
        if key_mask.dim() == 3 and not causal:
            raise ValueError("rel_attention: a per-query key_mask (B, Lq, Lk) needs causal=True")
        if key_mask.device != q.device:
            raise ValueError(f"rel_attention: key_mask is on {key_mask.device} but q is on {q.device}")


def visible_keys(key_lengths, key_mask, Lk: int) -> Optional[torch.Tensor]:
    """The key visibility, (B, Lk) or per query (B, Lq, Lk) bool, from lengths or a mask; None: every key."""
    if key_lengths is not None:
        return torch.arange(Lk, device=key_lengths.device) < key_lengths[:, None]
    return key_mask


def query_keys(keys, chunk_context, query_lengths, B: int, Lq: int, Lk: int, device) -> Optional[torch.Tensor]:
    """The key visibility with the chunks and the padded queries folded in: (B, Lq, Lk) bool, or
    ``keys`` as it is when neither is given (the paths that build every score take it so)."""
    if chunk_context is None and query_lengths is None:
        return keys
    visible = torch.ones(B, Lq, Lk, dtype=torch.bool, device=device)
    if keys is not None:
        visible &= keys[:, None, :] if keys.dim() == 2 else keys
    if chunk_context is not None:
        visible &= visibility_mask(Lq, Lk, None, device, causal=False, chunk_context=chunk_context)
    if query_lengths is not None:
        visible &= (torch.arange(Lq, device=device) < query_lengths[:, None])[:, :, None]
    return visible


def per_score(keys: torch.Tensor) -> torch.Tensor:
    """Key visibility (B, Lk) or (B, Lq, Lk) as a (B, 1, 1 or Lq, Lk) view beside the scores (B, H, Lq, Lk)."""
    return keys[:, None, None, :] if keys.dim() == 2 else keys[:, None]


def empty_row_mask(Lq: int, Lk: int, window, causal: bool, context, keys, device, chunk_context=None,
                   query_lengths=None) -> Optional[torch.Tensor]:
    """(B or 1, Lq) bool, True for the queries that see no key: padded queries (query_lengths), and
    those whose keys are all hidden; None when none can be empty (the key at distance 0, the
    query's own position, is always visible without padding, unless window is 0)."""
    empty = _keyless_rows(Lq, Lk, window, causal, context, keys, device, chunk_context)
    if query_lengths is None:
        return empty
    padded = torch.arange(Lq, device=device) >= query_lengths[:, None]                   # (B, Lq)
    return padded if empty is None else empty | padded


def _keyless_rows(Lq: int, Lk: int, window, causal: bool, context, keys, device, chunk_context):
    """``empty_row_mask`` without the padded queries. Query i sees the keys of one range [first_i,
    end_i) (by distance, or its chunk's keys), so it is empty when the prefix sums of the visible
    keys agree at both ends: O(B (Lq + Lk)), no (Lq, Lk) mask."""
    if causal and window == 0:
        return torch.ones(1, Lq, dtype=torch.bool, device=device)
    if keys is None:
        return None
    if keys.dim() == 3:                                              # per query: (B, Lq, Lk), causal
        queries = torch.arange(Lq, device=device)
        if device.type == "cpu" and bool(keys[:, queries, queries + Lk - Lq].all()):
            return None                                              # each query sees itself (distance 0)
        return ~(keys & visibility_mask(Lq, Lk, window, device, causal, context)).any(-1)
    if causal:
        dmin, dmax = 0, Lk if window is None else window - 1          # visible distances dmin <= d <= dmax
    else:
        dmin, dmax = _span(context, Lq, Lk)
    diagonal = torch.arange(Lq, device=device) + (Lk - Lq)           # each query's key at distance 0
    first = (diagonal - dmax).clamp(0, Lk)                           # its keys: [first, end)
    end = (diagonal - dmin + 1).clamp(0, Lk)
    if chunk_context is not None:
        lo, hi = chunk_keys(chunk_context, diagonal)
        first, end = torch.maximum(first, lo.clamp(0, Lk)), torch.minimum(end, hi.clamp(0, Lk))
    seen = torch.nn.functional.pad(keys.cumsum(-1), (1, 0))           # (B, Lk + 1): visible keys before j
    return seen[:, end] <= seen[:, first]


def full_positions(r: torch.Tensor, Lk: int) -> torch.Tensor:
    """(Lr, H, D) position keys -> the (Lk, H, D) rows of every distance Lk - 1 … 0, the clamped
    ones repeating row 0 (a copy; autograd sums their gradients into row 0)."""
    Lr = r.shape[0]
    return r if Lr == Lk else torch.cat([r[:1].expand(Lk - Lr, -1, -1), r])


def _span(context, Lq: int, Lk: int) -> tuple[int, int]:
    """The visible distances lo <= d <= hi of the bidirectional mode: all of them, or -right … left."""
    return (-(Lq - 1), Lk - 1) if context is None else (-context[1], context[0])


def _position_mask(q, r, r_r_bias, scale, Lk, window, uniform_keys=0, causal=True, span=None):
    """The position term as an additive attention mask (B, H, Lq, Lk): scale · (q_i + r_r_bias) . r_d
    for the (i, j) visible by distance, finfo.min for the hidden ones (HF's fill).

    Built as the raw scores of every distance Lk - 1 … -(Lq - 1) in one (B, H, Lq, Lk + Lq - 1)
    buffer, seen through ``rel_shift``: finfo.min for the distances hidden by the window (causal)
    or outside ``span`` = (lo, hi) (bidirectional: lo <= d <= hi visible), the product for the others; causal, the clamped distances' one score (column 0 of
    the product, which covers only the Lr distinct rows of r: wt103 eval, 1001 of 1727) and
    finfo.min for the negative distances. One write of the buffer, no boolean mask.

    uniform_keys = n > 0: keys 0 .. n-1 are one key, so they enter the softmax as that key with
    the log-sum-exp of their n position scores; that column (n - 1) is overwritten with it and
    the view from key n - 1 on is returned, (B, H, Lq, Lk - n + 1).
    """
    B, Lq, H, _ = q.shape
    Lr, lowest = r.shape[0], torch.finfo(q.dtype).min
    query = (q.transpose(1, 2) + r_r_bias[:, None]) * scale                                 # (B, H, Lq, D)
    fill = q.new_full((1, 1, 1, 1), lowest)
    if causal:
        far = max(0, Lk - window) if window is not None else 0      # raw columns of distances >= window
        position = query @ r.permute(1, 2, 0)                                                # (B, H, Lq, Lr)
        parts = [fill.expand(B, H, Lq, far),
                 position[..., :1].expand(B, H, Lq, max(0, Lk - Lr - far)),                 # distances > Lr - 1
                 position[..., max(0, far - (Lk - Lr)) :],
                 fill.expand(B, H, Lq, Lq - 1)]                                              # negative distances
    else:           # raw column p is distance Lk - 1 - p: the span keeps columns [lo, hi)
        lo, hi = min(Lr, max(0, Lk - 1 - span[1])), max(0, min(Lr, Lk - span[0]))
        hi = max(lo, hi)
        parts = [fill.expand(B, H, Lq, lo),
                 query @ r[lo:hi].permute(1, 2, 0),                                         # (B, H, Lq, hi - lo)
                 fill.expand(B, H, Lq, Lr - hi)]
    unmasked = parts[1] if not causal and parts[1].shape[-1] == Lr else None               # no fill: no copy
    raw = torch.cat(parts, dim=-1) if unmasked is None else unmasked                       # (B, H, Lq, Lk + Lq - 1)
    mask = rel_shift(raw, Lk)                                                               # (B, H, Lq, Lk)
    n = uniform_keys
    if n:
        mask[..., n - 1] = torch.logsumexp(mask[..., :n], dim=-1)
        mask = mask[..., n - 1 :]
    return mask


def _hide(mask_or_scores, keys, empty, empty_rows):
    """Hide the padded keys (keys (B, Lk) or (B, Lq, Lk) bool, False: hidden) with finfo.min, in
    place (the callers' masks and scores are their own fresh tensors, or views of them); HF's empty
    rows (empty (B or 1, Lq) bool) take equal scores, 0, so they are exactly uniform."""
    x = mask_or_scores
    if keys is not None:
        x.masked_fill_(~per_score(keys), torch.finfo(x.dtype).min)
    if empty is not None and empty_rows == "uniform":
        x.masked_fill_(empty[:, None, :, None], 0.0)
    return x


def _torch_scores(q, k, r, r_w_bias, r_r_bias, scale, window, causal=True, context=None, keys=None,
                  empty=None, empty_rows="uniform", softcap=None):
    """Masked scores (B, H, Lq, Lk), differentiable: the content matmul writes the scores and the
    position mask (``_position_mask``) is added in place. The scale is folded into the two query
    terms (scale·(a + b) = scale·a + scale·b). Hidden entries hold content + finfo.min: in fp32 and
    fp64 that rounds to finfo.min, as HF's fill; their probability is 0 in every dtype while a key is
    visible. Rows with no visible key (window 0, or padding) get scores 0 for HF's uniform rows.
    ``softcap`` caps every score, then hides again those the distance hides (capped, the fill is
    -softcap).
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    content_q = ((q.transpose(1, 2) + r_w_bias[:, None]) * scale).reshape(B * H, Lq, D)     # (B*H, Lq, D)
    score = torch.bmm(content_q, k.permute(0, 2, 3, 1).reshape(B * H, D, Lk)).view(B, H, Lq, Lk)
    span = None if causal else _span(context, Lq, Lk)
    score.add_(_position_mask(q, r, r_r_bias, scale, Lk, window, causal=causal, span=span))
    if softcap is not None:
        score = softcap * torch.tanh(score / softcap)
        score.masked_fill_(~visibility_mask(Lq, Lk, window, q.device, causal, context), torch.finfo(score.dtype).min)
    return _hide(score, keys, empty, empty_rows)


def torch_rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window, dropout_p=0.0, causal=True,
                         context=None, keys=None, empty_rows="uniform", softcap=None):
    """-> out (B, Lq, H, D), probabilities (B, H, Lq, Lk)."""
    empty = empty_row_mask(q.shape[1], k.shape[1], window, causal, context, keys, q.device)          # (B or 1, Lq)
    score = _torch_scores(q, k, r, r_w_bias, r_r_bias, scale, window, causal, context, keys, empty, empty_rows,
                          softcap)
    prob = torch.softmax(score, dim=-1)
    if empty is not None and empty_rows == "zero":
        prob = prob.masked_fill(empty[:, None, :, None], 0.0)
    if dropout_p > 0:
        prob = torch.nn.functional.dropout(prob, p=dropout_p, training=True)
    out = (prob @ v.transpose(1, 2)).transpose(1, 2)                            # (B, Lq, H, D)
    return out, prob


def torch_fused_out(q, k, v, r, r_w_bias, r_r_bias, scale, window, uniform_keys=0, causal=True, context=None,
                     keys=None, empty_rows="uniform", chunk_context=None, query_lengths=None, softcap=None):
    """The output alone, (B, Lq, H, D): ``F.scaled_dot_product_attention`` with the position mask.

    Its fused kernel (on the CPU, a blocked flash attention) computes the content scores, adds the
    mask, and does the softmax and the value product tile by tile: of the Lq x Lk arrays only
    the position mask is written. Keys 0 .. uniform_keys - 1 enter as key uniform_keys - 1 with
    their log-sum-exp position score (``_position_mask``): the closed form of HF's zero memory.
    Bidirectional: ``_bidirectional_fused_out``. Rows with no visible key (padded queries included)
    are written afterwards: the mean value (HF's uniform row) or zeros.
    The mask does not carry gradients through this kernel, so autograd takes ``torch_rel_attention``.
    """
    empty = empty_row_mask(q.shape[1], k.shape[1], window, causal, context, keys, q.device, chunk_context,
                           query_lengths)                                                    # (B or 1, Lq)
    if causal and window == 0:  # no key visible: HF's uniform rows (in fp16 content + finfo.min keeps the content)
        return v.mean(dim=1, keepdim=True).expand(q.shape) if empty_rows == "uniform" else q.new_zeros(q.shape)
    if causal:
        first = slice(max(uniform_keys - 1, 0), None)            # the uniform block as its last key
        mask = _position_mask(q, r, r_r_bias, scale, k.shape[1], window, uniform_keys)     # (B, H, Lq, keys)
        out = _sdpa(q, k[:, first], v[:, first], r_w_bias, _hide(mask, keys, None, empty_rows), scale)
    else:
        out = _bidirectional_fused_out(q, k, v, r, r_w_bias, r_r_bias, scale, _span(context, q.shape[1], k.shape[1]),
                                       keys, chunk_context, None if empty is None else ~empty, softcap)
    if empty is not None:
        fix = v.mean(dim=1, keepdim=True) if empty_rows == "uniform" else 0.0
        out = torch.where(empty[:, :, None, None], fix, out)
    return out


def _sdpa(q, k, v, r_w_bias, mask, scale):
    """(B, Lq, H, D) out of the content scores plus the additive ``mask`` (B, H, Lq, Lk)."""
    # the kernel reads rows of D contiguous values: ops.linear's queries are column-major
    content_q = (q.transpose(1, 2) + r_w_bias[:, None]).contiguous()                   # (B, H, Lq, D)
    out = torch.nn.functional.scaled_dot_product_attention(
        content_q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


# Queries per block of the bidirectional inference path: a block of n queries needs the position
# scores of Lk + n - 1 distances, not Lk + Lq - 1 (a Conformer's 400 frames: 527 of 799 columns)
QUERY_BLOCK = 128


def _bidirectional_fused_out(q, k, v, r, r_w_bias, r_r_bias, scale, span, keys, chunk_context=None, seeing=None,
                             softcap=None):
    """The bidirectional output (B, Lq, H, D) of the visible distances lo <= d <= hi (span), keys
    (B, Lk) bool or None, chunk_context (C, L, R) or None; rows with no visible key are left to the
    caller, which passes them as ``seeing`` (B or 1, Lq) bool (False: no key) or None (none empty).

    Queries run in blocks of QUERY_BLOCK, each over the keys [j0, j1) its rows may see: the span,
    the chunks, and the trailing keys no batch row sees (padding) cut the range. Rows [i0, i1) over
    keys [j0, j1) are the problem with r's rows Lq - i1 + j0 … Lq - i0 + j1 - 2 and the span shifted
    by i1 + (Lk - Lq) - j1 (the distance of row i1 - 1 to key j1 - 1). The padding inside the range
    and the chunk edges are written into each block's scores (with ``softcap``, after the cap, the
    span's too). Blocks none of whose rows see a key (padded queries) are skipped. Memory:
    O(QUERY_BLOCK · (j1 - j0)) per block.
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    end = Lk if keys is None else int(torch.arange(1, Lk + 1, device=keys.device).mul(keys).amax())
    out = q.new_zeros(q.shape)
    busy = None if seeing is None else seeing.any(0).tolist()              # per query: does some row see a key
    hidden = None if keys is None or bool(keys[:, :end].all()) else ~keys[:, None, :end]     # (B, 1, end)
    content_q = (q.transpose(1, 2) + r_w_bias[:, None]) * scale                        # (B, H, Lq, D)
    keys_t = k[:, :end].permute(0, 2, 3, 1).reshape(B * H, D, end)                      # (B*H, D, end)
    values = v[:, :end].transpose(1, 2).reshape(B * H, end, D)                          # (B*H, end, D)
    for i0 in range(0, Lq, QUERY_BLOCK):
        i1 = min(Lq, i0 + QUERY_BLOCK)
        j0, j1 = max(0, i0 + Lk - Lq - span[1]), min(end, i1 + Lk - Lq - span[0])
        if chunk_context is not None:
            j0 = max(j0, chunk_keys(chunk_context, i0 + Lk - Lq)[0])
            j1 = min(j1, chunk_keys(chunk_context, i1 - 1 + Lk - Lq)[1])
        if j1 <= j0 or (busy is not None and not any(busy[i0:i1])):
            continue
        n, m, shift = i1 - i0, j1 - j0, i1 + Lk - Lq - j1
        mask = _position_mask(q[:, i0:i1], r[Lq - i1 + j0 : Lq - i0 + j1 - 1], r_r_bias, scale, m, None,
                              causal=False, span=(span[0] - shift, span[1] - shift))          # (B, H, n, m)
        score = torch.baddbmm(mask.reshape(B * H, n, m), content_q[:, :, i0:i1].reshape(B * H, n, D),
                              keys_t[:, :, j0:j1])                                        # (B*H, n, m)
        hide = None if hidden is None else hidden[:, :, j0:j1]                            # (B, 1, m)
        position = torch.arange(i0, i1, device=q.device)[:, None] + (Lk - Lq)              # (n, 1)
        j = torch.arange(j0, j1, device=q.device)
        outside = None
        if chunk_context is not None:
            lo, hi = chunk_keys(chunk_context, position)
            outside = (j < lo) | (j >= hi)                                                 # (n, m)
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
            far = (position - j < span[0]) | (position - j > span[1])                     # (n, m)
            outside = far if outside is None else outside | far
        if outside is not None:
            hide = outside[None] if hide is None else hide | outside
        if hide is not None:
            score.view(B, H, n, m).masked_fill_(hide[:, None], torch.finfo(score.dtype).min)
        block = torch.bmm(torch.softmax(score, dim=-1), values[:, j0:j1])                # (B*H, n, D)
        out[:, i0:i1] = block.view(B, H, n, D).transpose(1, 2)
    return out


# Score elements per chunk of the output-only torch path: 2**21 fp32 (8 MiB) with its temporaries
# stays near this machine's 32 MiB L3 and under glibc's 32 MiB mmap threshold (larger blocks are
# fresh pages, faulted in on every call), and (1, h, ...) slices merge into bmm batches without
# copies of k, v and r. Measured at the wt103 shape on the explicit arithmetic (numbers in
# benchmarks/RESULTS.md): about 2.5x faster at batch 4 for eval steps, 6x for decode steps; the
# fused path's position mask is the same size, and per batch row at batch 4 it is again faster.
SCORE_CHUNK = 2**21


def torch_rel_attention_out(q, k, v, r, r_w_bias, r_r_bias, scale, window, uniform_keys=0, causal=True,
                             context=None, keys=None, empty_rows="uniform", chunk_context=None, query_lengths=None,
                             softcap=None):
    """The torch path's output (B, Lq, H, D), one (batch row, group of heads) at a time, on slices
    small enough to stay in cache: ``torch_fused_out`` when no gradient is wanted, else
    ``torch_rel_attention``, which ignores ``uniform_keys``. Causal, keys that no query sees
    (distance >= window even from query 0, the closest) are dropped first: they would only add
    zero probabilities. (The drop removes the largest distances; r keeps its clamped row 0 while
    it is longer than them; not for HF's uniform padded queries, which spread over every key.)
    keys: (B, Lk) or (B, Lq, Lk) bool key visibility or None. The
    autograd path takes the chunks and padded queries folded into per-query keys (``query_keys``);
    the output-only path takes them as they are, in memory linear in Lq."""
    if causal and window and (empty_rows == "zero" or query_lengths is None):
        first = max(0, k.shape[1] - q.shape[1] - window + 1)         # keys [0, first) are hidden from every query
        k, v, uniform_keys = k[:, first:], v[:, first:], max(0, uniform_keys - first)
        keys = None if keys is None else keys[..., first:]
        r = r[max(0, r.shape[0] - k.shape[1]) :]                    # distances up to the new Lk - 1
    inputs = (q, k, v, r, r_w_bias, r_r_bias)
    options = dict(causal=causal, context=context, empty_rows=empty_rows)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    plain = query_lengths is None and softcap is None     # (chunks are bidirectional: never a decode step)
    if (not wants_grad and plain and backend.cpu_compile() and q.device.type == "cpu"
            and is_one_query(q, causal, window, keys)):
        return compiled_decode.decode_attention(*inputs, scale, uniform_keys)
    if not wants_grad and plain and is_decode(q, causal, window, keys):
        return decode_out(*inputs, scale, uniform_keys)
    B, Lq, H, D = q.shape
    if wants_grad or (causal and softcap is not None):  # causal, the no-grad path's SDPA cannot cap the scores
        keys = query_keys(keys, chunk_context, query_lengths, B, Lq, k.shape[1], q.device)    # (B, Lq, Lk) or as given
        query_lengths = None

        def attend(*chunk, keys, lengths):
            return torch_rel_attention(*chunk, scale, window, keys=keys, softcap=softcap, **options)[0]
    else:
        def attend(*chunk, keys, lengths):
            return torch_fused_out(*chunk, scale, window, uniform_keys, keys=keys, chunk_context=chunk_context,
                                    query_lengths=lengths, softcap=softcap, **options)
    chunks = -(-H * Lq * k.shape[1] // SCORE_CHUNK)                    # per batch row
    heads = -(-H // chunks)
    # on the CPU, batch rows that see every key take the unmasked path (one look at the mask)
    masked = [True] * B if keys is None or q.device.type != "cpu" else (~keys).flatten(1).any(1).tolist()
    if B == 1 and heads >= H:
        return attend(*inputs, keys=keys if masked[0] else None, lengths=query_lengths)
    out = q.new_empty(q.shape)
    for b in range(B):
        for h in range(0, H, heads):
            rows, cols = slice(b, b + 1), slice(h, h + heads)
            out[rows, :, cols] = attend(q[rows, :, cols], k[rows, :, cols], v[rows, :, cols], r[:, cols],
                                        r_w_bias[cols], r_r_bias[cols],
                                        keys=keys[rows] if keys is not None and masked[b] else None,
                                        lengths=None if query_lengths is None else query_lengths[rows])
    return out


# dtypes whose decode steps take ``decode_out``: in bf16 it is twice as fast as the fused kernel
# (wt103 cache, 18 layers, batch 1: 29 against 61 ms), in fp32 slower (42 against 33 ms)
DECODE_DTYPES = (torch.bfloat16,)


def is_one_query(q, causal: bool, window: Optional[int], keys) -> bool:
    """A decode step: one query per row, causal, every key visible (after the window's drop), no
    padding. Without autograd it takes ``compiled_decode`` under ``backend.use_cpu_compile()`` on
    the CPU, else ``decode_out`` in a dtype of DECODE_DTYPES, else the fused kernel."""
    return q.shape[1] == 1 and causal and window != 0 and keys is None


def is_decode(q, causal: bool, window: Optional[int], keys) -> bool:
    """A decode step ``decode_out`` takes (without the compiled CPU form): a dtype of DECODE_DTYPES."""
    return is_one_query(q, causal, window, keys) and q.dtype in DECODE_DTYPES


def decode_out(q, k, v, r, r_w_bias, r_r_bias, scale, uniform_keys=0):
    """One query per batch row, every key visible: (B, 1, H, D) out as three batched products over
    the heads (position keys, keys, values: the cache's head-major blocks, passed as views), and the
    softmax in fp32. On the CPU faster than the fused kernel in bf16 (see DECODE_DTYPES), though
    still short of the read bandwidth: bf16 ``bmm`` copies blocks whose batch stride is the cache
    buffer's (benchmarks/RESULTS.md, "Decode step").

    Position scores: key j is at distance Lk - 1 - j, r's row Lr - 1 - d, row 0 for every distance
    >= Lr - 1; the uniform keys 0 .. n-1 enter as key n - 1 with the log-sum-exp of their scores.
    """
    B, _, H, D = q.shape
    Lk, Lr, n = k.shape[1], r.shape[0], max(uniform_keys, 1)
    query = q.reshape(B, H, D).transpose(0, 1)                                            # (H, B, D)
    position = torch.bmm((query + r_r_bias[:, None]) * scale, r.permute(1, 2, 0))         # (H, B, Lr)
    if Lk > Lr:
        position = torch.cat([position[..., :1].expand(H, B, Lk - Lr), position], dim=-1)
    else:
        position = position[..., Lr - Lk :]                                               # (H, B, Lk)
    if uniform_keys > 1:
        position = torch.cat([torch.logsumexp(position[..., :n], dim=-1, keepdim=True), position[..., n:]], dim=-1)
    keys = k[:, n - 1 :].transpose(1, 2).reshape(B * H, Lk - n + 1, D)                    # (B*H, keys, D)
    values = v[:, n - 1 :].transpose(1, 2).reshape(B * H, Lk - n + 1, D)
    content_q = ((q.reshape(B, H, D) + r_w_bias) * scale).reshape(B * H, D, 1)
    # keys @ query, not query @ keys^T: the keys' batch stride is the buffer's (capacity x D), and
    # the transposed product is then 2-4x slower (bf16: 3 against 5-7 GB/s; fp32: 11 against 19)
    score = torch.bmm(keys, content_q).view(B * H, 1, -1).add_(position.transpose(0, 1).reshape(B * H, 1, -1))
    prob = torch.softmax(score, dim=-1, dtype=torch.promote_types(score.dtype, torch.float32)).to(v.dtype)
    return torch.bmm(prob, values).view(B, 1, H, D)


class RelAttentionFunction(torch.autograd.Function):
    """The fused Triton kernels (``txl_fast.kernels.rel_attention``) under autograd.

    Forward saves the inputs (as given: strided views are not copied), the output and the row
    statistics m, l (B, H, Lq). Backward returns gradients for q, k, v, r, r_w_bias, r_r_bias,
    none for the mode (scale, window, causal, context, key_lengths int32 (B,) or None,
    empty_rows, key_starts and query_lengths int32 (B,) or None, chunk_context, softcap). The same
    launchers back the ``triton_op`` ``txl_fast::rel_attention_triton``
    (``txl_fast.ops.triton_ops``), launching through ``torch.library.wrap_triton`` there. Call it
    after ``check_inputs``; triton is imported lazily here.
    """

    @staticmethod
    def forward(q, k, v, r, r_w_bias, r_r_bias, scale, window, causal=True, context=None, key_lengths=None,
                empty_rows="uniform", key_starts=None, query_lengths=None, chunk_context=None, softcap=None):
        from txl_fast.kernels import rel_attention as kernels  # noqa: PLC0415 (needs triton)

        return kernels.forward(q, k, v, r, r_w_bias, r_r_bias, scale, window, causal=causal, context=context,
                               key_lengths=key_lengths, empty_rows=empty_rows, key_starts=key_starts,
                               query_lengths=query_lengths, chunk_context=chunk_context, softcap=softcap)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, r, r_w_bias, r_r_bias, scale, window, *mode = inputs
        out, m, l = output
        ctx.mark_non_differentiable(m, l)
        ctx.save_for_backward(q, k, v, r, r_w_bias, r_r_bias, out, m, l)
        ctx.scale, ctx.window = scale, window
        ctx.mode = dict(zip(("causal", "context", "key_lengths", "empty_rows", "key_starts", "query_lengths",
                             "chunk_context", "softcap"), mode))

    @staticmethod
    def backward(ctx, dout, _dm, _dl):
        from txl_fast.kernels import rel_attention as kernels  # noqa: PLC0415

        grads = kernels.backward(dout, *ctx.saved_tensors, ctx.scale, ctx.window, **ctx.mode)
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def kernel_key_ranges(key_lengths, key_mask, Lk: int):
    """The padding as the Triton kernels take it: (key starts, key ends, None), each int32 (B,) or
    None, or (None, None, the reason) for a key mask whose visible keys are not one range
    [start, end) per batch row (the kernels skip key tiles by one range per row). A prefix mask
    gives no starts; a range per row is left padding too (XLNet) or a streaming cache's window.
    Looking at a mask's values syncs with the device."""
    if key_lengths is not None:
        return None, key_lengths.to(torch.int32), None
    if key_mask is None:
        return None, None, None
    if key_mask.dim() == 3:
        return None, None, "a per-query key_mask (B, Lq, Lk)"
    count = key_mask.sum(-1)                                                    # (B,)
    start = key_mask.to(torch.int8).argmax(-1)                                  # first visible key, 0 if none
    j = torch.arange(Lk, device=key_mask.device)
    if not torch.equal(key_mask, (j >= start[:, None]) & (j < (start + count)[:, None])):
        return None, None, "a key_mask with holes (not one range of keys [start, end) per batch row)"
    starts = start.to(torch.int32) if bool(start.any()) else None
    return starts, (start + count).to(torch.int32), None


def rel_attention(q, k, v, r, r_w_bias, r_r_bias, *, scale: float, window: Optional[int] = None,
                  uniform_keys: int = 0, causal: bool = True, context: Optional[tuple[int, int]] = None,
                  key_lengths: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                  empty_rows: str = "uniform", chunk_context: Optional[tuple[int, int, int]] = None,
                  query_lengths: Optional[torch.Tensor] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """Fused relative attention on the current backend; shapes, the clamped r, the bidirectional
    mode and ``uniform_keys`` (a promise about the inputs, see there) in the module docstring.

    The Triton kernels compute every mode; a ``key_mask`` reaches them as a range of keys per row
    when its visible keys are one (a prefix mask, left padding). One with holes runs on the torch
    path under the ``auto`` backend and is an error on an explicit ``triton`` backend.
    ``chunk_context``, ``query_lengths`` and ``softcap``: see the module docstring.

    The inputs are checked here; then the registered operator ``torch.ops.txl_fast.rel_attention``
    (the arguments in the order of ``OPTIONS``) computes. Eager, its implementation ``dispatch`` is
    called directly: the same code without the dispatcher's ~20 us per call, with autograd through
    the torch ops (or ``RelAttentionFunction``); under ``torch.compile`` the operator is what the
    graph holds (``traced``)."""
    check_inputs(q, k, v, r, r_w_bias, r_r_bias, window, uniform_keys, causal=causal, context=context,
                 key_lengths=key_lengths, key_mask=key_mask, empty_rows=empty_rows, chunk_context=chunk_context,
                 query_lengths=query_lengths, softcap=softcap)
    options = (float(scale), window, uniform_keys, causal, None if context is None else list(context), key_lengths,
               key_mask, empty_rows, None if chunk_context is None else list(chunk_context), query_lengths,
               None if softcap is None else float(softcap))
    if torch.compiler.is_compiling():
        return traced(q, k, v, r, r_w_bias, r_r_bias, *options)
    return dispatch(q, k, v, r, r_w_bias, r_r_bias, *options)


def dispatch(q, k, v, r, r_w_bias, r_r_bias, scale, window, uniform_keys, causal, context, key_lengths, key_mask,
             empty_rows, chunk_context, query_lengths, softcap) -> torch.Tensor:
    """The operator's implementation: the backend's path, on checked inputs."""
    name = backend.resolve(q)
    if name == "triton":
        starts, ends, refusal = kernel_key_ranges(key_lengths, key_mask, k.shape[1])
        if refusal is None:      # the kernels index r by distance up to Lk - 1: clamped rows written out
            positions = full_positions(r, k.shape[1]) if causal else r
            queries = None if query_lengths is None else query_lengths.to(torch.int32)
            return RelAttentionFunction.apply(q, k, v, positions, r_w_bias, r_r_bias, scale, window, causal, context,
                                              ends, empty_rows, starts, queries, chunk_context, softcap)[0]
        if backend.get_backend() == "triton":
            raise ValueError(f"rel_attention: the triton kernels take key padding as one range of keys per batch row; "
                             f"{refusal} needs the torch or auto backend")
        name = "torch"
    keys = visible_keys(key_lengths, key_mask, k.shape[1])                      # (B, Lk) bool or None
    if name == "naive":
        return naive.rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window, causal=causal, context=context,
                                   key_mask=keys, empty_rows=empty_rows, chunk_context=chunk_context,
                                   query_lengths=query_lengths, softcap=softcap)[0]
    return torch_rel_attention_out(q, k, v, r, r_w_bias, r_r_bias, scale, window, uniform_keys,
                                    causal=causal, context=context, keys=keys, empty_rows=empty_rows,
                                    chunk_context=chunk_context, query_lengths=query_lengths, softcap=softcap)


def traced(q, k, v, r, r_w_bias, r_r_bias, *options) -> torch.Tensor:
    """What ``torch.compile`` records: on the triton backend, for what the triton_op
    ``txl_fast::rel_attention_triton`` takes (no key mask, chunks, query lengths or soft-cap), that
    triton_op, whose kernel launches Inductor schedules (the backend is resolved when the caller is
    traced); else the operator, opaque, whose implementation resolves the backend when it runs."""
    scale, window, _, causal, context, key_lengths, key_mask, empty_rows, chunk_context, query_lengths, softcap = options
    plain = key_mask is None and chunk_context is None and query_lengths is None and softcap is None
    if plain and backend.resolve(q) == "triton":
        from txl_fast.ops import triton_ops  # noqa: F401, PLC0415 (registers the triton_ops; imports triton)

        positions = full_positions(r, k.shape[1]) if causal else r
        lengths = None if key_lengths is None else key_lengths.to(torch.int32)
        return torch.ops.txl_fast.rel_attention_triton(q, k, v, positions, r_w_bias, r_r_bias, scale, window, causal,
                                                       context, lengths, empty_rows)[0]
    return torch.ops.txl_fast.rel_attention(q, k, v, r, r_w_bias, r_r_bias, *options)


def rel_attention_with_probs(
    q, k, v, r, r_w_bias, r_r_bias, *, scale: float, window: Optional[int] = None, dropout_p: float = 0.0,
    causal: bool = True, context: Optional[tuple[int, int]] = None, key_lengths: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None, empty_rows: str = "uniform",
    chunk_context: Optional[tuple[int, int, int]] = None, query_lengths: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``rel_attention`` but also returns the probabilities (B, H, Lq, Lk), after dropout.

    Used for ``output_attentions=True`` and attention dropout in training; the fused kernel never
    materialises the probabilities, so this runs the naive or torch path.
    """
    check_inputs(q, k, v, r, r_w_bias, r_r_bias, window, causal=causal, context=context,
                 key_lengths=key_lengths, key_mask=key_mask, empty_rows=empty_rows, chunk_context=chunk_context,
                 query_lengths=query_lengths, softcap=softcap)
    keys = visible_keys(key_lengths, key_mask, k.shape[1])                      # (B, Lk) bool or None
    mode = dict(causal=causal, context=context, empty_rows=empty_rows)
    if backend.get_backend() == "naive":
        out, prob = naive.rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window, key_mask=keys,
                                        chunk_context=chunk_context, query_lengths=query_lengths, softcap=softcap,
                                        **mode)
        if dropout_p > 0:
            prob = torch.nn.functional.dropout(prob, p=dropout_p, training=True)
            out = torch.einsum("bhij,bjhd->bihd", prob, v)
        return out, prob
    keys = query_keys(keys, chunk_context, query_lengths, q.shape[0], q.shape[1], k.shape[1], q.device)
    return torch_rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window, dropout_p, keys=keys,
                                softcap=softcap, **mode)


# ---- the registered operator -------------------------------------------------------------------
# torch.ops.txl_fast.rel_attention(q, k, v, r, r_w_bias, r_r_bias, *OPTIONS) -> out (B, Lq, H, D): the
# implementation ``dispatch``, a shape-only fake, and autograd whose backward is the operator
# ``rel_attention_backward`` (the vjp of ``dispatch``, recomputing the forward: autograd is off
# inside an operator), so AOTAutograd traces forward and backward without graph breaks.

# the arguments after the six tensors, the public function's keywords in order: the one list of them
OPTIONS = ("float scale, int? window, int uniform_keys, bool causal, int[]? context, Tensor? key_lengths, "
           "Tensor? key_mask, str empty_rows, int[]? chunk_context, Tensor? query_lengths, float? softcap")
TENSORS = "Tensor q, Tensor k, Tensor v, Tensor r, Tensor r_w_bias, Tensor r_r_bias"


@torch.library.custom_op("txl_fast::rel_attention", mutates_args=(), schema=f"({TENSORS}, {OPTIONS}) -> Tensor")
def _operator(q, k, v, r, r_w_bias, r_r_bias, *options):
    return library.fresh([dispatch(q, k, v, r, r_w_bias, r_r_bias, *options)], (q, k, v, r, r_w_bias, r_r_bias))[0]


@_operator.register_fake
def _(q, *rest):
    return q.new_empty(q.shape)                                                 # (B, Lq, H, D)


@torch.library.custom_op("txl_fast::rel_attention_backward", mutates_args=(),
                         schema=f"(Tensor grad, {TENSORS}, {OPTIONS}) -> Tensor[]")
def _backward_operator(grad, q, k, v, r, r_w_bias, r_r_bias, *options):
    _, pullback = torch.func.vjp(lambda *tensors: dispatch(*tensors, *options), q, k, v, r, r_w_bias, r_r_bias)
    return library.fresh(pullback(grad), (grad, q, k, v, r, r_w_bias, r_r_bias))


@_backward_operator.register_fake
def _(grad, *inputs):
    return [t.new_empty(t.shape) for t in inputs[:6]]


def _setup(ctx, inputs, output):
    options = list(inputs[6:])
    ctx.tensor_options = [i for i, o in enumerate(options) if isinstance(o, torch.Tensor)]    # key_lengths, key_mask
    ctx.options = [None if i in ctx.tensor_options else o for i, o in enumerate(options)]
    ctx.save_for_backward(*inputs[:6], *(options[i] for i in ctx.tensor_options))


def _grad(ctx, grad):
    saved = ctx.saved_tensors
    options = list(ctx.options)
    for i, t in zip(ctx.tensor_options, saved[6:]):
        options[i] = t
    return (*torch.ops.txl_fast.rel_attention_backward(grad, *saved[:6], *options), *[None] * len(options))


_operator.register_autograd(_grad, setup_context=_setup)
