"""Projected adaptive log-softmax (Transformer-XL's output layer), batch of rows.

Clusters c = 0..C, cluster 0 the head (shortlist), each given by
    weights[c]: (V_c, d_c)   biases[c]: (V_c,)   projs[c]: (d_proj, d_c) or None (identity)
and, when C >= 1, cluster_weight: (C, d_0), cluster_bias: (C,) (the head's cluster logits).
Cluster c covers token ids [V_0 + ... + V_{c-1}, ... + V_c); its probability is the head's
column V_0 + c - 1. ``txl_fast.naive`` states the maths literally.

    adaptive_log_softmax(hidden (N, d_proj), ...) -> log-probs (N, V)
    adaptive_nll(hidden (N, d_proj), target (N,), ...) -> NLL (N,), in row order, 0 where target == -100

Weights are passed per cluster so that HF's div_val == 1 layout (one big matrix) is handed
over as row slices: views, no copies.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from txl_fast import backend, naive
from txl_fast.ops import library
from txl_fast.ops.linear import linear

IGNORE_INDEX = -100


def cluster_bounds(weights: Sequence[torch.Tensor]) -> list[int]:
    """[0, V_0, V_0 + V_1, ..., V]: token id boundaries of the clusters."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w.shape[0])
    return bounds


def check_inputs(hidden, target, weights, biases, projs, cluster_weight, cluster_bias) -> None:
    """Raise a ValueError naming the problem; nothing has run yet when this raises."""
    if not (len(weights) == len(biases) == len(projs)) or len(weights) == 0:
        raise ValueError(
            f"adaptive softmax: need one weight, bias and proj per cluster, got {len(weights)}, {len(biases)}, {len(projs)}"
        )
    if hidden.dim() != 2:
        raise ValueError(f"adaptive softmax: hidden must be (N, d_proj), got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"adaptive softmax: hidden must be floating point, got {hidden.dtype}")
    d_proj = hidden.shape[1]
    params = []
    for c, (w, b, p) in enumerate(zip(weights, biases, projs)):
        d_c = w.shape[1]
        if p is not None:
            if p.shape != (d_proj, d_c):
                raise ValueError(
                    f"adaptive softmax: cluster {c} projection must be (d_proj={d_proj}, {d_c}), got {tuple(p.shape)}"
                )
            params.append((f"projs[{c}]", p))
        elif d_c != d_proj:
            raise ValueError(f"adaptive softmax: hidden size {d_proj} does not match cluster {c}'s weight width {d_c}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"adaptive softmax: cluster {c} bias must be ({w.shape[0]},), got {tuple(b.shape)}")
        params += [(f"weights[{c}]", w), (f"biases[{c}]", b)]
    n_clusters = len(weights) - 1
    if n_clusters:
        if cluster_weight is None or cluster_bias is None:
            raise ValueError("adaptive softmax: several clusters need cluster_weight and cluster_bias")
        if cluster_weight.shape != (n_clusters, weights[0].shape[1]) or cluster_bias.shape != (n_clusters,):
            raise ValueError(
                f"adaptive softmax: cluster_weight/bias must be ({n_clusters}, {weights[0].shape[1]})/({n_clusters},), "
                f"got {tuple(cluster_weight.shape)}/{tuple(cluster_bias.shape)}"
            )
        params += [("cluster_weight", cluster_weight), ("cluster_bias", cluster_bias)]
    for name, t in params:
        if t.dtype != hidden.dtype:
            raise ValueError(f"adaptive softmax: {name} has dtype {t.dtype} but hidden has {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"adaptive softmax: {name} is on {t.device} but hidden is on {hidden.device}")
    if target is not None:
        if target.shape != (hidden.shape[0],):
            raise ValueError(f"adaptive softmax: target must be ({hidden.shape[0]},), got {tuple(target.shape)}")
        if target.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"adaptive softmax: target must be int64 or int32, got {target.dtype}")
        if target.device != hidden.device:
            raise ValueError(f"adaptive softmax: target is on {target.device} but hidden is on {hidden.device}")
        vocab = cluster_bounds(weights)[-1]
        bad = ((target < 0) | (target >= vocab)) & (target != IGNORE_INDEX)
        # the value check syncs with the device; torch.compile traces skip it
        if not torch.compiler.is_compiling() and bool(bad.any()):
            raise ValueError(
                f"adaptive softmax: target ids must be in [0, {vocab}) or {IGNORE_INDEX}, "
                f"got {target[bad][0].item()} (of {int(bad.sum())} bad)"
            )


# logits per piece of the torch loss (2 MB in fp32: stays in cache); the wt103 head (20000 words)
# in pieces of 8192 rows at 128 hidden rows took 52 ms in fp32, in pieces of 1024-4096 41-42 (bf16:
# about the same at 128 rows; at 512, 85 ms in pieces of 8192 vs 60-65 in 1024-4096)
CHUNK_ELEMENTS = 2**19


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype sums are accumulated in: float64 stays, the rest (bf16, fp16) go to float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def project(x, proj):
    return x if proj is None else x @ proj                              # (N, d_proj) -> (N, d_c)


def _head_logprob(hidden, weights, biases, projs, cluster_weight, cluster_bias):
    """(N, V_0 + C) log-probs of the shortlist words and of the tail clusters.

    The two logit blocks are computed apart and joined as (N, V_0 + C) logits: concatenating the
    (V_0, d) head weight with the cluster weight instead would copy the whole head matrix per call.
    """
    h0 = project(hidden, projs[0])
    head = linear(h0, weights[0], biases[0])                                 # (N, V_0)
    if cluster_weight is not None:
        head = torch.cat([head, linear(h0, cluster_weight, cluster_bias)], dim=-1)
    return torch.log_softmax(_acc(head), dim=-1)                             # float32 for bf16 / fp16


def torch_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias):
    bounds = cluster_bounds(weights)
    head = _head_logprob(hidden, weights, biases, projs, cluster_weight, cluster_bias)
    if len(weights) == 1:
        return head.to(hidden.dtype)
    out = hidden.new_empty(hidden.shape[0], bounds[-1])                 # (N, V), written cluster by cluster
    out[:, : bounds[1]] = head[:, : bounds[1]]
    for c in range(1, len(weights)):
        tail = torch.log_softmax(_acc(linear(project(hidden, projs[c]), weights[c], biases[c])), dim=-1)
        out[:, bounds[c] : bounds[c + 1]] = tail + head[:, bounds[1] + c - 1, None]
    return out


def lse_and_pick(h, weight, bias, col):
    """Per row of h (n, d): the log-sum-exp of the logits h @ weight^T + bias and the logit at column
    ``col`` (n,) (0 where col is outside [0, V)), computed in pieces of CHUNK_ELEMENTS logits so that
    each piece is reduced while it is in cache and no (n, V) tensor exists; both in float32 for bf16 /
    fp16 logits (the dtype ``_acc`` gives). Differentiable.

    A piece's log-sum-exp is its largest logit less its largest log-softmax: the fused log-softmax
    reads the bf16 / fp16 logits and reduces them in float32 itself, faster than converting the piece
    and ``torch.logsumexp``'s four passes (with the pieces of CHUNK_ELEMENTS, the loss of a wt103
    segment at batch 4, fp32 / bf16: 363 / 255 ms before, 242 / 160 after; benchmarks/RESULTS.md);
    ``F.linear`` writes the piece's rows contiguous, as the log-softmax reads them."""
    acc = torch.promote_types(h.dtype, torch.float32)
    lse, pick = None, torch.zeros(h.shape[0], dtype=acc, device=h.device)
    chunk = max(1, CHUNK_ELEMENTS // max(h.shape[0], 1))
    for start in range(0, weight.shape[0], chunk):
        z = F.linear(h, weight[start : start + chunk], bias[start : start + chunk])      # (n, <= chunk)
        # the largest logit less its log-softmax (two maxima: faster than one max with its index)
        piece = z.amax(dim=1).to(acc) - torch.log_softmax(z, dim=1, dtype=acc).amax(dim=1)
        lse = piece if lse is None else torch.logaddexp(lse, piece)
        inside = (col >= start) & (col < start + z.shape[1])
        at = z.gather(1, (col - start).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        pick = pick + torch.where(inside, at.to(acc), 0.0)
    return lse, pick


@backend.compile_disabled("rows per cluster are data-dependent: compiling would recompile per batch")
def _torch_nll(hidden, target, weights, biases, projs, cluster_weight, cluster_bias):
    bounds = cluster_bounds(weights)
    cluster_of = torch.bucketize(target.contiguous(), torch.tensor(bounds[1:], device=target.device), right=True)  # (N,)
    ignored = target == IGNORE_INDEX
    h0 = project(hidden, projs[0])                                      # (N, d_0)
    lse, pick = lse_and_pick(h0, weights[0], biases[0], torch.where(cluster_of == 0, target, -1))
    if cluster_weight is not None:
        # the head's last C logits are the tail clusters': a tail row's head term is its cluster's logit
        cluster_z = _acc(linear(h0, cluster_weight, cluster_bias))       # (N, C)
        lse = torch.logaddexp(lse, torch.logsumexp(cluster_z, dim=1))
        in_tail = (cluster_of > 0) & ~ignored
        at = cluster_z.gather(1, (cluster_of - 1).clamp(0, len(weights) - 2)[:, None]).squeeze(1)
        pick = torch.where(in_tail, at, pick)
    logprob = pick - lse
    for c in range(1, len(weights)):
        rows = (cluster_of == c).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        tail_lse, tail_pick = lse_and_pick(project(hidden[rows], projs[c]), weights[c], biases[c],
                                            target[rows] - bounds[c])
        logprob = logprob.index_add(0, rows, tail_pick - tail_lse)
    return (-logprob).masked_fill(ignored, 0.0).to(hidden.dtype)      # reduced in float32, rounded once


def _split_params(n: int, params: tuple):
    return list(params[:n]), list(params[n: 2 * n]), list(params[2 * n: 3 * n])


class _TritonNLL(torch.autograd.Function):
    """NLL per row with the fused kernels of ``txl_fast.kernels.adaptive_softmax``; backward
    recomputes the logits tile by tile from the saved per-cluster log-sum-exp. The same launchers
    back the ``triton_op`` ``txl_fast::adaptive_nll_triton`` (``txl_fast.ops.triton_ops``)."""

    @staticmethod
    def forward(ctx, hidden, target, n, cluster_weight, cluster_bias, *params):
        from txl_fast.kernels import adaptive_softmax as kernels  # noqa: PLC0415 (needs triton)

        weights, biases, projs = _split_params(n, params)
        nll, lse = kernels.nll_forward(hidden, target, weights, biases, projs, cluster_weight, cluster_bias)
        ctx.n = n
        ctx.save_for_backward(hidden, target, lse, cluster_weight, cluster_bias, *params)
        return nll

    @staticmethod
    def backward(ctx, grad):
        from txl_fast.kernels import adaptive_softmax as kernels  # noqa: PLC0415

        n = ctx.n
        hidden, target, lse, cluster_weight, cluster_bias, *params = ctx.saved_tensors
        weights, biases, projs = _split_params(n, tuple(params))
        need = ctx.needs_input_grad
        needs = dict(hidden=need[0], cluster=need[3] or need[4], weights=list(need[5: 5 + n]),
                     biases=list(need[5 + n: 5 + 2 * n]),
                     projs=[need[5 + 2 * n + c] and projs[c] is not None for c in range(n)])
        dhidden, dw, db, dp, dcw, dcb = kernels.nll_backward(
            grad, hidden, target, weights, biases, projs, cluster_weight, cluster_bias, lse, needs)
        return (dhidden, None, None, dcw if need[3] else None, dcb if need[4] else None, *dw, *db, *dp)


class _TritonLogSoftmax(torch.autograd.Function):
    """Full log-probabilities written by the fused kernels straight into the output.

    The output is (N, V) anyway, so backward recomputes the torch path under autograd and
    differentiates it: exact gradients, at the torch path's memory cost, only when asked for.
    """

    @staticmethod
    def forward(ctx, hidden, n, cluster_weight, cluster_bias, *params):
        from txl_fast.kernels import adaptive_softmax as kernels  # noqa: PLC0415

        weights, biases, projs = _split_params(n, params)
        ctx.n = n
        ctx.save_for_backward(hidden, cluster_weight, cluster_bias, *params)
        return kernels.log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias)

    @staticmethod
    def backward(ctx, grad):
        hidden, cluster_weight, cluster_bias, *params = ctx.saved_tensors
        inputs = [hidden, cluster_weight, cluster_bias, *params]
        wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i + 1 if i else 0]]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(k in wanted) if t is not None else None for k, t in enumerate(inputs)]
            weights, biases, projs = _split_params(ctx.n, tuple(leaves[3:]))
            out = torch_log_softmax(leaves[0], weights, biases, projs, leaves[1], leaves[2])
            grads = torch.autograd.grad(out, [leaves[k] for k in wanted], grad)
        result = [None] * len(inputs)
        for k, g in zip(wanted, grads):
            result[k] = g
        return (result[0], None, *result[1:])


