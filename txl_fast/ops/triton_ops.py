"""The triton backend's ``torch.library.triton_op``s: what ``torch.compile`` records for the ops on
that backend (``txl_fast.ops.rel_attention.traced``, ``txl_fast.ops.adaptive_softmax.traced_*``).
Importing this module registers them (it imports triton); their bodies launch the kernels of
``txl_fast.kernels`` through ``torch.library.wrap_triton``, so AOTAutograd traces into them and
Inductor schedules each launch:

    torch.ops.txl_fast.rel_attention_triton(q, k, v, r, r_w_bias, r_r_bias, scale, window, causal,
        context, key_lengths, empty_rows) -> out (B, Lq, H, D), m (B, H, Lq), l (B, H, Lq)
        (r: a row for every distance; key_lengths: int32 (B,) or None; m, l: the softmax row statistics)
    torch.ops.txl_fast.rel_attention_triton_backward(grad, q, k, v, r, r_w_bias, r_r_bias, out, m, l,
        scale, window, causal, context, key_lengths, empty_rows) -> dq, dk, dv, dr, dr_w_bias, dr_r_bias
    torch.ops.txl_fast.adaptive_nll_triton(hidden, target, weights, biases, projs, has_proj,
        cluster_weight, cluster_bias) -> nll (N,), lse (n_clusters, N)
    torch.ops.txl_fast.adaptive_nll_triton_backward(grad, hidden, target, weights, biases, projs, has_proj,
        cluster_weight, cluster_bias, lse, needs) -> flat gradients (``txl_fast.ops.library``)
    torch.ops.txl_fast.adaptive_log_softmax_triton(hidden, weights, biases, projs, has_proj,
        cluster_weight, cluster_bias) -> (N, V)

The forwards return the statistics their backward needs, autograd saves them, and the backward
triton_ops launch the fused backward kernels from them (the log-prob kernels have no backward: its
gradient is the operator ``txl_fast::adaptive_log_softmax_backward``). Every triton_op has a
shape-only fake implementation (torch would otherwise trace the body, which cannot run on data-less
tensors under ``TRITON_INTERPRET=1``; there a compile keeps them whole:
``torch._functorch.config.patch(decompose_custom_triton_ops=False)``). docs/drop-in.md has the rest.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from txl_fast.ops.library import flat, log_softmax_fake, log_softmax_grad, log_softmax_setup, real, unflat


def _kernels(name: str):
    """``txl_fast.kernels.<name>``, imported on first launch (it imports triton)."""
    return importlib.import_module(f"txl_fast.kernels.{name}")


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- relative attention ------------------------------------------------------------------------


@torch.library.triton_op("txl_fast::rel_attention_triton", mutates_args=())
def rel_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, scale: float,
    window: Optional[int], causal: bool, context: Optional[list[int]], key_lengths: Optional[Tensor], empty_rows: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels("rel_attention").forward(q, k, v, r, r_w_bias, r_r_bias, scale, window, launch=wrap_triton,
                                             causal=causal, context=context, key_lengths=key_lengths,
                                             empty_rows=empty_rows)


@rel_attention_triton.register_fake
def _(q, k, v, r, r_w_bias, r_r_bias, scale, window, causal, context, key_lengths, empty_rows):
    B, Lq, H, _ = q.shape
    # out (B, Lq, H, D); m, l (B, H, Lq) in the accumulation dtype
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=_stat_dtype(q)), q.new_empty((B, H, Lq), dtype=_stat_dtype(q))


@torch.library.triton_op("txl_fast::rel_attention_triton_backward", mutates_args=())
def rel_attention_triton_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor,
    out: Tensor, m: Tensor, l: Tensor, scale: float, window: Optional[int], causal: bool,
    context: Optional[list[int]], key_lengths: Optional[Tensor], empty_rows: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels("rel_attention").backward(grad, q, k, v, r, r_w_bias, r_r_bias, out, m, l, scale, window,
                                              launch=wrap_triton, causal=causal, context=context,
                                              key_lengths=key_lengths, empty_rows=empty_rows)


@rel_attention_triton_backward.register_fake
def _(grad, q, k, v, r, r_w_bias, r_r_bias, *rest):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, r, r_w_bias, r_r_bias))


def _rel_attention_setup(ctx, inputs, output):
    *tensors, ctx.scale, ctx.window, ctx.causal, ctx.context, key_lengths, ctx.empty_rows = inputs
    out, m, l = output
    ctx.mark_non_differentiable(m, l)
    ctx.save_for_backward(*tensors, out, m, l, key_lengths)


def _rel_attention_grad(ctx, grad, _grad_m, _grad_l):
    *saved, key_lengths = ctx.saved_tensors
    grads = torch.ops.txl_fast.rel_attention_triton_backward(grad, *saved, ctx.scale, ctx.window, ctx.causal,
                                                             ctx.context, key_lengths, ctx.empty_rows)
    return (*grads, None, None, None, None, None, None)


rel_attention_triton.register_autograd(_rel_attention_grad, setup_context=_rel_attention_setup)


# ---- adaptive softmax ----------------------------------------------------------------------------
# The NLL backward takes ``needs``, one bool per entry of the flat list (a projection placeholder
# never needs one), and returns the flat list of gradients with an empty placeholder wherever none
# is needed.


def _flat_grads(flat_list, grads, needs) -> list[Tensor]:
    return [g if need else t.new_empty(0) for t, g, need in zip(flat_list, grads, needs)]


@torch.library.triton_op("txl_fast::adaptive_nll_triton", mutates_args=())
def adaptive_nll_triton(
    hidden: Tensor, target: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor],
    has_proj: list[bool], cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    return _kernels("adaptive_softmax").nll_forward(
        hidden, target, weights, biases, real(projs, has_proj), cluster_weight, cluster_bias, launch=wrap_triton)


@adaptive_nll_triton.register_fake
def _(hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias):
    N = hidden.shape[0]
    return hidden.new_empty(N), hidden.new_empty((len(weights), N), dtype=_stat_dtype(hidden))   # (N,), lse (C + 1, N)


@torch.library.triton_op("txl_fast::adaptive_nll_triton_backward", mutates_args=())
def adaptive_nll_triton_backward(
    grad: Tensor, hidden: Tensor, target: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor],
    has_proj: list[bool], cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor], lse: Tensor,
    needs: list[bool],
) -> list[Tensor]:
    structure = (len(weights), has_proj, cluster_weight is not None)
    need_h, need_w, need_b, need_p, need_cw, need_cb = unflat(needs, structure)
    dhidden, dw, db, dp, dcw, dcb = _kernels("adaptive_softmax").nll_backward(
        grad, hidden, target, weights, biases, real(projs, has_proj), cluster_weight, cluster_bias, lse,
        dict(hidden=need_h, weights=need_w, biases=need_b, projs=need_p, cluster=bool(need_cw or need_cb)),
        launch=wrap_triton)
    grads = [dhidden, *dw, *db, *dp] + ([dcw, dcb] if cluster_weight is not None else [])
    return _flat_grads(flat(hidden, weights, biases, projs, cluster_weight, cluster_bias), grads, needs)


@adaptive_nll_triton_backward.register_fake
def _(grad, hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias, lse, needs):
    flat_list = flat(hidden, weights, biases, projs, cluster_weight, cluster_bias)
    return _flat_grads(flat_list, [t.new_empty(t.shape) for t in flat_list], needs)


def _adaptive_nll_setup(ctx, inputs, output):
    hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.structure = (len(weights), list(has_proj), cluster_weight is not None)
    ctx.save_for_backward(hidden, target, cluster_weight, cluster_bias, output[1], *weights, *biases, *projs)


def _adaptive_nll_grad(ctx, grad, _grad_lse):
    n, has_proj, has_clusters = ctx.structure
    hidden, target, cluster_weight, cluster_bias, lse, *params = ctx.saved_tensors
    weights, biases, projs = params[:n], params[n: 2 * n], params[2 * n:]
    need = ctx.needs_input_grad                    # (hidden, target, [weights], [biases], [projs], has_proj, cw, cb)
    needs = [need[0], *need[2], *need[3], *(p and has for p, has in zip(need[4], has_proj))]
    needs += [need[6], need[7]] if has_clusters else []
    grads = torch.ops.txl_fast.adaptive_nll_triton_backward(
        grad, hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias, lse, needs)
    g_hidden, g_weights, g_biases, g_projs, g_cw, g_cb = unflat(
        [g if need else None for g, need in zip(grads, needs)], ctx.structure)
    return g_hidden, None, g_weights, g_biases, g_projs, None, g_cw, g_cb


adaptive_nll_triton.register_autograd(_adaptive_nll_grad, setup_context=_adaptive_nll_setup)


@torch.library.triton_op("txl_fast::adaptive_log_softmax_triton", mutates_args=())
def adaptive_log_softmax_triton(
    hidden: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor], has_proj: list[bool],
    cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor],
) -> Tensor:
    return _kernels("adaptive_softmax").log_softmax(
        hidden, weights, biases, real(projs, has_proj), cluster_weight, cluster_bias, launch=wrap_triton)


adaptive_log_softmax_triton.register_fake(log_softmax_fake)
adaptive_log_softmax_triton.register_autograd(log_softmax_grad, setup_context=log_softmax_setup)
