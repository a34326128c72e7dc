"""txl_fast's ops as PyTorch operators, so ``torch.compile`` traces through them.

The wrappers below (``rel_attention``, ``adaptive_nll``, ``adaptive_log_softmax``) take the same
arguments as the functional API (``txl_fast.ops``) and pick the operators by the backend the
inputs resolve to (``txl_fast.backend.resolve``): at every call in eager mode; under
``torch.compile`` once, when the caller is traced (the backend is a ContextVar, which Dynamo
cannot trace or guard on), so a compiled function keeps the backend it was traced with.

triton — ``torch.library.triton_op``s, whose bodies launch the fused kernels of
``txl_fast.kernels`` through ``torch.library.wrap_triton``, so that AOTAutograd traces into them
and the graph holds one ``triton_kernel_wrapper_functional`` node per launch, which Inductor
schedules like its own kernels (``torch.export`` keeps them as the operators instead):

    torch.ops.txl_fast.rel_attention_triton(q, k, v, r, r_w_bias, r_r_bias, scale, window)
        -> out (B, Lq, H, D), m (B, H, Lq), l (B, H, Lq)          m, l: the softmax row statistics
    torch.ops.txl_fast.rel_attention_triton_backward(grad, q, k, v, r, r_w_bias, r_r_bias, out, m, l,
        scale, window) -> dq, dk, dv, dr, dr_w_bias, dr_r_bias
    torch.ops.txl_fast.adaptive_nll_triton(hidden, target, weights, biases, projs, has_proj,
        cluster_weight, cluster_bias) -> nll (N,), lse (n_clusters, N)
    torch.ops.txl_fast.adaptive_nll_triton_backward(grad, hidden, target, weights, biases, projs, has_proj,
        cluster_weight, cluster_bias, lse, needs) -> flat gradients (see ``_flat``)
    torch.ops.txl_fast.adaptive_log_softmax_triton(hidden, weights, biases, projs, has_proj,
        cluster_weight, cluster_bias) -> (N, V)

The forwards return the statistics their backward needs (m and l; the per-cluster log-sum-exp),
autograd saves them, and the backward operators launch the fused backward kernels from them:
nothing is recomputed through ``torch.func.vjp``. Every tensor a kernel writes is allocated inside
the operator; no operator mutates its inputs. The launch code is the one the autograd Functions
of ``txl_fast.ops`` use (their launchers take ``launch``: the kernel itself there,
``wrap_triton`` here). The log-prob path has a triton_op forward only: its fused kernels have no
backward, so its gradient is the custom operator ``adaptive_log_softmax_backward`` below, which
differentiates the torch path (as ``txl_fast.ops.adaptive_softmax._TritonLogSoftmax`` does).

Each triton_op also has a registered fake implementation (shapes only, with the functional API's
shape checks): torch would otherwise use the body as its fake implementation, which cannot work
under ``TRITON_INTERPRET=1``, where ``wrap_triton`` returns the interpreted kernel unchanged and
tracing would run it on data-less tensors. For the same reason, with interpreted kernels (the
CPU tests) a ``torch.compile`` must keep the triton_ops whole:
``torch._functorch.config.patch(decompose_custom_triton_ops=False)``.

naive / torch — ``torch.library.custom_op``s, opaque to the compiler:

    torch.ops.txl_fast.rel_attention(q, k, v, r, r_w_bias, r_r_bias, scale, window) -> out (B, Lq, H, D)
    torch.ops.txl_fast.adaptive_nll(hidden, target, weights, biases, projs, has_proj, cluster_weight,
                                    cluster_bias) -> (N,)
    torch.ops.txl_fast.adaptive_log_softmax(hidden, weights, biases, projs, has_proj, cluster_weight,
                                            cluster_bias) -> (N, V)

Dynamo records one node each; the fake implementation gives the output's shape, dtype and device
(running the functional API's shape checks, so a bad shape fails at trace time), and autograd is
registered with a backward that is itself a custom operator, so AOTAutograd traces forward and
backward without graph breaks. The real implementation calls the functional API, which
dispatches on the backend when it runs; the backward recomputes the forward with
``torch.func.vjp`` (same backend) and differentiates it (autograd is switched off inside an
operator's implementation; functorch's transforms are not).

(``projs`` a list of tensors with an empty placeholder where the functional API takes None;
``has_proj`` says which are real.) Shapes and maths: ``txl_fast.ops.rel_attention`` /
``txl_fast.ops.adaptive_softmax``. Outputs are contiguous, as the fake implementations promise.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.library import wrap_triton

from txl_fast import backend

# the modules, not the functions of the same name that txl_fast.ops re-exports
_ra = importlib.import_module("txl_fast.ops.rel_attention")
_asm = importlib.import_module("txl_fast.ops.adaptive_softmax")


def _kernels(name: str):
    """``txl_fast.kernels.<name>``, imported on first launch (it imports triton)."""
    return importlib.import_module(f"txl_fast.kernels.{name}")


@torch.compiler.assume_constant_result
def _active_backend() -> str:
    """``txl_fast.backend.get_backend()``. Dynamo cannot trace the ContextVar behind it: it calls
    this when it traces the caller and keeps the result as a constant, without a guard."""
    return backend.get_backend()


def _on_triton(t: Tensor) -> bool:
    return backend.resolve(t, _active_backend()) == "triton"


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


@torch.library.triton_op("txl_fast::rel_attention_triton", mutates_args=())
def _rel_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, scale: float, window: Optional[int]
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels("rel_attention").forward(q, k, v, r, r_w_bias, r_r_bias, scale, window, launch=wrap_triton)


@_rel_attention_triton.register_fake
def _(q, k, v, r, r_w_bias, r_r_bias, scale, window):
    _ra.check_inputs(q, k, v, r, r_w_bias, r_r_bias, window)
    B, Lq, H, _ = q.shape
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    # out (B, Lq, H, D); m, l (B, H, Lq) in the accumulation dtype
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=stat), q.new_empty((B, H, Lq), dtype=stat)


@torch.library.triton_op("txl_fast::rel_attention_triton_backward", mutates_args=())
def _rel_attention_triton_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor,
    out: Tensor, m: Tensor, l: Tensor, scale: float, window: Optional[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels("rel_attention").backward(grad, q, k, v, r, r_w_bias, r_r_bias, out, m, l, scale, window,
                                               launch=wrap_triton)


@_rel_attention_triton_backward.register_fake
def _(grad, q, k, v, r, r_w_bias, r_r_bias, out, m, l, scale, window):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, r, r_w_bias, r_r_bias))


def _rel_attention_triton_setup(ctx, inputs, output):
    *tensors, ctx.scale, ctx.window = inputs
    out, m, l = output
    ctx.mark_non_differentiable(m, l)
    ctx.save_for_backward(*tensors, out, m, l)


def _rel_attention_triton_grad(ctx, grad, _grad_m, _grad_l):
    grads = torch.ops.txl_fast.rel_attention_triton_backward(grad, *ctx.saved_tensors, ctx.scale, ctx.window)
    return (*grads, None, None)


_rel_attention_triton.register_autograd(_rel_attention_triton_grad, setup_context=_rel_attention_triton_setup)


def rel_attention(q, k, v, r, r_w_bias, r_r_bias, *, scale: float, window: Optional[int] = None,
                  uniform_keys: int = 0) -> Tensor:
    """``txl_fast.ops.rel_attention`` through ``txl_fast::rel_attention_triton`` on the triton
    backend, through ``txl_fast::rel_attention`` otherwise. ``uniform_keys`` is checked, then left
    unused: the operators compute the same result without the promise."""
    _ra.check_inputs(q, k, v, r, r_w_bias, r_r_bias, window, uniform_keys)
    if _on_triton(q):
        r = _ra.full_positions(r, k.shape[1])          # the kernels take a row for every distance
        return torch.ops.txl_fast.rel_attention_triton(q, k, v, r, r_w_bias, r_r_bias, float(scale), window)[0]
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
def _adaptive_nll_fake(hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias):
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
def _adaptive_log_softmax_fake(hidden, weights, biases, projs, has_proj, cluster_weight, cluster_bias):
    _asm.check_inputs(hidden, None, weights, biases, _real(projs, has_proj), cluster_weight, cluster_bias)
    vocab = sum(w.shape[0] for w in weights)
    return hidden.new_empty(hidden.shape[0], vocab)                            # (N, V)


@torch.library.custom_op("txl_fast::adaptive_log_softmax_backward", mutates_args=())
def _adaptive_log_softmax_backward(
    grad: Tensor, flat: list[Tensor], n_clusters: int, has_proj: list[bool], has_clusters: bool
) -> list[Tensor]:
    # the fused log-prob kernels have no backward: on the triton backend the torch path is
    # differentiated, as txl_fast.ops.adaptive_softmax._TritonLogSoftmax does
    fn = _asm.torch_log_softmax if _on_triton(flat[0]) else _asm.adaptive_log_softmax
    return _vjp(fn, grad, flat, (n_clusters, has_proj, has_clusters))


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


# ---- adaptive softmax on the triton backend: triton_ops ------------------------------------------
# The NLL backward operator takes ``needs``, one bool per entry of the flat list (a projection
# placeholder never needs one), and returns the flat list of gradients with an empty placeholder
# wherever none is needed.


def _flat_grads(flat: Sequence[Tensor], grads: Sequence, needs: Sequence[bool]) -> list[Tensor]:
    return [g if need else t.new_empty(0) for t, g, need in zip(flat, grads, needs)]


@torch.library.triton_op("txl_fast::adaptive_nll_triton", mutates_args=())
def _adaptive_nll_triton(
    hidden: Tensor, target: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor],
    has_proj: list[bool], cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    return _kernels("adaptive_softmax").nll_forward(
        hidden, target, weights, biases, _real(projs, has_proj), cluster_weight, cluster_bias, launch=wrap_triton)


@_adaptive_nll_triton.register_fake
def _(hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias):
    nll = _adaptive_nll_fake(hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias)
    stat = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return nll, hidden.new_empty((len(weights), hidden.shape[0]), dtype=stat)  # (N,), lse (n_clusters, N)


@torch.library.triton_op("txl_fast::adaptive_nll_triton_backward", mutates_args=())
def _adaptive_nll_triton_backward(
    grad: Tensor, hidden: Tensor, target: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor],
    has_proj: list[bool], cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor], lse: Tensor,
    needs: list[bool],
) -> list[Tensor]:
    structure = (len(weights), has_proj, cluster_weight is not None)
    need_h, need_w, need_b, need_p, need_cw, need_cb = _unflat(needs, structure)
    dhidden, dw, db, dp, dcw, dcb = _kernels("adaptive_softmax").nll_backward(
        grad, hidden, target, weights, biases, _real(projs, has_proj), cluster_weight, cluster_bias, lse,
        dict(hidden=need_h, weights=need_w, biases=need_b, projs=need_p, cluster=bool(need_cw or need_cb)),
        launch=wrap_triton)
    grads = [dhidden, *dw, *db, *dp] + ([dcw, dcb] if cluster_weight is not None else [])
    return _flat_grads(_flat(hidden, weights, biases, projs, cluster_weight, cluster_bias), grads, needs)


@_adaptive_nll_triton_backward.register_fake
def _(grad, hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias, lse, needs):
    flat = _flat(hidden, weights, biases, projs, cluster_weight, cluster_bias)
    return _flat_grads(flat, [t.new_empty(t.shape) for t in flat], needs)


def _adaptive_nll_triton_setup(ctx, inputs, output):
    hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.structure = (len(weights), list(has_proj), cluster_weight is not None)
    ctx.save_for_backward(hidden, target, cluster_weight, cluster_bias, output[1], *weights, *biases, *projs)


def _adaptive_nll_triton_grad(ctx, grad, _grad_lse):
    n, has_proj, has_clusters = ctx.structure
    hidden, target, cluster_weight, cluster_bias, lse, *params = ctx.saved_tensors
    weights, biases, projs = params[:n], params[n: 2 * n], params[2 * n:]
    need = ctx.needs_input_grad                    # (hidden, target, [weights], [biases], [projs], has_proj, cw, cb)
    needs = [need[0], *need[2], *need[3], *(p and has for p, has in zip(need[4], has_proj))]
    needs += [need[6], need[7]] if has_clusters else []
    grads = torch.ops.txl_fast.adaptive_nll_triton_backward(
        grad, hidden, target, weights, biases, projs, has_proj, cluster_weight, cluster_bias, lse, needs)
    g_hidden, g_weights, g_biases, g_projs, g_cw, g_cb = _unflat(
        [g if need else None for g, need in zip(grads, needs)], ctx.structure)
    return g_hidden, None, g_weights, g_biases, g_projs, None, g_cw, g_cb


_adaptive_nll_triton.register_autograd(_adaptive_nll_triton_grad, setup_context=_adaptive_nll_triton_setup)


@torch.library.triton_op("txl_fast::adaptive_log_softmax_triton", mutates_args=())
def _adaptive_log_softmax_triton(
    hidden: Tensor, weights: list[Tensor], biases: list[Tensor], projs: list[Tensor], has_proj: list[bool],
    cluster_weight: Optional[Tensor], cluster_bias: Optional[Tensor],
) -> Tensor:
    return _kernels("adaptive_softmax").log_softmax(
        hidden, weights, biases, _real(projs, has_proj), cluster_weight, cluster_bias, launch=wrap_triton)


_adaptive_log_softmax_triton.register_fake(_adaptive_log_softmax_fake)
_adaptive_log_softmax_triton.register_autograd(_adaptive_log_softmax_grad, setup_context=_adaptive_log_softmax_setup)


def _op_projs(hidden: Tensor, projs) -> tuple[list, list]:
    """(projs with an empty placeholder for each None, has_proj)."""
    has_proj = [p is not None for p in projs]
    return [p if p is not None else hidden.new_empty(0) for p in projs], has_proj


def adaptive_nll(hidden, target, weights, biases, projs, cluster_weight=None, cluster_bias=None) -> Tensor:
    """``txl_fast.ops.adaptive_nll`` through ``txl_fast::adaptive_nll_triton`` on the triton
    backend, through ``txl_fast::adaptive_nll`` otherwise."""
    op_projs, has_proj = _op_projs(hidden, projs)
    args = (hidden, target, list(weights), list(biases), op_projs, has_proj, cluster_weight, cluster_bias)
    if _on_triton(hidden):
        _asm.check_inputs(hidden, target, weights, biases, projs, cluster_weight, cluster_bias)
        return torch.ops.txl_fast.adaptive_nll_triton(*args)[0]
    return torch.ops.txl_fast.adaptive_nll(*args)


def adaptive_log_softmax(hidden, weights, biases, projs, cluster_weight=None, cluster_bias=None) -> Tensor:
    """``txl_fast.ops.adaptive_log_softmax`` through ``txl_fast::adaptive_log_softmax_triton`` on the
    triton backend, through ``txl_fast::adaptive_log_softmax`` otherwise."""
    op_projs, has_proj = _op_projs(hidden, projs)
    args = (hidden, list(weights), list(biases), op_projs, has_proj, cluster_weight, cluster_bias)
    if _on_triton(hidden):
        _asm.check_inputs(hidden, None, weights, biases, projs, cluster_weight, cluster_bias)
        return torch.ops.txl_fast.adaptive_log_softmax_triton(*args)
    return torch.ops.txl_fast.adaptive_log_softmax(*args)
