"""Long form through ``txl_fast.patch`` on transformers 5.x Parakeet: the subsampling run in time
chunks (``ParakeetEncoderSubsamplingConv2D``) and the encoder that hands its layers the padding as
frames, not a (B, 1, T, T) mask (``ParakeetEncoder``). Against HF's own code on the same random
weights: the subsampling alone and whole encoders, ragged batches of odd lengths, the chunk forced
small so several chunks run, eval and train (every gradient), fp32 and float64, bf16 against
float64; the tensors the patched encoder allocates grow linearly in T where HF's grow in T²;
output collection (hidden states, attentions, tuples); unpatch; the fallbacks.
"""
import importlib
import pickle
import warnings
import weakref

import pytest
import torch
from compare import GRAD_TOL, TOLERANCE, check, check_encoder_bf16, check_grads, frames, grads, perturb, run_models, weighted
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import ParakeetCTCConfig, ParakeetEncoder, ParakeetEncoderConfig, ParakeetForCTC

import txl_fast
from txl_fast import patch_speech

rel_attention_op = importlib.import_module("txl_fast.ops.rel_attention")   # the module, not the function

MELS = 16


def config(attn="sdpa", **over):
    """The tiny encoder: hidden 64, 4 heads, 2 layers, the default 8x subsampling (three stride-2 convolutions)."""
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, num_mel_bins=MELS,
              subsampling_conv_channels=8, conv_kernel_size=5, dropout=0.0, attention_dropout=0.0,
              activation_dropout=0.0, layerdrop=0.0, dropout_positions=0.0)
    cfg = ParakeetEncoderConfig(**{**kw, **over})
    cfg._attn_implementation = attn
    return cfg


def features(lengths, T_in, seed=0):
    """(B, T_in, MELS) random mel frames (padding frames random too: the library reads them), (B, T_in) mask."""
    torch.manual_seed(seed)
    return torch.randn(len(lengths), T_in, MELS), frames(list(lengths), T_in).long()


@pytest.fixture
def small_chunks(monkeypatch):
    """5 output frames per chunk of the tiny subsampling, 3 batch rows (its largest activation, the
    first convolution's: 8 channels x 8 mel bins x 4 bytes, 4 of its frames per output frame)."""
    monkeypatch.setattr(patch_speech, "SUBSAMPLING_CHUNK_BYTES", 5 * 3 * 8 * 8 * 4 * 4)


def chunks(T, dtype):
    """The chunks of T output frames under ``small_chunks``: 5 frames each in fp32, 2 in float64."""
    n = 5 if dtype == torch.float32 else 2
    return -(-T // n)


def chunks_run(module):
    """A counter of the subsampling's linear calls: one per chunk (deep copies count into it too)."""
    calls = []
    module.subsampling.linear.register_forward_hook(lambda *a: calls.append(1))
    return calls


# ---- the subsampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("masked", [True, False])
def test_subsampling_in_chunks(small_chunks, train, masked, dtype):
    """Every output frame (padded ones too) and every gradient as HF's, with several chunks: odd
    lengths, one shorter than the stack's receptive field, the last chunk short. (fp32 gradients:
    the convolutions' bias gradients sum thousands of terms; see compare.check_grads.)"""
    module = perturb(ParakeetEncoder(config())).subsampling.train(train)
    x0, am = features([203, 77, 5], 203, seed=1)
    am = am if masked else None
    calls = []
    module.linear.register_forward_hook(lambda *a: calls.append(1))

    def run(m):
        m.zero_grad(set_to_none=True)
        x = x0.to(next(m.parameters()).dtype, copy=True).requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = m(x, am)
        if train:
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out, (grads(m, x) if train else {})

    ref, ours, ref_g, our_g, ref64 = run_models(module, run, dtype, reference64=train)
    assert len(calls) == 1 + chunks(26, dtype) + (train and dtype == torch.float32)   # HF's call, ours, HF's float64
    check(ours, ref, "subsampling", TOLERANCE[dtype])
    if train:
        check_grads(our_g, ref_g, "subsampling", max(TOLERANCE[dtype], GRAD_TOL * (dtype == torch.float32)), ref64)


def test_subsampling_one_chunk_is_bitwise():
    """With the whole utterance in one chunk the patched stack computes exactly HF's numbers."""
    encoder = perturb(ParakeetEncoder(config())).eval()
    x, am = features([203, 77], 203, seed=2)
    with torch.no_grad():
        ref = encoder.subsampling(x, am)
        txl_fast.patch(encoder)
        ours = encoder.subsampling(x, am)
    txl_fast.unpatch(encoder)
    assert torch.equal(ours, ref)


# ---- whole encoders -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("attn", "dtype"), [("eager", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.float64)],
                         ids=["eager-fp32", "sdpa-fp32", "sdpa-fp64"])
