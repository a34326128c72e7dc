"""``txl_fast.patch`` on transformers 5.x Parakeet (NeMo's FastConformer): ``ParakeetEncoderAttention``
alone, in ``ParakeetEncoder`` and in ``ParakeetForCTC``. Patched vs HF's own code on the same random
weights: outputs (padded frames included), attention weights, the CTC loss, and the gradients of
every parameter and of the input, fp32, eval and train mode (no dropout), eager and sdpa, padded
batches with a row of length 0 (module) or of another length (encoders); bf16 weights and autocast
against a float64 reference; unpatch; the fallbacks and their one warning.

Gradients are taken of a loss over the valid frames (the CTC loss is one): HF's padded query rows
are uniform in value but its autograd sends them gradient through the finfo.min scores (see
docs/conformer.md), ours does not.
"""
import pickle
import warnings

import pytest
import torch
from compare import (TOLERANCE, GRAD_TOL, check, check_bf16, check_encoder_bf16, check_grads, frames, grads, perturb, run_both,
                     run_models, weighted)
from transformers import ParakeetCTCConfig, ParakeetEncoder, ParakeetEncoderConfig, ParakeetForCTC
from transformers.models.parakeet.modeling_parakeet import (
    ParakeetEncoderAttention,
    ParakeetEncoderRelPositionalEncoding,
)

import txl_fast
from txl_fast import patch_speech

E, H = 32, 4


def config(attn="eager", **over):
    kw = dict(hidden_size=E, num_hidden_layers=3, num_attention_heads=H, intermediate_size=48, num_mel_bins=16,
              subsampling_conv_channels=8, conv_kernel_size=5, dropout=0.0, attention_dropout=0.0,
              activation_dropout=0.0, layerdrop=0.0, dropout_positions=0.0)
    cfg = ParakeetEncoderConfig(**{**kw, **over})
    cfg._attn_implementation = attn
    return cfg


def pair_mask(valid):
    """ParakeetEncoder's attention mask (B, 1, T, T): valid query AND valid key."""
    return (valid[:, None, :] & valid[:, :, None])[:, None]


def attention_inputs(B=3, T=13, lengths=(13, 8, 0), seed=0):
    torch.manual_seed(seed)
    x = torch.randn(B, T, E)
    pos = ParakeetEncoderRelPositionalEncoding(config())(x)          # (B, 2T - 1, E), one table expanded
    valid = frames(list(lengths), T)
    return x, pos, valid


# ---- the attention module ---------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kv_heads", [H, 2])
def test_attention_module(attn, train, kv_heads):
    """Outputs on every frame (HF's padded rows: the mean of all values) and every gradient; grouped
    keys and values (num_key_value_heads < heads) included; a batch row of length 0."""
    module = perturb(ParakeetEncoderAttention(config(attn, num_key_value_heads=kv_heads), 0)).train(train)
    x0, pos, valid = attention_inputs()

    def run(m):
        x = x0.clone().requires_grad_()
        out, weights = m(x, pos, pair_mask(valid))
        weighted(out, valid).backward()
        return out, weights, grads(m, x)

    (ref, ref_w, ref_g), (ours, our_w, our_g) = run_both(module, run)
    check(ours, ref, "output")
    check(ours[valid], ref[valid], "output on valid frames")
    assert our_w is None and (ref_w is None) == (attn == "sdpa")      # HF's eager returns them, unasked
    check_grads(our_g, ref_g, f"{attn} train={train}")


@pytest.mark.parametrize("always", [False, True])
def test_attention_weights_when_asked(always):
    """Eager: the weights with output_attentions=True (or attention_weights="always"), padded query
    rows uniform as HF's; sdpa: none, as HF (which warns)."""
    module = perturb(ParakeetEncoderAttention(config("eager"), 0)).eval()
    x, pos, valid = attention_inputs(seed=1)
    mask = pair_mask(valid)
    ref_out, ref_w = module(x, pos, mask)
    txl_fast.patch(module, attention_weights="always" if always else "on_request")
    out, w = module(x, pos, mask, output_attentions=True)
    _, unasked = module(x, pos, mask)
    txl_fast.unpatch(module)
    check(out, ref_out, "output")
    check(w, ref_w, "weights")
    assert (unasked is not None) == always
    module.config._attn_implementation = "sdpa"
    txl_fast.patch(module)
    assert module(x, pos, mask, output_attentions=True)[1] is None
    txl_fast.unpatch(module)


