"""The compiled CPU decode attention (``ops.compiled_decode``, under ``backend.use_cpu_compile()``)
against the float64 naive path, through ``rel_attention`` and through a model's decode steps; and
its switch's refusals. Dynamo may not fall back to running the function eagerly here (its
recompile limit, raised for the many shapes and dtypes of these cases, is made an error), so every
comparison checks compiled code."""
import copy
import importlib

import pytest
import torch
import torch._dynamo

from helpers import assert_rel_close, our_model
from txl_fast import backend, naive
from txl_fast.ops import linear, rel_attention

compiled_decode = importlib.import_module("txl_fast.ops.compiled_decode")
ra = importlib.import_module("txl_fast.ops.rel_attention")

# (B, mlen, H, D, window, Lr, uniform_keys): one query per row
CASES = {
    "plain": (2, 23, 3, 8, None, 24, 0),
    "one_row": (1, 30, 2, 16, None, 31, 0),
    "clamped": (2, 20, 3, 8, None, 6, 0),                    # distances >= 5 take r's row 0
    "window_drops_keys": (2, 20, 3, 8, 9, 21, 0),             # r cut to the 9 distances left
    "clamped_window": (2, 20, 3, 8, 12, 6, 0),
    "uniform_keys": (2, 25, 3, 8, None, 11, 17),             # HF's zero memory, clamped
    "uniform_partly_dropped": (2, 25, 3, 8, 15, 26, 17),
    "every_key_uniform": (2, 6, 2, 8, None, 7, 7),
}


@pytest.fixture
def strict_dynamo():
    """Dynamo's recompile limit raised for the cases' many shapes and dtypes, and hitting it an error
    (not a silent eager run). Through torch's own ``config.patch``: pytest's monkeypatch deletes a
    config entry it did not find in the module's ``__dict__`` on undo, which hides it for good."""
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture
def compiled_calls(monkeypatch, strict_dynamo):
    calls, decode_attention = [], compiled_decode.decode_attention
    monkeypatch.setattr(compiled_decode, "decode_attention", lambda *a: (calls.append(1), decode_attention(*a))[1])
    return calls


def inputs_of(case, dtype, seed=0):
    """Random inputs; k, v as views of a head-major buffer with spare rows (the cache's layout)."""
    B, mlen, H, D, _, Lr, _ = CASES[case]
    g = torch.Generator().manual_seed(seed)
    Lk, spare = mlen + 1, 5
    buffers = [torch.randn(B, H, Lk + 2 * spare, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    k, v = (b[:, :, spare : spare + Lk].transpose(1, 2) for b in buffers)            # (B, Lk, H, D) views
    q = torch.randn(B, 1, H, D, generator=g, dtype=torch.float64).to(dtype)
    r, u, w = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in ((Lr, H, D), (H, D), (H, D)))
    return q, k, v, r, u, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_decode_matches_naive(case, dtype, compiled_calls):
    B, mlen, H, D, window, Lr, n = CASES[case]
    q, k, v, r, u, w = inputs_of(case, dtype, seed=len(case))
    with torch.no_grad(), backend.use_backend("torch"), backend.use_cpu_compile():
        out = rel_attention(q, k, v, r, u, w, scale=D**-0.5, window=window, uniform_keys=n)
    assert compiled_calls
    q, k, v, r, u, w = (x.double() for x in (q, k, v, r, u, w))                    # the same rounded inputs
    if n:                                                # the closed form reads row n - 1 for rows [0, n)
        k, v = (torch.cat([x[:, n - 1 : n].expand(-1, n, -1, -1), x[:, n:]], dim=1) for x in (k, v))
    ref = naive.rel_attention(q, k, v, r, u, w, D**-0.5, window)[0]
    assert_rel_close(out, ref, dtype, case)


def test_bf16_scores_are_not_rounded_before_the_softmax(compiled_calls):
    """A wt103-sized memory with peaked attention (scores of spread ~3): the compiled form reduces in
    float32 and is within 3e-3 of float64; the eager bf16 products round each score to bf16 first."""
    g = torch.Generator().manual_seed(1)
    H, D, Lk, Lr = 4, 64, 1601, 1001
    q = (3 * torch.randn(1, 1, H, D, generator=g)).bfloat16()
    k, v = (torch.randn(1, Lk, H, D, generator=g).bfloat16() for _ in range(2))
    r, u, w = (torch.randn(*s, generator=g).bfloat16() for s in ((Lr, H, D), (H, D), (H, D)))
    ref = naive.rel_attention(*(x.double() for x in (q, k, v, r, u, w)), D**-0.5, None)[0]
    with torch.no_grad(), backend.use_backend("torch"):
        eager = rel_attention(q, k, v, r, u, w, scale=D**-0.5)
        with backend.use_cpu_compile():
            compiled = rel_attention(q, k, v, r, u, w, scale=D**-0.5)
    err = [((x.double() - ref).norm() / ref.norm()).item() for x in (compiled, eager)]
    assert err[0] < 3e-3 < err[1], err


def test_gradients_and_the_default_do_not_take_it(compiled_calls):
    q, k, v, r, u, w = inputs_of("plain", torch.float32)
    with backend.use_backend("torch"):
        with torch.no_grad():
            rel_attention(q, k, v, r, u, w, scale=0.3)                       # switch off (the default)
        with backend.use_cpu_compile():
            q.requires_grad_()
            rel_attention(q, k, v, r, u, w, scale=0.3).sum().backward()      # autograd: the torch path
    assert not compiled_calls and q.grad is not None


@pytest.mark.parametrize("name,init", [("default", "zeros"), ("long_mem_clamp", "empty"), ("pre_lnorm", "zeros")])
def test_model_decode_steps_equal_eager(name, init, compiled_calls):
    """A prompt then single-token steps through a filling, then sliding memory: the same scores as
    the eager steps (fp32), and greedy generation gives the same tokens."""
    model = our_model(name)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(2))
    scores = {}
    for compiled in (False, True):
        cache = model.transformer.new_cache(2, init)
        with torch.no_grad(), backend.use_backend("torch"), backend.use_cpu_compile(compiled):
            model(ids[:, :3], cache=cache)
            scores[compiled] = torch.stack([model(ids[:, t : t + 1], cache=cache).prediction_scores
                                            for t in range(3, ids.shape[1])])
    assert compiled_calls
    assert_rel_close(scores[True], scores[False].double(), torch.float32, "decode step scores")
    with backend.use_cpu_compile():
        tokens = model.generate(ids[:, :4], 8, init_mems=init)
    assert torch.equal(tokens, model.generate(ids[:, :4], 8, init_mems=init))