def adaptive_log_softmax(
    hidden: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    projs: Sequence[Optional[torch.Tensor]],
    cluster_weight: Optional[torch.Tensor] = None,
    cluster_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Log-probabilities over the whole vocabulary: (N, d_proj) -> (N, V).

    Checks, then ``torch.ops.txl_fast.adaptive_log_softmax``: eager its implementation
    ``dispatch_log_softmax`` directly, under ``torch.compile`` the operator (``traced_log_softmax``),
    as ``txl_fast.ops.rel_attention.rel_attention`` does."""
    check_inputs(hidden, None, weights, biases, projs, cluster_weight, cluster_bias)
    if torch.compiler.is_compiling():
        return traced_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias)
    return dispatch_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias)


def adaptive_nll(
    hidden: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    projs: Sequence[Optional[torch.Tensor]],
    cluster_weight: Optional[torch.Tensor] = None,
    cluster_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Negative log-likelihood of ``target`` per row, in row order: (N, d_proj), (N,) -> (N,).

    Checks, then ``torch.ops.txl_fast.adaptive_nll`` (eager: ``dispatch_nll``; compiled: ``traced_nll``)."""
    check_inputs(hidden, target, weights, biases, projs, cluster_weight, cluster_bias)
    if torch.compiler.is_compiling():
        return traced_nll(hidden, target, weights, biases, projs, cluster_weight, cluster_bias)
    return dispatch_nll(hidden, target, weights, biases, projs, cluster_weight, cluster_bias)


def dispatch_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias) -> torch.Tensor:
    """The operator's implementation: the backend's path, on checked inputs."""
    name = backend.resolve(hidden)
    if name == "naive":
        return naive.adaptive_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias)
    if name == "triton":
        return _TritonLogSoftmax.apply(hidden, len(weights), cluster_weight, cluster_bias, *weights, *biases, *projs)
    return torch_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias)


