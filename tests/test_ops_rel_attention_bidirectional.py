"""The bidirectional mode of ``rel_attention`` (Conformer encoders) and key padding, on the torch
backend, against the float64 naive path: output and every input's gradient (autograd path), the
output of the fused inference path, with forced chunking; both kinds of empty rows; bad input."""
import importlib

import pytest
import torch

from helpers import assert_rel_close
from txl_fast import backend, naive
from txl_fast.ops import rel_attention, rel_attention_with_probs

ra = importlib.import_module("txl_fast.ops.rel_attention")
NAMES = ("q", "k", "v", "r", "r_w_bias", "r_r_bias")

# (B, Lq, mlen, H, D, causal, context or window, padding): padding "lengths" gives batch row 1
# a shorter key length and the last batch row length 0 (every query empty); "mask" a random mask;
# "gap" hides keys 2 .. 5 of batch row 1, so that the queries whose context lies inside see nothing
CASES = {
    "bidi": (2, 13, 0, 3, 7, False, None, None),
    "bidi_lengths": (3, 11, 0, 2, 5, False, None, "lengths"),
    "bidi_context": (2, 9, 0, 3, 4, False, (3, 2), "lengths"),
    "bidi_context_left_only": (2, 8, 0, 2, 4, False, (4, 0), None),
    "bidi_memory": (2, 5, 7, 2, 4, False, (6, 1), "mask"),     # streaming: a memory (NeMo's cache) before the chunk
    "bidi_single_query": (3, 1, 6, 2, 4, False, None, "lengths"),
    "bidi_gap": (2, 9, 0, 2, 4, False, (1, 0), "gap"),
    "causal_lengths": (3, 7, 4, 2, 4, True, 5, "lengths"),
    "causal_gap": (2, 7, 1, 2, 4, True, 2, "gap"),
    "causal_mask": (2, 6, 3, 3, 4, True, None, "mask"),
}


def make_case(case, seed):
    """float64 inputs, the mode keywords and an output gradient of a case."""
    B, Lq, mlen, H, D, causal, extent, padding = CASES[case]
    Lk = Lq + mlen
    g = torch.Generator().manual_seed(seed)
    Lr = Lk if causal else Lk + Lq - 1
    shapes = [(B, Lq, H, D), (B, Lk, H, D), (B, Lk, H, D), (Lr, H, D), (H, D), (H, D)]
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    mode = dict(causal=causal)
    mode["window" if causal else "context"] = extent
    if padding == "lengths":
        mode["key_lengths"] = torch.tensor([Lk, max(1, Lk - 3)] + [0] * (B - 2))
    elif padding == "mask":
        mode["key_mask"] = torch.rand(B, Lk, generator=g) < 0.7
    elif padding == "gap":
        mode["key_mask"] = torch.ones(B, Lk, dtype=torch.bool)
        mode["key_mask"][1, 2:6] = False
    return inputs, mode, torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64)


