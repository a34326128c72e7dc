"""``txl_fast.patch`` on Conformer speech models: SpeechBrain's RelPosMHAXL and ConformerEncoder,
ESPnet's RelPositionMultiHeadedAttention ("latest") with its Conformer encoder, and ESPnet's
transducer attention with a left context. Patched vs the library's own code on the same module:
outputs, attention weights, and the gradients of every parameter and input, fp32, eval and train
mode, padded batches (a row whose keys are all padding included).

The libraries come from ``txl_fast.bench.speech``: installed without their dependency trees,
SpeechBrain imported with a torchaudio stand-in where torchaudio is missing (see there).
"""
import copy
import pickle

import pytest
import torch

import txl_fast
from helpers import rel_err
from txl_fast.bench import speech
from txl_fast.bench.speech import padding_mask

TOL = 1e-5          # fp32, relative error (tests/helpers.py's table)


def perturb(module, seed=0):
    """Non-zero biases (SpeechBrain's value bias starts at 0) and random weights everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def compare(module, run, inputs, what, grads=True):
    """Runs ``run(module, *inputs)`` unpatched and patched; outputs and (train mode) every gradient agree."""
    results = []
    for patched in (False, True):
        if patched:
            txl_fast.patch(module)
        module.zero_grad(set_to_none=True)
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        outs = run(module, *xs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        grad = {}
        if grads:
            loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs if o is not None)
            loss.backward()
            grad = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
            grad.update({f"input{i}": x.grad for i, x in enumerate(xs) if x.grad is not None})
        results.append((outs, grad))
    txl_fast.unpatch(module)
    (ref, ref_grad), (ours, our_grad) = results
    for i, (o, r) in enumerate(zip(ours, ref)):
        if r is None:
            continue
        assert torch.isfinite(o).all(), f"{what} output {i}: non-finite"
        assert rel_err(o, r) <= TOL, f"{what} output {i}: {rel_err(o, r):.2e}"
    assert ref_grad.keys() == our_grad.keys(), f"{what}: gradients of {sorted(ref_grad.keys() ^ our_grad.keys())}"
    # a gradient that is zero in exact arithmetic (the key bias: softmax ignores a shift per query)
    # is rounding noise on both sides: it must stay that small, its relative error means nothing
    zero = TOL * max((g.norm() for g in ref_grad.values()), default=0.0)
    for name, g in ref_grad.items():
        if g.norm() <= zero:
            assert our_grad[name].norm() <= zero, f"{what} d{name}: {our_grad[name].norm():.2e}, not ~0"
        else:
            assert rel_err(our_grad[name], g) <= TOL, f"{what} d{name}: {rel_err(our_grad[name], g):.2e}"


# ---- SpeechBrain ---------------------------------------------------------------------------------


def library(load, name: str):
    """The library's modules, or a skip saying it is not importable."""
    try:
        return load()
    except ImportError as e:
        pytest.skip(f"{name} not importable: {e}")


@pytest.fixture(scope="module")
def sb():
    return library(speech.speechbrain, "SpeechBrain")


@pytest.mark.parametrize("vbias", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_speechbrain_attention(sb, vbias, train):
    """Random position tables: SpeechBrain's own give d and -d one embedding, which would hide a
    sign error in the distance."""
    torch.manual_seed(0)
    L, E = 13, 32
    module = perturb(sb.RelPosMHAXL(E, 4, vbias=vbias)).train(train)
    x, pos = torch.randn(3, L, E), torch.randn(1, 2 * L - 1, E)
    mask = padding_mask([L, 8, 0], L)                                     # the last row: every key padded

    def run(m, x, pos):
        return m(x, x, x, pos, key_padding_mask=mask, return_attn_weights=True)

    compare(module, run, [x, pos], f"RelPosMHAXL vbias={vbias}")


@pytest.mark.skipif(not txl_fast.backend.triton_interpreter(), reason="needs TRITON_INTERPRET=1 before triton import")
@pytest.mark.parametrize("train", [False, True])
def test_speechbrain_attention_on_the_triton_kernels(sb, train, monkeypatch):
    """The patched module on the triton backend (interpreted on the CPU): its padding mask reaches
    the kernels as key lengths, the batch row with every key padded included."""
    kernels = pytest.importorskip("txl_fast.kernels.rel_attention")
    launches = []
    original = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *a, **kw: (launches.append(kw), original(*a, **kw))[1])
    torch.manual_seed(1)
    L, E = 13, 32
    module = perturb(sb.RelPosMHAXL(E, 4, vbias=True)).train(train)
    x, pos = torch.randn(3, L, E), torch.randn(1, 2 * L - 1, E)
    mask = padding_mask([L, 8, 0], L)

    def run(m, x, pos):
        return m(x, x, x, pos, key_padding_mask=mask)[0]

    with txl_fast.backend.use_backend("triton"):
        compare(module, run, [x, pos], "RelPosMHAXL on triton")
    assert len(launches) == 1 and launches[0]["key_lengths"].tolist() == [L, 8, 0]
    assert launches[0]["causal"] is False and launches[0]["empty_rows"] == "zero"


