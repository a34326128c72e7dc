"""Model level: the triton backend (kernels in the interpreter) equals the torch backend in fp32.

Both fused ops run inside a real model over three segments with memory, with labels (loss path)
and without (log-prob path), and the gradients of every parameter agree in training mode.
"""
import pytest
import torch

from tests.helpers import our_model, rel_err
from txl_fast import use_backend

pytest.importorskip("triton")
ATOL = 1e-5


def small_model(name, seed=0):
    return our_model(name, torch.float32, seed)


def run(model, segments, labels):
    mems, outs = None, []
    for ids in segments:
        out = model(ids, mems=mems, labels=ids if labels and ids.shape[1] > 1 else None)
        mems = out.mems
        outs.append(out)
    return outs


@pytest.mark.parametrize("name", ["default", "no_same_length", "div_val_1_d_embed", "no_cutoffs"])
def test_triton_backend_equals_torch_over_three_segments(name):
    model = small_model(name)
    g = torch.Generator().manual_seed(3)
    segments = [torch.randint(0, 97, (2, L), generator=g) for L in (5, 9, 1)]   # 9 > mem_len, 1 = decode path
    for labels in (True, False):
        with torch.no_grad(), use_backend("torch"):
            ref = run(model, segments, labels)
        with torch.no_grad(), use_backend("triton"):
            out = run(model, segments, labels)
        for r, o in zip(ref, out):
            for a, b in zip(r.mems, o.mems):
                assert (a - b).abs().max() <= ATOL
            if r.losses is not None:
                assert (r.losses - o.losses).abs().max() <= ATOL and (r.loss - o.loss).abs() <= ATOL
            else:
                assert (r.prediction_scores - o.prediction_scores).abs().max() <= ATOL


def test_triton_backend_gradients_equal_torch():
    g = torch.Generator().manual_seed(4)
    segments = [torch.randint(0, 97, (2, L), generator=g) for L in (5, 7)]
    grads = {}
    for backend in ("torch", "triton"):
        model = small_model("default").train()
        with use_backend(backend):
            sum(o.loss for o in run(model, segments, labels=True)).backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    for n, ref in grads["torch"].items():
        assert rel_err(grads["triton"][n], ref) <= 1e-5, n
