"""A decode step without host synchronisation, as CUDA graphs need (issue 15, section 3).

What these CPU tests prove: through the formulations the ops take on CUDA (``backend.sync_free``,
forced here with ``force_sync_free``), a cached decode step - the model on one fed-back token and
the next token's candidates, greedy, top-k or full log-probs, on the torch and the triton
(interpreted) launch paths - issues no syncing ATen op (``txl_fast.bench.syncs``), and those
formulations give the CPU ones' results. What they cannot prove: syncs in code that runs only on
CUDA (the Triton launchers' CUDA branches, the caching allocator), and the CUDA graphs themselves;
scripts/gpu_check.py counts the syncs on CUDA and replays the graphs there.
"""
import contextlib

import pytest
import torch

from tests.helpers import our_model
from txl_fast import backend
from txl_fast.bench.syncs import SyncCounter
from txl_fast.inference import EOS_CHECK_EVERY, decode_step, generate
from txl_fast.cache import trusted_token_ids

CANDIDATES = [(False, 0), (True, 5), (True, 0)]           # greedy, top-k, the full row


def _prompted(model, backend_name, do_sample, top_k, B=2):
    """A cache after a 5-token prompt, and the fed-back token (B, 1)."""
    ids = torch.randint(0, model.config.vocab_size, (B, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), backend.use_backend(backend_name):
        logprobs, cand, cache = decode_step(model.transformer, model.crit, ids, model.new_cache(B), do_sample, top_k)
    token = logprobs.argmax(-1, keepdim=True) if cand is None else cand[:, :1]
    return cache, token


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("name", ["default", "d_embed_div4", "no_cutoffs"])
@pytest.mark.parametrize("do_sample,top_k", CANDIDATES)
def test_decode_step_issues_no_host_sync(backend_name, name, do_sample, top_k):
    if backend_name == "triton":
        pytest.importorskip("triton")
    model = our_model(name)
    cache, token = _prompted(model, backend_name, do_sample, top_k)
    with torch.no_grad(), backend.use_backend(backend_name), backend.force_sync_free(), trusted_token_ids():
        with SyncCounter(fail=True):
            decode_step(model.transformer, model.crit, token, cache, do_sample, top_k)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_the_cpu_formulation_syncs_so_the_check_can_fail(backend_name):
    """Without the CUDA formulations and with the ids checked, the same step syncs 7 times (the
    count before this work, on both backends): the range check's min and max, a nonzero per
    embedding cluster (3) and per tail cluster of the top-k (2)."""
    if backend_name == "triton":
        pytest.importorskip("triton")
    model = our_model("default")
    cache, token = _prompted(model, backend_name, False, 0)
    with torch.no_grad(), backend.use_backend(backend_name), SyncCounter() as syncs:
        decode_step(model.transformer, model.crit, token, cache, False, 0)
    assert dict(syncs.ops) == {"_local_scalar_dense": 2, "nonzero": 5}
    with pytest.raises(RuntimeError, match="host synchronisation: aten._local_scalar_dense"):
        with SyncCounter(fail=True):
            bool(torch.tensor(1.0) > 0)


@pytest.mark.parametrize("do_sample,top_k", CANDIDATES)
@pytest.mark.parametrize("name", ["default", "d_embed_div4"])
def test_sync_free_formulations_give_the_same_step(name, do_sample, top_k):
    model = our_model(name, seed=2)
    results = []
    for force in (False, True):
        cache, token = _prompted(model, "torch", do_sample, top_k, B=4)
        with torch.no_grad(), trusted_token_ids(), backend.force_sync_free() if force else contextlib.nullcontext():
            logprobs, ids, cache = decode_step(model.transformer, model.crit, token, cache, do_sample, top_k)
        results.append((logprobs, ids))
    (a, ids_a), (b, ids_b) = results
    assert (a - b).abs().max() <= 1e-5
    assert ids_a is None and ids_b is None or torch.equal(ids_a, ids_b)


def test_sync_free_top_k_equals_the_row_skipping_one():
    from txl_fast import ops

    model = our_model("d_embed_div4", seed=5)
    # scaled up so that some rows' best words are in the tails and others' are not
    hidden = torch.randn(9, 32, generator=torch.Generator().manual_seed(6)) * 4
    for k in (1, 3, 40):
        plain = ops.adaptive_topk(hidden, k, *model.crit.clusters())
        with backend.force_sync_free():
            free = ops.adaptive_topk(hidden, k, *model.crit.clusters())
        assert torch.equal(plain[1], free[1]) and (plain[0] - free[0]).abs().max() <= 1e-6


def test_generate_syncs_a_bounded_number_of_times_per_call():
    """No eos: the prompt's range check only (2), whatever the length. With eos: one look per
    EOS_CHECK_EVERY steps and one at the end."""
    model = our_model("default")
    prompt = torch.randint(0, 97, (2, 4))
    for new in (3, 40):
        with backend.force_sync_free(), SyncCounter() as syncs:
            generate(model, prompt, new)
        assert syncs.total == 2, (new, syncs.ops)
    with backend.force_sync_free(), SyncCounter() as syncs:
        generate(model, prompt, 40, eos_token_id=96)              # 96: a token that never wins here
    assert syncs.total == 2 + 40 // EOS_CHECK_EVERY + 1, syncs.ops


def test_generate_with_eos_equals_stopping_at_every_step():
    """Rows finish at different steps, one past an EOS_CHECK_EVERY boundary: the output is cut at
    the step where the last row finished, eos after each row's first one, as a per-step check."""
    model = our_model("default", seed=4)
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(2))
    free = generate(model, prompt, 40)[:, 4:]                                      # (3, 40)
    for eos in {int(t) for t in free[:, EOS_CHECK_EVERY + 1 :].flatten()}:
        hit = free == eos
        first = torch.where(hit.any(1), hit.int().argmax(1), torch.full((3,), 40))  # each row's first eos
        stop = 40 if bool((first == 40).any()) else int(first.max()) + 1
        expected = free.clone()
        for row, f in enumerate(first.tolist()):
            expected[row, f:] = eos
        got = generate(model, prompt, 40, eos_token_id=eos)
        assert torch.equal(got, torch.cat([prompt, expected[:, :stop]], 1)), eos


