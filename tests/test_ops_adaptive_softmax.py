"""The Triton adaptive softmax (``kernels/adaptive_softmax.py``) against ``txl_fast.naive`` in float64.

Runs in the Triton interpreter on CPU tensors (``tests/conftest.py`` sets TRITON_INTERPRET=1),
where every tile is 16 x 32 (16 x 16 for dh): the small shapes below still take several row tiles,
vocabulary tiles, vocabulary splits, K chunks and d chunks, none of them full.

Every test runs with poisoned buffers: each buffer a kernel writes is the NaN-filled interior of
a larger NaN buffer (``poisoned_buffers``), so an element left unwritten shows up as NaN in the
results and a write outside the buffer shows up as a non-NaN canary after the test. Inputs are
views into larger NaN-filled buffers too: an unmasked read pulls NaN into the results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import GridExecutor

from tests.helpers import assert_rel_close
from txl_fast import naive
from txl_fast.backend import use_backend
from txl_fast.kernels import adaptive_softmax as kernels
from txl_fast.ops import adaptive_softmax as ops

PAD = 7                              # canary elements on each side of a kernel-written buffer
DTYPES = [torch.float64, torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    made = []

    def empty(shape, dtype, device):
        numel = math.prod(shape)
        big = torch.full((numel + 2 * PAD,), float("nan"), dtype=dtype, device=device)
        made.append(big)
        return big[PAD: PAD + numel].view(shape)

    monkeypatch.setattr(kernels, "_empty", empty)
    yield made
    for big in made:
        assert torch.isnan(big[:PAD]).all() and torch.isnan(big[-PAD:]).all(), "a kernel wrote outside its buffer"


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------

@dataclass
class Problem:
    leaves: list                      # the distinct tensors gradients are taken for (hidden first)
    structure: Callable               # leaves -> (hidden, weights, biases, projs, cluster_weight, cluster_bias)
    bounds: list
    dtype: torch.dtype

    def args(self, leaves=None):
        return self.structure(self.leaves if leaves is None else leaves)

    def reference_leaves(self):
        return [x.detach().double().requires_grad_() for x in self.leaves]


def _canaried(shape, dtype, scale, gen):
    """A view of ``shape`` inside a larger NaN-filled buffer (row stride > width), random values."""
    pad = 2
    big = torch.full(tuple(s + 2 * pad + i for i, s in enumerate(shape)), float("nan"), dtype=dtype)
    view = big[tuple(slice(pad, pad + s) for s in shape)]
    view.copy_(torch.randn(shape, generator=gen, dtype=torch.float64) * scale)
    big.requires_grad_()
    return big[tuple(slice(pad, pad + s) for s in shape)]


def build(dtype, n_rows, d_proj, sizes, proj=True, proj0=True, div_val_1=False, tie_proj=False, seed=0):
    """sizes: [(V_c, d_c)] per cluster. proj: tails get a projection (else d_c must be d_proj);
    proj0: the head gets one. div_val_1: one (V, d) weight and (V,) bias sliced into the clusters.
    tie_proj: tails with the same d_c share one projection tensor."""
    gen = torch.Generator().manual_seed(seed)
    leaves = []

    def leaf(shape, scale):
        leaves.append(_canaried(shape, dtype, scale, gen))
        return len(leaves) - 1

    bounds = [0]
    for v, _ in sizes:
        bounds.append(bounds[-1] + v)
    i_h = leaf((n_rows, d_proj), 1.0)
    if div_val_1:
        d = sizes[0][1]
        i_w, i_b = leaf((bounds[-1], d), 2.0 / math.sqrt(d)), leaf((bounds[-1],), 0.5)
    else:
        i_w = [leaf((v, d), 2.0 / math.sqrt(d)) for v, d in sizes]
        i_b = [leaf((v,), 0.5) for v, _ in sizes]
    i_p, shared = [], {}
    for c, (_, d) in enumerate(sizes):
        if not (proj0 if c == 0 else proj):
            i_p.append(None)
        elif tie_proj and c > 0 and d in shared:
            i_p.append(shared[d])
        else:
            i_p.append(leaf((d_proj, d), 1.0 / math.sqrt(d_proj)))
            if c > 0:
                shared[d] = i_p[-1]
    n_tails = len(sizes) - 1
    i_cw = leaf((n_tails, sizes[0][1]), 2.0 / math.sqrt(sizes[0][1])) if n_tails else None
    i_cb = leaf((n_tails,), 0.5) if n_tails else None

    def structure(L):
        if div_val_1:
            weights = [L[i_w][bounds[c]: bounds[c + 1]] for c in range(len(sizes))]
            biases = [L[i_b][bounds[c]: bounds[c + 1]] for c in range(len(sizes))]
        else:
            weights, biases = [L[i] for i in i_w], [L[i] for i in i_b]
        projs = [None if i is None else L[i] for i in i_p]
        return (L[i_h], weights, biases, projs, None if i_cw is None else L[i_cw],
                None if i_cb is None else L[i_cb])

    return Problem(leaves, structure, bounds, dtype)


def targets(p: Problem, n_rows, clusters=None, n_ignored=2, seed=1):
    """Random labels in ``clusters`` (default all), every one of them used, ``n_ignored`` -100s."""
    gen = torch.Generator().manual_seed(seed)
    clusters = range(len(p.bounds) - 1) if clusters is None else clusters
    ids = torch.cat([torch.arange(p.bounds[c], p.bounds[c + 1]) for c in clusters])
    t = ids[torch.randint(0, len(ids), (n_rows,), generator=gen)]
    for k, c in enumerate(clusters):                                    # one label in each cluster
        t[k] = p.bounds[c] + k % (p.bounds[c + 1] - p.bounds[c])
    t[len(clusters): len(clusters) + n_ignored] = -100
    return t[torch.randperm(n_rows, generator=gen)]


CONFIGS = {
    # name: (d_proj, sizes, build kwargs)
    "div4_proj": (32, [(61, 32), (130, 16), (57, 8)], {}),
    "proj0_none": (24, [(70, 24), (101, 12), (33, 24)], dict(proj0=False)),
    "div_val_1": (32, [(50, 24), (90, 24), (71, 24)], dict(div_val_1=True)),
    "tied_proj": (16, [(40, 16), (77, 8), (65, 8)], dict(proj0=False, tie_proj=True)),
    "no_cutoffs": (32, [(173, 32)], dict(proj0=False)),
    "no_cutoffs_proj": (32, [(111, 16)], {}),
}
FAST_CONFIGS = ["div4_proj", "div_val_1"]          # the ones also run in fp32 and fp16
CASES = [(name, torch.float64) for name in CONFIGS] + [
    (name, dt) for name in FAST_CONFIGS for dt in (torch.float32, torch.float16)]


def check_nll(p: Problem, target, what=""):
    """Triton NLL and every gradient vs naive in float64, upstream gradient random per row."""
    go = torch.randn(target.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with use_backend("triton"):
        out = ops.adaptive_nll(p.args()[0], target, *p.args()[1:])
    grads = torch.autograd.grad(out, p.leaves, go.to(p.dtype))
    ref_leaves = p.reference_leaves()
    ref_args = p.args(ref_leaves)
    ref = naive.adaptive_nll(ref_args[0], target, *ref_args[1:])
    ref_grads = torch.autograd.grad(ref, ref_leaves, go)
    assert_rel_close(out, ref, p.dtype, f"{what} nll")
    assert bool((out[target == -100] == 0).all()), "ignored rows must have NLL 0"
    for k, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == p.dtype
        assert_rel_close(g, rg, p.dtype, f"{what} grad of leaf {k}")


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_nll_and_gradients(name, dtype):
    d_proj, sizes, kw = CONFIGS[name]
    n_rows = 37
    p = build(dtype, n_rows, d_proj, sizes, **kw)
    check_nll(p, targets(p, n_rows), name)


@pytest.mark.parametrize("name", ["div4_proj", "no_cutoffs"])
def test_log_softmax(name):
    d_proj, sizes, kw = CONFIGS[name]
    n_rows = 23
    for dtype in DTYPES:
        p = build(dtype, n_rows, d_proj, sizes, **kw)
        with use_backend("triton"):
            out = ops.adaptive_log_softmax(*p.args())
        ref = naive.adaptive_log_softmax(*p.args(p.reference_leaves()))
        assert out.dtype == dtype
        assert_rel_close(out, ref, dtype, f"{name} log-probs {dtype}")


def test_log_softmax_into_strided_canaried_output():
    d_proj, sizes, kw = CONFIGS["div4_proj"]
    p = build(torch.float64, 21, d_proj, sizes, **kw)
    V = p.bounds[-1]
    big = torch.full((21 + 4, V + 9), float("nan"), dtype=torch.float64)
    view = big[2: 23, 5: 5 + V]                                          # row stride V + 9, offset
    with torch.no_grad():
        kernels.log_softmax(*p.args(), out=view)
    ref = naive.adaptive_log_softmax(*p.args(p.reference_leaves()))
    assert_rel_close(view, ref, torch.float64, "log-probs into a view")
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[2: 23, 5: 5 + V] = False
    assert torch.isnan(big[outside]).all(), "log_softmax wrote outside its output view"


@pytest.mark.parametrize("name", ["div4_proj", "div_val_1"])
def test_log_softmax_gradients(name):
    """The log-prob path's backward (recomputed through the torch path) against the naive one, every input."""
    d_proj, sizes, kw = CONFIGS[name]
    p = build(torch.float64, 13, d_proj, sizes, **kw)
    grad_out = torch.randn(13, p.bounds[-1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with use_backend("triton"):
        out = ops.adaptive_log_softmax(*p.args())
    grads = torch.autograd.grad(out, p.leaves, grad_out)
    ref_leaves = p.reference_leaves()
    ref = naive.adaptive_log_softmax(*p.args(ref_leaves))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    for k, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(g, r, torch.float64, f"{name} log-prob gradient of leaf {k}")


def test_empty_clusters():
    """Batches where some or all tails get no row, and one with every label ignored."""
    d_proj, sizes, kw = (16, [(40, 16), (75, 8), (66, 8), (35, 16)], {})
    n_rows = 19
    p = build(torch.float64, n_rows, d_proj, sizes, **kw)
    check_nll(p, targets(p, n_rows, clusters=[0]), "head only")
    check_nll(p, targets(p, n_rows, clusters=[0, 2]), "tails 1 and 3 empty")
    check_nll(p, targets(p, n_rows, clusters=[3], n_ignored=0), "all in the last tail")
    check_nll(p, torch.full((n_rows,), -100), "all ignored")


def test_tied_projection_gradients_add():
    """The same tensor as two clusters' projection: its gradient is the sum of both uses."""
    d_proj, sizes, kw = CONFIGS["tied_proj"]
    p = build(torch.float64, 29, d_proj, sizes, **kw)
    _, _, _, projs, _, _ = p.args()
    assert projs[1] is projs[2]
    check_nll(p, targets(p, 29), "tied")


def test_gradcheck_tiny():
    """Full (not fast-mode) gradcheck in float64: tied tail projections, head without projection,
    widths below the 16-wide tiles."""
    gen = torch.Generator().manual_seed(5)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    hidden, w0, w1, w2 = t(5, 8), t(6, 8), t(5, 4), t(4, 4)
    b0, b1, b2, proj, cw, cb = t(6), t(5), t(4), t(8, 4), t(2, 8), t(2)
    target = torch.tensor([1, 7, -100, 13, 9])                           # head, tail 1, ignored, tail 2, tail 1

    def f(hidden, w0, w1, w2, b0, b1, b2, proj, cw, cb):
        with use_backend("triton"):
            return ops.adaptive_nll(hidden, target, [w0, w1, w2], [b0, b1, b2], [None, proj, proj], cw, cb)

    assert torch.autograd.gradcheck(f, (hidden, w0, w1, w2, b0, b1, b2, proj, cw, cb), eps=1e-6, atol=1e-8,
                                    rtol=1e-6, fast_mode=False)


class AllocationRecorder(TorchDispatchMode):
    """Element count of every tensor an op produces that does not alias an input. Ops run by the
    Triton interpreter itself are left out: it copies each argument's whole storage to emulate
    device memory, copies that do not exist on a GPU."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.sizes = []
        self.launching = False
        launch = GridExecutor.__call__

        def recorded_launch(executor, *args, **kwargs):
            self.launching = True
            try:
                return launch(executor, *args, **kwargs)
            finally:
                self.launching = False

        monkeypatch.setattr(GridExecutor, "__call__", recorded_launch)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not self.launching:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.sizes.append((str(func), t.numel()))
        return out


def test_loss_path_never_allocates_rows_by_vocab(monkeypatch):
    """Forward and backward of the loss path: no tensor with rows x V_c elements, for clusters
    larger than any tile (32) and any split (the interpreter aims at 8 programs)."""
    n_rows, d_proj = 33, 16
    p = build(torch.float32, n_rows, d_proj, [(100, 16), (260, 8), (130, 8)])
    limit = n_rows * 100
    for clusters in ([1], [0, 1, 2]):                                     # all rows in one tail; mixed
        target = targets(p, n_rows, clusters=clusters, n_ignored=1)
        rec = AllocationRecorder(monkeypatch)
        with rec, use_backend("triton"):
            out = ops.adaptive_nll(p.args()[0], target, *p.args()[1:])
            grads = torch.autograd.grad(out.sum(), p.leaves)
        assert all(torch.isfinite(g).all() for g in grads)
        assert rec.sizes and any("index_add" in name for name, _ in rec.sizes), "backward ops were not recorded"
        big = [(name, n) for name, n in rec.sizes if n >= limit]
        assert not big, f"allocations of >= rows x V_c = {limit} elements: {big}"


def test_log_prob_path_allocates_only_its_output(monkeypatch):
    n_rows = 33
    p = build(torch.float32, n_rows, 16, [(100, 16), (260, 8), (130, 8)])
    rec = AllocationRecorder(monkeypatch)
    with rec, use_backend("triton"), torch.no_grad():
        out = ops.adaptive_log_softmax(*p.args())
    big = [n for _, n in rec.sizes if n >= n_rows * 100]
    assert big == [out.numel()], f"allocations of >= rows x V_0 elements besides the output: {big}"


def test_bad_inputs_raise_before_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(kernels, "nll_forward", launched)
    monkeypatch.setattr(kernels, "log_softmax", launched)
    d_proj, sizes, kw = CONFIGS["div4_proj"]
    p = build(torch.float32, 6, d_proj, sizes, **kw)
    hidden, weights, biases, projs, cw, cb = p.args()
    V = p.bounds[-1]
    with use_backend("triton"):
        for bad in (torch.tensor([0, 1, V, 2, 3, 4]), torch.tensor([0, -1, 2, 3, 4, 5]),
                    torch.tensor([0, -100, 2, 3, 4, -7])):
            with pytest.raises(ValueError, match="target ids"):
                ops.adaptive_nll(hidden, bad, weights, biases, projs, cw, cb)
        with pytest.raises(ValueError, match="projection"):
            ops.adaptive_nll(hidden[:, :-1], torch.zeros(6, dtype=torch.long), weights, biases, projs, cw, cb)
        with pytest.raises(ValueError, match="dtype"):
            ops.adaptive_log_softmax(hidden.double(), weights, biases, projs, cw, cb)
        with pytest.raises(ValueError, match="dtype"):
            ops.adaptive_nll(hidden, torch.zeros(6, dtype=torch.long), weights, biases, projs, cw.half(), cb)


def test_bfloat16_refused_in_the_interpreter():
    d_proj, sizes, kw = CONFIGS["div4_proj"]
    p = build(torch.bfloat16, 4, d_proj, sizes, **kw)
    with use_backend("triton"), pytest.raises(ValueError, match="bfloat16"):
        ops.adaptive_nll(p.args()[0], torch.zeros(4, dtype=torch.long), *p.args()[1:])


def test_zero_rows():
    d_proj, sizes, kw = CONFIGS["div4_proj"]
    p = build(torch.float64, 0, d_proj, sizes, **kw)
    with use_backend("triton"):
        out = ops.adaptive_nll(p.args()[0], torch.zeros(0, dtype=torch.long), *p.args()[1:])
        lp = ops.adaptive_log_softmax(*p.args())
    assert out.shape == (0,) and lp.shape == (0, p.bounds[-1])
    grads = torch.autograd.grad(out.sum(), p.leaves, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("tail", [False, True])
def test_dh_splits_the_vocabulary(tail):
    """The dh kernel splits the vocabulary across programs (grid axis 2), partials summed in a
    fixed order: the result matches float64 dz @ W, for the head (every row) and a tail's span
    (rows outside it zero), and is bitwise the same on a second run."""
    gen = torch.Generator().manual_seed(3)
    n, d, V = 37, 24, 150
    h = torch.randn(n, d, dtype=torch.float64, generator=gen)
    w = torch.randn(V, d, dtype=torch.float64, generator=gen) * 0.3
    b = torch.randn(V, dtype=torch.float64, generator=gen)
    col = torch.randint(0, V, (n,), dtype=torch.int32, generator=gen)
    g = torch.rand(n, dtype=torch.float64, generator=gen) + 0.5
    z = h @ w.t() + b
    dz = g[:, None] * (torch.softmax(z, 1) - torch.nn.functional.one_hot(col.long(), V))
    grids = []

    def launch(kernel):
        class Grid:
            def __getitem__(self, grid):
                grids.append(grid)
                return kernel[grid]
        return Grid()

    span, rows = (torch.tensor([5, 30], dtype=torch.int32), slice(5, 30)) if tail else (None, slice(0, n))
    dh = kernels.segment_dh(h, w, b, None, None, col, torch.logsumexp(z, 1), g, span, launch=launch)
    assert grids[-1][2] > 1, f"the vocabulary was not split: grid {grids[-1]}"
    ref = torch.zeros(n, d, dtype=torch.float64)
    ref[rows] = dz[rows] @ w
    assert_rel_close(dh, ref, torch.float64, "dh")
    again = kernels.segment_dh(h, w, b, None, None, col, torch.logsumexp(z, 1), g, span)
    assert torch.equal(dh, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_nll_reduces_in_float32(monkeypatch, dtype):
    """The torch path's NLL and gradients against naive in float64, with the vocabulary cut into
    pieces of 4 words: the pieces' log-sum-exps are taken and added in float32 for bf16 logits.
    Added in bf16 they were off by more than the bf16 tolerance (wt103's head at batch 4, 10
    pieces: 0.25 nats a token on average)."""
    n_rows, (d_proj, sizes, kw) = 64, CONFIGS["div4_proj"]
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 4 * n_rows)
    p = build(torch.float64, n_rows, d_proj, sizes, **kw)
    leaves = [x.detach().to(dtype).requires_grad_() for x in p.leaves]
    target = targets(p, n_rows)
    go = torch.randn(n_rows, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with use_backend("torch"):
        out = ops.adaptive_nll(p.args(leaves)[0], target, *p.args(leaves)[1:])
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, leaves, go.to(dtype))
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]       # the same rounded inputs
    ref = naive.adaptive_nll(p.args(ref_leaves)[0], target, *p.args(ref_leaves)[1:])
    assert_rel_close(out, ref, dtype, "nll")
    for k, (g, rg) in enumerate(zip(grads, torch.autograd.grad(ref, ref_leaves, go))):
        assert_rel_close(g, rg, dtype, f"grad of leaf {k}")
