"""``txl_fast.patch`` on NeMo 3.0's Conformer attention (``RelPositionMultiHeadAttention``,
``RelPositionMultiHeadAttentionLongformer``), alone and in ``ConformerEncoder``. Patched vs NeMo's own
code on the same random weights, masks built by NeMo's ``ConformerEncoder._create_masks``: outputs
(modules: every frame, NeMo's padded query rows being zeros before linear_out as ours; encoders: the
valid frames) and the gradients of every parameter and of the input, fp32, eval and train mode (no
dropout), ragged batches: full, limited and chunked-limited context, the cache-aware streaming step
(the module; the encoder's ``cache_aware_stream_step``, outputs and caches, from caches of random fill), local attention
(symmetric and asymmetric windows), shared pos_bias_u / v, NeMo's sdpa flag; bf16 (weights, autocast)
against float64; the fallbacks; unpatch.

Skipped when NeMo is not importable (scripts/test_tf5.sh installs it: tests_tf5/requirements-nemo.txt).
"""
import copy
import functools
import warnings

import pytest
import torch
from compare import check, check_bf16, check_grads, grads, perturb, warns_once_and_agrees, weighted

import txl_fast
from txl_fast import patch_nemo, patch_speech

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    nemo_asr = pytest.importorskip("nemo.collections.asr.modules", reason="NeMo is not installed (scripts/test_tf5.sh)")
from nemo.collections.asr.parts.submodules import multi_head_attention as mha  # noqa: E402

E, H = 32, 4
T = 13
LENGTHS = [13, 9, 4]

# att_context_style, att_context_size: what NeMo's encoder builds its (B, T, T) mask from
CONTEXTS = {
    "full": ("regular", [-1, -1]),
    "limited": ("regular", [3, 2]),
    "left-only": ("regular", [4, -1]),
    "chunked": ("chunked_limited", [4, 1]),
    "chunked-unlimited-left": ("chunked_limited", [-1, 2]),
    "chunked-right-context": ("chunked_limited_with_rc", [4, 2, 1]),                 # frames: left, chunk, right
}


@functools.lru_cache(maxsize=None)
def mask_maker(style, context, streaming=False):
    """A 1-layer ConformerEncoder whose ``_create_masks`` builds NeMo's masks for this context."""
    kw = dict(conv_context_size="causal", causal_downsampling=True) if streaming else {}
    return nemo_asr.ConformerEncoder(feat_in=16, n_layers=1, d_model=E, n_heads=H, subsampling_factor=4,
                                     att_context_size=list(context), att_context_style=style, **kw)


def nemo_mask(name, lengths=LENGTHS, T=T):
    style, context = CONTEXTS[name]
    return mask_maker(style, tuple(context))._create_masks(list(context), torch.tensor(lengths), T, None, "cpu")[1]


def valid_frames(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]                   # (B, T)


def rel_pos(x, cache_len=0):
    """NeMo's (1, 2 (T + cache) - 1, E) position table for x (B, T, E)."""
    pe = mha.RelPositionalEncoding(E, 0.0)
    pe.extend_pe(x.shape[1] + cache_len, x.device, x.dtype)
    return pe(x, cache_len=cache_len)[1]


def attention(shared=None, sdpa=False, dropout=0.0):
    module = mha.RelPositionMultiHeadAttention(H, E, dropout, *(shared or (None, None)), use_pytorch_sdpa=sdpa)
    return perturb(module, scale=0.3)


def run_module(x0, *args, valid=None, **kw):
    """A runner for compare.run_both: out (and the next cache), every gradient of a weighted loss."""
    def run(m):
        x = x0.clone().requires_grad_()
        result = m(x, x, x, *args, **kw)
        out = result[0] if isinstance(result, tuple) else result
        weighted(out, valid if valid is not None else torch.ones(out.shape[:2], dtype=torch.bool)).backward()
        return result, grads(m, x)
    return run


def run_both(module, run):
    """Unpatched, then patched with no fallback (the conftest turns one into an error)."""
    ref = run(module)
    module.zero_grad(set_to_none=True)
    txl_fast.patch(module)
    assert all(patch_speech.is_patched(m) for m in patch_speech.targets(module))
    ours = run(module)
    txl_fast.unpatch(module)
    return ref, ours


# ---- RelPositionMultiHeadAttention ------------------------------------------------------------------