def test_attention_without_mask_and_batch_of_one_table():
    """No mask at all, and position embeddings given as (1, 2T - 1, E)."""
    module = perturb(ParakeetEncoderAttention(config("sdpa"), 0)).eval()
    x, pos, _ = attention_inputs(B=2, T=9, lengths=(9, 9), seed=2)
    ref = module(x, pos)[0]
    txl_fast.patch(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # the fused path: no fallback warning
        ours, ours1 = module(x, pos)[0], module(x, pos[:1])[0]
    txl_fast.unpatch(module)
    check(ours, ref, "no mask")
    check(ours1, ref, "one table")


@pytest.mark.skipif(not txl_fast.backend.triton_interpreter(), reason="needs TRITON_INTERPRET=1 before triton import")
@pytest.mark.parametrize("train", [False, True])
def test_attention_on_the_triton_kernels(train, monkeypatch):
    """On the triton backend (interpreted on the CPU): the padding reaches the kernels as key lengths
    (a row of length 0 included); outputs and every gradient as HF's."""
    kernels = pytest.importorskip("txl_fast.kernels.rel_attention")
    launches = []
    original = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *a, **kw: (launches.append(kw), original(*a, **kw))[1])
    module = perturb(ParakeetEncoderAttention(config("sdpa"), 0)).train(train)
    x0, pos, valid = attention_inputs(seed=8)

    def run(m):
        x = x0.clone().requires_grad_()
        out = m(x, pos, pair_mask(valid))[0]
        weighted(out, valid).backward()
        return out, grads(m, x)

    with txl_fast.backend.use_backend("triton"):
        (ref, ref_g), (ours, our_g) = run_both(module, run)
    check(ours, ref, "output")
    check_grads(our_g, ref_g, f"triton train={train}")
    assert len(launches) == 1 and launches[0]["key_lengths"].tolist() == [13, 8, 0]
    assert launches[0]["causal"] is False and launches[0]["empty_rows"] == "zero"


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_bf16_no_less_accurate(autocast, attn):
    """bf16 weights or autocast: scores and probabilities accumulate in float32, so ours is at least
    as close to float64 as HF's bf16 (a 5 % margin for rounding luck) and within the bf16 tolerance."""
    module = perturb(ParakeetEncoderAttention(config(attn, hidden_size=64), 0), scale=0.05).eval()
    torch.manual_seed(3)
    T = 150
    x = torch.randn(3, T, 64)
    pos = ParakeetEncoderRelPositionalEncoding(config(hidden_size=64))(x)
    valid = frames([150, 101, 40], T)
    mask = pair_mask(valid)
    check_bf16(module, lambda m, x, pos: m(x, pos, mask)[0][valid], x, pos, autocast)     # on the valid frames


# ---- what runs HF's code ----------------------------------------------------------------------------


def test_fallbacks_warn_once_and_agree():
    """A mask that is not valid-query AND valid-key, position tables that differ per batch row: HF's
    own attention, one warning per reason however often it runs, the same result as unpatched."""
    module = perturb(ParakeetEncoderAttention(config("eager"), 0)).eval()
    x, pos, valid = attention_inputs(seed=4)
    band = (torch.arange(13)[:, None] - torch.arange(13)[None, :]).abs() <= 3
    cases = {
        "mask": (pos, pair_mask(valid) & band),                                   # limited context
        "positions": (pos + 0.01 * torch.randn(pos.shape), pair_mask(valid)),     # dropout_positions
    }
    patch_speech.warned.clear()
    for name, (p, mask) in cases.items():
        ref = module(x, p, mask)[0]
        txl_fast.patch(module)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [module(x, p, mask)[0] for _ in range(3)]
        txl_fast.unpatch(module)
        ours = [str(w.message) for w in caught if "txl_fast.patch" in str(w.message)]
        assert len(ours) == 1, f"{name}: {ours}"
        for out in outs:
            assert torch.equal(out, ref), name


def test_unpatch_restores_class_state_and_outputs():
    module = perturb(ParakeetEncoderAttention(config("eager"), 0)).eval()
    x, pos, valid = attention_inputs(seed=5)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    attrs = set(vars(module))
    ref = module(x, pos, pair_mask(valid))
    txl_fast.patch(module)
    assert type(module).__name__ == "TxlFastPatchedHFParakeetEncoderAttention"
    assert isinstance(module, ParakeetEncoderAttention) and patch_speech.is_patched(module)
    assert module.state_dict().keys() == state.keys()
    clone = pickle.loads(pickle.dumps(module))                  # the patched class resolves by name
    assert type(clone) is type(module)
    txl_fast.unpatch(module)
    assert type(module) is ParakeetEncoderAttention and set(vars(module)) == attrs
    out = module(x, pos, pair_mask(valid))
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


# ---- whole models -----------------------------------------------------------------------------------


