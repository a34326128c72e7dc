"""What txl_fast's registered operators share: their outputs' contract and the adaptive softmax's
list plumbing.

Each op file registers its operator (``torch.ops.txl_fast.<op>``, a ``torch.library.custom_op``
with the public function's full signature) beside the public function that calls it under
``torch.compile``; ``txl_fast.ops.triton_ops`` holds the triton backend's ``triton_op``s.
docs/drop-in.md ("torch.compile") has the design.

A projection may be None (identity). torch's custom-op autograd cannot differentiate a
list[Optional[Tensor]] argument that holds a None, so the adaptive softmax's operators take
``projs`` as a list of tensors, an empty placeholder where there is none, and ``has_proj`` saying
which are real. Their backward operators take and return the differentiable tensors as one flat
list: hidden, weights..., biases..., projs... (placeholders included), cluster_weight, cluster_bias
(the last two only when given). ``structure`` = (number of clusters, has_proj, has clusters).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def fresh(outputs, inputs) -> list[Tensor]:
    """Contiguous outputs sharing memory with no input and no other output (an operator's contract)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    result = []
    for t in outputs:
        if t.untyped_storage().data_ptr() in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        result.append(t)
    return result


def op_projs(hidden: Tensor, projs) -> tuple[list, list]:
    """(projs with an empty placeholder for each None, has_proj)."""
    has_proj = [p is not None for p in projs]
    return [p if p is not None else hidden.new_empty(0) for p in projs], has_proj


def real(projs: Sequence[Tensor], has_proj: Sequence[bool]) -> list:
    """The projections back, None for the placeholders."""
    return [p if has else None for p, has in zip(projs, has_proj)]


def flat(hidden, weights, biases, projs, cluster_weight, cluster_bias) -> list:
    flat_list = [hidden, *weights, *biases, *projs]
    return flat_list + ([cluster_weight, cluster_bias] if cluster_weight is not None else [])


def unflat(flat_list: Sequence, structure: tuple) -> tuple:
    """(hidden, weights, biases, projs, cluster_weight, cluster_bias) back from the flat list."""
    n, _, has_clusters = structure
    flat_list = list(flat_list)
    hidden, weights, biases, projs = (flat_list[0], flat_list[1 : 1 + n], flat_list[1 + n : 1 + 2 * n],
                                      flat_list[1 + 2 * n : 1 + 3 * n])
    cluster_weight, cluster_bias = flat_list[1 + 3 * n :] if has_clusters else (None, None)
    return hidden, weights, biases, projs, cluster_weight, cluster_bias


def vjp(fn, grad: Tensor, flat_list: list, structure: tuple) -> list[Tensor]:
    """Gradients of ``fn(hidden, weights, biases, projs or None, cluster_weight, cluster_bias)`` w.r.t. ``flat_list``
    (``torch.func.vjp``: autograd is off inside an operator's implementation; functorch's transforms are not)."""
    has_proj = structure[1]

    def forward(*leaves):
        hidden, weights, biases, projs, cw, cb = unflat(leaves, structure)
        return fn(hidden, weights, biases, real(projs, has_proj), cw, cb)

    _, pullback = torch.func.vjp(forward, *flat_list)
    return fresh(pullback(grad), (grad, *flat_list))


# ---- the adaptive log-softmax's fake and autograd, shared by its operator and its triton_op -------


def log_softmax_fake(hidden, weights, biases, projs, has_proj, cluster_weight, cluster_bias):
    return hidden.new_empty(hidden.shape[0], sum(w.shape[0] for w in weights))      # (N, V)


def log_softmax_setup(ctx, inputs, output):
    hidden, weights, biases, projs, has_proj, cluster_weight, cluster_bias = inputs
    ctx.structure = (len(weights), list(has_proj), cluster_weight is not None)
    ctx.save_for_backward(*flat(hidden, weights, biases, projs, cluster_weight, cluster_bias))


def log_softmax_grad(ctx, grad):
    """Through ``txl_fast::adaptive_log_softmax_backward`` (``txl_fast.ops.adaptive_softmax``)."""
    grads = torch.ops.txl_fast.adaptive_log_softmax_backward(grad, list(ctx.saved_tensors), *ctx.structure)
    g_hidden, g_weights, g_biases, g_projs, g_cw, g_cb = unflat(grads, ctx.structure)
    return g_hidden, g_weights, g_biases, g_projs, None, g_cw, g_cb