@pytest.fixture
def row_calls(monkeypatch, strict_dynamo):
    calls, row_linear = [], compiled_decode.row_linear
    monkeypatch.setattr(compiled_decode, "row_linear", lambda *a: (calls.append(1), row_linear(*a))[1])
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,bias", [((48, 40), True), ((40, 72), False), ((3, 5), True)])
def test_one_row_products_match_float64(shape, bias, dtype, row_calls):
    """ops.linear's one-row product under the switch: compiled, float32 sums; more rows, fp32 rows
    and autograd keep their eager products."""
    g = torch.Generator().manual_seed(shape[0])
    w, x = torch.randn(*shape, generator=g).to(dtype), torch.randn(1, 1, shape[1], generator=g).to(dtype)
    b = torch.randn(shape[0], generator=g).to(dtype) if bias else None
    with torch.no_grad(), backend.use_cpu_compile():
        out = linear(x, w, b)
        assert len(row_calls) == 1
        linear(x.expand(2, 1, -1), w, b)                                        # two rows
        linear(x.float(), w.float(), None)                                       # fp32
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert_rel_close(out, ref, dtype, "row_linear")
    with backend.use_cpu_compile():
        linear(x, w.requires_grad_(), b)                                         # autograd
    assert len(row_calls) == 1


def test_bf16_model_steps_take_the_compiled_rows_and_pack_nothing(compiled_calls, row_calls):
    """bf16 steps against float64 steps of the same (bf16-rounded) weights."""
    model = our_model("default", dtype=torch.bfloat16)
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(4))

    def steps(m):
        cache = m.transformer.new_cache(1, "zeros")
        m(ids[:, :4], cache=cache)
        return torch.stack([m(ids[:, t : t + 1], cache=cache).prediction_scores for t in range(4, 10)])

    with torch.no_grad():
        ref = steps(reference)
        steps(model)
        assert model.transformer.inference_state.packed.value is not None   # eager bf16 steps pack
        with backend.use_cpu_compile():
            out = steps(model)
        assert model.transformer.inference_state.packed.value is None   # compiled rows: no copies
    assert compiled_calls and row_calls
    assert_rel_close(out, ref, torch.bfloat16, "bf16 decode step scores")


def test_switch_refusals(monkeypatch):
    with pytest.raises(TypeError, match="True or False"):
        backend.set_cpu_compile("yes")
    with pytest.raises(TypeError, match="True or False"):
        with backend.use_cpu_compile(1):
            pass
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("no g++")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        backend.set_cpu_compile(True)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        with backend.use_cpu_compile():
            pass
    assert not backend.cpu_compile()
    with backend.use_cpu_compile(False):                                      # off needs no compiler
        assert not backend.cpu_compile()
