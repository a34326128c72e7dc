"""txl_fast.patch / unpatch on live HF transformers==4.35.0 TransfoXL models: patched == unpatched.

Every comparison runs the same HF instance twice, unpatched and then patched (fp32, abs <= 1e-5),
and a spy checks that the patched run really went through txl_fast.ops.
"""
import copy
import io
import warnings

import pytest
import torch

import txl_fast
from tests.helpers import config_kwargs, hf_model, max_diff
from txl_fast import ops
from txl_fast.patch import is_patched, patch, unpatch

transformers = pytest.importorskip("transformers", reason="the peer transformers==4.35.0 is a test extra")
assert transformers.__version__ == "4.35.0", "the peer must be transformers==4.35.0"
warnings.filterwarnings("ignore", message=".*TransfoXL.*")

ATOL = 1e-5
HF_ATTN = transformers.models.transfo_xl.modeling_transfo_xl.RelPartialLearnableMultiHeadAttn






@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the txl_fast ops the patched modules use."""
    calls = {"rel_attention": 0, "rel_attention_with_probs": 0, "adaptive_nll": 0, "adaptive_log_softmax": 0}
    for name in calls:
        real = getattr(ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    return calls


def segments(kwargs, lengths, bsz=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, kwargs["vocab_size"], (bsz, L), generator=g) for L in lengths]


def run_segments(model, segs, labels: bool, **kw):
    outs, mems = [], None
    for ids in segs:
        lab = None
        if labels:
            lab = ids.clone()
            lab[0, 2] = -100
        out = model(ids, mems=mems, labels=lab, **kw)
        outs.append(out)
        mems = out.mems
    return outs


def assert_lm_outputs_equal(got, ref, labels: bool):
    for o, h in zip(got, ref):
        if labels:
            assert max_diff(o.losses, h.losses) <= ATOL          # HF's order, not just the same values
            assert abs(o.loss.item() - h.loss.item()) <= ATOL
        else:
            assert max_diff(o.prediction_scores, h.prediction_scores) <= ATOL
        if h.mems is None:
            assert o.mems is None
        else:
            assert max_diff(o.mems, h.mems) <= ATOL
        if h.hidden_states is not None:
            assert max_diff(o.hidden_states, h.hidden_states) <= ATOL
        if h.attentions is not None:
            assert max_diff(o.attentions, h.attentions) <= ATOL


CONFIG_NAMES = ["default", "no_same_length", "untie_r_false", "pre_lnorm", "div_val_1", "div_val_1_d_embed",
                "d_embed_div4", "no_cutoffs", "mem_len_0", "long_mem_clamp"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_lm_head_three_segments(name, spy):
    kwargs = config_kwargs(name)
    model = hf_model(transformers.TransfoXLLMHeadModel, kwargs)
    segs = segments(kwargs, (5, kwargs["mem_len"] + 3, 4))      # the middle segment is longer than mem_len
    for labels in (True, False):
        kw = dict(output_hidden_states=True, output_attentions=labels)
        with torch.no_grad():
            ref = run_segments(model, segs, labels, **kw)
            patch(model)
            got = run_segments(model, segs, labels, **kw)
            unpatch(model)
        assert_lm_outputs_equal(got, ref, labels)
    assert spy["rel_attention"] == 3 * kwargs["n_layer"]                # labels=False run: fused op
    assert spy["rel_attention_with_probs"] == 3 * kwargs["n_layer"]     # output_attentions run
    assert spy["adaptive_nll"] == 3 and spy["adaptive_log_softmax"] == 3


def test_losses_keep_order_and_single_row_clusters(spy):
    kwargs = config_kwargs("default")
    model = hf_model(transformers.TransfoXLLMHeadModel, kwargs)
    ids = torch.tensor([[1, 25, 3, 90, 4, 5], [6, 7, 8, 9, 10, 11]])   # clusters 1 and 2 have one row each
    hidden = torch.randn(2, 6, 32)
    for keep_order in (False, True):
        ref = model.crit(hidden, ids, keep_order=keep_order)
        patch(model)
        got = model.crit(hidden, ids, keep_order=keep_order)
        unpatch(model)
        assert max_diff(got, ref) <= ATOL
    model.crit.keep_order = True            # HF's attribute is honoured too
    ref = model.crit(hidden, ids)
    patch(model)
    assert max_diff(model.crit(hidden, ids), ref) <= ATOL
    assert spy["adaptive_nll"] == 3


def test_base_model_head_mask_inputs_embeds_and_tuples(spy):
    kwargs = config_kwargs("default")
    model = hf_model(transformers.TransfoXLModel, kwargs)
    ids = torch.randint(0, 97, (2, 5))
    embeds = torch.randn(2, 5, 32)
    calls = [
        dict(input_ids=ids, head_mask=torch.tensor([1.0, 0.0, 0.5, 1.0]), output_attentions=True),
        dict(input_ids=ids, head_mask=torch.rand(2, 4), output_attentions=True),
        dict(input_ids=ids, head_mask=torch.rand(2, 4)),
        dict(inputs_embeds=embeds),
        dict(input_ids=ids, return_dict=False, output_hidden_states=True),
    ]
    with torch.no_grad():
        ref = [model(**kw) for kw in calls]
        patch(model)
        got = [model(**kw) for kw in calls]
    for o, h in zip(got, ref):
        o, h = (o, h) if isinstance(o, tuple) else (o.to_tuple(), h.to_tuple())
        assert max_diff(list(o), list(h)) <= ATOL
    assert spy["rel_attention"] + spy["rel_attention_with_probs"] == len(calls) * kwargs["n_layer"]


@pytest.mark.parametrize("pad", [None, 3])
def test_sequence_classification(pad, spy):
    kwargs = config_kwargs("default", pad_token_id=pad, num_labels=3)
    model = hf_model(transformers.TransfoXLForSequenceClassification, kwargs)
    bsz = 1 if pad is None else 3
    ids = torch.randint(4, 97, (bsz, 6))
    if pad is not None:
        ids[0, 4:] = pad
    labels = torch.randint(0, 3, (bsz,))
    with torch.no_grad():
        ref = model(ids, labels=labels)
        patch(model)
        got = model(ids, labels=labels)
    assert max_diff(got.logits, ref.logits) <= ATOL and abs(got.loss.item() - ref.loss.item()) <= ATOL
    assert spy["rel_attention"] == kwargs["n_layer"]


def test_generate_greedy_equal(spy):
    kwargs = config_kwargs("default")
    model = hf_model(transformers.TransfoXLLMHeadModel, kwargs)
    prompt = torch.randint(0, 97, (2, 4))
    gen = dict(max_new_tokens=6, do_sample=False, num_beams=1, pad_token_id=0)
    ref = model.generate(prompt, **gen)
    patch(model)
    got = model.generate(prompt, **gen)
    assert torch.equal(got, ref)
    assert spy["adaptive_log_softmax"] >= 6


@pytest.mark.parametrize("name", ["default", "div_val_1_d_embed", "untie_r_false", "pre_lnorm"])
def test_training_gradients_equal(name, spy):
    kwargs = config_kwargs(name)                # dropout 0: deterministic in train mode
    model = hf_model(transformers.TransfoXLLMHeadModel, kwargs).train()
    segs = segments(kwargs, (5, 6))

    def grads():
        model.zero_grad(set_to_none=True)
        mems = None
        for ids in segs:                        # two segments: the memory path is exercised (no grad through it)
            out = model(ids, mems=mems, labels=ids.clone())
            out.loss.backward()
            mems = out.mems
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    patch(model)
    got = grads()
    assert got.keys() == ref.keys() and len(ref) == len(list(model.parameters()))
    for n in ref:
        assert max_diff(got[n], ref[n]) <= ATOL, n
    assert spy["adaptive_nll"] == 2


def test_patch_keeps_parameters_state_dict_and_unpatch_restores_exactly():
    model = hf_model(transformers.TransfoXLLMHeadModel, config_kwargs("default"))
    params = {n: p for n, p in model.named_parameters()}
    state = model.state_dict(keep_vars=True)
    classes = {n: type(m) for n, m in model.named_modules()}
    attrs = {n: dict(vars(m)) for n, m in model.named_modules()}

    assert patch(model) is model
    assert {n: p for n, p in model.named_parameters()} == params                   # the same tensors
    assert {k: v for k, v in model.state_dict(keep_vars=True).items()} == state   # same keys, same tensors
    swapped = {n for n, m in model.named_modules() if type(m) is not classes[n]}
    assert swapped == {"crit"} | {f"transformer.layers.{i}.dec_attn" for i in range(2)}
    for n in swapped:
        m = model.get_submodule(n)
        assert is_patched(m) and isinstance(m, classes[n])                         # still an HF instance
    text = repr(model)
    assert text.count("TxlFastPatchedRelPartialLearnableMultiHeadAttn(") == 1 and "2 x RelPartial" in text
    assert "TxlFastPatchedProjectedAdaptiveLogSoftmax(" in text and "txl_fast=adaptive_softmax" in text
    assert patch(model) is model                                                   # idempotent

    assert unpatch(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    for n, m in model.named_modules():
        now = vars(m)
        assert now.keys() == attrs[n].keys(), n
        assert all(now[k] is attrs[n][k] for k in now), n
    assert "TxlFast" not in repr(model)
    assert unpatch(model) is model                                                 # unpatched: no-op


def test_reset_memory_length_copy_and_pickle(spy):
    """Live mem_len, deepcopy and torch.save of a patched model keep it patched and equal."""
    kwargs = config_kwargs("default")
    model = hf_model(transformers.TransfoXLLMHeadModel, kwargs)
    segs = segments(kwargs, (5, 4, 4))
    with torch.no_grad():
        model.reset_memory_length(3)
        ref = run_segments(model, segs, labels=True)
        patch(model)
        assert_lm_outputs_equal(run_segments(model, segs, labels=True), ref, True)
        twin = copy.deepcopy(model)
        assert twin.transformer.layers[0].dec_attn._txl_fast_patch.transformer is twin.transformer
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for other in (twin, loaded):
            assert is_patched(other.crit)
            assert_lm_outputs_equal(run_segments(other, segs, labels=True), ref, True)
    assert spy["adaptive_nll"] == 9


def test_unusual_attention_inputs_fall_back_to_hf():
    """Called directly without a mask, HF attends to every key: the patched module runs HF's code."""
    kwargs = config_kwargs("default")
    model = hf_model(transformers.TransfoXLModel, kwargs)
    attn = model.layers[0].dec_attn
    w, r = torch.randn(5, 2, 32), torch.randn(5, 1, 32)
    ref = attn(w, r)[0]
    patch(model)
    with pytest.warns(UserWarning, match="running HF's attention"):
        got = attn(w, r)[0]
    assert max_diff(got, ref) <= ATOL
    mask = torch.zeros(5, 5, 1, dtype=torch.bool)              # not HF's causal mask either
    ref = HF_ATTN.forward(attn, w, r, attn_mask=mask)[0]
    with pytest.warns(UserWarning, match="running HF's attention"):
        got = attn(w, r, attn_mask=mask)[0]
    assert max_diff(got, ref) <= ATOL


def test_not_a_transfo_xl_model_is_a_clear_error():
    ours = txl_fast.TransfoXLLMHeadModel(txl_fast.TransfoXLConfig(**config_kwargs("default")))
    for wrong in (torch.nn.Linear(2, 2), ours):
        with pytest.raises(TypeError, match="expects a HuggingFace transformers TransfoXLModel"):
            patch(wrong)
        with pytest.raises(TypeError, match="expects a HuggingFace transformers TransfoXLModel"):
            unpatch(wrong)
    with pytest.raises(TypeError, match="already run txl_fast's ops"):
        patch(txl_fast.TransfoXLModel(txl_fast.TransfoXLConfig(**config_kwargs("default"))))