@pytest.mark.parametrize("vbias", [False, True])
def test_speechbrain_attention_autocast_bf16(sb, vbias):
    """bf16 through autocast (SpeechBrain's own module fails in plain bf16): against the fp32
    output, within twice the library's own bf16 error."""
    torch.manual_seed(9)
    L, E = 23, 64
    module = perturb(sb.RelPosMHAXL(E, 4, vbias=vbias)).eval()
    x, pos = torch.randn(2, L, E), torch.randn(1, 2 * L - 1, E)
    mask = padding_mask([L, 17], L)
    ref = module(x, x, x, pos, key_padding_mask=mask)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        library = module(x, x, x, pos, key_padding_mask=mask)[0]
        txl_fast.patch(module)
        ours = module(x, x, x, pos, key_padding_mask=mask)[0]
        txl_fast.unpatch(module)
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    assert rel_err(ours, ref) <= max(2 * rel_err(library, ref), 1e-2), (rel_err(ours, ref), rel_err(library, ref))


def test_speechbrain_attention_weights_on_request(sb):
    torch.manual_seed(1)
    L, E = 9, 16
    module = perturb(sb.RelPosMHAXL(E, 2)).eval()
    x, pos = torch.randn(2, L, E), torch.randn(1, 2 * L - 1, E)
    ref_out, ref_prob = module(x, x, x, pos)
    txl_fast.patch(module)
    out, prob = module(x, x, x, pos)                                       # the library default: not produced
    assert prob is None and rel_err(out, ref_out) <= TOL
    out, prob = module(x, x, x, pos, return_attn_weights=True)            # asked for: produced
    assert rel_err(prob, ref_prob) <= TOL
    assert torch.is_tensor(module(x, x, x, pos, return_attn_weights=False))
    txl_fast.patch(module, attention_weights="always")
    assert rel_err(module(x, x, x, pos)[1], ref_prob) <= TOL
    txl_fast.unpatch(module)


def test_speechbrain_fallbacks_warn_and_agree(sb):
    """An attn_mask, or mask_pos_future: the library's own code runs, with a warning."""
    torch.manual_seed(2)
    L, E = 7, 16
    x, pos = torch.randn(2, L, E), torch.randn(1, 2 * L - 1, E)
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    for module, kwargs in [(sb.RelPosMHAXL(E, 2), dict(attn_mask=causal)),
                           (sb.RelPosMHAXL(E, 2, mask_pos_future=True), {})]:
        module = perturb(module).eval()
        ref = module(x, x, x, pos, **kwargs)[0]
        txl_fast.patch(module)
        txl_fast.patch_speech.warned.clear()
        with pytest.warns(UserWarning, match="running the library's own attention"):
            out = module(x, x, x, pos, **kwargs)[0]
        assert torch.equal(out, ref)
        txl_fast.unpatch(module)


@pytest.mark.parametrize("train", [False, True])
def test_speechbrain_conformer_encoder(sb, train):
    torch.manual_seed(3)
    E, L = 32, 21
    encoder = perturb(speech.speechbrain_conformer(E, 4, layers=4, kernel=5)).train(train)
    pos = sb.RelPosEncXL(E)(torch.zeros(1, L, E))                          # SpeechBrain's own table
    x = torch.randn(3, L, E)
    mask = padding_mask([L, 15, 9], L)

    def run(m, x):
        return m(x, src_key_padding_mask=mask, pos_embs=pos)[0]

    compare(encoder, run, [x], "ConformerEncoder")
    assert len(txl_fast.patch_speech.targets(encoder)) == 4


def test_speechbrain_patch_keeps_state_and_travels(sb):
    module = perturb(sb.RelPosMHAXL(16, 2, vbias=True)).eval()
    before, keys = dict(vars(module)), list(module.state_dict())
    txl_fast.patch(module)
    assert type(module).__name__ == "TxlFastPatchedSpeechBrainRelPosMHAXL"
    assert list(module.state_dict()) == keys and "txl_fast=rel_attention" in repr(module)
    x, pos = torch.randn(2, 5, 16), torch.randn(1, 9, 16)
    out = module(x, x, x, pos)[0]
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert type(clone) is type(module) and torch.equal(clone(x, x, x, pos)[0], out)
    txl_fast.unpatch(module)
    assert type(module) is sb.RelPosMHAXL and vars(module).keys() == before.keys()


