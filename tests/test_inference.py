"""evaluate() and generate(): the paper's streaming protocol, HF-identical greedy decoding, bad input."""
import math

import pytest
import torch

from tests.helpers import config_kwargs, our_model
from txl_fast import PRESETS, TransfoXLLMHeadModel, evaluate, ops


def model_for(name="default", seed=0, **over):
    return our_model(name, torch.float32, seed, **over)


@pytest.mark.parametrize("batch_size,tgt_len", [(1, 5), (3, 4), (2, 7)])
def test_evaluate_equals_manual_segment_loop(batch_size, tgt_len):
    model = model_for()
    stream = torch.randint(0, 97, (61,), generator=torch.Generator().manual_seed(2))
    result = evaluate(model, stream, tgt_len=tgt_len, mem_len=6, clamp_len=5, same_length=True,
                      batch_size=batch_size, progress=False)
    rows = 61 // batch_size
    data = stream[: rows * batch_size].view(batch_size, rows)
    total, count, mems = 0.0, 0, model.empty_mems(batch_size)
    with torch.no_grad():
        for i in range(0, rows - 1, tgt_len):
            inp, tgt = data[:, i : i + tgt_len], data[:, i + 1 : i + 1 + tgt_len]
            inp = inp[:, : tgt.shape[1]]
            out = model.transformer(inp, mems=mems)
            mems = out.mems
            # the full distribution, then the target's entry: independent of the NLL kernel path
            logprob = model.crit.log_prob(out.last_hidden_state.reshape(-1, 32))
            total -= logprob.gather(1, tgt.reshape(-1, 1)).sum().item()
            count += tgt.numel()
    assert result.tokens == count == batch_size * (rows - 1)
    assert math.isclose(result.nll, total / count, rel_tol=1e-6)
    assert math.isclose(result.perplexity, math.exp(total / count), rel_tol=1e-6)
    assert result.bpc is None and result.tokens_per_s > 0


def test_evaluate_restores_the_models_protocol_and_zero_init():
    model = model_for()
    stream = torch.randint(0, 97, (40,))
    empty = evaluate(model, stream, tgt_len=8, mem_len=12, clamp_len=3, same_length=False, progress=False)
    zeros = evaluate(model, stream, tgt_len=8, mem_len=12, clamp_len=3, same_length=False,
                     init_mems="zeros", progress=False)
    assert empty.nll != zeros.nll
    t = model.transformer
    assert (t.mem_len, t.clamp_len, t.same_length) == (6, 5, True)
    char = evaluate(model, stream, tgt_len=8, mem_len=12, clamp_len=3, same_length=False, char_level=True,
                    progress=False)
    assert math.isclose(char.bpc, char.nll / math.log(2))
    assert PRESETS["wt103"] == dict(tgt_len=128, mem_len=1600, clamp_len=1000, same_length=True)
    assert PRESETS["enwik8"]["mem_len"] == PRESETS["text8"]["mem_len"] == 3800


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tgt_len=0), "tgt_len must be a positive"),
        (dict(mem_len=-1), "mem_len must be an integer >= 0"),
        (dict(mem_len=0, same_length=True), "same_length needs a memory"),
        (dict(batch_size=-1), "batch_size must be a positive"),
        (dict(clamp_len=-1), "clamp_len must be"),
        (dict(init_mems="random"), "init_mems must be"),
        (dict(batch_size=40), "too few"),
    ],
)
def test_evaluate_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(model_for(), torch.randint(0, 97, (40,)), **kwargs)


@pytest.mark.parametrize("use_cache", [True, False])
def test_evaluate_without_memory_scores_each_segment_alone(use_cache):
    model = model_for()
    stream = torch.randint(0, 97, (41,), generator=torch.Generator().manual_seed(5))
    result = evaluate(model, stream, tgt_len=8, mem_len=0, clamp_len=5, same_length=False, progress=False,
                      use_cache=use_cache)
    model.transformer.same_length = False
    total = 0.0
    with torch.no_grad():
        for i in range(0, 40, 8):
            inp, tgt = stream[None, i : i + 8], stream[None, i + 1 : i + 9]
            inp = inp[:, : tgt.shape[1]]
            out = model.transformer(inp, mems=model.empty_mems(1))
            total -= model.crit.log_prob(out.last_hidden_state[0]).gather(1, tgt.reshape(-1, 1)).sum().item()
    assert result.tokens == 40 and math.isclose(result.nll, total / 40, rel_tol=1e-6)


