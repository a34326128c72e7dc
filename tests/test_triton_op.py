"""The triton_ops of ``txl_fast.ops.triton_ops`` (what torch.compile records on the triton backend), on the CPU.

- Eager, kernels in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), float64:
  ``txl_fast::rel_attention_triton`` (tiled and decode paths) and ``txl_fast::adaptive_nll_triton``
  / ``adaptive_log_softmax_triton`` against ``txl_fast.naive``, the output and the gradient of
  every input, through the ops' ``traced`` paths (what the public ops call when compiled), which
  must route to them on the triton backend.
- ``torch.compile(fullgraph=True, backend="aot_eager")`` of a function calling the three public ops, with
  backward: 0 graph breaks, the triton_ops in the graph, results equal to eager. With interpreted
  kernels AOTAutograd cannot trace into a triton_op's body (``wrap_triton`` returns an interpreted
  kernel unchanged, and it cannot run on data-less tensors), so this compile keeps the triton_ops
  whole (``decompose_custom_triton_ops=False``, as ``torch.export`` does): it checks Dynamo, the
  fake implementations and the registered autograd, not the decomposition.
- The decomposition, in a subprocess without the interpreter and with triton's active driver
  replaced by a stub that only names a target (sm_90), since this machine has no GPU: AOTAutograd
  traces the forward and backward graphs of each triton_op into one
  ``triton_kernel_wrapper_functional`` node per kernel launch, and torch's analysis of each kernel
  finds that it writes only the buffers allocated for it. Nothing is launched there: the graphs
  are captured and replaced by zero-filled outputs.
- ``torch.library.opcheck`` of each triton_op (schema, fake implementation, autograd
  registration, AOT dispatch with dynamic shapes; decomposition off, as above).

Not covered, for want of a GPU: Inductor compiling, scheduling and running the kernel nodes.
Every comparison is a relative error within ``tests.helpers.TOLERANCE`` for float64 (1e-10).
"""
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_rel_close
from txl_fast import backend, naive, ops, use_backend
from txl_fast.ops import library, triton_ops  # noqa: F401 (triton_ops: registers them)

pytestmark = pytest.mark.skipif(not backend.triton_interpreter(), reason="needs TRITON_INTERPRET=1 before triton import")
K = pytest.importorskip("txl_fast.kernels.rel_attention")
ra = importlib.import_module("txl_fast.ops.rel_attention")      # the modules, not the re-exported functions
asm = importlib.import_module("txl_fast.ops.adaptive_softmax")
CAUSAL = (True, None, None, "uniform")                          # causal, context, key_lengths, empty_rows

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
B, LQ, MEM, H, D = 2, 7, 6, 2, 16                    # Lk 13
LK, DM = LQ + MEM, H * D
NO_DECOMPOSITION = torch._functorch.config.patch(decompose_custom_triton_ops=False)


def randn(g, *shape):
    return (0.5 * torch.randn(*shape, generator=g, dtype=F64)).requires_grad_()


def attention_inputs(seed=0):
    """q (B, Lq, H, D), k, v (B, Lk, H, D), r (Lk, H, D), r_w_bias, r_r_bias (H, D)."""
    g = torch.Generator().manual_seed(seed)
    return [randn(g, B, LQ, H, D), randn(g, B, LK, H, D), randn(g, B, LK, H, D), randn(g, LK, H, D),
            randn(g, H, D), randn(g, H, D)]


