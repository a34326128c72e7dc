"""``txl_fast.patch`` on transformers 5.x ``NemotronAsrStreamingEncoderAttention``: offline (the
chunked_limited mask read as the op's chunk_context, key padding as key lengths, queries whose
chunk sees no valid key as query lengths) and cache-aware streaming (keys = cache + chunk, Lk > Lq,
chunk by chunk with ``use_cache``). Patched vs HF's own code on the same random weights: outputs on
valid frames, every gradient, eval and train (no dropout), eager and sdpa; bf16 against float64;
the fallback and its one warning; unpatch.
"""

import pytest
import torch
from compare import check, check_bf16, check_grads, frames, grads, perturb, run_both, run_models, warns_once_and_agrees, weighted
from transformers import NemotronAsrStreamingEncoderConfig
from transformers.models.nemotron_asr_streaming.modeling_nemotron_asr_streaming import (
    NemotronAsrStreamingEncoder,
    NemotronAsrStreamingEncoderAttention,
    NemotronAsrStreamingEncoderRelPositionalEncoding,
)

import txl_fast
from txl_fast import patch_speech

E, MEL = 32, 16


def config(attn="sdpa", **over):
    kw = dict(hidden_size=E, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_kernel_size=3,
              subsampling_factor=4, subsampling_conv_channels=4, num_mel_bins=MEL, dropout=0.0, layerdrop=0.0,
              activation_dropout=0.0, attention_dropout=0.0, sliding_window=5, default_num_lookahead_tokens=1)
    cfg = NemotronAsrStreamingEncoderConfig(**{**kw, **over})
    cfg._attn_implementation = attn
    return cfg


def features(lengths, T=60, seed=6):
    torch.manual_seed(seed)
    return torch.randn(len(lengths), T, MEL), frames(list(lengths), T).long()


@pytest.mark.parametrize("train", [False, True])
def test_encoder_offline(train, attn="sdpa"):
    """The whole encoder, two lengths: valid frames and every gradient (chunked_limited: chunks of 2
    frames, 2 chunks of left context)."""
    torch.manual_seed(0)
    model = perturb(NemotronAsrStreamingEncoder(config(attn))).train(train)
    assert len(patch_speech.targets(model)) == 2
    x0, am = features([60, 37])

    def run(m):
        m.zero_grad(set_to_none=True)
        x = x0.to(next(m.parameters()).dtype, copy=True).requires_grad_()
        out = m(x, attention_mask=am, num_lookahead_tokens=1)
        valid = out.attention_mask.bool()
        weighted(out.last_hidden_state, valid).backward()
        return (out.last_hidden_state, valid), grads(m, x)

    ref, ours, ref_g, our_g, ref64 = run_models(model, run, torch.float32)
    valid = ref[1]
    assert not valid.all()
    check(ours[0][valid], ref[0][valid], "last hidden state")
    check_grads(our_g, ref_g, f"encoder {attn} train={train}", ref64=ref64)


def test_encoder_streaming():
    """Cache-aware streaming: chunk by chunk with use_cache (keys = cache + chunk), every chunk's output."""
    torch.manual_seed(0)
    model = perturb(NemotronAsrStreamingEncoder(config())).eval()
    x, _ = features([64], T=64, seed=7)

    def stream(m):
        outs, cache, padding = [], None, None
        for start in range(0, 64, 16):
            out = m(x[:, start:start + 16], past_key_values=cache, padding_cache=padding, use_cache=True,
                    num_lookahead_tokens=1)
            cache, padding = out.past_key_values, out.padding_cache
            outs.append(out.last_hidden_state)
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        ref = stream(model)
        txl_fast.patch(model)
        ours = stream(model)
        txl_fast.unpatch(model)
    check(ours, ref, "streamed output")