@pytest.mark.parametrize("train", [False, True])
def test_encoder_long_form(small_chunks, attn, train, dtype):
    """ParakeetEncoder, 2 layers, 8x subsampling in chunks, 3 odd lengths: the last hidden state on
    every frame, the output mask, every layer's hidden states (and attentions under eager), every
    gradient of a loss over the valid frames; under grad and without."""
    model = perturb(ParakeetEncoder(config(attn))).train(train)
    x0, am = features([211, 157, 83], 211, seed=3)
    tol = TOLERANCE[dtype]
    calls = chunks_run(model)

    def run(m):
        m.zero_grad(set_to_none=True)
        x = x0.to(next(m.parameters()).dtype, copy=True).requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = m(x, attention_mask=am, output_hidden_states=True, output_attentions=attn == "eager")
        if train:
            weighted(out.last_hidden_state, out.attention_mask.bool()).backward()
        return out, (grads(m, x) if train else {})

    ref, ours, ref_g, our_g, ref64 = run_models(model, run, dtype, reference64=train)
    assert len(calls) == 1 + chunks(27, dtype) + (train and dtype == torch.float32)   # HF's call, ours, HF's float64
    assert torch.equal(ours.attention_mask, ref.attention_mask) and not ref.attention_mask.all()
    check(ours.last_hidden_state, ref.last_hidden_state, "last hidden state", tol)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 3
    for i, (h, r) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        check(h, r, f"hidden state {i}", tol)
    assert len(ours.attentions or ()) == len(ref.attentions or ()) == (2 if attn == "eager" else 0)
    for i, (w, r) in enumerate(zip(ours.attentions or (), ref.attentions or ())):
        check(w, r, f"attentions layer {i}", tol)
    if train:
        check_grads(our_g, ref_g, f"encoder {attn} train", max(tol, GRAD_TOL * (dtype == torch.float32)), ref64)


@pytest.mark.parametrize("autocast", [False, True])
def test_encoder_bf16_no_less_accurate(small_chunks, autocast):
    """bf16 weights or autocast, on the valid frames: as close to float64 as HF's own bf16 (5 % margin)."""
    model = perturb(ParakeetEncoder(config()), scale=0.05).eval()
    x, am = features([211, 157, 83], 211, seed=4)
    check_encoder_bf16(model, x, am, autocast)


@pytest.mark.parametrize("train", [False, True])
def test_ctc_long_form(small_chunks, train):
    """ParakeetForCTC around the patched encoder: logits, CTC loss, every gradient; tuples out."""
    cfg = ParakeetCTCConfig(vocab_size=11, pad_token_id=0, encoder_config=config().to_dict())
    model = perturb(ParakeetForCTC(cfg)).train(train)
    x0, am = features([211, 130, 97], 211, seed=5)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, 7, -100], [8, 9, -100, -100]])

    def run(m):
        m.zero_grad(set_to_none=True)
        x = x0.to(next(m.parameters()).dtype, copy=True).requires_grad_()
        out = m(x, attention_mask=am, labels=labels)
        out.loss.backward()
        return out, grads(m, x)

    ref, ours, ref_g, our_g, ref64 = run_models(model, run, torch.float32)
    check(ours.logits, ref.logits, "logits")
    check(ours.loss, ref.loss, "loss")
    check_grads(our_g, ref_g, f"CTC train={train}", GRAD_TOL, ref64)
    with torch.no_grad():
        library = model.encoder(x0, attention_mask=am, return_dict=False)
        txl_fast.patch(model)
        as_tuple = model.encoder(x0, attention_mask=am, return_dict=False)
    txl_fast.unpatch(model)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(library) == 2
    check(as_tuple[0], library[0], "return_dict=False")
    assert torch.equal(as_tuple[1], library[1])


# ---- memory: linear in T ------------------------------------------------------------------------------


class Allocations(TorchDispatchMode):
    """The tensors a call allocates: the largest (elements), and the peak of the bytes alive at once
    (a storage counts from the op that makes it until the last Python tensor on it dies; tensors
    made before the mode, the weights and inputs, do not count)."""

    def __init__(self):
        super().__init__()
        self.largest, self.live, self.peak, self.refs = 0, 0, 0, {}

    def _release(self, ptr, nbytes):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if ptr in inputs and ptr not in self.refs:          # a view or in-place result of an untracked tensor
                continue
            if ptr not in self.refs:
                self.refs[ptr] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
            self.refs[ptr] += 1
            weakref.finalize(t, self._release, ptr, nbytes)
        return out


def allocations(model, T, patched):
    """Allocations of one forward without autograd: 2 rows (the second 3/4 long), T output frames."""
    x, am = features([8 * T, 6 * T], 8 * T, seed=6)
    if patched:
        txl_fast.patch(model)
    try:
        with torch.no_grad(), Allocations() as seen:
            model(x, attention_mask=am)
    finally:
        if patched:
            txl_fast.unpatch(model)
    return seen


