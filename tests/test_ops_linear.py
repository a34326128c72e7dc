"""``ops.linear``: the product as a batched matmul over weight row blocks (one per thread), against
F.linear in float64 (values and every gradient), and which inputs take it."""
import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_rel_close
from txl_fast import ops

linear_module = importlib.import_module("txl_fast.ops.linear")     # the module, not the function

# (leading shape of x, K, N): one decode row, a batch of them, a segment, the most rows taken; odd sizes
CASES = [((1, 1), 37, 54), ((3, 1), 20, 12), ((2, 5), 9, 30), ((linear_module.MAX_ROWS,), 16, 22)]


@pytest.fixture(autouse=True)
def two_threads():
    """The split path uses one weight block per thread: run every test with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _counting_bmm():
    """Patches torch.bmm and torch.baddbmm with counting wrappers: did the split path run?"""
    return (mock.patch.object(torch, "bmm", wraps=torch.bmm), mock.patch.object(torch, "baddbmm", wraps=torch.baddbmm))


@pytest.mark.parametrize("lead,K,N", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_path_matches_f_linear(lead, K, N, with_bias, dtype):
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64) if with_bias else None
    dout = torch.randn(*lead, N, generator=g, dtype=torch.float64)
    ours = [t.to(dtype, copy=True).requires_grad_() for t in (x, w, b) if t is not None]
    refs = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    bmm, baddbmm = _counting_bmm()
    with bmm as bmm_calls, baddbmm as baddbmm_calls:
        out = ops.linear(*ours)
    assert bmm_calls.call_count + baddbmm_calls.call_count == 1, "the split path did not run"
    ref = F.linear(*refs)
    out.backward(dout.to(dtype))
    ref.backward(dout)
    assert_rel_close(out, ref, dtype, "out")
    for name, t, rt in zip(("dx", "dweight", "dbias"), ours, refs):
        assert_rel_close(t.grad, rt.grad, dtype, name)


@pytest.mark.parametrize("why,x,w", [
    ("more rows than MAX_ROWS", torch.randn(linear_module.MAX_ROWS + 1, 8), torch.randn(6, 8)),
    ("odd output size", torch.randn(2, 8), torch.randn(7, 8)),
    ("weight not contiguous", torch.randn(2, 8), torch.randn(8, 6).t()),
    ("no rows", torch.randn(0, 8), torch.randn(6, 8)),
    ("one thread", torch.randn(2, 8), torch.randn(6, 8)),
    ("bf16 segment rows", torch.randn(linear_module.MAX_PACKED_ROWS + 1, 8).bfloat16(), torch.randn(6, 8).bfloat16()),
])
def test_other_inputs_are_f_linear(why, x, w):
    if why == "one thread":
        torch.set_num_threads(1)
    bmm, baddbmm = _counting_bmm()
    with bmm as bmm_calls, baddbmm as baddbmm_calls:
        out = ops.linear(x, w)
    assert bmm_calls.call_count + baddbmm_calls.call_count == 0, why
    assert torch.equal(out, F.linear(x, w))


def test_bad_shapes_raise_as_f_linear_does():
    with pytest.raises(RuntimeError):
        ops.linear(torch.randn(1, 5), torch.randn(6, 8))
    with pytest.raises(RuntimeError):
        ops.linear(torch.randn(1, 8), torch.randn(6, 8), torch.randn(5))


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("dtype,rows", [(torch.float32, 4), (torch.float32, 2), (torch.bfloat16, 1),
                                        (torch.bfloat16, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_path_matches_f_linear(dtype, rows, with_bias):
    """A decode step's rows against a packed weight. The product must come from ``packed``: given
    the packing of another weight, the result is that weight's product."""
    g = torch.Generator().manual_seed(rows)
    x, w, other = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(rows, 1, 37), (54, 37), (54, 37)])
    b = torch.randn(54, generator=g, dtype=torch.float64) if with_bias else None
    assert linear_module.packing_helps(w.to(dtype), rows)
    cast = [t.to(dtype) if t is not None else None for t in (x, w, b)]
    with torch.no_grad():
        out = ops.linear(*cast, packed=linear_module.pack(cast[1], rows))
        used = ops.linear(*cast, packed=linear_module.pack(other.to(dtype), rows))
    assert_rel_close(out, F.linear(x, w, b), dtype, "out")
    assert_rel_close(used, F.linear(x, other, b), dtype, "out with another packed weight")


@pytest.fixture
def threads():
    """Set torch's thread count for one test (``threads(n)``), restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@needs_onednn
def test_fp32_single_rows_packed_on_one_thread_only(threads):
    """On one thread split_linear has nothing to split and the packed product is faster; on two
    split_linear reads faster than the packed product (benchmarks/RESULTS.md, "Decode step")."""
    w = torch.randn(6, 16)
    threads(1)
    assert linear_module.packing_helps(w, 1)
    x = torch.randn(1, 16)
    with torch.no_grad():
        used = ops.linear(x, w, packed=linear_module.pack(torch.zeros_like(w), 1))
    assert torch.equal(used, torch.zeros(1, 6)), "one thread: the packed weight was not used"
    threads(2)
    assert not linear_module.packing_helps(w, 1)


@needs_onednn
@pytest.mark.parametrize("why,dtype,rows,grad", [
    ("fp32 single row on two threads: split_linear", torch.float32, 1, False),
    ("more rows than MAX_PACKED_ROWS", torch.float32, linear_module.MAX_PACKED_ROWS + 1, False),
    ("a gradient is wanted", torch.float32, 4, True),
])
def test_packed_weight_ignored(why, dtype, rows, grad, threads):
    threads(2)
    g = torch.Generator().manual_seed(2)
    x, w, other = (torch.randn(*s, generator=g) for s in [(rows, 16), (6, 16), (6, 16)])
    w.requires_grad_(grad)
    out = ops.linear(x, w, packed=linear_module.pack(other, 1))
    assert not linear_module.packing_helps(w, rows) or grad, why
    assert_rel_close(out, F.linear(x.double(), w.double()), torch.float32, why)
    if grad:
        out.sum().backward()
        assert w.grad is not None, "no gradient reached the weight"


def test_bf16_decode_rows_are_not_split():
    """bf16 batched products are slow on the CPU: a few bf16 rows take F.linear, not split_linear."""
    x, w = torch.randn(2, 16).bfloat16(), torch.randn(6, 16).bfloat16()
    bmm, baddbmm = _counting_bmm()
    with bmm as bmm_calls, baddbmm as baddbmm_calls:
        out = ops.linear(x, w)
    assert bmm_calls.call_count + baddbmm_calls.call_count == 0
    assert torch.equal(out, F.linear(x, w))
