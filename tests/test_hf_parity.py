"""Ours vs the peer, HF transformers==4.35.0, on checkpoint files written by HF's own save_pretrained."""
import warnings

import pytest
import torch

from tests.helpers import CONFIGS, config_kwargs, hf_model, max_diff
from txl_fast import TransfoXLForSequenceClassification, TransfoXLLMHeadModel, TransfoXLModel

transformers = pytest.importorskip("transformers", reason="the peer transformers==4.35.0 is a test extra")
assert transformers.__version__ == "4.35.0", "the peer must be transformers==4.35.0"
warnings.filterwarnings("ignore", message=".*TransfoXL.*")

ATOL = 1e-5   # fp32




def saved(model, path, safe: bool):
    model.save_pretrained(path, safe_serialization=safe)
    assert (path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    return path




@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lm_head_matches_hf_over_three_segments(tmp_path, name, safe):
    kwargs = config_kwargs(name)
    hf = hf_model(transformers.TransfoXLLMHeadModel, kwargs)
    ours = TransfoXLLMHeadModel.from_pretrained(saved(hf, tmp_path, safe))
    g = torch.Generator().manual_seed(1)
    lengths = (5, kwargs["mem_len"] + 3, 4)      # the middle segment is longer than mem_len
    for labels in (True, False):
        hf_mems = our_mems = None
        for L in lengths:
            ids = torch.randint(0, kwargs["vocab_size"], (2, L), generator=g)
            lab = ids.clone() if labels else None
            if lab is not None:
                lab[0, 2] = -100
            kw = dict(output_hidden_states=True, output_attentions=True)
            h = hf(ids, mems=hf_mems, labels=None if lab is None else lab.clone(), **kw)
            o = ours(ids, mems=our_mems, labels=lab, **kw)
            assert max_diff(o.hidden_states, h.hidden_states) <= ATOL
            assert max_diff(o.attentions, h.attentions) <= ATOL
            if h.mems is None:
                assert o.mems is None
            else:
                assert max_diff(o.mems, h.mems) <= ATOL
            if labels:
                assert abs(o.loss.item() - h.loss.item()) <= ATOL
                # HF groups per-token losses by cluster; ours are in position order: same values
                assert max_diff(o.losses.flatten().sort().values, h.losses.flatten().sort().values) <= ATOL
            else:
                assert max_diff(o.prediction_scores, h.prediction_scores) <= ATOL
            hf_mems, our_mems = h.mems, o.mems


def test_base_model_head_mask_inputs_embeds_and_tuples(tmp_path):
    kwargs = config_kwargs("default")
    hf = hf_model(transformers.TransfoXLModel, kwargs)
    ours = TransfoXLModel.from_pretrained(saved(hf, tmp_path, True))
    ids = torch.randint(0, 97, (2, 5))
    for head_mask in (torch.tensor([1.0, 0.0, 0.5, 1.0]), torch.rand(2, 4)):
        h = hf(ids, head_mask=head_mask, output_attentions=True)
        o = ours(ids, head_mask=head_mask, output_attentions=True)
        assert max_diff(o.last_hidden_state, h.last_hidden_state) <= ATOL
        assert max_diff(o.attentions, h.attentions) <= ATOL
    embeds = torch.randn(2, 5, 32)
    assert max_diff(ours(inputs_embeds=embeds).last_hidden_state, hf(inputs_embeds=embeds).last_hidden_state) <= ATOL
    h, o = hf(ids, return_dict=False, output_hidden_states=True), ours(ids, return_dict=False, output_hidden_states=True)
    assert len(h) == len(o) == 3
    assert max_diff(list(o), list(h)) <= ATOL


def test_lm_head_tuple_output(tmp_path):
    hf = hf_model(transformers.TransfoXLLMHeadModel, config_kwargs("default", cutoffs=[], div_val=1))
    ours = TransfoXLLMHeadModel.from_pretrained(saved(hf, tmp_path, True))
    ids = torch.randint(0, 97, (2, 5))
    h, o = hf(ids, labels=ids, return_dict=False), ours(ids, labels=ids, return_dict=False)
    assert len(h) == len(o) == 4 and o[1] == () and h[1] == ()
    assert max_diff(o[0], h[0]) <= ATOL and max_diff(o[2], h[2]) <= ATOL and max_diff(o[3], h[3]) <= ATOL


def test_all_labels_ignored_quirk(tmp_path):
    """HF sets labels[0, 1] = eos when row 0 has no label; the loss must agree (ours leaves the caller's tensor alone)."""
    hf = hf_model(transformers.TransfoXLLMHeadModel, config_kwargs("default"))
    ours = TransfoXLLMHeadModel.from_pretrained(saved(hf, tmp_path, True))
    ids = torch.randint(0, 97, (2, 5))
    labels = ids.clone()
    labels[0, 1:] = -100
    o = ours(ids, labels=labels)
    assert (labels[0, 1:] == -100).all()
    assert abs(o.loss.item() - hf(ids, labels=labels.clone()).loss.item()) <= ATOL


@pytest.mark.parametrize("pad", [None, 3])
def test_sequence_classification(tmp_path, pad):
    kwargs = config_kwargs("default", pad_token_id=pad, num_labels=3)
    hf = hf_model(transformers.TransfoXLForSequenceClassification, kwargs)
    ours = TransfoXLForSequenceClassification.from_pretrained(saved(hf, tmp_path, True))
    bsz = 1 if pad is None else 3
    ids = torch.randint(4, 97, (bsz, 6))
    if pad is not None:
        ids[0, 4:] = pad
        ids[1, 2:] = pad
    labels = torch.randint(0, 3, (bsz,))
    h, o = hf(ids, labels=labels), ours(ids, labels=labels)
    assert max_diff(o.logits, h.logits) <= ATOL
    assert abs(o.loss.item() - h.loss.item()) <= ATOL


def test_hf_loads_our_files(tmp_path):
    """Round trip the other way: HF reads what our save_pretrained writes."""
    hf = hf_model(transformers.TransfoXLLMHeadModel, config_kwargs("div_val_1_d_embed"))
    ours = TransfoXLLMHeadModel.from_pretrained(saved(hf, tmp_path / "a", True))
    ours.save_pretrained(tmp_path / "b")
    back = transformers.TransfoXLLMHeadModel.from_pretrained(tmp_path / "b").eval()
    ids = torch.randint(0, 97, (2, 5))
    assert max_diff(back(ids).prediction_scores, ours(ids).prediction_scores) <= ATOL


def test_sequence_classification_with_d_embed_unlike_d_model_is_refused_before_compute(tmp_path):
    """HF's score layer takes d_embed features of d_model-wide states: HF fails inside the product;
    ours loads the checkpoint and says why at forward, before any compute."""
    transformers = pytest.importorskip("transformers")
    kwargs = config_kwargs("div_val_1_d_embed", pad_token_id=3, num_labels=3)
    hf = hf_model(transformers.TransfoXLForSequenceClassification, kwargs)
    hf.save_pretrained(tmp_path)
    ours = TransfoXLForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs d_embed == d_model"):
        ours(torch.randint(0, 97, (2, 5)))