def naive_mode(mode, Lk):
    """The naive path's keywords: lengths written as the key mask they mean."""
    mode = dict(mode)
    lengths = mode.pop("key_lengths", None)
    if lengths is not None:
        mode["key_mask"] = torch.arange(Lk)[None, :] < lengths[:, None]
    return mode


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the inference paths (blocked bidirectional, or SDPA for the causal mode)."""
    calls = []
    for name in ("_bidirectional_fused_out", "_sdpa"):
        original = getattr(ra, name)
        monkeypatch.setattr(ra, name, lambda *a, _f=original, **kw: (calls.append(1), _f(*a, **kw))[1])
    return calls


CHUNKS = [(None, torch.float64), (1, torch.float64), (None, torch.float32), (1, torch.float16)]


@pytest.mark.parametrize("empty_rows", ["uniform", "zero"])
@pytest.mark.parametrize("chunk,dtype", CHUNKS)
@pytest.mark.parametrize("case", list(CASES))
def test_autograd_path_matches_naive(case, chunk, dtype, empty_rows, monkeypatch, fused_calls):
    B, Lq, mlen, H, D = CASES[case][:5]
    if chunk is not None:                                # one head per chunk
        monkeypatch.setattr(ra, "SCORE_CHUNK", chunk * Lq * (Lq + mlen))
    inputs, mode, dout = make_case(case, seed=len(case) + (chunk or 0))
    ours = [x.to(dtype, copy=True).requires_grad_() for x in inputs]
    with backend.use_backend("torch"):
        out = rel_attention(*ours, scale=D**-0.5, empty_rows=empty_rows, **mode)
    out.backward(dout.to(dtype))
    refs = [x.to(dtype).double().requires_grad_() for x in inputs]      # float64 on the same rounded inputs
    ref = naive.rel_attention(*refs, D**-0.5, empty_rows=empty_rows, **naive_mode(mode, Lq + mlen))[0]
    ref.backward(dout)
    assert not fused_calls
    assert_rel_close(out, ref, dtype, "out")
    for name, x, rx in zip(NAMES, ours, refs):
        assert_rel_close(x.grad, rx.grad, dtype, f"d{name}")


@pytest.mark.parametrize("empty_rows", ["uniform", "zero"])
@pytest.mark.parametrize("chunk,dtype", CHUNKS + [(None, torch.bfloat16)])
@pytest.mark.parametrize("case", list(CASES))
def test_inference_path_matches_naive(case, chunk, dtype, empty_rows, monkeypatch, fused_calls):
    """chunk 1 also runs the bidirectional queries in blocks of 4 (the last block shorter)."""
    B, Lq, mlen, H, D = CASES[case][:5]
    if chunk is not None:
        monkeypatch.setattr(ra, "SCORE_CHUNK", chunk * Lq * (Lq + mlen))
        monkeypatch.setattr(ra, "QUERY_BLOCK", 4)
    inputs, mode, _ = make_case(case, seed=len(case) + (chunk or 0))
    with torch.no_grad(), backend.use_backend("torch"):
        out = rel_attention(*[x.to(dtype) for x in inputs], scale=D**-0.5, empty_rows=empty_rows, **mode)
    refs = [x.to(dtype).double() for x in inputs]
    ref = naive.rel_attention(*refs, D**-0.5, empty_rows=empty_rows, **naive_mode(mode, Lq + mlen))[0]
    assert fused_calls
    assert_rel_close(out, ref, dtype, "out")


def test_gap_cases_have_empty_rows():
    """The cases above do exercise queries left without a key inside a batch row that has some."""
    for case in ("bidi_gap", "causal_gap"):
        B, Lq, mlen, H, D, causal, extent, _ = CASES[case]
        _, mode, _ = make_case(case, seed=0)
        empty = ra.empty_row_mask(Lq, Lq + mlen, mode.get("window"), causal, mode.get("context"), mode["key_mask"], None)
        assert empty[1].any() and not empty[1].all() and not empty[0].any()


def test_empty_rows_are_exact():
    """A batch row whose keys are all padding: zeros, or HF's uniform row (the mean value)."""
    inputs, mode, _ = make_case("bidi_lengths", seed=1)
    v = inputs[2]
    for grad in (False, True):
        with torch.set_grad_enabled(grad), backend.use_backend("torch"):
            x = [t.clone().requires_grad_(grad) for t in inputs]
            zero = rel_attention(*x, scale=0.3, empty_rows="zero", **mode)
            uniform = rel_attention(*x, scale=0.3, **mode)
        assert torch.equal(zero[2], torch.zeros_like(zero[2]))
        torch.testing.assert_close(uniform[2], v[2].mean(0, keepdim=True).expand_as(uniform[2]), rtol=1e-12, atol=1e-12)


def test_probabilities_bidirectional():
    inputs, mode, _ = make_case("bidi_context", seed=2)
    with backend.use_backend("torch"):
        out, prob = rel_attention_with_probs(*inputs, scale=0.4, empty_rows="zero", **mode)
    ref_out, ref_prob = naive.rel_attention(*inputs, 0.4, empty_rows="zero", **naive_mode(mode, inputs[1].shape[1]))
    assert_rel_close(out, ref_out, torch.float64, "out")
    assert_rel_close(prob, ref_prob, torch.float64, "prob")