def test_evaluate_mem_len_beyond_the_stream_and_beyond_memory(monkeypatch):
    model = model_for()
    stream = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(6))
    whole = evaluate(model, stream, tgt_len=8, mem_len=40, clamp_len=5, progress=False)
    huge = evaluate(model, stream, tgt_len=8, mem_len=100_000_000, clamp_len=5, progress=False)
    assert huge.nll == whole.nll                  # an empty memory never holds more than the stream
    with pytest.raises(ValueError, match=r"mem_len 100000000 needs .* GiB of memory cache"):
        evaluate(model, stream, tgt_len=8, mem_len=100_000_000, init_mems="zeros", progress=False)
    monkeypatch.setattr("txl_fast.inference.available_memory", lambda device: 1000)
    with pytest.raises(ValueError, match=r"0\.0 GiB is available on cpu: lower mem_len"):
        evaluate(model, stream, tgt_len=8, mem_len=30, progress=False)


def test_evaluate_bad_tokens():
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        evaluate(model_for(), torch.tensor([1, 2, 97, 3]))
    with pytest.raises(ValueError, match="1-D int64"):
        evaluate(model_for(), torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("name", ["default", "mem_len_0", "no_cutoffs"])
def test_greedy_generate_matches_hf(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    from tests.helpers import hf_model

    hf = hf_model(transformers.TransfoXLLMHeadModel, config_kwargs(name))
    hf.save_pretrained(tmp_path)
    ours = TransfoXLLMHeadModel.from_pretrained(tmp_path)
    prompt = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=12)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_and_respects_top_k_and_top_p():
    model = model_for()
    prompt = torch.randint(0, 97, (3, 4))
    sample = lambda seed, **kw: model.generate(prompt, 8, do_sample=True,  # noqa: E731
                                               generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(sample(1), sample(1))
    assert torch.equal(sample(1, top_k=1), model.generate(prompt, 8))          # top-k 1 is greedy
    assert torch.equal(sample(2, top_p=1e-6), model.generate(prompt, 8))       # the smallest nucleus is the argmax
    logprobs = torch.log_softmax(torch.tensor([[3.0, 2.0, 0.0, -1.0]]), -1)
    from txl_fast.inference import next_token

    drawn = {int(next_token(logprobs, True, 1.0, 0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert drawn == {0, 1}              # p = 0.67, 0.24, ...: the 0.7 nucleus is {0, 1}
    drawn = {int(next_token(logprobs, True, 1.0, 3, 1.0, torch.Generator().manual_seed(s))) for s in range(300)}
    assert drawn == {0, 1, 2}


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_choose_next_equals_sampling_from_the_full_row(backend_name):
    """Greedy and top-k decoding through ops.adaptive_topk (no (B, V) row) pick the same tokens as
    next_token on the full log-probs, draw for draw with the same generator; top_p inside top-k too."""
    from txl_fast import use_backend
    from txl_fast.inference import choose_next, next_token

    model = model_for("default", seed=3)
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad(), use_backend(backend_name):
        logprobs = model.crit.log_prob(hidden)                                   # (5, V)
        for do_sample, top_k, top_p in ((False, 0, 1.0), (True, 1, 1.0), (True, 7, 1.0), (True, 7, 0.5),
                                        (True, 0, 0.8), (True, 500, 1.0)):
            for seed in range(3):
                gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
                fast = choose_next(model.crit, hidden, do_sample, 0.7, top_k, top_p, gen())
                full = next_token(logprobs, do_sample, 0.7, top_k, top_p, gen())
                assert torch.equal(fast, full), (do_sample, top_k, top_p, seed)


def test_generate_stops_at_eos():
    model = model_for()
    prompt = torch.randint(0, 97, (1, 4))
    greedy = model.generate(prompt, 6)
    eos = int(greedy[0, 5])                                          # the second generated token
    out = model.generate(prompt, 6, eos_token_id=eos)
    assert out.shape[1] <= 6 + 4 and int(out[0, -1]) == eos


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_p=None), "top_p"),
        (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite"),
        (dict(do_sample=True, temperature="0.5"), "temperature"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(top_k=True), "top_k"),
        (dict(max_new_tokens=10**13), "would not fit"),
        (dict(do_sample="no"), "do_sample must be True or False"),
        (dict(eos_token_id=97), "eos_token_id must be None or an id in"),
        (dict(eos_token_id=-3), "eos_token_id must be None or an id in"),
        (dict(eos_token_id="x"), "eos_token_id must be None or an id in"),
        (dict(do_sample=True, generator=123), "generator must be a torch.Generator"),
        (dict(streamer=5), "streamer must be callable"),
    ],
)
def test_generate_bad_arguments(kwargs, match):
    model = model_for()
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(torch.tensor([[1, 2]]), **kwargs)
    with pytest.raises(ValueError, match="token ids must be in"):                # even with nothing to generate
        model.generate(torch.tensor([[1, 500]]), max_new_tokens=0)
    with pytest.raises(ValueError, match="needs a prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize("wrong", [None, "model", "transformer"])
def test_evaluate_and_generate_take_an_lm_head_model(wrong):
    model = model_for()
    thing = model.transformer if wrong == "transformer" else wrong
    with pytest.raises(TypeError, match="expected a txl_fast TransfoXLLMHeadModel"):
        evaluate(thing, torch.tensor([1, 2, 3, 4]), tgt_len=2, mem_len=2)
    from txl_fast import generate

    with pytest.raises(TypeError, match="expected a txl_fast TransfoXLLMHeadModel"):
        generate(thing, torch.tensor([[1, 2]]))


def test_a_tgt_len_longer_than_the_stream_is_one_segment_not_a_huge_cache():
    """The cache is sized by the segment that can run, not by tgt_len: tgt_len 10**9 on 40 tokens is
    the whole stream in one segment, the numbers of tgt_len 39."""
    model = model_for()
    stream = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(5))
    huge = evaluate(model, stream, tgt_len=10**9, mem_len=6, clamp_len=5, progress=False)
    exact = evaluate(model, stream, tgt_len=39, mem_len=6, clamp_len=5, progress=False)
    assert huge.tokens == exact.tokens == 39 and math.isclose(huge.nll, exact.nll, rel_tol=1e-9)


def test_sampling_at_a_tiny_temperature_takes_the_best_token():
    """logprobs / 1e-45 overflow to -inf everywhere: the scores less their best are divided instead."""
    model = model_for()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(9))
    greedy = model.generate(prompt, 6)
    for top_k in (0, 5):
        tiny = model.generate(prompt, 6, do_sample=True, temperature=1e-45, top_k=top_k,
                              generator=torch.Generator().manual_seed(0))
        assert torch.equal(tiny, greedy)


def test_nll_op_used_by_evaluate_is_position_ordered():
    model = model_for()
    hidden = torch.randn(7, 32)
    target = torch.randint(0, 97, (7,))
    nll = ops.adaptive_nll(hidden, target, *model.crit.clusters())
    ref = -model.crit.log_prob(hidden).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(nll, ref, atol=1e-6)


# ---- the inference cache ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("name", ["default", "no_same_length", "pre_lnorm", "long_mem_clamp", "mem_len_0", "div_val_1"])
@pytest.mark.parametrize("init", ["zeros", "empty"])
def test_cached_forward_equals_uncached(name, init, backend):
    from txl_fast import use_backend

    model = model_for(name)
    g = torch.Generator().manual_seed(5)
    mems = model.init_mems(3) if init == "zeros" else model.empty_mems(3)
    cache = model.new_cache(3, init, step_hint=2)              # small buffer: forces moves and growth
    with torch.no_grad(), use_backend(backend):
        for L in (5, 11, 1, 1, 4, 7, 1, 13, 2):                 # longer and shorter than mem_len, decode steps
            ids = torch.randint(0, 97, (3, L), generator=g)
            ref = model(ids, mems=mems)
            mems = ref.mems
            got = model(ids, cache=cache)
            assert got.mems is None and got.cache is cache
            assert (got.prediction_scores - ref.prediction_scores).abs().max() <= 1e-5
            assert cache.mlen == (0 if mems is None else mems[0].shape[0])


@pytest.mark.parametrize("name", ["default", "long_mem_clamp"])
def test_cached_forward_on_triton_equals_uncached(name):
    """The kernels (interpreted) on the cache: the position keys are stored written out to a row
    per distance for them (clamp_len + 1 distinct rows for the torch path)."""
    pytest.importorskip("triton")
    from txl_fast import use_backend

    model = model_for(name)
    g = torch.Generator().manual_seed(4)
    mems, cache = model.init_mems(2), model.new_cache(2, "zeros", step_hint=2)
    stored = model.transformer.inference_state.positions
    with torch.no_grad():
        for L in (5, 1, 3):
            ids = torch.randint(0, 97, (2, L), generator=g)
            ref = model(ids, mems=mems)
            mems = ref.mems
            with use_backend("triton"):
                got = model(ids, cache=cache)
            assert (got.prediction_scores - ref.prediction_scores).abs().max() <= 1e-5
            assert stored.value[0].shape[0] >= model.config.mem_len + L > model.config.clamp_len + 1   # written out
        model(ids, cache=cache)                                                   # torch: the distinct rows
        assert stored.value[0].shape[0] == model.config.clamp_len + 1


def test_layer_kv_buffer_holds_the_last_mem_len_rows_through_moves_and_growth(monkeypatch):
    from txl_fast.cache import LayerKV

    moves = []                                  # (gap, rows) of every in-place move
    make_room = LayerKV.make_room
    monkeypatch.setattr(LayerKV, "make_room", lambda self, L: (moves.append((self.start, self.mlen)),
                                                                make_room(self, L))[1])
    g = torch.Generator().manual_seed(7)
    mem_len, kv = 9, LayerKV(2, 12, 3, 4, torch.float64, "cpu")
    fill = torch.randn(2, 1, 3, 4, generator=g, dtype=torch.float64)
    kv.fill(fill, -fill, 7)                                    # a filled start, as HF's zero memory
    kv.commit(7, mem_len)
    history, filled = fill.expand(2, 7, 3, 4), torch.ones(7, dtype=torch.bool)
    for L in (4, 3, 5, 1, 1, 2, 6, 1, 14, 3, 2, 1, 5):         # 14: longer than the buffer, which grows
        new = torch.randn(2, L, 3, 4, generator=g, dtype=torch.float64)
        k, v = kv.extend(new, -new)
        history = torch.cat([history, new], 1)[:, -(mem_len + L):]
        filled = torch.cat([filled, torch.zeros(L, dtype=torch.bool)])[-(mem_len + L):]
        assert torch.equal(k, history) and torch.equal(v, -history)
        assert kv.uniform_rows == int(filled.sum()), "filled rows miscounted"
        assert k.stride(1) == v.stride(1) == 4, "one head's keys/values are not a contiguous block"
        kv.commit(L, mem_len)
        history, filled = history[:, -mem_len:], filled[-mem_len:]
    assert any(gap < rows for gap, rows in moves), "no move overlapped its source"
    assert kv.uniform_rows == 0
    with pytest.raises(ValueError, match="empty memory"):
        kv.fill(fill, -fill, 2)


def test_zero_memory_is_scored_in_closed_form(monkeypatch):
    """A zero-initialised cache tells attention how many leading memory rows are still the zero
    row (``uniform_keys``), and the results equal the uncached path's."""
    import txl_fast.modules

    model = model_for(mem_len=12)
    calls, attention = [], txl_fast.modules.ops.rel_attention

    def recorded(*args, uniform_keys=0, **kwargs):
        calls.append(uniform_keys)
        return attention(*args, uniform_keys=uniform_keys, **kwargs)

    monkeypatch.setattr(txl_fast.modules.ops, "rel_attention", recorded)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(9))
    got = model.generate(prompt, 4)
    per_step = calls[:: model.config.n_layer]
    assert calls == [u for u in per_step for _ in range(model.config.n_layer)]
    assert per_step == [12, 7, 6, 5]                          # 12 zero rows, then 5 of them pushed out
    assert torch.equal(got, model.generate(prompt, 4, use_cache=False))


