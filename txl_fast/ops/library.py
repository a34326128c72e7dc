"""txl_fast's ops as PyTorch custom operators, so ``torch.compile`` traces through them.

    torch.ops.txl_fast.rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window) -> out (B, Lq, H, D)
    torch.ops.txl_fast.adaptive_nll(hidden, target, weights, biases, projs, has_proj, cluster_weight,
                                    cluster_bias) -> (N,)
    torch.ops.txl_fast.adaptive_log_softmax(hidden, weights, biases, projs, has_proj, cluster_weight,
                                            cluster_bias) -> (N, V)

(``projs`` a list of tensors with an empty placeholder where the functional API takes None;
``has_proj`` says which are real.)

Shapes and maths: ``txl_fast.ops.rel_attention`` / ``txl_fast.ops.adaptive_softmax``. The Python
wrappers below (``rel_attention``, ``adaptive_nll``, ``adaptive_log_softmax``) take the same
arguments as the functional API and call the registered operators.

Each operator is opaque to the compiler: Dynamo records one node, the fake implementation gives
the output's shape, dtype and device (running the functional API's shape checks, so a bad shape
fails at trace time), and autograd is registered with a backward that is itself a custom operator,
so AOTAutograd traces forward and backward without graph breaks. The real implementation calls
the functional API, which dispatches on the backend (naive / torch / triton) when it runs; the
backward recomputes the forward with ``torch.func.vjp`` (same backend) and differentiates it
(autograd is switched off inside an operator's implementation; functorch's transforms are not). Outputs
are contiguous, as the fake implementations promise.

Not done here (needs the kernel owners' autograd Functions): a ``torch.library.triton_op`` for
the triton backend, whose forward launches the fused kernel and saves (out, m, l) for the fused
backward kernels instead of recomputing; that lets Inductor see and schedule the triton kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

import importlib

# the modules, not the functions of the same name that txl_fast.ops re-exports
_ra = importlib.import_module("txl_fast.ops.rel_attention")
_asm = importlib.import_module("txl_fast.ops.adaptive_softmax")

def _fresh(outputs, inputs) -> list[Tensor]:
    """Contiguous outputs sharing memory with no input and no other output (an operator's contract)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    fresh = []
    for t in outputs:
        if t.untyped_storage().data_ptr() in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        fresh.append(t)
    return fresh


# ---- relative attention ------------------------------------------------------------------------


@torch.library.custom_op("txl_fast::rel_attention", mutates_args=())
def _rel_attention(
    q: Tensor, k: Tensor, v: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, scale: float, window: Optional[int]
) -> Tensor:
    return _ra.rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale=scale, window=window).contiguous()


@_rel_attention.register_fake
def _(q, k, v, r, r_w_bias, r_r_bias, scale, window):
    _ra.check_inputs(q, k, v, r, r_w_bias, r_r_bias, window)
    return q.new_empty(q.shape)                                                 # (B, Lq, H, D)


@torch.library.custom_op("txl_fast::rel_attention_backward", mutates_args=())
def _rel_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor,
    scale: float, window: Optional[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    def forward(*inputs):
        return _ra.rel_attention(*inputs, scale=scale, window=window)

    _, vjp = torch.func.vjp(forward, q, k, v, r, r_w_bias, r_r_bias)
    return tuple(_fresh(vjp(grad), (grad, q, k, v, r, r_w_bias, r_r_bias)))


@_rel_attention_backward.register_fake
def _(grad, q, k, v, r, r_w_bias, r_r_bias, scale, window):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, r, r_w_bias, r_r_bias))


def _rel_attention_setup(ctx, inputs, output):
    *tensors, ctx.scale, ctx.window = inputs
    ctx.save_for_backward(*tensors)


def _rel_attention_grad(ctx, grad):
    return (*_rel_attention_backward(grad, *ctx.saved_tensors, ctx.scale, ctx.window), None, None)


_rel_attention.register_autograd(_rel_attention_grad, setup_context=_rel_attention_setup)