def test_generate_streams_each_step_once_and_stops_at_eos():
    model = our_model("default", seed=4)
    prompt = torch.randint(0, 97, (1, 4))
    eos = int(generate(model, prompt, 8)[0, 7])                       # the 4th new token
    seen = []
    out = generate(model, prompt, 20, eos_token_id=eos, streamer=lambda t: seen.append(t.clone()))
    assert out.shape[1] <= 4 + 4 and len(seen) == out.shape[1] - 4
    assert torch.equal(torch.stack(seen, 1), out[:, 4:])


def test_cuda_graph_is_refused_off_cuda():
    model = our_model("default")
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        generate(model, torch.tensor([[1, 2]]), 3, cuda_graph=True)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_steps_on_a_cache_fixed_for_graphs_equal_eager_generation(backend_name):
    """The layout the graphs replay: after ``fix_for_graphs`` the decode steps (the function
    captured) give generate's tokens, and the cache cycles through slack + 2 layouts."""
    if backend_name == "triton":
        pytest.importorskip("triton")
    model = our_model("default", seed=3)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(8))
    with backend.use_backend(backend_name):
        expected = generate(model, prompt, 14)
        with torch.no_grad():
            logprobs, ids, cache = decode_step(model.transformer, model.crit, prompt, model.new_cache(2), False, 0)
            cache.fix_for_graphs(1, slack=3)
            tokens, layouts = [ids[:, 0]], set()
            with trusted_token_ids():
                for _ in range(13):
                    layouts.add(cache.layout())
                    logprobs, ids, cache = decode_step(model.transformer, model.crit, tokens[-1][:, None], cache,
                                                       False, 0)
                    tokens.append(ids[:, 0])
    assert torch.equal(torch.stack(tokens, 1), expected[:, 5:])
    assert len(layouts) == 3 + 2


def test_sync_free_adaptive_input_has_the_same_values_and_gradients():
    """The CUDA formulation of the adaptive input is also the one training takes on CUDA."""
    model = our_model("d_embed_div4", seed=7)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(9))
    emb = model.transformer.word_emb
    params = [p for p in emb.parameters()]
    results = []
    for force in (False, True):
        with backend.force_sync_free() if force else contextlib.nullcontext():
            out = emb(ids)
        results.append((out, torch.autograd.grad((out * out.detach().sin()).sum(), params)))
    (a, grads_a), (b, grads_b) = results
    assert (a - b).abs().max() <= 1e-6
    for ga, gb in zip(grads_a, grads_b):
        assert (ga - gb).abs().max() <= 1e-6


def test_cache_layout_restores_only_its_own_buffers():
    model = our_model("default")
    cache = model.new_cache(2)
    layout = cache.layout()
    cache.commit(1)
    assert cache.layout() != layout
    cache.restore(layout)
    assert cache.layout() == layout
    cache.fix_for_graphs(1, slack=2)                     # new buffers: the old layout is of others
    with pytest.raises(ValueError, match="other buffers"):
        cache.restore(layout)