def test_position_keys_are_kept_across_caches_until_the_weights_change():
    model = model_for(mem_len=9, clamp_len=4)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(8))
    kept = model.transformer.inference_state.positions
    with torch.no_grad():
        model(ids, cache=model.new_cache(2))
        first = kept.value
        model(ids, cache=model.new_cache(2))
        assert first is not None and kept.value is first                      # reused by a new cache
        r_net = model.transformer.layers[1].dec_attn.r_net.weight
        r_net.mul_(1.5)                                                        # in place: version bumped
        got = model(ids, cache=model.new_cache(2)).prediction_scores
        assert kept.value is not first
        ref = model(ids).prediction_scores                                     # uncached, new weights
        assert (got - ref).abs().max() <= 1e-5
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        model(ids, cache=model.new_cache(2))
        assert kept.value is not first
    model.clear_position_cache()
    assert kept.value is None
    model(ids, cache=model.new_cache(2))                                       # autograd on: not kept
    assert kept.value is None
    with torch.no_grad():
        model(ids, cache=model.new_cache(2))
    r_net.grad = None
    model(ids, cache=model.new_cache(2)).prediction_scores.sum().backward()  # nor taken from the store
    assert r_net.grad is not None and r_net.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_decode_weights_are_packed_once_and_remade_when_they_change():
    """Batch-2 fp32 decode steps take the layer weights packed (``cache.PackedWeights``), kept across
    steps and caches, remade after an in-place update or load_state_dict, never used under autograd
    or for a single fp32 row on two threads; the steps equal the uncached forward throughout."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _packed_decode_weights_lifecycle()
    finally:
        torch.set_num_threads(threads)


def _packed_decode_weights_lifecycle():
    model = model_for(mem_len=9, clamp_len=4)
    kept = model.transformer.inference_state.packed
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 1), generator=g)

    def step_equals_uncached(cache_bsz=2):
        prompt = torch.randint(0, 97, (cache_bsz, 3), generator=g)
        step = ids[:cache_bsz]
        cache = model.new_cache(cache_bsz)
        model(prompt, cache=cache)
        ref = model(step, mems=model(prompt).mems).prediction_scores
        assert (model(step, cache=cache).prediction_scores - ref).abs().max() <= 1e-5

    with torch.no_grad():
        step_equals_uncached()
        first = kept.value
        assert first is not None and len(first) == model.config.n_layer                 # per layer the 4 weights
        assert all(len(layer) == 4 and all(w is not None for w in layer) for layer in first)
        step_equals_uncached()
        assert kept.value is first                                           # kept across caches
        model.transformer.layers[1].pos_ff.CoreNet[3].weight.mul_(1.5)         # in place: version bumped
        step_equals_uncached()
        assert kept.value is not first
        second = kept.value
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        step_equals_uncached()
        assert kept.value is not second
        model.clear_position_cache()
        assert kept.value is None
        step_equals_uncached(cache_bsz=1)                           # fp32, one row, two threads: split_linear
        assert kept.value is None
    weight = model.transformer.layers[0].dec_attn.qkv_net.weight
    model(ids, cache=model.new_cache(2)).prediction_scores.sum().backward()    # autograd: not packed
    assert kept.value is None and weight.grad is not None and weight.grad.abs().sum() > 0


def test_evaluate_and_generate_cached_equal_uncached():
    model = model_for()
    stream = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(6))
    for init in ("zeros", "empty"):
        a = evaluate(model, stream, tgt_len=6, mem_len=9, clamp_len=4, batch_size=2, init_mems=init, progress=False)
        b = evaluate(model, stream, tgt_len=6, mem_len=9, clamp_len=4, batch_size=2, init_mems=init, progress=False,
                     use_cache=False)
        assert math.isclose(a.nll, b.nll, rel_tol=1e-6)
        prompt = stream[:12].view(2, 6)
        assert torch.equal(model.generate(prompt, 10, init_mems=init), model.generate(prompt, 10, init_mems=init,
                                                                                       use_cache=False))


def test_cache_misuse_is_refused():
    model = model_for()
    cache = model.new_cache(2)
    ids = torch.randint(0, 97, (2, 3))
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.randint(0, 97, (3, 3)), cache=cache)
    with pytest.raises(ValueError, match="another model"):
        model_for(seed=1)(ids, cache=cache)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(ids, cache=cache, mems=model.init_mems(2))
    with pytest.raises(ValueError, match="init must be"):
        model.new_cache(2, "ones")
    model.reset_memory_length(3)
    with pytest.raises(ValueError, match="mem_len 6"):
        model(ids, cache=cache)
    model.reset_memory_length(6)
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        model(ids, cache=cache)


def test_a_model_copies_and_pickles_after_decode_steps():
    """The packed decode weights (oneDNN tensors: no storage to copy) and the position keys a model
    keeps are derived from its weights: copies and pickles start without them and remake their own."""
    import copy
    import io
    import pickle

    model = model_for()
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(8))
    tokens = model.generate(prompt, 6)
    assert model.transformer.inference_state.packed.value is not None   # fp32, 2 rows: packed
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        state = twin.transformer.inference_state
        assert state.packed.value is None and state.positions.value is None
        assert torch.equal(twin.generate(prompt, 6), tokens)
    torch.save(model, io.BytesIO())
    assert model.transformer.inference_state.packed.value is not None   # the original keeps its own