def softmax_inputs(n_rows=11, seed=1):
    """Three clusters (20 head words + 2 cluster logits, tails of 30 and 13 words), the head without
    a projection, d_proj 32; targets in every cluster and two ignored rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = randn(g, n_rows, DM)
    weights = [randn(g, 20, DM), randn(g, 30, 8), randn(g, 13, 4)]
    biases = [randn(g, 20), randn(g, 30), randn(g, 13)]
    projs = [None, randn(g, DM, 8), randn(g, DM, 4)]
    cw, cb = randn(g, 2, DM), randn(g, 2)
    target = torch.tensor([1, 25, -100, 55, 3, 40, 21, 0, -100, 62, 19, 7, 44, 50][:n_rows])
    return hidden, target, weights, biases, projs, cw, cb


def params_of(weights, biases, projs, cw, cb):
    return [*weights, *biases, *[p for p in projs if p is not None], cw, cb]


@pytest.fixture(params=["tiled", "decode"])
def path(request, monkeypatch):
    """Lq 7 takes the decode (split over keys) path; DECODE_MAX_LQ 0 forces the tiled one."""
    monkeypatch.setattr(K, "DECODE_MAX_LQ", 16 if request.param == "decode" else 0)
    return request.param


@pytest.mark.parametrize("window", [None, 9])
def test_rel_attention_triton_op_equals_naive(path, window):
    inputs = attention_inputs()
    with use_backend("triton"):
        out = ra.traced(*inputs, 0.25, window, 0, True, None, None, None, "uniform", None, None, None)
        functional = ops.rel_attention(*inputs, scale=0.25, window=window)
    assert "rel_attention_triton" in type(out.grad_fn).__name__, "the traced path did not route to the triton_op"
    assert torch.equal(out, functional), "the triton_op and the autograd Function run the same launches"
    with torch.no_grad():
        _, m, l = torch.ops.txl_fast.rel_attention_triton(*inputs, 0.25, window, *CAUSAL)
    assert m.shape == l.shape == (B, H, LQ) and m.dtype == l.dtype == F64     # the row statistics
    dout = torch.randn(B, LQ, H, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    grads = torch.autograd.grad(out, inputs, dout)
    ref = naive.rel_attention(*inputs, 0.25, window)[0]
    ref_grads = torch.autograd.grad(ref, inputs, dout)
    assert_rel_close(out, ref, F64, "out")
    for name, g, rg in zip(("q", "k", "v", "r", "r_w_bias", "r_r_bias"), grads, ref_grads):
        assert_rel_close(g, rg, F64, f"d{name}")


def check_softmax_ops(hidden, target, weights, biases, projs, cw, cb, leaves):
    """NLL and log-probs through the traced paths (which must pick the triton_ops) vs naive, values
    and the gradients of ``leaves``."""
    with use_backend("triton"):
        nll = asm.traced_nll(hidden, target, weights, biases, projs, cw, cb)
        logp = asm.traced_log_softmax(hidden, weights, biases, projs, cw, cb)
    assert "adaptive_nll_triton" in type(nll.grad_fn).__name__
    assert "adaptive_log_softmax_triton" in type(logp.grad_fn).__name__
    ref_nll = naive.adaptive_nll(hidden, target, weights, biases, projs, cw, cb)
    ref_logp = naive.adaptive_log_softmax(hidden, weights, biases, projs, cw, cb)
    g = torch.Generator().manual_seed(3)
    for got, ref, what in ((nll, ref_nll, "nll"), (logp, ref_logp, "log-probs")):
        assert_rel_close(got, ref, F64, what)
        upstream = torch.randn(got.shape, generator=g, dtype=F64)
        grads = torch.autograd.grad(got, leaves, upstream)
        ref_grads = torch.autograd.grad(ref, leaves, upstream)
        for k, (a, b) in enumerate(zip(grads, ref_grads)):
            assert_rel_close(a, b, F64, f"{what}: gradient of leaf {k}")


def test_adaptive_softmax_triton_ops_equal_naive():
    """Gradients of hidden, every weight, bias and projection, cluster weight and bias."""
    hidden, target, weights, biases, projs, cw, cb = softmax_inputs()
    check_softmax_ops(hidden, target, weights, biases, projs, cw, cb,
                      [hidden, *params_of(weights, biases, projs, cw, cb)])


def test_adaptive_nll_triton_op_empty_cluster_and_some_gradients():
    """No target in the last tail (an empty span), and only hidden and one tail weight need a
    gradient (the backward operator returns placeholders for the rest)."""
    hidden, target, weights, biases, projs, cw, cb = softmax_inputs()
    target = target.masked_fill(target >= 50, 7)
    for t in params_of(weights, biases, projs, cw, cb):
        t.requires_grad_(t is weights[1])
    check_softmax_ops(hidden, target, weights, biases, projs, cw, cb, [hidden, weights[1]])


def test_fullgraph_compile_no_graph_breaks_equal_results():
    attn = attention_inputs()
    _, target, weights, biases, projs, cw, cb = softmax_inputs(B * LQ)
    params = [*attn, *params_of(weights, biases, projs, cw, cb)]

    def fn(q, k, v, r, u, w):
        out = ops.rel_attention(q, k, v, r, u, w, scale=0.25, window=9)         # (B, Lq, H, D)
        hidden = out.reshape(B * LQ, DM)                                          # (N, d_proj)
        nll = ops.adaptive_nll(hidden, target, weights, biases, projs, cw, cb)
        logp = ops.adaptive_log_softmax(hidden, weights, biases, projs, cw, cb)
        return nll.sum() + logp.logsumexp(-1).sum()

    with use_backend("triton"), NO_DECOMPOSITION:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*attn)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        targets = {str(n.target) for n in explained.graphs[0].graph.nodes}
        assert {"txl_fast.rel_attention_triton", "txl_fast.adaptive_nll_triton",
                "txl_fast.adaptive_log_softmax_triton"} <= targets, targets
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*attn)
        got_grads = torch.autograd.grad(got, params)
        assert not torch._dynamo.utils.counters["graph_break"]
        ref = fn(*attn)
        ref_grads = torch.autograd.grad(ref, params)
    torch._dynamo.reset()
    assert_rel_close(got, ref, F64, "loss")
    for k, (g, r) in enumerate(zip(got_grads, ref_grads)):
        assert_rel_close(g, r, F64, f"gradient {k}")


def test_opcheck_triton_ops():
    attn = attention_inputs()
    hidden, target, weights, biases, projs, cw, cb = softmax_inputs()
    op_projs, has_proj = library.op_projs(hidden, projs)
    with NO_DECOMPOSITION:
        torch.library.opcheck(torch.ops.txl_fast.rel_attention_triton.default, (*attn, 0.25, 9, *CAUSAL))
        torch.library.opcheck(torch.ops.txl_fast.rel_attention_triton.default,
                              (*attn, 0.25, None, True, None, torch.tensor([LK, 5], dtype=torch.int32), "zero"))
        torch.library.opcheck(torch.ops.txl_fast.adaptive_nll_triton.default,
                              (hidden, target, weights, biases, op_projs, has_proj, cw, cb))
        torch.library.opcheck(torch.ops.txl_fast.adaptive_log_softmax_triton.default,
                              (hidden, weights, biases, op_projs, has_proj, cw, cb))


DECOMPOSE = textwrap.dedent(
    """
    import json, warnings
    warnings.filterwarnings("ignore")
    import torch, triton
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget

    class TargetOnly:                          # no GPU here: the kernel analysis only needs a target
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(TargetOnly())
    from txl_fast.ops import library, triton_ops  # noqa: F401 (triton_ops: registers them)

    graphs = {}

    def capture(kind):
        def compiler(gm, example_inputs):
            outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            graphs[kind] = [[kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__,
                             sorted(n.kwargs["tensors_to_clone"])]
                            if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional else [str(n.target)]
                            for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional
                            or str(n.target).startswith("txl_fast.")]

            def run(*args):                    # launch nothing: zeros of the traced outputs' layout
                return [None if o is None else torch.empty_strided(o.meta["val"].shape, o.meta["val"].stride(),
                                                                   dtype=o.meta["val"].dtype).zero_() for o in outs]
            return make_boxed_func(run)
        return compiler

    def trace(fn, *args):
        graphs.clear()
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture("fw"), bw_compiler=capture("bw")),
                                 fullgraph=True)
        compiled(*args).backward()
        return dict(graphs)

    def t(*shape):
        return (0.3 * torch.randn(*shape, dtype=torch.float16)).requires_grad_()

    from txl_fast.kernels import rel_attention as K
    report = {}
    underfill = K.UNDERFILL_PROGRAMS
    # the tiled path (underfill check off), the split path (4 programs underfill a GPU), decode
    for name, lq, mem, K.UNDERFILL_PROGRAMS in (("Lq 37", 37, 6, 0), ("Lq 37 split", 37, 6, underfill),
                                                ("Lq 3", 3, 20, underfill)):
        attn = [t(2, lq, 2, 16), t(2, lq + mem, 2, 16), t(2, lq + mem, 2, 16), t(lq + mem, 2, 16), t(2, 16), t(2, 16)]
        report[f"rel_attention {name}"] = trace(
            lambda *a: torch.ops.txl_fast.rel_attention_triton(*a, 0.25, 7, True, None, None, "uniform")[0]
            .float().square().sum(), *attn)
    hidden = t(10, 32)
    weights, biases, projs, cw, cb = [t(20, 32), t(30, 8)], [t(20), t(30)], [None, t(32, 8)], t(1, 32), t(1)
    op_projs, has_proj = library.op_projs(hidden, projs)
    target = torch.tensor([1, 25, -100, 45, 3, 40, 21, 0, 2, 33])
    report["adaptive_nll"] = trace(lambda h: torch.ops.txl_fast.adaptive_nll_triton(
        h, target, weights, biases, op_projs, has_proj, cw, cb)[0].float().sum(), hidden)
    report["adaptive_log_softmax"] = trace(lambda h: torch.ops.txl_fast.adaptive_log_softmax_triton(
        h, weights, biases, op_projs, has_proj, cw, cb).float().exp().sum(), hidden)
    print(json.dumps(report))
    """
)

# per op: forward and backward graphs, each kernel launch as (kernel, buffers it writes), and any
# operator of ours left whole (the log-prob backward, a custom op: its kernels have no backward)
EXPECTED = {
    "rel_attention Lq 37": {"fw": [["_fwd_kernel", ["L", "M", "O"]]],
                            "bw": [["_bwd_delta_kernel", ["DELTA"]], ["_bwd_dq_kernel", ["DCB_PART", "DPB_PART", "DQ"]],
                                   ["_bwd_dkdv_kernel", ["DK", "DR", "DV"]]]},
    "rel_attention Lq 37 split": {"fw": [["_fwd_kernel", ["AP", "LP", "MP"]], ["_fwd_combine_kernel", ["L", "M", "O"]]],
                                  "bw": [["_bwd_delta_kernel", ["DELTA"]], ["_bwd_dq_kernel", ["DCB_PART", "DPB_PART", "DQ"]],
                                         ["_bwd_dkdv_kernel", ["DK", "DR", "DV"]]]},
    "rel_attention Lq 3": {"fw": [["_fwd_kernel", ["AP", "LP", "MP"]], ["_fwd_combine_kernel", ["L", "M", "O"]]],
                           "bw": [["_bwd_delta_kernel", ["DELTA"]], ["_bwd_dq_kernel", ["DCB_PART", "DPB_PART", "DQ"]],
                                  ["_bwd_dkdv_kernel", ["DK", "DR", "DV"]]]},
    "adaptive_nll": {"fw": [["_lse_fwd_kernel", ["LSE_PART", "PICK"]]] * 2,
                     "bw": [["_bwd_dw_kernel", ["DB", "DB2", "DW", "DW2"]], ["_bwd_dh_kernel", ["DH"]],
                            ["_bwd_dw_kernel", ["DB", "DW"]], ["_bwd_dh_kernel", ["DH"]]]},
    "adaptive_log_softmax": {"fw": [["_lse_fwd_kernel", ["LSE_PART"]], ["_logprob_kernel", ["OUT"]]] * 2,
                             "bw": [["txl_fast.adaptive_log_softmax_backward.default"]]},
}


@pytest.mark.slow
def test_triton_ops_decompose_into_kernel_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", DECOMPOSE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == EXPECTED