def dispatch_nll(hidden, target, weights, biases, projs, cluster_weight, cluster_bias) -> torch.Tensor:
    """The operator's implementation: the backend's path, on checked inputs."""
    name = backend.resolve(hidden)
    if name == "naive":
        return naive.adaptive_nll(hidden, target, weights, biases, projs, cluster_weight, cluster_bias)
    if name == "triton":
        return _TritonNLL.apply(hidden, target, len(weights), cluster_weight, cluster_bias, *weights, *biases, *projs)
    return _torch_nll(hidden, target, weights, biases, projs, cluster_weight, cluster_bias)


def traced_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias) -> torch.Tensor:
    """What ``torch.compile`` records: the triton_op on the triton backend (resolved when the caller
    is traced), else the operator."""
    op_projs, has_proj = library.op_projs(hidden, projs)
    args = (hidden, list(weights), list(biases), op_projs, has_proj, cluster_weight, cluster_bias)
    if backend.resolve(hidden) == "triton":
        from txl_fast.ops import triton_ops  # noqa: F401, PLC0415 (registers the triton_ops; imports triton)

        return torch.ops.txl_fast.adaptive_log_softmax_triton(*args)
    return torch.ops.txl_fast.adaptive_log_softmax(*args)


def traced_nll(hidden, target, weights, biases, projs, cluster_weight, cluster_bias) -> torch.Tensor:
    """As ``traced_log_softmax``, for the NLL."""
    op_projs, has_proj = library.op_projs(hidden, projs)
    args = (hidden, target, list(weights), list(biases), op_projs, has_proj, cluster_weight, cluster_bias)
    if backend.resolve(hidden) == "triton":
        from txl_fast.ops import triton_ops  # noqa: F401, PLC0415

        return torch.ops.txl_fast.adaptive_nll_triton(*args)[0]
    return torch.ops.txl_fast.adaptive_nll(*args)