def test_position_gradient_sees_the_sign_of_the_distance():
    """A table symmetric in the distance (SpeechBrain's sinusoids give d and -d one embedding) would
    hide a sign error; random rows do not: the gradient of r row p is the distance Lk - 1 - p's."""
    inputs, mode, dout = make_case("bidi", seed=5)
    q, k, v, r, u, w = [x.clone().requires_grad_() for x in inputs]
    with backend.use_backend("torch"):
        rel_attention(q, k, v, r, u, w, scale=0.5, **mode).backward(dout)
    r_ref = inputs[3].clone().requires_grad_()
    naive.rel_attention(*inputs[:3], r_ref, *inputs[4:], 0.5, causal=False)[0].backward(dout)
    flipped = inputs[3].flip(0).clone().requires_grad_()              # the sign error: distance -d for d
    naive.rel_attention(*inputs[:3], flipped, *inputs[4:], 0.5, causal=False)[0].backward(dout)
    assert_rel_close(r.grad, r_ref.grad, torch.float64, "dr")
    assert (r.grad - flipped.grad.flip(0)).norm() > 1e-3 * r.grad.norm()


def test_rel_shift_is_exact_on_the_bidirectional_raw_scores():
    """The raw product over all Lk + Lq - 1 distances, shifted: entry (i, j) is distance i + mlen - j's."""
    Lq, Lk = 4, 6
    raw = torch.arange(Lq * (Lk + Lq - 1), dtype=torch.float64).view(Lq, Lk + Lq - 1)
    shifted = ra.rel_shift(raw, Lk)
    for i in range(Lq):
        for j in range(Lk):
            assert shifted[i, j] == raw[i, Lk - 1 - (i + Lk - Lq - j)]


SHAPES = dict(q=(2, 3, 2, 4), k=(2, 5, 2, 4), v=(2, 5, 2, 4), r=(7, 2, 4), r_w_bias=(2, 4), r_r_bias=(2, 4))


@pytest.mark.parametrize("change,match", [
    (dict(r=(5, 2, 4)), r"causal=False r must be \(Lk \+ Lq - 1 = 7"),
    (dict(window=3), r"window must be None or an int"),
    (dict(context=(2,)), r"context must be None or \(left, right\)"),
    (dict(context=(-1, 2)), r"context must be None or \(left, right\)"),
    (dict(causal=True, r=(5, 2, 4), context=(1, 1)), r"context must be None"),
    (dict(key_lengths=torch.tensor([5, 6])), r"key_lengths must lie in \[0, Lk=5\]"),
    (dict(key_lengths=torch.tensor([5.0, 2.0])), r"key_lengths must be an integer tensor"),
    (dict(key_lengths=torch.tensor([5])), r"key_lengths must be an integer tensor of shape \(B=2,\)"),
    (dict(key_mask=torch.ones(2, 4, dtype=torch.bool)), r"key_mask must be a bool tensor of shape \(B=2, Lk=5\)"),
    (dict(key_mask=torch.ones(2, 5)), r"key_mask must be a bool tensor"),
    (dict(key_mask=torch.ones(2, 5, dtype=torch.bool), key_lengths=torch.tensor([1, 2])), r"not both"),
    (dict(empty_rows="zeros"), r"empty_rows must be 'uniform' \(HF\) or 'zero'"),
    (dict(causal="no"), r"causal must be True or False"),
    (dict(causal=True, r=(5, 2, 4), uniform_keys=2, key_lengths=torch.tensor([5, 5])), r"uniform_keys .* no key padding"),
    (dict(causal=True, r=(5, 2, 4), uniform_keys=2, query_lengths=torch.tensor([3, 3])), r"uniform_keys .* no query_lengths"),
    (dict(chunk_context=(2, 1, 0), context=(1, 1)), r"chunk_context needs causal=False and no context"),
    (dict(chunk_context=(2, 1, 0), causal=True, r=(5, 2, 4)), r"chunk_context needs causal=False"),
    (dict(chunk_context=(0, 1, 0)), r"chunk_context must be \(C >= 1, L >= -1, R >= 0\) ints"),
    (dict(chunk_context=(2, -2, 0)), r"chunk_context must be \(C >= 1"),
    (dict(chunk_context=(2, 1, -1)), r"chunk_context must be \(C >= 1"),
    (dict(chunk_context=(2, 1)), r"chunk_context must be \(C >= 1"),
    (dict(chunk_context=(2.0, 1, 0)), r"chunk_context must be \(C >= 1"),
    (dict(query_lengths=torch.tensor([3, 4])), r"query_lengths must lie in \[0, Lq=3\]"),
    (dict(query_lengths=torch.tensor([-1, 2])), r"query_lengths must lie in \[0, Lq=3\]"),
    (dict(query_lengths=torch.tensor([3.0, 2.0])), r"query_lengths must be an integer tensor"),
    (dict(query_lengths=torch.tensor([3])), r"query_lengths must be an integer tensor of shape \(B=2,\)"),
])
def test_bad_input_raises(change, match):
    shapes = {**SHAPES, **{n: s for n, s in change.items() if n in SHAPES}}
    tensors = [torch.randn(*s) for s in shapes.values()]
    options = {"causal": False, **{n: x for n, x in change.items() if n not in SHAPES}}
    with pytest.raises(ValueError, match=match):
        rel_attention(*tensors, scale=0.5, **options)