def test_memory_grows_linearly(small_chunks, monkeypatch):
    """Twice the frames: the patched encoder's largest tensor and peak of live bytes about double,
    and no tensor holds T x T elements; HF's hold its (B, 1, T, T) mask and (B, H, T, 2T - 1) scores,
    and its peak about quadruples. (Query blocks of 16: the op's position scores of a block, H x 16
    x (T + 15), stay below T x T at this T; at 128 they would from T = 512 on.)"""
    monkeypatch.setattr(rel_attention_op, "QUERY_BLOCK", 16)
    model = perturb(ParakeetEncoder(config())).eval()
    B, T = 2, 300
    ours = [allocations(model, t, True) for t in (T, 2 * T)]
    library = [allocations(model, t, False) for t in (T, 2 * T)]
    for t, seen in zip((T, 2 * T), ours):                    # the largest: the convolution module's (B, 2E, T)
        assert seen.largest < B * t * t / 2, f"patched, T={t}: a tensor of {seen.largest} elements"
    for t, seen in zip((T, 2 * T), library):
        assert seen.largest >= B * t * t, f"HF, T={t}: largest {seen.largest}"
    ours_ratio, library_ratio = ours[1].peak / ours[0].peak, library[1].peak / library[0].peak
    assert ours_ratio < 2.3, f"patched peak x{ours_ratio:.2f} for 2x frames ({ours[0].peak} -> {ours[1].peak} bytes)"
    assert library_ratio > 3.2, f"HF's peak x{library_ratio:.2f} ({library[0].peak} -> {library[1].peak} bytes)"
    assert ours[1].largest / ours[0].largest < 2.3


# ---- patch, unpatch, fallbacks ------------------------------------------------------------------------


def test_unpatch_restores_classes_state_and_outputs():
    """The encoder, its subsampling and attentions swapped per instance (state_dict unchanged, pickle
    keeps the swap and the output collection); unpatch restores classes, attributes and outputs."""
    cfg = ParakeetCTCConfig(vocab_size=11, pad_token_id=0, encoder_config=config().to_dict())
    model = perturb(ParakeetForCTC(cfg)).eval()
    x, am = features([211, 130], 211, seed=7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    with torch.no_grad():
        ref = model(x, attention_mask=am).logits
        txl_fast.patch(model)
        names = {type(m).__name__ for m in model.modules()}
        assert {"TxlFastPatchedHFParakeetEncoder", "TxlFastPatchedHFParakeetEncoderSubsamplingConv2D",
                "TxlFastPatchedHFParakeetEncoderAttention"} <= names
        assert model.state_dict().keys() == state.keys()
        clone = pickle.loads(pickle.dumps(model))
        assert type(clone.encoder) is type(model.encoder)
        out = clone.encoder(x, attention_mask=am, output_hidden_states=True)
        assert len(out.hidden_states) == 3
        txl_fast.unpatch(model)
        assert not any(type(m).__name__.startswith("TxlFastPatched") for m in model.modules())
        assert {name: set(vars(m)) for name, m in model.named_modules()} == attrs
        assert torch.equal(model(x, attention_mask=am).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def one_warning(call):
    """``call()`` three times: its results and the txl_fast warnings they raised."""
    patch_speech.warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [call() for _ in range(3)]
    return outs, [str(w.message) for w in caught if "txl_fast.patch" in str(w.message)]


def test_fallbacks_warn_once_and_agree():
    """What the exact replacements cannot serve runs the library's code, one warning per reason,
    the library's result: a dilated subsampling convolution; an encoder one of whose attention
    modules is not patched (the library's (B, 1, T, T) mask); position tables that differ per
    batch row (dropout_positions in training: the patched attention falls back, and gets the
    library's mask built from the frames)."""
    x, am = features([211, 130], 211, seed=8)
    model = perturb(ParakeetEncoder(config())).eval()
    model.subsampling.layers[2].dilation = (2, 1)     # the depthwise convolution, dilated in time
    cases = {"dilated": (model, lambda m: m.subsampling(x, am), None)}
    model = perturb(ParakeetEncoder(config())).eval()
    cases["unpatched attention"] = (model, lambda m: m(x, attention_mask=am).last_hidden_state,
                                    lambda m: txl_fast.unpatch(m.layers[1].self_attn))
    model = perturb(ParakeetEncoder(config(dropout_positions=0.3))).train()
    cases["dropout_positions"] = (model, lambda m: (torch.manual_seed(0), m(x, attention_mask=am))[1].last_hidden_state,
                                  None)
    for name, (m, call, after_patch) in cases.items():
        with torch.no_grad():
            ref = call(m)
            txl_fast.patch(m)
            if after_patch is not None:
                after_patch(m)
            outs, caught = one_warning(lambda: call(m))
        txl_fast.unpatch(m)
        assert len(caught) == 1, f"{name}: {caught}"
        for out in outs:
            check(out, ref, name)
