"""``txl_fast.patch`` on transformers 5.x ``FastSpeech2ConformerAttention`` (ESPnet's "latest"
relative attention): the module alone, in ``FastSpeech2ConformerModel``'s encoder and in the whole
model's training step (encoder, decoder, loss). Patched vs HF's own code on the same random weights:
outputs on every frame, attention weights, the loss, the gradients of every parameter, eval and
train mode (no dropout), padded batches (a row of length 0: zeros, as HF); bf16 against float64;
the fallback and its one warning; unpatch.
"""

import pytest
import torch
from compare import TOLERANCE, check, check_bf16, check_grads, frames, grads, perturb, run_both, run_models, warns_once_and_agrees, weighted
from transformers import FastSpeech2ConformerConfig, FastSpeech2ConformerModel
from transformers.models.fastspeech2_conformer.modeling_fastspeech2_conformer import (
    FastSpeech2ConformerAttention,
    FastSpeech2ConformerRelPositionalEncoding,
)

import txl_fast
from txl_fast import patch_speech

E = 32


def config(**over):
    kw = dict(hidden_size=E, vocab_size=20, num_mel_bins=8, encoder_num_attention_heads=4, encoder_layers=2,
              encoder_linear_units=48, decoder_layers=2, decoder_num_attention_heads=2, decoder_linear_units=48,
              speech_decoder_postnet_layers=2, speech_decoder_postnet_units=16, duration_predictor_channels=16,
              energy_predictor_channels=16, pitch_predictor_channels=16, pitch_predictor_layers=2,
              encoder_kernel_size=5, decoder_kernel_size=5, energy_predictor_dropout=0.0, pitch_predictor_dropout=0.0,
              encoder_dropout_rate=0.0, encoder_positional_dropout_rate=0.0, encoder_attention_dropout_rate=0.0,
              decoder_dropout_rate=0.0, decoder_positional_dropout_rate=0.0, decoder_attention_dropout_rate=0.0,
              duration_predictor_dropout_rate=0.0, speech_decoder_postnet_dropout=0.0)
    return FastSpeech2ConformerConfig(**{**kw, **over})


def attention(heads=4, E=E, dropout=0.0):
    module = FastSpeech2ConformerAttention(config(hidden_size=E), dict(num_attention_heads=heads,
                                                                        attention_dropout_rate=dropout))
    with torch.no_grad():                      # HF leaves pos_bias_u / v uninitialised (torch.Tensor)
        module.pos_bias_u.normal_()
        module.pos_bias_v.normal_()
    return perturb(module)


def attention_inputs(B=3, T=13, lengths=(13, 8, 0), seed=0, E=E):
    torch.manual_seed(seed)
    x = torch.randn(B, T, E)
    _, pos = FastSpeech2ConformerRelPositionalEncoding(config(hidden_size=E), dict(positional_dropout_rate=0.0))(x)     # (1, 2T - 1, E)
    valid = frames(list(lengths), T)
    return x, pos, valid, valid[:, None, :].long()


@pytest.mark.parametrize("train", [False, True])
def test_attention_module(train):
    """Every frame (a row of length 0: zeros), the weights when asked, every gradient."""
    module = attention().train(train)
    x0, pos, valid, mask = attention_inputs()

    def run(m):
        x = x0.clone().requires_grad_()
        out, weights = m(x, mask, pos, output_attentions=True)
        weighted(out, torch.ones_like(valid)).backward()
        return out, weights, grads(m, x)

    (ref, ref_w, ref_g), (ours, our_w, our_g) = run_both(module, run)
    check(ours, ref, "output")
    check(our_w, ref_w, "weights")
    check_grads(our_g, ref_g, f"train={train}")


def test_attention_weights_only_when_asked():
    module = attention().eval()
    x, pos, _, mask = attention_inputs(seed=1)
    for mode, unasked in (("on_request", False), ("always", True)):
        txl_fast.patch(module, attention_weights=mode)
        assert module(x, mask, pos)[1] is None if not unasked else module(x, mask, pos)[1] is not None
        txl_fast.unpatch(module)
    assert module(x, mask, pos)[1] is None                                            # HF: none unasked