def rel_attention(q, k, v, r, r_w_bias, r_r_bias, *, scale: float, window: Optional[int] = None) -> Tensor:
    """``txl_fast.ops.rel_attention`` through the registered operator ``txl_fast::rel_attention``."""
    return torch.ops.txl_fast.rel_attention(q, k, v, r, r_w_bias, r_r_bias, float(scale), window)


# ---- adaptive softmax ----------------------------------------------------------------------------
# A projection may be None (identity). torch's custom-op autograd cannot differentiate a
# list[Optional[Tensor]] argument that holds a None, so the operators take ``projs`` as a list of
# tensors, an empty placeholder where there is none, and ``has_proj`` saying which are real.
# The backward operators take and return the differentiable tensors as one flat list:
# hidden, weights..., biases..., projs... (placeholders included), cluster_weight, cluster_bias
# (the last two only when given). ``structure`` = (number of clusters, has_proj, has clusters).


def _flat(hidden, weights, biases, projs, cluster_weight, cluster_bias) -> list:
    flat = [hidden, *weights, *biases, *projs]
    return flat + ([cluster_weight, cluster_bias] if cluster_weight is not None else [])


def _unflat(flat: Sequence, structure: tuple) -> tuple:
    """(hidden, weights, biases, projs, cluster_weight, cluster_bias) back from the flat list."""
    n, _, has_clusters = structure
    flat = list(flat)
    hidden, weights, biases, projs = flat[0], flat[1 : 1 + n], flat[1 + n : 1 + 2 * n], flat[1 + 2 * n : 1 + 3 * n]
    cluster_weight, cluster_bias = flat[1 + 3 * n :] if has_clusters else (None, None)
    return hidden, weights, biases, projs, cluster_weight, cluster_bias


def _real(projs: Sequence[Tensor], has_proj: Sequence[bool]) -> list:
    return [p if has else None for p, has in zip(projs, has_proj)]


def _vjp(fn, grad: Tensor, flat: list, structure: tuple) -> list[Tensor]:
    """Gradients of ``fn(hidden, weights, biases, projs or None, cluster_weight, cluster_bias)`` w.r.t. ``flat``."""
    has_proj = structure[1]

    def forward(*flat):
        hidden, weights, biases, projs, cw, cb = _unflat(flat, structure)
        return fn(hidden, weights, biases, _real(projs, has_proj), cw, cb)

    _, vjp = torch.func.vjp(forward, *flat)
    return _fresh(vjp(grad), (grad, *flat))


@torch.library.custom_op("txl_fast::adaptive_nll", mutates_args=())
def _adaptive_nll(
    hidden: Tensor, target: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor],
    has_proj: list[bool], cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor],
) -> Tensor:
    projs = _real(projs, has_proj)
    return _asm.adaptive_nll(hidden, target, weights, biases, projs, cluster_weight, cluster_bias).contiguous()


@_adaptive_nll.register_fake
def _(hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias):
    _asm.check_inputs(hidden, None, weights, biases, _real(projs, has_proj), cluster_weight, cluster_bias)  # shapes
    if target.shape != (hidden.shape[0],):
        raise ValueError(f"adaptive softmax: target must be ({hidden.shape[0]},), got {tuple(target.shape)}")
    return hidden.new_empty(hidden.shape[0])                                   # (N,)


@torch.library.custom_op("txl_fast::adaptive_nll_backward", mutates_args=())
def _adaptive_nll_backward(
    grad: Tensor, target: Tensor, flat: list[Tensor], n_clusters: int, has_proj: list[bool], has_clusters: bool
) -> list[Tensor]:
    def nll(hidden, weights, biases, projs, cw, cb):
        return _asm.adaptive_nll(hidden, target, weights, biases, projs, cw, cb)

    return _vjp(nll, grad, flat, (n_clusters, has_proj, has_clusters))


@_adaptive_nll_backward.register_fake
def _(grad, target, flat, n_clusters, has_proj, has_clusters):
    return [t.new_empty(t.shape) for t in flat]


def _adaptive_nll_setup(ctx, inputs, output):
    hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias = inputs
    ctx.structure = (len(weights), list(has_proj), cluster_weight is not None)
    ctx.save_for_backward(target, *_flat(hidden, weights, biases, projs, cluster_weight, cluster_bias))


