"""The torch backend of ``rel_attention`` against the float64 naive path, including its
cache-sized chunks over (batch row, heads). Both of its paths: with autograd (content matmul plus
the position mask, softmax, value matmul) output and every input's gradient; without (the fused
``scaled_dot_product_attention`` with the position mask, or for one query per row the decode
step's three batched products, and the closed form of uniform keys) the output, with a check that
the fused kernel or the decode products are what ran."""
import importlib

import pytest
import torch

from helpers import assert_rel_close
from txl_fast import backend, naive
from txl_fast.ops import rel_attention

ra = importlib.import_module("txl_fast.ops.rel_attention")     # the module, not the re-exported function
NAMES = ("q", "k", "v", "r", "r_w_bias", "r_r_bias")

# (B, Lq, mlen, H, D, window, Lr, uniform_keys): Lr rows of r (clamped distances when < Lk)
CASES = {
    "no_window": (3, 13, 10, 5, 7, None, 23, 0),
    "window": (2, 11, 9, 3, 8, 6, 20, 0),
    "decode": (3, 1, 23, 5, 4, 9, 24, 0),
    "window0_uniform": (2, 7, 0, 3, 4, 0, 7, 0),          # no key visible: uniform rows, as HF
    "clamped": (2, 9, 14, 3, 4, None, 6, 0),
    "clamped_window": (2, 9, 14, 3, 4, 12, 6, 0),
    "clamped_past_window": (2, 3, 7, 3, 4, 2, 8, 0),     # the dropped keys leave fewer than Lr distances
    "zero_memory_prompt": (2, 6, 17, 3, 4, 16, 11, 15),  # some uniform keys dropped, the rest kept
    "zero_memory_decode": (1, 1, 30, 5, 4, 30, 11, 25),
    "zero_memory_decode_batch": (3, 1, 20, 3, 4, None, 8, 12),
    "uniform_all_dropped": (2, 5, 12, 3, 4, 6, 17, 4),
    "uniform_but_the_last": (2, 4, 3, 2, 4, None, 7, 6),
    "uniform_clamped_no_window": (2, 5, 12, 3, 4, None, 6, 9),
}


def make_inputs(case, layout, seed):
    """float64 inputs of a case; k, v and r stored as HF's time-major tensors (the uncached
    models) or as the inference cache's head-major buffers, passed as batch-first views."""
    B, Lq, mlen, H, D, window, Lr, _ = CASES[case]
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Lq, H, D), (B, Lq + mlen, H, D), (B, Lq + mlen, H, D), (Lr, H, D), (H, D), (H, D)]
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    if layout == "time_major":
        inputs[:3] = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in inputs[:3]]
    else:
        inputs[1:3] = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs[1:3]]
        inputs[3] = inputs[3].transpose(0, 1).contiguous().transpose(0, 1)
    return inputs, torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused kernel (scaled_dot_product_attention)."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: (calls.append(1), sdpa(*a, **kw))[1])
    return calls


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the calls of the decode step's path (``decode_out``)."""
    calls, decode_out = [], ra.decode_out
    monkeypatch.setattr(ra, "decode_out", lambda *a: (calls.append(1), decode_out(*a))[1])
    return calls


CHUNKS = [(None, torch.float64), (1, torch.float64), (150, torch.float64), (None, torch.float32), (150, torch.float16)]