@pytest.mark.parametrize("autocast", [False, True])
def test_attention_bf16_no_less_accurate(autocast):
    torch.manual_seed(3)
    module = attention(E=64).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.5)
    x, pos, valid, mask = attention_inputs(T=150, lengths=(150, 101, 40), seed=3, E=64)
    check_bf16(module, lambda m, x, pos: m(x, mask, pos)[0], x, pos, autocast)


def test_fallback_warns_once_and_agrees():
    """Position tables that differ per batch row: HF's own attention, one warning."""
    module = attention().eval()
    x, pos, _, mask = attention_inputs(seed=4)
    pos = pos.expand(3, -1, -1) + 0.01 * torch.randn(3, *pos.shape[1:])
    warns_once_and_agrees(module, lambda m: m(x, mask, pos)[0])


def test_unpatch_restores():
    module = attention().eval()
    attrs, keys = set(vars(module)), module.state_dict().keys()
    txl_fast.patch(module)
    assert type(module).__name__ == "TxlFastPatchedHFFastSpeech2ConformerAttention"
    assert isinstance(module, FastSpeech2ConformerAttention) and module.state_dict().keys() == keys
    txl_fast.unpatch(module)
    assert type(module) is FastSpeech2ConformerAttention and set(vars(module)) == attrs


def model(seed=0):
    torch.manual_seed(seed)
    m = FastSpeech2ConformerModel(config())
    with torch.no_grad():
        for a in m.modules():
            if isinstance(a, FastSpeech2ConformerAttention):
                a.pos_bias_u.normal_()
                a.pos_bias_v.normal_()
    return perturb(m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_encoder(dtype):
    """The text encoder (2 layers), padded batch, with every layer's weights: outputs, weights and
    every gradient."""
    encoder = model().encoder.eval()
    torch.manual_seed(5)
    ids = torch.randint(1, 20, (3, 11))
    mask = frames([11, 7, 4], 11)[:, None, :].long()
    tol = TOLERANCE[dtype]

    def run(m):
        m.zero_grad(set_to_none=True)
        out = m(ids, mask, output_attentions=True, return_dict=True)
        weighted(out.last_hidden_state, mask[:, 0].bool()).backward()
        return out, grads(m)

    ref, ours, ref_g, our_g, ref64 = run_models(encoder, run, dtype)
    check(ours.last_hidden_state, ref.last_hidden_state, "last hidden state", tol)
    assert len(ours.attentions) == len(ref.attentions) == 2
    for i, (w, r) in enumerate(zip(ours.attentions, ref.attentions)):
        check(w, r, f"attentions layer {i}", tol)
    check_grads(our_g, ref_g, "encoder", max(tol, 1e-4 * (dtype == torch.float32)), ref64)


def test_model_training_step():
    """FastSpeech2ConformerModel in training (encoder, length regulator on the given durations,
    decoder, the loss): loss, spectrogram and every gradient."""
    m = model().train()
    torch.manual_seed(6)
    B, L = 2, 6
    ids = torch.randint(1, 20, (B, L))
    am = frames([6, 4], L).long()
    durations = torch.randint(1, 4, (B, L)) * am
    frames_ = int(durations.sum(1).max())
    spec = torch.randn(B, frames_, 8)
    spec[1, int(durations[1].sum()):] = -100.0
    labels = dict(spectrogram_labels=spec, duration_labels=durations, pitch_labels=torch.randn(B, L, 1),
                  energy_labels=torch.randn(B, L, 1))

    def run(m):
        m.zero_grad(set_to_none=True)
        out = m(ids, attention_mask=am, return_dict=True, **labels)
        out.loss.backward()
        return out, grads(m)

    # HF's length regulator writes float32 whatever the model's dtype: no float64 reference
    ref, ours, ref_g, our_g, _ = run_models(m, run, torch.float32, reference64=False)
    assert len(patch_speech.targets(m)) == 4
    check(ours.loss, ref.loss, "loss")
    check(ours.spectrogram, ref.spectrogram, "spectrogram")
    check_grads(our_g, ref_g, "model")