@pytest.mark.parametrize(("context", "expected"), [
    ("full", {}),
    ("limited", {"context": (3, 2)}),
    ("left-only", {"context": (4, 12)}),
    ("chunked", {"chunk_context": (2, 2, 0)}),
    ("chunked-unlimited-left", {"chunk_context": (3, -1, 0)}),
    ("chunked-right-context", {"chunk_context": (2, 2, 1)}),
])
def test_mask_layout(context, expected):
    """NeMo's (B, T, T) masks read as the op's arguments: the context (chunked_limited [4, 1]: chunks
    of 2 frames, 2 to the left), the padding as query and key lengths; None of them without padding."""
    keys, layout = patch_nemo.mask_layout(nemo_mask(context))
    assert keys is None
    assert layout.pop("query_lengths").tolist() == layout.pop("key_lengths").tolist() == LENGTHS
    assert layout == expected
    assert patch_nemo.mask_layout(nemo_mask(context, lengths=[T, T, T])) == (None, expected)



@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("train", [False, True])
def test_attention_module(context, train):
    """Every context NeMo's encoder builds, a ragged batch: outputs and every gradient."""
    torch.manual_seed(0)
    module = attention().train(train)
    x = torch.randn(len(LENGTHS), T, E)
    (ref, ref_g), (ours, our_g) = run_both(module, run_module(x, nemo_mask(context), rel_pos(x)))
    assert isinstance(ours, torch.Tensor)                                  # no cache: NeMo returns one tensor
    check(ours, ref, f"{context} output")
    check_grads(our_g, ref_g, f"{context} train={train}")


