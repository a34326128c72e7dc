"""``txl_fast.patch`` on transformers 5.x ``Wav2Vec2BertSelfAttention`` with
``position_embeddings_type="relative_key"`` (Shaw's distance table, clipped at left / right: T = 13
frames reach past both clips) and "relative" (Wav2Vec2Conformer's formula): the module alone and in
``Wav2Vec2BertModel``. Patched vs HF's own code on the same random weights: outputs on every frame,
attention weights when asked, the gradients of every parameter and of the input, eval and train
(no dropout), eager and sdpa, padded batches; bf16 against float64; the fallback and its one
warning; rotary modules left alone; unpatch.
"""

import pytest
import torch
from compare import check, check_bf16, check_grads, frames, grads, perturb, run_both, run_models, warns_once_and_agrees, weighted
from test_patch_wav2vec2_conformer import key_mask
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel
from transformers.models.wav2vec2_bert.modeling_wav2vec2_bert import (
    Wav2Vec2BertRelPositionalEmbedding,
    Wav2Vec2BertSelfAttention,
)

import txl_fast
from txl_fast import patch_speech

E = 32
KINDS = ["relative_key", "relative"]


def config(attn="eager", kind="relative_key", **over):
    kw = dict(hidden_size=E, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, feature_size=8,
              stride=2, feature_projection_input_dim=16, conv_depthwise_kernel_size=5, position_embeddings_type=kind, left_max_position_embeddings=5,
              right_max_position_embeddings=3, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
              feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
              conformer_conv_dropout=0.0, add_adapter=False, vocab_size=11, pad_token_id=0)
    cfg = Wav2Vec2BertConfig(**{**kw, **over})
    cfg._attn_implementation = attn
    return cfg


def attention_inputs(kind, B=3, T=13, lengths=(13, 8, 5), seed=0, hidden=E):
    torch.manual_seed(seed)
    x = torch.randn(B, T, hidden)
    pos = Wav2Vec2BertRelPositionalEmbedding(config(hidden_size=hidden))(x) if kind == "relative" else None
    return x, pos, frames(list(lengths), T)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("train", [False, True])
def test_attention_module(kind, attn, train):
    """Outputs on every frame and every gradient (a loss over every frame)."""
    module = perturb(Wav2Vec2BertSelfAttention(config(attn, kind))).train(train)
    x0, pos, valid = attention_inputs(kind)
    mask = key_mask(valid, attn)

    def run(m):
        x = x0.clone().requires_grad_()
        out, weights = m(x, mask, pos)
        weighted(out, torch.ones_like(valid)).backward()
        return out, weights, grads(m, x)

    (ref, ref_w, ref_g), (ours, our_w, our_g) = run_both(module, run)
    check(ours, ref, "output")
    assert our_w is None and (ref_w is None) == (attn == "sdpa")      # HF's eager returns them, unasked
    check_grads(our_g, ref_g, f"{kind} {attn} train={train}")


def test_attention_row_of_length_zero_and_weights_when_asked():
    """A batch row with every key padded is uniform over all keys (as HF); the weights when asked."""
    module = perturb(Wav2Vec2BertSelfAttention(config("eager"))).eval()
    x, pos, valid = attention_inputs("relative_key", lengths=(13, 8, 0), seed=1)
    mask = key_mask(valid, "eager")
    ref, ref_w = module(x, mask, pos)
    txl_fast.patch(module)
    out, w = module(x, mask, pos, output_attentions=True)
    _, unasked = module(x, mask, pos)
    txl_fast.unpatch(module)
    check(out, ref, "output")
    check(w, ref_w, "weights")
    assert unasked is None


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_attention_bf16_no_less_accurate(kind, autocast):
    module = perturb(Wav2Vec2BertSelfAttention(config("sdpa", kind, hidden_size=64, left_max_position_embeddings=64,
                                                      right_max_position_embeddings=8)), scale=0.05).eval()
    x, pos, valid = attention_inputs(kind, T=150, lengths=(150, 101, 40), seed=3, hidden=64)
    mask = key_mask(valid, "sdpa")
    check_bf16(module, lambda m, x, pos: m(x, mask, pos if kind == "relative" else None)[0], x,
               x if pos is None else pos, autocast)


def test_fallback_warns_once_and_agrees():
    """A mask that is not key padding (limited context): HF's own attention, one warning."""
    module = perturb(Wav2Vec2BertSelfAttention(config("sdpa"))).eval()
    x, pos, valid = attention_inputs("relative_key", seed=4)
    band = (torch.arange(13)[:, None] - torch.arange(13)[None, :]).abs() <= 3
    mask = key_mask(valid, "sdpa") & band
    warns_once_and_agrees(module, lambda m: m(x, mask, pos)[0])


def test_rotary_is_left_alone_and_unpatch_restores():
    rotary = Wav2Vec2BertModel(config(kind="rotary"))
    assert patch_speech.targets(rotary) == []
    module = perturb(Wav2Vec2BertSelfAttention(config("eager"))).eval()
    attrs, keys = set(vars(module)), module.state_dict().keys()
    txl_fast.patch(module)
    assert type(module).__name__ == "TxlFastPatchedHFWav2Vec2BertSelfAttention"
    assert isinstance(module, Wav2Vec2BertSelfAttention) and module.state_dict().keys() == keys
    txl_fast.unpatch(module)
    assert type(module) is Wav2Vec2BertSelfAttention and set(vars(module)) == attrs


@pytest.mark.parametrize(("kind", "attn", "train"), [("relative_key", "eager", False), ("relative_key", "sdpa", True),
                                                     ("relative", "sdpa", False)])
def test_model(kind, attn, train):
    """Wav2Vec2BertModel, 2 layers, two lengths: last hidden state on valid frames and every
    gradient; under eager with output_attentions, every layer's weights."""
    torch.manual_seed(0)
    model = perturb(Wav2Vec2BertModel(config(attn, kind))).train(train)
    assert len(patch_speech.targets(model)) == 2
    torch.manual_seed(6)
    x0, am = torch.randn(2, 17, 16), frames([17, 11], 17).long()
    valid = am.bool()

    def run(m):
        m.zero_grad(set_to_none=True)
        x = x0.to(next(m.parameters()).dtype, copy=True).requires_grad_()
        out = m(x, attention_mask=am, output_attentions=attn == "eager")
        weighted(out.last_hidden_state, valid).backward()
        return out, grads(m, x)

    ref, ours, ref_g, our_g, ref64 = run_models(model, run, torch.float32)
    check(ours.last_hidden_state[valid], ref.last_hidden_state[valid], "last hidden state")
    check_grads(our_g, ref_g, f"model {kind} {attn} train={train}", ref64=ref64)
    assert len(ours.attentions or ()) == len(ref.attentions or ()) == (2 if attn == "eager" else 0)
    for i, (w, r) in enumerate(zip(ours.attentions or (), ref.attentions or ())):
        check(w, r, f"attentions layer {i}")