def _adaptive_nll_grad(ctx, grad):
    target, *flat = ctx.saved_tensors
    grads = _adaptive_nll_backward(grad, target, flat, *ctx.structure)
    g_hidden, g_weights, g_biases, g_projs, g_cw, g_cb = _unflat(grads, ctx.structure)
    return g_hidden, None, g_weights, g_biases, g_projs, None, g_cw, g_cb


_adaptive_nll.register_autograd(_adaptive_nll_grad, setup_context=_adaptive_nll_setup)


@torch.library.custom_op("txl_fast::adaptive_log_softmax", mutates_args=())
def _adaptive_log_softmax(
    hidden: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor], has_proj: list[bool],
    cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor],
) -> Tensor:
    projs = _real(projs, has_proj)
    return _asm.adaptive_log_softmax(hidden, weights, biases, projs, cluster_weight, cluster_bias).contiguous()


@_adaptive_log_softmax.register_fake
def _(hidden, weights, biases, projs, has_proj, cluster_weight, cluster_bias):
    _asm.check_inputs(hidden, None, weights, biases, _real(projs, has_proj), cluster_weight, cluster_bias)
    vocab = sum(w.shape[0] for w in weights)
    return hidden.new_empty(hidden.shape[0], vocab)                            # (N, V)


@torch.library.custom_op("txl_fast::adaptive_log_softmax_backward", mutates_args=())
def _adaptive_log_softmax_backward(
    grad: Tensor, flat: list[Tensor], n_clusters: int, has_proj: list[bool], has_clusters: bool
) -> list[Tensor]:
    return _vjp(_asm.adaptive_log_softmax, grad, flat, (n_clusters, has_proj, has_clusters))


@_adaptive_log_softmax_backward.register_fake
def _(grad, flat, n_clusters, has_proj, has_clusters):
    return [t.new_empty(t.shape) for t in flat]


def _adaptive_log_softmax_setup(ctx, inputs, output):
    hidden, weights, biases, projs, has_proj, cluster_weight, cluster_bias = inputs
    ctx.structure = (len(weights), list(has_proj), cluster_weight is not None)
    ctx.save_for_backward(*_flat(hidden, weights, biases, projs, cluster_weight, cluster_bias))


def _adaptive_log_softmax_grad(ctx, grad):
    grads = _adaptive_log_softmax_backward(grad, list(ctx.saved_tensors), *ctx.structure)
    g_hidden, g_weights, g_biases, g_projs, g_cw, g_cb = _unflat(grads, ctx.structure)
    return g_hidden, g_weights, g_biases, g_projs, None, g_cw, g_cb


_adaptive_log_softmax.register_autograd(_adaptive_log_softmax_grad, setup_context=_adaptive_log_softmax_setup)


def _op_projs(hidden: Tensor, projs) -> tuple[list, list]:
    """(projs with an empty placeholder for each None, has_proj)."""
    has_proj = [p is not None for p in projs]
    return [p if p is not None else hidden.new_empty(0) for p in projs], has_proj


def adaptive_nll(hidden, target, weights, biases, projs, cluster_weight=None, cluster_bias=None) -> Tensor:
    """``txl_fast.ops.adaptive_nll`` through the registered operator ``txl_fast::adaptive_nll``."""
    projs, has_proj = _op_projs(hidden, projs)
    return torch.ops.txl_fast.adaptive_nll(
        hidden, target, list(weights), list(biases), projs, has_proj, cluster_weight, cluster_bias
    )


def adaptive_log_softmax(hidden, weights, biases, projs, cluster_weight=None, cluster_bias=None) -> Tensor:
    """``txl_fast.ops.adaptive_log_softmax`` through the registered operator ``txl_fast::adaptive_log_softmax``."""
    projs, has_proj = _op_projs(hidden, projs)
    return torch.ops.txl_fast.adaptive_log_softmax(
        hidden, list(weights), list(biases), projs, has_proj, cluster_weight, cluster_bias
    )