@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if spec[-1] == 0])
@pytest.mark.parametrize("chunk,dtype", CHUNKS)
@pytest.mark.parametrize("layout", ["time_major", "head_major"])
def test_autograd_path_matches_naive(case, chunk, dtype, layout, monkeypatch, fused_calls):
    """chunk: the default; one head per chunk; 2 heads (H = 5 -> 3 groups)."""
    B, Lq, mlen, H, D, window, _, _ = CASES[case]
    if chunk is not None:
        monkeypatch.setattr(ra, "SCORE_CHUNK", chunk * Lq * (Lq + mlen))
    inputs, dout = make_inputs(case, layout, seed=len(case) + (chunk or 0))
    ours = [x.to(dtype, copy=True).requires_grad_() for x in inputs]
    with backend.use_backend("torch"):
        out = rel_attention(*ours, scale=D**-0.5, window=window)
    out.backward(dout.to(dtype))
    refs = [x.to(dtype).double().requires_grad_() for x in inputs]      # float64 on the same rounded inputs
    ref = naive.rel_attention(*refs, D**-0.5, window)[0]
    ref.backward(dout)
    assert not fused_calls
    assert_rel_close(out, ref, dtype, "out")
    for name, x, rx in zip(NAMES, ours, refs):
        assert_rel_close(x.grad, rx.grad, dtype, f"d{name}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk,dtype", CHUNKS + [(None, torch.bfloat16)])    # (bf16 autograd: dk 1.2e-2 off)
@pytest.mark.parametrize("layout", ["time_major", "head_major"])
def test_inference_path_matches_naive(case, chunk, dtype, layout, monkeypatch, fused_calls, decode_calls):
    """Without autograd. With ``uniform_keys=n`` the first n keys and values are given *different*:
    the output must be naive's on inputs whose first n rows are all row n - 1 (the row the closed
    form reads), which only the closed form gives."""
    B, Lq, mlen, H, D, window, _, n = CASES[case]
    if chunk is not None:
        monkeypatch.setattr(ra, "SCORE_CHUNK", chunk * Lq * (Lq + mlen))
    inputs, _ = make_inputs(case, layout, seed=len(case) + (chunk or 0))
    with torch.no_grad(), backend.use_backend("torch"):
        out = rel_attention(*[x.to(dtype) for x in inputs], scale=D**-0.5, window=window, uniform_keys=n)

    def uniform(x):                                      # (B, Lk, H, D): rows [0, n) all row n - 1
        return torch.cat([x[:, n - 1 : n].expand(-1, n, -1, -1), x[:, n:]], dim=1) if n else x

    q, k, v, r, u, w = (x.to(dtype).double() for x in inputs)          # float64 on the same rounded inputs
    ref = naive.rel_attention(q, uniform(k), uniform(v), r, u, w, D**-0.5, window)[0]
    if ra.is_decode(inputs[0].to(dtype), True, window, None):
        assert decode_calls and not fused_calls          # one query per row: the decode products
    else:
        assert fused_calls or window == 0                # window 0: no key visible, the rows' mean value
    assert_rel_close(out, ref, dtype, "out")


@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if spec[1] == 1 and spec[5] != 0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_decode_branch_matches_naive(case, dtype, monkeypatch, decode_calls):
    """The decode branch (one query per row) in every dtype, not only those that take it by default."""
    B, Lq, mlen, H, D, window, _, n = CASES[case]
    monkeypatch.setattr(ra, "DECODE_DTYPES", (dtype,))
    inputs, _ = make_inputs(case, "head_major", seed=len(case))
    with torch.no_grad(), backend.use_backend("torch"):
        out = rel_attention(*[x.to(dtype) for x in inputs], scale=D**-0.5, window=window, uniform_keys=n)
    q, k, v, r, u, w = (x.to(dtype).double() for x in inputs)
    if n:                                                # the closed form reads row n - 1 for rows [0, n)
        k, v = (torch.cat([x[:, n - 1 : n].expand(-1, n, -1, -1), x[:, n:]], dim=1) for x in (k, v))
    ref = naive.rel_attention(q, k, v, r, u, w, D**-0.5, window)[0]
    assert decode_calls
    assert_rel_close(out, ref, dtype, "out")