# ---- the registered operators --------------------------------------------------------------------
# torch.ops.txl_fast.adaptive_nll(hidden, target, weights, biases, projs, has_proj, cluster_weight,
# cluster_bias) -> (N,) and adaptive_log_softmax(hidden, weights, biases, projs, has_proj, cluster_weight,
# cluster_bias) -> (N, V) (projs with placeholders: ``txl_fast.ops.library``): the implementations
# above, shape-only fakes, and autograd whose backward operator differentiates the forward with
# ``torch.func.vjp`` (on the triton backend the torch path: the autograd Functions here take no
# functorch transform).


@torch.library.custom_op("txl_fast::adaptive_nll", mutates_args=())
def _nll_operator(
    hidden: Tensor, target: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor],
    has_proj: list[bool], cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor],
) -> Tensor:
    out = dispatch_nll(hidden, target, weights, biases, library.real(projs, has_proj), cluster_weight, cluster_bias)
    return library.fresh([out], (hidden,))[0]


@_nll_operator.register_fake
def _(hidden, target, *rest):
    return hidden.new_empty(hidden.shape[0])                                   # (N,)


@torch.library.custom_op("txl_fast::adaptive_nll_backward", mutates_args=())
def _nll_backward_operator(
    grad: Tensor, target: Tensor, flat: list[Tensor], n_clusters: int, has_proj: list[bool], has_clusters: bool
) -> list[Tensor]:
    dispatch = _torch_nll if backend.resolve(flat[0]) == "triton" else dispatch_nll

    def nll(hidden, weights, biases, projs, cw, cb):
        return dispatch(hidden, target, weights, biases, projs, cw, cb)

    return library.vjp(nll, grad, flat, (n_clusters, has_proj, has_clusters))


