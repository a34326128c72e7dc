"""``txl_fast.patch`` on transformers 5.x ``Wav2Vec2ConformerSelfAttention`` with
``position_embeddings_type="relative"``: the module alone, in ``Wav2Vec2ConformerModel`` and in
``Wav2Vec2ConformerForCTC``. Patched vs HF's own code on the same random weights: outputs on every
frame, attention weights, the CTC loss, the gradients of every parameter and of the input, eval
and train mode (no dropout), eager and sdpa, padded batches; bf16 against float64; rotary modules
left alone; the fallback and its one warning; unpatch.

HF's mask here is key padding only (a padded query attends to the valid keys), so padded frames
agree too and the losses may read every frame.
"""

import pytest
import torch
from compare import TOLERANCE, check, check_bf16, check_grads, frames, grads, perturb, run_both, run_models, warns_once_and_agrees, weighted
from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerForCTC, Wav2Vec2ConformerModel
from transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer import (
    Wav2Vec2ConformerRelPositionalEmbedding,
    Wav2Vec2ConformerSelfAttention,
)

import txl_fast
from txl_fast import patch_speech

E = 32


def config(attn="eager", **over):
    kw = dict(hidden_size=E, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, conv_dim=(8, 8),
              conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
              conv_depthwise_kernel_size=5, position_embeddings_type="relative", hidden_dropout=0.0,
              attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
              mask_time_prob=0.0, conformer_conv_dropout=0.0, vocab_size=11, pad_token_id=0, feat_extract_norm="layer")
    cfg = Wav2Vec2ConformerConfig(**{**kw, **over})
    cfg._attn_implementation = attn
    return cfg


def key_mask(valid, attn):
    """What create_bidirectional_mask gives the layers (B, 1, T, T): sdpa bool, eager additive float."""
    mask = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)
    if attn == "sdpa":
        return mask
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


def attention_inputs(B=3, T=13, lengths=(13, 8, 5), seed=0):
    torch.manual_seed(seed)
    x = torch.randn(B, T, E)
    pos = Wav2Vec2ConformerRelPositionalEmbedding(config())(x)          # (1, 2T - 1, E)
    return x, pos, frames(list(lengths), T)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("train", [False, True])
def test_attention_module(attn, train):
    """Outputs on every frame and every gradient (a loss over every frame)."""
    module = perturb(Wav2Vec2ConformerSelfAttention(config(attn))).train(train)
    x0, pos, valid = attention_inputs()
    mask = key_mask(valid, attn)

    def run(m):
        x = x0.clone().requires_grad_()
        out, weights = m(x, mask, pos)
        weighted(out, torch.ones_like(valid)).backward()
        return out, weights, grads(m, x)

    (ref, ref_w, ref_g), (ours, our_w, our_g) = run_both(module, run)
    check(ours, ref, "output")
    assert our_w is None and (ref_w is None) == (attn == "sdpa")      # HF's eager returns them, unasked
    check_grads(our_g, ref_g, f"{attn} train={train}")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_row_of_length_zero(attn):
    """A batch row with every key padded is uniform over all keys in HF (eager's finfo.min scores,
    sdpa's all-False row alike); ours too."""
    module = perturb(Wav2Vec2ConformerSelfAttention(config(attn))).eval()
    x, pos, valid = attention_inputs(lengths=(13, 8, 0), seed=1)
    mask = key_mask(valid, attn)
    ref = module(x, mask, pos)[0]
    txl_fast.patch(module)
    ours = module(x, mask, pos)[0]
    txl_fast.unpatch(module)
    check(ours, ref, "output")


@pytest.mark.parametrize("always", [False, True])
def test_attention_weights_when_asked(always):
    module = perturb(Wav2Vec2ConformerSelfAttention(config("eager"))).eval()
    x, pos, valid = attention_inputs(seed=2)
    mask = key_mask(valid, "eager")
    ref_out, ref_w = module(x, mask, pos)
    txl_fast.patch(module, attention_weights="always" if always else "on_request")
    out, w = module(x, mask, pos, output_attentions=True)
    _, unasked = module(x, mask, pos)
    txl_fast.unpatch(module)
    check(out, ref_out, "output")
    check(w, ref_w, "weights")
    assert (unasked is not None) == always