# ---------------------------------------------------------------------------------------------
# chunk_context (NeMo's chunked_limited, streaming FastConformers offline) and query_lengths
# ---------------------------------------------------------------------------------------------

def naive_chunk_visible(Lq, Lk, chunk_context):
    """(Lq, Lk) bool by a loop over the chunks of the keys: query i (position p = i + Lk - Lq, chunk
    p // C) sees key j when j's chunk lies L chunks back at most and j < its chunk's end + R."""
    C, L, R = chunk_context
    visible = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        c = (i + Lk - Lq) // C
        for j in range(Lk):
            visible[i, j] = (L < 0 or j // C >= c - L) and j < (c + 1) * C + R
    return visible


# (Lq, mlen, chunk_context, or "causal" (window 3) / None (bidirectional, no context), key padding, query lengths)
QUERY_CASES = {
    "chunk_unlimited": (13, 0, (4, -1, 0), None, False),
    "chunk_l0_r2_ragged": (13, 0, (4, 0, 2), "lengths", True),
    "chunk_l1_memory_ragged": (13, 6, (4, 1, 0), "lengths", True),
    "chunk_l1_r2_memory_mask": (13, 6, (4, 1, 2), "mask", False),
    "chunk_l0_memory_queries": (13, 6, (4, 0, 0), None, True),
    "chunk_unlimited_r2_memory": (13, 6, (4, -1, 2), "lengths", True),
    "chunk_c1": (5, 2, (1, 2, 1), None, True),
    "bidi_query_lengths": (13, 6, None, "lengths", True),
    "causal_query_lengths": (7, 4, "causal", "lengths", True),
}


def make_query_case(case, seed, dtype=torch.float64):
    """B 2, H 2, D 16; key lengths (Lk, Lk - 8): some queries of row 1 see no key in their chunk;
    query lengths (Lq - 4, Lq)."""
    Lq, mlen, chunk, padding, ragged = QUERY_CASES[case]
    B, H, D, Lk = 2, 2, 16, Lq + mlen
    causal = chunk == "causal"
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Lq, H, D), (B, Lk, H, D), (B, Lk, H, D), (Lk if causal else Lk + Lq - 1, H, D), (H, D), (H, D)]
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    mode = dict(causal=causal)
    if causal:
        mode["window"] = 3
    elif chunk is not None:
        mode["chunk_context"] = chunk
    if padding == "lengths":
        mode["key_lengths"] = torch.tensor([Lk, max(1, Lk - 8)])
    elif padding == "mask":
        mode["key_mask"] = torch.rand(B, Lk, generator=g) < 0.7
    if ragged:
        mode["query_lengths"] = torch.tensor([max(1, Lq - 4), Lq])
    return inputs, mode, torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64)


def test_naive_chunk_context_is_the_chunk_loop():
    for Lq, Lk in ((13, 13), (13, 19), (5, 7)):
        for chunk in ((4, -1, 0), (4, 0, 2), (4, 1, 0), (3, 2, 1), (1, 0, 0)):
            assert torch.equal(ra.visibility_mask(Lq, Lk, None, None, causal=False, chunk_context=chunk),
                               naive_chunk_visible(Lq, Lk, chunk)), (Lq, Lk, chunk)