def features(lengths, T_in=120, seed=6):
    torch.manual_seed(seed)
    x = torch.randn(len(lengths), T_in, 16)
    return x, frames(list(lengths), T_in).long()


# float64 with sdpa only: HF's eager path takes its fp32 softmax of finfo(float64).min scores to NaN
@pytest.mark.parametrize(("attn", "dtype"), [("eager", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.float64)],
                         ids=["eager-fp32", "sdpa-fp32", "sdpa-fp64"])
@pytest.mark.parametrize("train", [False, True])
def test_encoder(attn, train, dtype):
    """ParakeetEncoder, 3 layers, two lengths: last hidden state on every frame, every gradient
    (float64: 1e-10 apart; fp32: see check_grads); with output_attentions (eager) every layer's weights."""
    torch.manual_seed(0)
    model = perturb(ParakeetEncoder(config(attn))).train(train)
    targets = patch_speech.targets(model)               # 3 attentions, the encoder and its subsampling (long form)
    assert len(targets) == 5 and sum(isinstance(m, ParakeetEncoderAttention) for m in targets) == 3
    x0, am = features([120, 77])
    tol = TOLERANCE[dtype]

    def run(m):
        m.zero_grad(set_to_none=True)
        x = x0.to(next(m.parameters()).dtype, copy=True).requires_grad_()
        out = m(x, attention_mask=am, output_attentions=attn == "eager")
        valid = out.attention_mask.bool()
        weighted(out.last_hidden_state, valid).backward()
        return out, grads(m, x)

    ref, ours, ref_g, our_g, ref64 = run_models(model, run, dtype)
    assert torch.equal(ours.attention_mask, ref.attention_mask) and not ref.attention_mask.all()
    check(ours.last_hidden_state, ref.last_hidden_state, "last hidden state", tol)
    check_grads(our_g, ref_g, f"encoder {attn} train={train}", max(tol, GRAD_TOL * (dtype == torch.float32)), ref64)
    assert len(ours.attentions or ()) == len(ref.attentions or ()) == (3 if attn == "eager" else 0)
    for i, (w, r) in enumerate(zip(ours.attentions or (), ref.attentions or ())):
        check(w, r, f"attentions layer {i}", tol)


@pytest.mark.parametrize("autocast", [False, True])
def test_encoder_bf16_no_less_accurate(autocast):
    """The whole encoder in bf16 (weights, or autocast): on the valid frames, as close to float64
    as HF's own bf16 (5 % margin)."""
    torch.manual_seed(0)
    model = perturb(ParakeetEncoder(config("sdpa")), scale=0.05).eval()
    x, am = features([120, 77], seed=10)
    check_encoder_bf16(model, x, am, autocast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("train", [False, True])
def test_ctc_logits_loss_and_gradients(train, dtype):
    """ParakeetForCTC: logits, the CTC loss and every gradient, padded batch."""
    torch.manual_seed(0)
    cfg = ParakeetCTCConfig(vocab_size=11, pad_token_id=0, encoder_config=config("sdpa").to_dict())
    model = perturb(ParakeetForCTC(cfg)).train(train)
    x0, am = features([120, 90, 61], seed=7)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, 7, -100], [8, 9, -100, -100]])
    tol = TOLERANCE[dtype]

    def run(m):
        m.zero_grad(set_to_none=True)
        x = x0.to(next(m.parameters()).dtype, copy=True).requires_grad_()
        out = m(x, attention_mask=am, labels=labels)
        out.loss.backward()
        return out, grads(m, x)

    ref, ours, ref_g, our_g, ref64 = run_models(model, run, dtype)
    valid = frames(model._get_subsampling_output_length(am.sum(-1)).tolist(), ref.logits.shape[1])
    assert not valid.all()
    check(ours.logits[valid], ref.logits[valid], "logits on valid frames", tol)
    check(ours.logits, ref.logits, "logits", tol)
    check(ours.loss, ref.loss, "loss", tol)
    check_grads(our_g, ref_g, f"CTC train={train}", max(tol, GRAD_TOL * (dtype == torch.float32)), ref64)


def test_encoder_patch_is_per_instance():
    """Patching one encoder leaves another of the same class alone; patching twice is a no-op."""
    a, b = ParakeetEncoder(config()), ParakeetEncoder(config())
    txl_fast.patch(a)
    txl_fast.patch(a)
    assert all(patch_speech.is_patched(m) for m in patch_speech.targets(a))
    assert not any(patch_speech.is_patched(m) for m in patch_speech.targets(b))
    txl_fast.unpatch(a)
    assert not any(patch_speech.is_patched(m) for m in patch_speech.targets(a))