@pytest.mark.parametrize("context", ["full", "chunked"])
def test_attention_sdpa_flag_shared_biases_and_no_mask(context):
    """use_pytorch_sdpa=True (the same maths), pos_bias_u / v shared by two modules (untie_biases=False:
    one gradient from both), and no mask at all."""
    torch.manual_seed(1)
    u, v = (torch.nn.Parameter(0.3 * torch.randn(H, E // H)) for _ in range(2))
    model = torch.nn.ModuleList([attention((u, v), sdpa=True), attention((u, v))])
    x0 = torch.randn(len(LENGTHS), T, E)
    mask, pos = nemo_mask(context), rel_pos(x0)

    def run(m):
        x = x0.clone().requires_grad_()
        out = m[1](m[0](x, x, x, mask, pos), x, x, mask, pos) + m[1](x, x, x, None, pos)
        weighted(out, torch.ones(out.shape[:2], dtype=torch.bool)).backward()
        return out, grads(m, x)

    (ref, ref_g), (ours, our_g) = run_both(model, run)
    check(ours, ref, "output")
    check_grads(our_g, ref_g, "shared u, v")
    assert model[0].pos_bias_u is model[1].pos_bias_u


@pytest.mark.parametrize("context", ["limited", "chunked"])
def test_attention_cache_step(context):
    """NeMo's cache-aware streaming step: keys = cache + chunk, the cache's first frames empty per
    batch row (offset), positions shifted by the cache: output, the next cache, every gradient."""
    style, ctx = CONTEXTS[context]
    cache_len, chunk = 8, 4
    maker = mask_maker(style, tuple(ctx))
    torch.manual_seed(2)
    module = attention()
    module.cache_drop_size = 1
    x0 = torch.randn(3, chunk, E)
    cache = torch.randn(3, cache_len, E)
    filled = torch.tensor([8, 3, 0])
    lengths = torch.tensor([4, 4, 2])
    _, att = maker._create_masks(ctx, lengths + cache_len, chunk + cache_len, cache_len - filled, "cpu")
    mask = att[:, cache_len:]                                              # (B, chunk, cache + chunk)
    pos = rel_pos(x0, cache_len)
    (ref, ref_g), (ours, our_g) = run_both(module, run_module(x0, mask, pos, cache=cache))
    check(ours[0], ref[0], "output")
    assert torch.equal(ours[1], ref[1]), "next cache"
    check_grads(our_g, ref_g, f"cache step {context}")


# ---- RelPositionMultiHeadAttentionLongformer --------------------------------------------------------


@pytest.mark.parametrize("window", [[3, 3], [4, 2], [2, 5]], ids=["3-3", "4-2", "2-5"])
@pytest.mark.parametrize("train", [False, True])
def test_longformer(window, train):
    """Local attention over NeMo's overlapping chunks, a ragged batch (T not a multiple of 2w):
    symmetric windows, and asymmetric ones (where NeMo's sliding chunks put the position term on
    other diagonals than the window's: the adapter gives each distance the row NeMo uses)."""
    torch.manual_seed(3)
    module = perturb(mha.RelPositionMultiHeadAttentionLongformer(H, E, 0.0, None, None, att_context_size=window),
                     scale=0.3).train(train)
    x = torch.randn(len(LENGTHS), T, E)
    pe = mha.LocalAttRelPositionalEncoding(window, d_model=E, dropout_rate=0.0)
    pe.extend_pe(T, "cpu", torch.float32)
    pad_mask = ~valid_frames(LENGTHS, T)
    (ref, ref_g), (ours, our_g) = run_both(module, run_module(x, pad_mask, pe(x)[1]))
    check(ours, ref, "output")
    check_grads(our_g, ref_g, f"longformer {window} train={train}")


# ---- low precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["limited", "longformer"])
def test_bf16_no_less_accurate(kind, autocast):
    """bf16 weights or CPU autocast: the op accumulates in float32, so ours is at least as close to
    float64 as NeMo's bf16 (5 % margin), on the valid frames."""
    torch.manual_seed(4)
    T_long, lengths = 150, [150, 101, 40]
    x = torch.randn(3, T_long, 64)
    valid = valid_frames(lengths, T_long)
    if kind == "longformer":
        module = mha.RelPositionMultiHeadAttentionLongformer(H, 64, 0.0, None, None, att_context_size=[16, 16])
        pe = mha.LocalAttRelPositionalEncoding([16, 16], d_model=64, dropout_rate=0.0)
        pe.extend_pe(T_long, "cpu", torch.float32)
        mask, pos = ~valid, pe(x)[1]
    else:
        module = mha.RelPositionMultiHeadAttention(H, 64, 0.0, None, None)
        style, ctx = CONTEXTS[kind]
        maker = nemo_asr.ConformerEncoder(feat_in=16, n_layers=1, d_model=64, n_heads=H, att_context_size=ctx,
                                          att_context_style=style)
        mask = maker._create_masks(ctx, torch.tensor(lengths), T_long, None, "cpu")[1]
        pe = mha.RelPositionalEncoding(64, 0.0)
        pe.extend_pe(T_long, "cpu", torch.float32)
        pos = pe(x)[1]
    perturb(module, scale=0.05).eval()
    check_bf16(module, lambda m, x, pos: m(x, x, x, mask, pos)[valid], x, pos, autocast)


# ---- what runs NeMo's code --------------------------------------------------------------------------


def test_fallbacks_warn_once_and_agree():
    """Masks the op cannot express (holes; chunked_limited_with_rc's left context of 3 frames with
    chunks of 2), position embeddings too short for the keys, the Longformer's global tokens and
    leading padding: NeMo's own code, one warning, NeMo's result."""
    torch.manual_seed(5)
    x = torch.randn(3, T, E)
    pos = rel_pos(x)
    holes = nemo_mask("full") | (torch.rand(3, T, T) < 0.2)
    module = attention().eval()
    warns_once_and_agrees(module, lambda m: m(x, x, x, holes, pos))
    rc = mask_maker("chunked_limited_with_rc", (3, 2, 1))._create_masks([3, 2, 1], torch.tensor(LENGTHS), T, None,
                                                                       "cpu")[1]   # left 3 frames: not whole chunks
    warns_once_and_agrees(module, lambda m: m(x, x, x, rc, pos))
    warns_once_and_agrees(module, lambda m: m(x, x, x, nemo_mask("full"), pos[:, 1:-1]))
    window = [3, 3]
    pe = mha.LocalAttRelPositionalEncoding(window, d_model=E, dropout_rate=0.0)
    pe.extend_pe(T, "cpu", torch.float32)
    pad_mask = ~valid_frames(LENGTHS, T)
    local = perturb(mha.RelPositionMultiHeadAttentionLongformer(H, E, 0.0, None, None, att_context_size=window,
                                                                global_tokens=2)).eval()
    warns_once_and_agrees(local, lambda m: m(x, x, x, pad_mask, pe(x)[1]))
    local.global_tokens = 0
    warns_once_and_agrees(local, lambda m: m(x, x, x, pad_mask.flip(1), pe(x)[1]))


def test_unpatch_state_dict_and_copies():
    """The swap keeps state_dict; deepcopy keeps it; unpatch restores class, attributes and outputs;
    per instance; patching twice is a no-op; attention_weights="always" changes nothing (NeMo's
    modules return no weights)."""
    torch.manual_seed(6)
    module, other = attention().eval(), attention().eval()
    x = torch.randn(3, T, E)
    mask, pos = nemo_mask("limited"), rel_pos(x)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    attrs = set(vars(module))
    ref = module(x, x, x, mask, pos)
    txl_fast.patch(module, attention_weights="always")
    txl_fast.patch(module)
    assert type(module).__name__ == "TxlFastPatchedNeMoRelPositionMultiHeadAttention"
    assert isinstance(module, mha.RelPositionMultiHeadAttention) and not patch_speech.is_patched(other)
    assert module.state_dict().keys() == state.keys()
    clone = copy.deepcopy(module)
    assert type(clone) is type(module)
    check(clone(x, x, x, mask, pos), ref, "deepcopy")
    txl_fast.unpatch(module)
    assert type(module) is mha.RelPositionMultiHeadAttention and set(vars(module)) == attrs
    assert torch.equal(module(x, x, x, mask, pos), ref)
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


# ---- ConformerEncoder -------------------------------------------------------------------------------


def encoder(**over):
    kw = dict(feat_in=16, n_layers=2, d_model=64, n_heads=H, subsampling_factor=4, subsampling="dw_striding",
              conv_kernel_size=5, dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0, dropout_att=0.0)
    torch.manual_seed(7)
    return perturb(nemo_asr.ConformerEncoder(**{**kw, **over}), scale=0.05)


ENCODERS = {
    "full": {},
    "limited-shared-biases": dict(att_context_size=[6, 2], untie_biases=False),
    "chunked-sdpa": dict(att_context_style="chunked_limited", att_context_size=[4, 1], use_pytorch_sdpa=True),
    "local": dict(self_attention_model="rel_pos_local_attn", att_context_size=[4, 4]),
}


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("config", list(ENCODERS))
def test_encoder(config, train):
    """A 2-layer ConformerEncoder (subsampling 4, 64 channels) on a ragged batch: encoded frames and
    every parameter's gradient of a loss over the valid frames."""
    model = encoder(**ENCODERS[config]).train(train)
    torch.manual_seed(8)
    feats, lengths = torch.randn(3, 16, 101), torch.tensor([101, 70, 37])

    def run(m):
        x = feats.clone().requires_grad_()
        out, out_len = m(audio_signal=x, length=lengths)
        valid = valid_frames(out_len.tolist(), out.shape[-1])
        weighted(out.transpose(1, 2), valid).backward()
        return (out.transpose(1, 2)[valid], out_len), grads(m, x)

    ((ref, ref_len), ref_g), ((ours, our_len), our_g) = run_both(model, run)
    assert torch.equal(our_len, ref_len) and len(set(ref_len.tolist())) == 3
    check(ours, ref, f"{config} encoded")
    check_grads(our_g, ref_g, f"{config} train={train}")


@pytest.mark.parametrize("style", ["regular", "chunked_limited"])
def test_encoder_stream_step(style):
    """cache_aware_stream_step of a causal streaming encoder, two steps from caches of random fill:
    the encoded chunk and every next cache."""
    context = [8, 3] if style == "chunked_limited" else [8, 1]
    model = encoder(att_context_size=context, att_context_style=style, conv_context_size="causal",
                    causal_downsampling=True, subsampling="striding").eval()
    model.setup_streaming_params()
    torch.manual_seed(9)
    cfg = model.streaming_cfg
    chunk = cfg.chunk_size[1] if isinstance(cfg.chunk_size, list) else cfg.chunk_size
    pre = cfg.pre_encode_cache_size[1] if isinstance(cfg.pre_encode_cache_size, list) else cfg.pre_encode_cache_size
    feats = torch.randn(3, 16, pre + chunk)
    lengths = torch.tensor([pre + chunk, pre + chunk, pre + chunk - 4])
    caches = model.get_initial_cache_state(batch_size=3, max_dim=cfg.last_channel_cache_size)

    def run(m):
        state, outs = caches, []
        with torch.no_grad():
            for _ in range(2):
                out, out_len, *state = m.cache_aware_stream_step(feats, lengths, *state)
                outs.append((out, out_len, state))
        return outs

    ref = run(model)
    txl_fast.patch(model)
    ours = run(model)
    txl_fast.unpatch(model)
    for step, ((o, n, s), (ro, rn, rs)) in enumerate(zip(ours, ref)):
        assert torch.equal(n, rn)
        valid = valid_frames(rn.tolist(), ro.shape[-1])
        check(o.transpose(1, 2)[valid], ro.transpose(1, 2)[valid], f"step {step} encoded")
        check(s[0], rs[0], f"step {step} cache_last_channel")
        check(s[1], rs[1], f"step {step} cache_last_time")
        assert torch.equal(s[2], rs[2])