def test_naive_chunk_context_is_nemo_chunked_limited():
    """NeMo's chunked_limited: chunk_size = right + 1, left_chunks = left // chunk_size; key j is
    visible when 0 <= chunk(i) - chunk(j) <= left_chunks (Lk = Lq: no cache)."""
    T = 17
    for left, right in ((8, 3), (5, 1), (-1, 2), (0, 0)):
        size = right + 1
        left_chunks = left // size if left >= 0 else T
        chunk = torch.arange(T) // size
        diff = chunk[:, None] - chunk[None, :]
        nemo = (diff >= 0) & (diff <= left_chunks)
        ours = ra.visibility_mask(T, T, None, None, causal=False,
                                  chunk_context=(size, left // size if left >= 0 else -1, 0))
        assert torch.equal(ours, nemo), (left, right)


def test_naive_query_lengths_pad_queries():
    """Padded queries: uniform over all keys (HF's rows) or zero; the real ones as without padding."""
    inputs, mode, _ = make_query_case("chunk_l1_memory_ragged", seed=3)
    full = {n: x for n, x in mode.items() if n != "query_lengths"}
    for empty_rows in ("uniform", "zero"):
        out = naive.rel_attention(*inputs, 0.3, empty_rows=empty_rows, **naive_mode(mode, 19))[0]
        ref = naive.rel_attention(*inputs, 0.3, empty_rows=empty_rows, **naive_mode(full, 19))[0]
        assert torch.equal(out[1], ref[1]) and torch.equal(out[0, :9], ref[0, :9])
        fill = inputs[2][0].mean(0) if empty_rows == "uniform" else torch.zeros_like(inputs[2][0, 0])
        torch.testing.assert_close(out[0, 9:], fill.expand_as(out[0, 9:]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("empty_rows", ["uniform", "zero"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_query_cases_autograd_path_matches_naive(case, dtype, empty_rows, fused_calls):
    inputs, mode, dout = make_query_case(case, seed=len(case))
    ours = [x.to(dtype, copy=True).requires_grad_() for x in inputs]
    with backend.use_backend("torch"):
        out = rel_attention(*ours, scale=0.25, empty_rows=empty_rows, **mode)
    out.backward(dout.to(dtype))
    refs = [x.to(dtype).double().requires_grad_() for x in inputs]
    ref = naive.rel_attention(*refs, 0.25, empty_rows=empty_rows, **naive_mode(mode, inputs[1].shape[1]))[0]
    ref.backward(dout)
    assert not fused_calls
    assert_rel_close(out, ref, dtype, "out")
    for name, x, rx in zip(NAMES, ours, refs):
        assert_rel_close(x.grad, rx.grad, dtype, f"d{name}")


@pytest.mark.parametrize("empty_rows", ["uniform", "zero"])
@pytest.mark.parametrize("block", [None, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_query_cases_inference_path_matches_naive(case, dtype, block, empty_rows, monkeypatch, fused_calls):
    if block is not None:
        monkeypatch.setattr(ra, "QUERY_BLOCK", block)
    inputs, mode, _ = make_query_case(case, seed=len(case) + 1)
    with torch.no_grad(), backend.use_backend("torch"):
        out = rel_attention(*[x.to(dtype) for x in inputs], scale=0.25, empty_rows=empty_rows, **mode)
    ref = naive.rel_attention(*[x.to(dtype).double() for x in inputs], 0.25, empty_rows=empty_rows,
                              **naive_mode(mode, inputs[1].shape[1]))[0]
    assert fused_calls
    assert_rel_close(out, ref, dtype, "out")


@pytest.mark.parametrize("case", ["chunk_l1_memory_ragged", "causal_query_lengths"])
def test_query_cases_probabilities(case):
    inputs, mode, _ = make_query_case(case, seed=4)
    for empty_rows in ("uniform", "zero"):
        with backend.use_backend("torch"):
            out, prob = rel_attention_with_probs(*inputs, scale=0.4, empty_rows=empty_rows, **mode)
        ref_out, ref_prob = naive.rel_attention(*inputs, 0.4, empty_rows=empty_rows,
                                                **naive_mode(mode, inputs[1].shape[1]))
        assert_rel_close(out, ref_out, torch.float64, "out")
        assert_rel_close(prob, ref_prob, torch.float64, "prob")


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk_context", [None, (4, 1, 2), (4, -1, 0)])
def test_inference_path_memory_is_linear(chunk_context, monkeypatch):
    """No-grad, bidirectional, queries in blocks of 16: the largest tensor built grows as T, not T²
    (4x the frames: at most 4.5x the elements; T² would be 16x), with ragged lengths of both kinds."""
    monkeypatch.setattr(ra, "QUERY_BLOCK", 16)
    largest = []
    for T in (64, 256):
        g = torch.Generator().manual_seed(T)
        B, H, D = 2, 2, 8
        q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
        r = torch.randn(2 * T - 1, H, D, generator=g)
        u, w = torch.randn(H, D, generator=g), torch.randn(H, D, generator=g)
        lengths = torch.tensor([T, T - 9])
        mode = dict(causal=False, chunk_context=chunk_context, key_lengths=lengths, query_lengths=lengths - 3)
        with torch.no_grad(), backend.use_backend("torch"), LargestTensor() as seen:
            rel_attention(q, k, v, r, u, w, scale=0.3, empty_rows="zero", **mode)
        largest.append(seen.largest)
    assert largest[1] <= 4.5 * largest[0], largest


# ---------------------------------------------------------------------------------------------
# softcap (Gemma's audio encoders): score -> cap * tanh(score / cap) before the masking
# ---------------------------------------------------------------------------------------------

SOFTCAP_CASES = ["chunk_l1_memory_ragged", "bidi_query_lengths", "causal_query_lengths"]


def test_naive_softcap_is_the_formula():
    """One query, two keys, no bias: the probabilities are the softmax of cap · tanh(score / cap)."""
    q = torch.tensor([[[[3.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0]], [[-2.0]]]], dtype=torch.float64)
    r = torch.zeros(2, 1, 1, dtype=torch.float64)
    bias = torch.zeros(1, 1, dtype=torch.float64)
    prob = naive.rel_attention(q, k, k, r, bias, bias, 1.0, softcap=2.0)[1]
    capped = 2.0 * torch.tanh(torch.tensor([3.0, -6.0], dtype=torch.float64) / 2.0)
    torch.testing.assert_close(prob.flatten(), torch.softmax(capped, 0), rtol=1e-14, atol=0)


@pytest.mark.parametrize("empty_rows", ["uniform", "zero"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", SOFTCAP_CASES)
def test_softcap_matches_naive(case, dtype, empty_rows, monkeypatch):
    """Both torch paths (autograd: every gradient; without: the output, queries in blocks of 5)."""
    monkeypatch.setattr(ra, "QUERY_BLOCK", 5)
    inputs, mode, dout = make_query_case(case, seed=len(case) + 7)
    inputs = [x * 2 for x in inputs]                     # scores of a few units: the cap of 3 bends them
    ours = [x.to(dtype, copy=True).requires_grad_() for x in inputs]
    with backend.use_backend("torch"):
        out = rel_attention(*ours, scale=0.25, empty_rows=empty_rows, softcap=3.0, **mode)
        with torch.no_grad():
            inference = rel_attention(*[x.detach() for x in ours], scale=0.25, empty_rows=empty_rows, softcap=3.0,
                                      **mode)
    out.backward(dout.to(dtype))
    refs = [x.to(dtype).double().requires_grad_() for x in inputs]
    ref = naive.rel_attention(*refs, 0.25, empty_rows=empty_rows, softcap=3.0,
                              **naive_mode(mode, inputs[1].shape[1]))[0]
    ref.backward(dout)
    uncapped = naive.rel_attention(*refs, 0.25, empty_rows=empty_rows, **naive_mode(mode, inputs[1].shape[1]))[0]
    assert (uncapped - ref).norm() > 1e-2 * ref.norm()   # the cap matters here
    assert_rel_close(out, ref, dtype, "out")
    assert_rel_close(inference, ref, dtype, "out (no grad)")
    for name, x, rx in zip(NAMES, ours, refs):
        assert_rel_close(x.grad, rx.grad, dtype, f"d{name}")
    with backend.use_backend("torch"):
        _, prob = rel_attention_with_probs(*inputs, scale=0.25, empty_rows=empty_rows, softcap=3.0, **mode)
    ref_prob = naive.rel_attention(*inputs, 0.25, empty_rows=empty_rows, softcap=3.0,
                                   **naive_mode(mode, inputs[1].shape[1]))[1]
    assert_rel_close(prob, ref_prob, torch.float64, "prob")


@pytest.mark.parametrize("softcap", [0, -1.0, float("inf"), "3", True])
def test_bad_softcap_raises(softcap):
    tensors = [torch.randn(*s) for s in SHAPES.values()]
    with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
        rel_attention(*tensors, scale=0.5, causal=False, softcap=softcap)
