"""The next-token path: ``txl_fast.ops.adaptive_topk`` (torch scan and the Triton kernel of
``kernels/adaptive_topk.py``) against a full float64 log-softmax from ``txl_fast.naive`` + ``torch.topk``.

Runs in the Triton interpreter on CPU tensors. The problems are those of the adaptive-softmax kernel
tests: inputs are views inside NaN-filled buffers (an unmasked read shows as NaN), and every buffer
the kernel writes is the NaN-filled interior of a canaried buffer.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from tests.helpers import assert_rel_close
from tests.test_ops_adaptive_softmax import CONFIGS, FAST_CONFIGS, PAD, AllocationRecorder, build
from txl_fast import naive
from txl_fast.backend import use_backend
from txl_fast.kernels import adaptive_topk as kernel

op_module = importlib.import_module("txl_fast.ops.adaptive_topk")     # not the function txl_fast.ops re-exports
adaptive_topk = op_module.adaptive_topk
N_ROWS = 37


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    made = []

    def empty(shape, dtype, device):
        numel = math.prod(shape)
        fill = float("nan") if dtype.is_floating_point else -1
        big = torch.full((numel + 2 * PAD,), fill, dtype=dtype, device=device)
        made.append((big, fill))
        return big[PAD: PAD + numel].view(shape)

    monkeypatch.setattr(kernel, "_empty", empty)
    yield made
    for big, fill in made:
        edges = torch.cat([big[:PAD], big[-PAD:]])
        assert (edges.isnan().all() if big.is_floating_point() else (edges == fill).all()), "kernel wrote outside"


def reference(p, k):
    args = [None if t is None else t for t in p.args(p.reference_leaves())]
    with torch.no_grad():
        return naive.adaptive_log_softmax(*args)                       # (N, V) float64


def check(p, k, backend_name, what):
    with use_backend(backend_name):
        values, ids = adaptive_topk(p.args()[0].detach(), k, *[x for x in p.args()[1:]])
    full = reference(p, k)
    ref = full.topk(k, dim=1)
    assert values.shape == ids.shape == (full.shape[0], k) and ids.dtype == torch.int64
    assert not values.isnan().any(), f"{what}: NaN"
    if p.dtype == torch.float64:
        assert torch.equal(ids, ref.indices), f"{what}: ids differ"
    else:                                                  # near-ties may swap: the chosen words' true log-probs
        assert_rel_close(full.gather(1, ids), ref.values, p.dtype, f"{what} chosen words")
    assert_rel_close(values, ref.values, p.dtype, f"{what} log-probs")


# k = 17 (K = 32 in the kernel) costs ~20 s a case in the interpreter: two configurations only
CASES = [(name, k) for name in CONFIGS for k in (1, 5)] + [("div4_proj", 17), ("no_cutoffs", 17)]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("name,k", CASES, ids=[f"{n}-k{k}" for n, k in CASES])
def test_topk_matches_full_softmax_float64(name, k, backend_name):
    d_proj, sizes, kw = CONFIGS[name]
    p = build(torch.float64, N_ROWS, d_proj, sizes, **kw)
    check(p, k, backend_name, f"{name} k={k} {backend_name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("name", FAST_CONFIGS)
def test_topk_low_precision(name, dtype):
    d_proj, sizes, kw = CONFIGS[name]
    p = build(dtype, N_ROWS, d_proj, sizes, **kw)
    for backend_name in ("torch", "triton"):
        check(p, 8, backend_name, f"{name} {dtype} {backend_name}")


@pytest.mark.parametrize("k", [64, 70])
def test_k_beyond_the_head_and_beyond_the_kernel(k, monkeypatch):
    """tied_proj's head has 40 words: k = 64 pads the head's candidates (K = 64, the kernel's
    largest); k = 70 > MAX_K takes the torch scan under the triton backend."""
    d_proj, sizes, kw = CONFIGS["tied_proj"]
    p = build(torch.float64, 9, d_proj, sizes, **kw)
    check(p, k, "triton", f"k={k}")


def test_torch_scan_in_chunks(monkeypatch):
    """Chunks smaller than every cluster (16 words) merge to the same answer."""
    monkeypatch.setattr(op_module, "CHUNK_ELEMENTS", 16 * N_ROWS)
    d_proj, sizes, kw = CONFIGS["div4_proj"]
    p = build(torch.float64, N_ROWS, d_proj, sizes, **kw)
    check(p, 20, "torch", "chunked")


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_tails_scanned_only_where_they_can_win(backend_name, monkeypatch):
    """With the tail clusters' logits far below the head words no tail is scanned; far above, every
    tail is scanned for every row; the answer is exact both ways."""
    d_proj, sizes, kw = CONFIGS["div4_proj"]
    scanned = []
    scan = op_module.scan
    monkeypatch.setattr(op_module, "scan", lambda h, w, b, k: scanned.append((w.shape[0], h.shape[0])) or scan(h, w, b, k))
    for shift in (-40.0, 40.0):
        p = build(torch.float64, N_ROWS, d_proj, sizes, **kw)
        with torch.no_grad():
            p.args()[-1].add_(shift)                               # cluster_bias
        scanned.clear()
        check(p, 3, backend_name, f"cluster bias {shift:+}")
        if shift < 0:
            assert scanned == [(61, N_ROWS)]
        else:   # the first tail for every row; a later one only for rows the earlier tails left open
            assert [v for v, _ in scanned] == [61, 130, 57] and scanned[1][1] == N_ROWS


def test_never_allocates_rows_by_vocab(monkeypatch):
    """No tensor of rows x V_c elements, for clusters larger than a tile and a split (triton), or
    than a chunk (torch, 64 words)."""
    n_rows = 33
    monkeypatch.setattr(op_module, "CHUNK_ELEMENTS", 64 * n_rows)
    p = build(torch.float32, n_rows, 16, [(100, 16), (260, 8), (130, 8)])
    with torch.no_grad():
        p.args()[-1].add_(20.0)                                        # every tail scanned for every row
    for backend_name in ("torch", "triton"):
        rec = AllocationRecorder(monkeypatch)
        with rec, use_backend(backend_name):
            adaptive_topk(p.args()[0].detach(), 4, *p.args()[1:])
        assert any("topk" in name for name, _ in rec.sizes), "nothing was recorded"
        big = [(name, n) for name, n in rec.sizes if n >= n_rows * 100]
        assert not big, f"{backend_name}: allocations of >= rows x V_c = {n_rows * 100} elements: {big}"


def test_bad_k_and_inputs_raise_before_any_scan(monkeypatch):
    monkeypatch.setattr(op_module, "scan", lambda *a: pytest.fail("scanned"))
    d_proj, sizes, kw = CONFIGS["div4_proj"]
    p = build(torch.float32, 4, d_proj, sizes, **kw)
    hidden, *rest = p.args()
    V = p.bounds[-1]
    for bad in (0, -1, V + 1, True, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            adaptive_topk(hidden, bad, *rest)
    with pytest.raises(ValueError, match="hidden size|projection"):
        adaptive_topk(hidden[:, :-1], 1, *rest)
    with pytest.raises(ValueError, match="dtype"):
        adaptive_topk(hidden.double(), 1, *rest)
    with use_backend("triton"), pytest.raises(ValueError, match="k must be"):
        kernel.cluster_topk(hidden, rest[0][0], rest[1][0], kernel.MAX_K + 1)


def test_zero_rows():
    d_proj, sizes, kw = CONFIGS["div4_proj"]
    p = build(torch.float64, 0, d_proj, sizes, **kw)
    for backend_name in ("torch", "triton"):
        with use_backend(backend_name):
            values, ids = adaptive_topk(p.args()[0], 3, *p.args()[1:])
        assert values.shape == ids.shape == (0, 3)
