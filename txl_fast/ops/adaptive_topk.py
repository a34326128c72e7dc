"""The k most probable next words under the projected adaptive softmax, without the (N, V) row.

    adaptive_topk(hidden (N, d_proj), k, weights, biases, projs, cluster_weight, cluster_bias)
        -> log-probs (N, k), ids (N, k) int64, most probable first

Arguments as ``txl_fast.ops.adaptive_softmax`` (clusters c = 0..C; cluster 0 the head, whose last C
logits are the tail clusters' own). k = 1 is greedy decoding; k = top_k gives the candidates of
top-k sampling exactly (``txl_fast.inference`` samples among them). Inference only: no gradients.

How: each cluster's vocabulary is scanned for its log-sum-exp and its k largest logits, in bounded
pieces (``_scan_torch``: chunks of CHUNK_ELEMENTS logits; triton: ``txl_fast.kernels.adaptive_topk``, one
streaming pass). A tail word's log-prob is its cluster's log-prob (from the head) plus its log-prob
inside the cluster, so it is never above its cluster's: a tail is scanned only for the rows whose
cluster log-prob beats their current k-th best candidate (on CUDA, ``txl_fast.backend.sync_free``:
every row is scanned and the others merge -inf, so that no host sync waits for the row count). With
a trained model most rows never touch the big tails (wt103: 160,000 + 67,735 + 20,000 of the
267,735 words). The winners' logits are recomputed from their weight rows in the accumulation
dtype, so the values are exact, not the scan's rounding. The naive backend takes the full
log-softmax and ``torch.topk`` (the reference).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from txl_fast import backend, naive
from txl_fast.ops.adaptive_softmax import project, check_inputs, cluster_bounds
from txl_fast.ops.linear import linear

CHUNK_ELEMENTS = 2**20           # logits per piece of the torch scan (4 MB in fp32), whatever the row count


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def _scan_torch(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (n,), ids (n, min(k, V)) best first) of the logits h @ w^T + b, CHUNK_ELEMENTS at a time."""
    lse, best_z, best_ids = None, None, None
    chunk = max(1, CHUNK_ELEMENTS // max(h.shape[0], 1))                               # words per piece
    for start in range(0, w.shape[0], chunk):
        z = _acc(linear(h, w[start : start + chunk], b[start : start + chunk]))        # (n, <= chunk)
        z_top, ids_top = z.topk(min(k, z.shape[1]), dim=1)
        chunk_lse = torch.logsumexp(z, dim=1)
        if lse is None:
            lse, best_z, best_ids = chunk_lse, z_top, ids_top
            continue
        lse = torch.logaddexp(lse, chunk_lse)
        best_z, pick = torch.cat([best_z, z_top], 1).topk(min(k, best_z.shape[1] + z_top.shape[1]), dim=1)
        best_ids = torch.cat([best_ids, ids_top + start], 1).gather(1, pick)
    return lse, best_ids


def scan(h, w, b, k):
    if backend.resolve(h) == "triton":
        from txl_fast.kernels import adaptive_topk as kernel  # noqa: PLC0415

        if k <= kernel.MAX_K:
            return kernel.cluster_topk(h, w, b, k)
    return _scan_torch(h, w, b, k)


def _logits_at(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(n, m) logits of the words ``ids`` (n, m), from their weight rows: (n, m, d) gathered, not (n, V)."""
    return torch.einsum("nd,nmd->nm", _acc(h), _acc(w[ids])) + _acc(b[ids])


@torch.no_grad()
def adaptive_topk(
    hidden: torch.Tensor,
    k: int,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    projs: Sequence[Optional[torch.Tensor]],
    cluster_weight: Optional[torch.Tensor] = None,
    cluster_bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable words per row: (N, d_proj) -> log-probs (N, k), ids (N, k), best first."""
    check_inputs(hidden, None, weights, biases, projs, cluster_weight, cluster_bias)
    bounds = cluster_bounds(weights)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= bounds[-1]:
        raise ValueError(f"adaptive top-k: k must be an integer in [1, {bounds[-1]}] (the vocabulary), got {k!r}")
    if backend.resolve(hidden) == "naive":
        return naive.adaptive_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias).topk(k, dim=1)

    n = hidden.shape[0]
    h0 = project(hidden, projs[0])                                       # (N, d_0)
    word_lse, head_ids = scan(h0, weights[0], biases[0], k)              # (N,), (N, min(k, V_0))
    if len(weights) == 1:
        return (_logits_at(h0, weights[0], biases[0], head_ids) - word_lse[:, None]).to(hidden.dtype), head_ids
    cluster_z = _acc(linear(h0, cluster_weight, cluster_bias))            # (N, C)
    head_lse = torch.logaddexp(word_lse, torch.logsumexp(cluster_z, dim=1))
    cluster_logprob = cluster_z - head_lse[:, None]                       # (N, C)

    # the running k best (N, k); fewer than k head words: padded with -inf
    values = torch.full((n, k), float("-inf"), dtype=head_lse.dtype, device=hidden.device)
    ids = torch.zeros((n, k), dtype=torch.int64, device=hidden.device)
    m = head_ids.shape[1]
    values[:, :m] = _logits_at(h0, weights[0], biases[0], head_ids) - head_lse[:, None]
    ids[:, :m] = head_ids
    for c in range(1, len(weights)):
        # a tail word's log-prob is <= its cluster's: only rows where the cluster can still enter the k best
        can_enter = cluster_logprob[:, c - 1] > values[:, -1]                            # (N,)
        if backend.sync_free(hidden):
            # no host sync (a CUDA graph, a queue that never waits): every row scans the tail and
            # the rows that cannot enter merge -inf, which changes nothing
            tail_values, tail_ids = tail_topk(hidden, c, k, cluster_logprob[:, c - 1], weights, biases, projs)
            tail_values = tail_values.masked_fill(~can_enter[:, None], float("-inf"))
            values, pick = torch.cat([values, tail_values], 1).topk(k, dim=1)
            ids = torch.cat([ids, tail_ids + bounds[c]], 1).gather(1, pick)
            continue
        rows = can_enter.nonzero().squeeze(1)                                             # (n_c,)
        if rows.numel() == 0:
            continue
        tail_values, tail_ids = tail_topk(hidden[rows], c, k, cluster_logprob[rows, c - 1], weights, biases, projs)
        merged, pick = torch.cat([values[rows], tail_values], 1).topk(k, dim=1)
        ids[rows] = torch.cat([ids[rows], tail_ids + bounds[c]], 1).gather(1, pick)
        values[rows] = merged
    return values.to(hidden.dtype), ids


def tail_topk(hidden, c, k, cluster_logprob, weights, biases, projs):
    """(n, d_proj) rows, their (n,) log-probs of tail cluster c -> the cluster's k best words'
    log-probs (n, min(k, V_c)) and ids inside the cluster."""
    hc = project(hidden, projs[c])                                           # (n, d_c)
    tail_lse, tail_ids = scan(hc, weights[c], biases[c], k)
    return _logits_at(hc, weights[c], biases[c], tail_ids) - tail_lse[:, None] + cluster_logprob[:, None], tail_ids