def attention_inputs(B=3, Lq=7, cached=6, lengths=(13, 9, 4), seed=0, hidden=E, attn="sdpa", C=2, left=2):
    """A chunk of Lq queries after ``cached`` frames of memory: x (B, Lq, E), memory keys / values
    (B, H, cached, D), positions (B, 2Lk - 1, E), HF's mask (B, 1, Lq, Lk): key padding (``lengths``
    over Lk) AND chunked_limited (chunks of C, ``left`` chunks of left context)."""
    torch.manual_seed(seed)
    cfg = config(attn, hidden_size=hidden)
    Lk, D = Lq + cached, hidden // cfg.num_attention_heads
    x = torch.randn(B, Lq, hidden)
    memory = torch.randn(2, B, cfg.num_attention_heads, cached, D)
    pos = NemotronAsrStreamingEncoderRelPositionalEncoding(cfg)(x, cached_frames=cached)      # (B, 2Lk - 1, E)
    p, j = torch.arange(Lq)[:, None] + cached, torch.arange(Lk)[None, :]
    chunk = (p // C - j // C >= 0) & (p // C - j // C <= left)
    mask = (frames(list(lengths), Lk)[:, None, :] & chunk)[:, None]             # (B, 1, Lq, Lk)
    return x, memory, pos, mask


class Memory:
    """A cache holding ``memory`` before this chunk (HF's DynamicCache.update: keys = cache + chunk)."""

    def __init__(self, memory):
        self.memory = memory

    def update(self, k, v, layer_idx):
        return torch.cat([self.memory[0], k], dim=2), torch.cat([self.memory[1], v], dim=2)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("cached", [0, 6])
def test_attention_module(cached, train):
    """The module with a cache (Lk > Lq) or none: outputs on rows that see a key, every gradient
    (HF's rows that see none are NaN; the encoder's chunks never give one a valid frame)."""
    module = perturb(NemotronAsrStreamingEncoderAttention(config(), layer_idx=0)).train(train)
    x0, memory, pos, mask = attention_inputs(cached=cached, lengths=(13, 9, 4) if cached else (7, 5, 1))
    rows = mask[:, 0].any(dim=-1)                                               # (B, Lq)
    assert not rows.all()

    def run(m):
        x = x0.clone().requires_grad_()
        out, _ = m(x, pos, mask, Memory(memory) if cached else None)
        weighted(out.nan_to_num(), rows).backward()
        return out, grads(m, x)

    (ref, ref_g), (ours, our_g) = run_both(module, run)
    check(ours[rows], ref[rows], "output")
    check_grads(our_g, ref_g, f"cached={cached} train={train}")


@pytest.mark.parametrize("always", [False, True])
def test_attention_weights_when_asked(always):
    """Under eager with a bool mask (the module alone) HF returns the weights: ours when asked."""
    module = perturb(NemotronAsrStreamingEncoderAttention(config("eager"), layer_idx=0)).eval()
    x, memory, pos, mask = attention_inputs(lengths=(13, 13, 13))
    ref_out, ref_w = module(x, pos, mask, Memory(memory))
    txl_fast.patch(module, attention_weights="always" if always else "on_request")
    out, w = module(x, pos, mask, Memory(memory), output_attentions=True)
    _, unasked = module(x, pos, mask, Memory(memory))
    txl_fast.unpatch(module)
    check(out, ref_out, "output")
    check(w, ref_w, "weights")
    assert (unasked is not None) == always


@pytest.mark.parametrize("autocast", [False, True])
def test_attention_bf16_no_less_accurate(autocast):
    module = perturb(NemotronAsrStreamingEncoderAttention(config(hidden_size=64), layer_idx=0), scale=0.05).eval()
    x, memory, pos, mask = attention_inputs(B=2, Lq=60, cached=40, lengths=(100, 77), seed=3, hidden=64, C=10, left=4)
    check_bf16(module, lambda m, x, pos: m(x, pos, mask, Memory(memory.to(x.dtype)))[0], x, pos, autocast)


def test_eager_mask_fallback_warns_once_and_agrees():
    """Under eager HF's mask is additive float and its masked_fill reads it as bool (the visible scores
    hidden): not what the op computes; HF's own code, one warning."""
    torch.manual_seed(0)
    model = perturb(NemotronAsrStreamingEncoder(config("eager"))).eval()
    x, am = features([60, 37])
    warns_once_and_agrees(model, lambda m: m(x, attention_mask=am, num_lookahead_tokens=1).last_hidden_state)


def test_unpatch_restores():
    module = perturb(NemotronAsrStreamingEncoderAttention(config(), layer_idx=0)).eval()
    attrs, keys = set(vars(module)), module.state_dict().keys()
    txl_fast.patch(module)
    assert type(module).__name__ == "TxlFastPatchedHFNemotronAsrStreamingEncoderAttention"
    assert isinstance(module, NemotronAsrStreamingEncoderAttention) and module.state_dict().keys() == keys
    txl_fast.unpatch(module)
    assert type(module) is NemotronAsrStreamingEncoderAttention and set(vars(module)) == attrs