# ---- ESPnet --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def esp():
    return library(speech.espnet, "ESPnet")


@pytest.mark.parametrize("train", [False, True])
def test_espnet_attention(esp, train):
    torch.manual_seed(4)
    T, F = 11, 32
    module = perturb(esp.RelPositionMultiHeadedAttention(4, F, 0.0)).train(train)
    x, pos = torch.randn(3, T, F), torch.randn(1, 2 * T - 1, F)
    mask = ~padding_mask([T, 6, 0], T)[:, None, :]                       # (B, 1, T), True = keep

    def run(m, x, pos):
        return m(x, x, x, pos, mask)

    compare(module, run, [x, pos], "ESPnet RelPositionMultiHeadedAttention")


def test_espnet_attention_weights(esp):
    torch.manual_seed(5)
    T, F = 6, 16
    module = perturb(esp.RelPositionMultiHeadedAttention(2, F, 0.0)).eval()
    x, pos, mask = torch.randn(2, T, F), torch.randn(1, 2 * T - 1, F), torch.ones(2, 1, T, dtype=torch.bool)
    module(x, x, x, pos, mask)
    ref = module.attn
    txl_fast.patch(module)
    module(x, x, x, pos, mask)
    assert module.attn is None
    txl_fast.patch(module, attention_weights="always")
    module(x, x, x, pos, mask)
    assert rel_err(module.attn, ref) <= TOL
    txl_fast.unpatch(module)


@pytest.mark.parametrize("train", [False, True])
def test_espnet_conformer_encoder(esp, train):
    torch.manual_seed(6)
    T, F = 19, 32
    encoder = perturb(speech.espnet_conformer(F, 4, layers=4, kernel=5)).train(train)
    x = torch.randn(3, T, F)
    masks = ~padding_mask([T, 12, 7], T)[:, None, :]                      # (B, 1, T), True = keep

    def run(m, x):
        return m(x, masks)[0]

    compare(encoder, run, [x], "ESPnet Conformer Encoder")
    assert len(txl_fast.patch_speech.targets(encoder)) == 4


def test_espnet_fallback_zero_triu(esp):
    torch.manual_seed(7)
    T, F = 5, 16
    module = perturb(esp.RelPositionMultiHeadedAttention(2, F, 0.0, zero_triu=True)).eval()
    x, pos = torch.randn(2, T, F), torch.randn(1, 2 * T - 1, F)
    ref = module(x, x, x, pos, None)
    txl_fast.patch(module)
    txl_fast.patch_speech.warned.clear()
    with pytest.warns(UserWarning, match="zero_triu"):
        assert torch.equal(module(x, x, x, pos, None), ref)
    txl_fast.unpatch(module)


@pytest.mark.parametrize("left_context", [0, 5])
def test_espnet_transducer_attention(esp, left_context):
    torch.manual_seed(8)
    T1, F = 7, 32
    T2 = T1 + left_context
    module = perturb(esp.TransducerRelPositionMultiHeadedAttention(4, F, 0.0)).train()
    q, kv, pos = torch.randn(2, T1, F), torch.randn(2, T2, F), torch.randn(1, T1 + T2 - 1, F)
    mask = padding_mask([T2, T2 - 3], T2)                                 # (B, T2), True = padding

    def run(m, q, kv, pos):
        return m(q, kv, kv, pos, mask, left_context=left_context)

    compare(module, run, [q, kv, pos], f"ESPnet transducer attention left_context={left_context}")


def test_patch_refuses_modules_without_supported_attention():
    with pytest.raises(TypeError, match="RelPosMHAXL"):
        txl_fast.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="txl_fast.patch expects"):
        txl_fast.patch("not a module")
    with pytest.raises(ValueError, match="attention_weights must be one of"):
        txl_fast.patch_speech.patch_modules(torch.nn.Linear(2, 2), attention_weights="sometimes")


def test_transformers_4_wav2vec2_conformer_is_never_swapped():
    """transformers 4.x has a Wav2Vec2ConformerSelfAttention of the same module and name as 5.x's,
    with another signature and outputs: patch leaves it alone (the 5.x adapter: tests_tf5/)."""
    modeling = pytest.importorskip("transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer")
    import transformers

    assert transformers.__version__.startswith("4.")
    config = transformers.Wav2Vec2ConformerConfig(hidden_size=16, num_attention_heads=2,
                                                  position_embeddings_type="relative")
    module = modeling.Wav2Vec2ConformerSelfAttention(config)
    assert txl_fast.patch_speech.targets(module) == []
    with pytest.raises(TypeError, match="Wav2Vec2ConformerSelfAttention"):
        txl_fast.patch(module)
    assert type(module) is modeling.Wav2Vec2ConformerSelfAttention