@pytest.mark.parametrize("autocast", [False, True])
def test_attention_bf16_no_less_accurate(autocast):
    module = perturb(Wav2Vec2ConformerSelfAttention(config("sdpa", hidden_size=64)), scale=0.05).eval()
    torch.manual_seed(3)
    T = 150
    x = torch.randn(3, T, 64)
    pos = Wav2Vec2ConformerRelPositionalEmbedding(config(hidden_size=64))(x)
    valid = frames([150, 101, 40], T)
    mask = key_mask(valid, "sdpa")
    check_bf16(module, lambda m, x, pos: m(x, mask, pos)[0], x, pos, autocast)


def test_fallback_warns_once_and_agrees():
    """A mask that is not key padding (limited context): HF's own attention, one warning."""
    module = perturb(Wav2Vec2ConformerSelfAttention(config("sdpa"))).eval()
    x, pos, valid = attention_inputs(seed=4)
    band = (torch.arange(13)[:, None] - torch.arange(13)[None, :]).abs() <= 3
    mask = key_mask(valid, "sdpa") & band
    warns_once_and_agrees(module, lambda m: m(x, mask, pos)[0])


def test_rotary_is_left_alone_and_unpatch_restores():
    rotary = Wav2Vec2ConformerModel(config(position_embeddings_type="rotary"))
    assert patch_speech.targets(rotary) == []
    with pytest.raises(TypeError):
        txl_fast.patch(rotary)
    module = perturb(Wav2Vec2ConformerSelfAttention(config("eager"))).eval()
    attrs, keys = set(vars(module)), module.state_dict().keys()
    txl_fast.patch(module)
    assert type(module).__name__ == "TxlFastPatchedHFWav2Vec2ConformerSelfAttention"
    assert isinstance(module, Wav2Vec2ConformerSelfAttention) and module.state_dict().keys() == keys
    txl_fast.unpatch(module)
    assert type(module) is Wav2Vec2ConformerSelfAttention and set(vars(module)) == attrs


def audio(lengths, samples=400, seed=6):
    torch.manual_seed(seed)
    return torch.randn(len(lengths), samples), frames(list(lengths), samples).long()


@pytest.mark.parametrize(("attn", "dtype"), [("eager", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.float64)],
                         ids=["eager-fp32", "sdpa-fp32", "sdpa-fp64"])
@pytest.mark.parametrize("train", [False, True])
def test_model(attn, train, dtype):
    """Wav2Vec2ConformerModel, 3 layers, two lengths: last hidden state and every gradient; under
    eager with output_attentions, every layer's weights."""
    torch.manual_seed(0)
    model = perturb(Wav2Vec2ConformerModel(config(attn))).train(train)
    assert len(patch_speech.targets(model)) == 3
    x0, am = audio([400, 250])
    tol = TOLERANCE[dtype]

    def run(m):
        m.zero_grad(set_to_none=True)
        x = x0.to(next(m.parameters()).dtype, copy=True).requires_grad_(not train)
        out = m(x, attention_mask=am, output_attentions=attn == "eager")
        weighted(out.last_hidden_state, torch.ones(out.last_hidden_state.shape[:2], dtype=torch.bool)).backward()
        return out, grads(m, *[x] * (not train))      # in training it sets requires_grad on its output

    ref, ours, ref_g, our_g, ref64 = run_models(model, run, dtype)
    check(ours.last_hidden_state, ref.last_hidden_state, "last hidden state", tol)
    check_grads(our_g, ref_g, f"model {attn} train={train}", max(tol, 1e-4 * (dtype == torch.float32)), ref64)
    assert len(ours.attentions or ()) == len(ref.attentions or ()) == (3 if attn == "eager" else 0)
    for i, (w, r) in enumerate(zip(ours.attentions or (), ref.attentions or ())):
        check(w, r, f"attentions layer {i}", tol)


@pytest.mark.parametrize("train", [False, True])
def test_ctc_logits_loss_and_gradients(train):
    torch.manual_seed(0)
    model = perturb(Wav2Vec2ConformerForCTC(config("sdpa"))).train(train)
    x0, am = audio([400, 300, 170], seed=7)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, 7, -100], [8, 9, -100, -100]])

    def run(m):
        m.zero_grad(set_to_none=True)
        x = x0.to(next(m.parameters()).dtype, copy=True).requires_grad_(not train)
        out = m(x, attention_mask=am, labels=labels)
        out.loss.backward()
        return out, grads(m, *[x] * (not train))

    ref, ours, ref_g, our_g, ref64 = run_models(model, run, torch.float32)
    check(ours.logits, ref.logits, "logits")
    check(ours.loss, ref.loss, "loss")
    check_grads(our_g, ref_g, f"CTC train={train}", ref64=ref64)
