"""The paper's formulas, written literally: the validator every fast path is tested against.

Nothing here is meant to be fast. Every function runs in float64 (it keeps its inputs'
dtype) and spells out the maths of Dai et al. 2019, "Transformer-XL", section 3.3, and of
the projected adaptive softmax (Grave et al. 2017, as used by Transformer-XL):

Relative attention, for query i (0 <= i < qlen) and key j (0 <= j < klen = mlen + qlen):

    d(i, j)      = i + mlen - j                     relative distance (key j is d positions before query i)
    r_d          = r[Lr - 1 - min(d, Lr - 1)]       causal: r holds one row per distance Lr-1 .. 0, larger
                                                    distances clamped to row 0: Lr = klen is HF's pos_seq =
                                                    [klen-1, ..., 0] (its clamp_len applied when r is
                                                    built), Lr = clamp_len + 1 the clamp here
                 = r[klen - 1 - d]                  bidirectional: r holds the Lr = klen + qlen - 1 distances
                                                    klen-1 .. -(qlen-1), every d of the (i, j) grid
    score(i, j)  = scale * ( (q_i + u) . k_j   +   (q_i + v) . r_d(i,j) )
                           ^ content term (a)+(c)    ^ position term (b)+(d)
    visible(i,j) = causal:        d >= 0  and  (window is None or d < window)
                   bidirectional: context is None or -right <= d <= left, context = (left, right),
                                  or chunk_context = (C, L, R): query i at position p = i + mlen, its
                                  chunk c = p // C, sees (c - L) * C <= j < (c + 1) * C + R
                                  (L = -1: no lower bound)
                   and, either way, key j not masked for the batch row (key_mask[b, j], padding)
                   and query i not padding (i < query_lengths[b]: a padded query sees no key)
    softcap      : score <- softcap * tanh(score / softcap) before the masking (Gemma's audio encoders)
    p(i, .)      = softmax over j of score, with invisible scores set to the dtype's most
                   negative finite value (HF's masked_fill); a row with no visible key is
                   therefore uniform over all keys, exactly as in HF (empty_rows="uniform"),
                   or all zeros (empty_rows="zero", what the speech libraries give)
    out_i        = sum_j p(i, j) v_j

Adaptive softmax, clusters c = 0..C (cluster 0 is the head/shortlist):

    h_c          = hidden @ proj_c            (proj_c may be None: identity)
    head logits  = [h_0 @ W_0^T + b_0,  h_0 @ cluster_weight^T + cluster_bias]
    log p(w)     = head_logprob[w]                                         w in cluster 0
                 = head_logprob[V_0 + c - 1] + log_softmax(h_c @ W_c^T + b_c)[w - start_c]   w in cluster c >= 1

(cluster c's probability sits in head column V_0 + c - 1, the order HF's forward uses.)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def rel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    r_w_bias: torch.Tensor,
    r_r_bias: torch.Tensor,
    scale: float,
    window: Optional[int] = None,
    *,
    causal: bool = True,
    context: Optional[tuple[int, int]] = None,
    key_mask: Optional[torch.Tensor] = None,
    empty_rows: str = "uniform",
    chunk_context: Optional[tuple[int, int, int]] = None,
    query_lengths: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative-position attention, literally.

    q:  (B, Lq, H, D)   queries of the current segment
    k:  (B, Lk, H, D)   keys of memory + segment, Lk = mlen + Lq
    v:  (B, Lk, H, D)   values
    r:  (Lr, H, D)      projected position embeddings. causal: row p for distance Lr - 1 - p,
                        Lr <= Lk, distances >= Lr - 1 use row 0. bidirectional (causal=False):
                        Lr = Lk + Lq - 1, row p for distance Lk - 1 - p
    r_w_bias, r_r_bias: (H, D)   u and v of the paper
    window:   causal only: a key is visible only if its distance is < window (HF's same_length)
    context:  bidirectional only: (left, right), a key is visible only if -right <= d <= left
    chunk_context: bidirectional only: (C, L, R), query i in chunk c = (i + mlen) // C sees keys
              (c - L) * C <= j < (c + 1) * C + R, every earlier key when L = -1
    query_lengths: (B,) ints: queries i >= query_lengths[b] are padding and see no key
    softcap:  score -> softcap * tanh(score / softcap) before masking, or None
    key_mask: (B, Lk) bool, True where the key may be seen (False: padding); causal, also (B, Lq, Lk) per query
    empty_rows: "uniform" (HF) or "zero": the probabilities of a row with no visible key
    returns out (B, Lq, H, D) and probabilities (B, H, Lq, Lk)
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    mlen = Lk - Lq
    i = torch.arange(Lq, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    distance = i + mlen - j                                           # (Lq, Lk)
    Lr = r.shape[0]
    if causal:
        visible = distance >= 0
        if window is not None:
            visible = visible & (distance < window)
        r_ij = r[Lr - 1 - distance.clamp(0, Lr - 1)]                  # (Lq, Lk, H, D), one row per (i, j)
    else:
        visible = torch.ones_like(distance, dtype=torch.bool)
        if context is not None:
            left, right = context
            visible = (distance <= left) & (distance >= -right)
        if chunk_context is not None:
            size, left_chunks, right = chunk_context
            chunk = (i + mlen) // size                                # (Lq, 1)
            visible = j < (chunk + 1) * size + right
            if left_chunks >= 0:
                visible = visible & (j >= (chunk - left_chunks) * size)
        r_ij = r[Lk - 1 - distance]                                   # (Lq, Lk, H, D)
    visible = visible.expand(B, 1, Lq, Lk)                            # (B, 1, Lq, Lk)
    if key_mask is not None:
        visible = visible & (key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None])
    if query_lengths is not None:
        visible = visible & (i < query_lengths[:, None, None, None])

    content = torch.einsum("bihd,bjhd->bhij", q + r_w_bias, k)        # (B, H, Lq, Lk)
    position = torch.einsum("bihd,ijhd->bhij", q + r_r_bias, r_ij)    # (B, H, Lq, Lk)
    score = (content + position) * scale
    if softcap is not None:
        score = softcap * torch.tanh(score / softcap)
    score = score.masked_fill(~visible, torch.finfo(score.dtype).min)
    prob = torch.softmax(score, dim=-1)
    if empty_rows == "zero":
        prob = prob * visible.any(-1, keepdim=True)
    out = torch.einsum("bhij,bjhd->bihd", prob, v)                    # (B, Lq, H, D)
    return out, prob


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, proj: Optional[torch.Tensor]):
    if proj is not None:
        hidden = hidden @ proj                                        # (N, d_proj) @ (d_proj, d_c)
    return hidden @ weight.t() + bias


def adaptive_log_softmax(
    hidden: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    projs: Sequence[Optional[torch.Tensor]],
    cluster_weight: Optional[torch.Tensor],
    cluster_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """log p(w | hidden) over the whole vocabulary: (N, d_proj) -> (N, V), V = sum of weights[c].shape[0].

    weights[c]: (V_c, d_c), biases[c]: (V_c,), projs[c]: (d_proj, d_c) or None,
    cluster_weight: (C, d_0), cluster_bias: (C,), both None when there is one cluster only.
    """
    head = _logits(hidden, weights[0], biases[0], projs[0])
    if len(weights) == 1:
        return torch.log_softmax(head, dim=-1)
    cluster = _logits(hidden, cluster_weight, cluster_bias, projs[0])
    head_logprob = torch.log_softmax(torch.cat([head, cluster], dim=-1), dim=-1)   # (N, V_0 + C)
    shortlist = weights[0].shape[0]
    parts = [head_logprob[:, :shortlist]]
    for c in range(1, len(weights)):
        tail_logprob = torch.log_softmax(_logits(hidden, weights[c], biases[c], projs[c]), dim=-1)
        parts.append(head_logprob[:, shortlist + c - 1, None] + tail_logprob)
    return torch.cat(parts, dim=-1)


def adaptive_nll(hidden, target, weights, biases, projs, cluster_weight, cluster_bias) -> torch.Tensor:
    """-log p(target | hidden) per row, from the full distribution; 0 where target == -100.

    hidden: (N, d_proj), target: (N,) -> (N,)
    """
    logprob = adaptive_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias)
    ignored = target == -100
    picked = logprob.gather(1, target.masked_fill(ignored, 0)[:, None]).squeeze(1)
    return (-picked).masked_fill(ignored, 0.0)