def test_every_key_uniform(fused_calls):
    """uniform_keys = Lk: no key left beside the one the closed form reads (key Lk - 1; the others
    are given different). Outputs only: with one key and one value every score gradient is zero."""
    g = torch.Generator().manual_seed(3)
    q, k, v, r, u, w = (torch.randn(*s, generator=g, dtype=torch.float64)
                        for s in [(2, 4, 2, 3), (2, 4, 2, 3), (2, 4, 2, 3), (4, 2, 3), (2, 3), (2, 3)])
    with torch.no_grad(), backend.use_backend("torch"):
        out = rel_attention(q, k, v, r, u, w, scale=0.5, uniform_keys=4)
    last = naive.rel_attention(q, k[:, 3:].expand(2, 4, 2, 3), v[:, 3:].expand(2, 4, 2, 3), r, u, w, 0.5, None)[0]
    assert fused_calls
    assert_rel_close(out, last, torch.float64, "out")


def test_full_positions_writes_out_the_clamped_rows():
    r = torch.randn(4, 2, 3, dtype=torch.float64)
    full = ra.full_positions(r, 7)
    assert full.shape == (7, 2, 3)
    for p in range(7):                                   # row p: distance 6 - p, clamped to 3
        assert torch.equal(full[p], r[3 - min(6 - p, 3)])
    assert ra.full_positions(r, 4) is r


@pytest.mark.parametrize("change,match", [
    (dict(r=(8, 2, 4)), r"1 <= Lr <= Lk=7"),
    (dict(r=(0, 2, 4)), r"1 <= Lr <= Lk=7"),
    (dict(uniform_keys=8), r"uniform_keys must be an int in \[0, Lk=7\]"),
    (dict(uniform_keys=-1), r"uniform_keys must be an int"),
    (dict(uniform_keys=2.0), r"uniform_keys must be an int"),
])
def test_bad_promises_raise(change, match):
    shapes = dict(q=(1, 3, 2, 4), k=(1, 7, 2, 4), v=(1, 7, 2, 4), r=(5, 2, 4), r_w_bias=(2, 4), r_r_bias=(2, 4))
    shapes.update({name: s for name, s in change.items() if name != "uniform_keys"})
    tensors = [torch.randn(*s) for s in shapes.values()]
    with pytest.raises(ValueError, match=match):
        rel_attention(*tensors, scale=0.5, uniform_keys=change.get("uniform_keys", 0))


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("empty_rows", ["uniform", "zero"])
@pytest.mark.parametrize("grad", [False, True])
def test_per_query_key_mask_matches_naive(window, empty_rows, grad):
    """key_mask (B, Lq, Lk): documents packed in a row, each query seeing keys from its document's
    start on (and some holes); a query whose start lies past itself sees nothing (an empty row)."""
    g = torch.Generator().manual_seed(5)
    B, Lq, mlen, H, D = 3, 9, 6, 2, 4
    Lk = mlen + Lq
    q, k, v = (torch.randn(B, n, H, D, generator=g, dtype=torch.float64) for n in (Lq, Lk, Lk))
    r = torch.randn(Lk - 2, H, D, generator=g, dtype=torch.float64)                        # clamped
    u, w = (torch.randn(H, D, generator=g, dtype=torch.float64) for _ in range(2))
    starts = torch.randint(0, Lk, (B, Lq), generator=g)
    starts[0, 4] = Lk                                                                        # an empty row
    mask = torch.arange(Lk) >= starts[..., None]                                            # (B, Lq, Lk)
    mask &= torch.rand(B, Lq, Lk, generator=g) > 0.1
    inputs = [t.requires_grad_(grad) for t in (q, k, v, r, u, w)]
    kwargs = dict(scale=0.3, window=window, key_mask=mask, empty_rows=empty_rows)
    with backend.use_backend("naive"):
        ref = rel_attention(*inputs, **kwargs)
    got = rel_attention(*inputs, **kwargs)
    assert_rel_close(got, ref, torch.float64, "out")
    if grad:
        dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref, inputs, dout)
        got_grads = torch.autograd.grad(got, inputs, dout)
        for name, a, b in zip(NAMES, got_grads, ref_grads):
            assert_rel_close(a, b, torch.float64, name)
    with pytest.raises(ValueError, match="per-query key_mask"):
        rel_attention(q, k, v, torch.randn(Lk + Lq - 1, H, D, dtype=torch.float64), u, w, scale=0.3, key_mask=mask,
                      causal=False)