@_nll_backward_operator.register_fake
def _(grad, target, flat, *structure):
    return [t.new_empty(t.shape) for t in flat]


def _nll_setup(ctx, inputs, output):
    hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias = inputs
    ctx.structure = (len(weights), list(has_proj), cluster_weight is not None)
    ctx.save_for_backward(target, *library.flat(hidden, weights, biases, projs, cluster_weight, cluster_bias))


def _nll_grad(ctx, grad):
    target, *flat = ctx.saved_tensors
    grads = torch.ops.txl_fast.adaptive_nll_backward(grad, target, flat, *ctx.structure)
    g_hidden, g_weights, g_biases, g_projs, g_cw, g_cb = library.unflat(grads, ctx.structure)
    return g_hidden, None, g_weights, g_biases, g_projs, None, g_cw, g_cb


_nll_operator.register_autograd(_nll_grad, setup_context=_nll_setup)


@torch.library.custom_op("txl_fast::adaptive_log_softmax", mutates_args=())
def _log_softmax_operator(
    hidden: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor], has_proj: list[bool],
    cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor],
) -> Tensor:
    out = dispatch_log_softmax(hidden, weights, biases, library.real(projs, has_proj), cluster_weight, cluster_bias)
    return library.fresh([out], (hidden,))[0]


@torch.library.custom_op("txl_fast::adaptive_log_softmax_backward", mutates_args=())
def _log_softmax_backward_operator(
    grad: Tensor, flat: list[Tensor], n_clusters: int, has_proj: list[bool], has_clusters: bool
) -> list[Tensor]:
    # the fused log-prob kernels have no backward: on the triton backend the torch path is
    # differentiated, as _TritonLogSoftmax does
    fn = torch_log_softmax if backend.resolve(flat[0]) == "triton" else dispatch_log_softmax
    return library.vjp(fn, grad, flat, (n_clusters, has_proj, has_clusters))


@_log_softmax_backward_operator.register_fake
def _(grad, flat, *structure):
    return [t.new_empty(t.shape) for t in flat]


_log_softmax_operator.register_fake(library.log_softmax_fake)
_log_softmax_operator.register_autograd(library.log_softmax_grad, setup_context=library.log_softmax_setup)
