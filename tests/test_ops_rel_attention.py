"""The fused Triton relative attention (txl_fast.kernels.rel_attention) against txl_fast.naive.

Every test runs the kernels under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before triton is imported) on CPU tensors, with 16 x 16 tiles so that small odd
shapes still cross several tiles. What this covers: forward and all six gradients in fp64 (to
1e-10), fp32 (1e-5) and fp16 (1e-2) against a float64 reference; full gradcheck in fp64 for both
the tiled and the decode (split-over-keys) path; odd sizes; every mask mode; repeated r rows;
strided time-major inputs; NaN poisoning of every allocation plus NaN canaries around every
buffer; input validation before launch; an allocation bound (no Lq x Lk tensor). The
bidirectional mode and key padding (per-row lengths, a prefix key mask; windows on either or both
sides, memory, rows and batch rows with no visible key, both kinds of empty rows) on the tiled,
decode and split paths, in fp64 (plus fp32, fp16 and a full gradcheck), NaN-poisoned, and
key tiles past a row's length never read. The loops split into full and edge tiles (``FULL_TILES``,
off by default): the full (unmasked) loop taken by every kernel, its result bit for bit that of
every tile masked.
What it does not cover: bf16 (broken in the interpreter; compiled ahead of time in test_aot.py),
GPU numerics (tf32x3 fp32 dots, atomics ordering), the autotuned tile sizes, and speed.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")     # normally already set by tests/conftest.py

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import TOLERANCE, assert_rel_close
from txl_fast import backend, naive
from txl_fast.ops import rel_attention

pytestmark = pytest.mark.skipif(not backend.triton_interpreter(), reason="needs TRITON_INTERPRET=1 before triton import")
K = pytest.importorskip("txl_fast.kernels.rel_attention")

NAMES = ("q", "k", "v", "r", "r_w_bias", "r_r_bias")


def make_inputs(B, Lq, mlen, H, D, dtype=torch.float64, seed=0, repeat_r=0, rows_r=None):
    """Random inputs in float64 (batch-first); ``repeat_r`` first rows of r equal (clamp_len-like);
    ``rows_r``: r has that many rows (the op's clamped layout) instead of Lk."""
    g = torch.Generator().manual_seed(seed)
    Lk = Lq + mlen

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r = rnd(rows_r or Lk, H, D)
    if repeat_r:
        r[:repeat_r] = r[repeat_r]
    return [rnd(B, Lq, H, D), rnd(B, Lk, H, D), rnd(B, Lk, H, D), r, rnd(H, D) * 0.5, rnd(H, D) * 0.5], rnd(B, Lq, H, D)


def run_triton(inputs, dout, window, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    with backend.use_backend("triton"):
        out = rel_attention(*leaves, scale=inputs[0].shape[-1] ** -0.5, window=window)
    out.backward(dout.to(dtype))
    return out, [x.grad for x in leaves]


def run_naive(inputs, dout, window):
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    out = naive.rel_attention(*leaves, inputs[0].shape[-1] ** -0.5, window)[0]
    out.backward(dout.double())
    return out, [x.grad for x in leaves]


def check_all(inputs, dout, window, dtype, path_ok=None):
    out, grads = run_triton(inputs, dout, window, dtype)
    ref, ref_grads = run_naive(inputs, dout, window)
    assert_rel_close(out, ref, dtype, "out")
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == dtype and g.shape == rg.shape
        assert_rel_close(g, rg, dtype, f"d{name}")


@pytest.fixture(params=["tiled", "decode", "split"])
def path(request, monkeypatch):
    """Force the path: tiled (query tiles), decode (split over keys, any Lq <= 16) or split (split
    over keys for any Lq, as a GPU takes it when the tiled grid underfills the SMs)."""
    monkeypatch.setattr(K, "DECODE_MAX_LQ", 16 if request.param == "decode" else 0)
    monkeypatch.setattr(K, "INTERPRET_UNDERFILL_PROGRAMS", 10**9 if request.param == "split" else 0)
    return request.param


# (B, Lq, mlen, H, D, window, repeat_r): each a mask mode or size corner; Lq <= 16 so both paths run
CASES = {
    "odd_no_window": (2, 13, 10, 2, 16, None, 0),
    "mlen0": (1, 11, 0, 2, 16, None, 0),
    "window": (1, 14, 9, 2, 24, 6, 0),            # D 24: padded to a 32-wide tile with masks
    "window_ge_klen": (1, 9, 5, 1, 16, 100, 0),
    "window0_uniform": (2, 7, 0, 1, 16, 0, 0),    # every row fully masked -> uniform over Lk keys
    "window0_with_mem": (1, 5, 6, 1, 16, 0, 0),
    "lq_gt_mlen": (1, 15, 3, 1, 16, 4, 0),
    "lq1": (2, 1, 40, 2, 16, None, 0),
    "lq1_window": (1, 1, 37, 1, 16, 9, 0),
    "repeated_r": (1, 12, 12, 1, 16, None, 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp64_matches_naive(case, path):
    B, Lq, mlen, H, D, window, rep = CASES[case]
    inputs, dout = make_inputs(B, Lq, mlen, H, D, repeat_r=rep, seed=len(case))
    check_all(inputs, dout, window, torch.float64)


@pytest.mark.parametrize("window", [None, 7])
def test_clamped_positions_match_naive(path, window):
    """r with 6 rows for 21 keys (clamp_len 5): written out to Lk rows before the launch, the
    clamped rows' gradients summed into row 0."""
    inputs, dout = make_inputs(2, 9, 12, 2, 16, seed=11, rows_r=6)
    check_all(inputs, dout, window, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_dtypes_odd_sizes(dtype):
    """Lq 37, Lk 53 (no multiple of 16), D 48 (tile 64): three query tiles, four key tiles."""
    inputs, dout = make_inputs(1, 37, 16, 2, 48, seed=3)
    check_all(inputs, dout, 20, dtype)


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_split_path_over_query_tiles(monkeypatch, dtype, window):
    """The split-over-keys path beyond decode (Lq 37: three query tiles, each merged over its own
    key chunks, some of them empty under the window), forced as an underfilled GPU grid takes it."""
    monkeypatch.setattr(K, "DECODE_MAX_LQ", 0)
    monkeypatch.setattr(K, "INTERPRET_UNDERFILL_PROGRAMS", 10**9)
    plan = K.split_plan(1, 2, 37, 53, 64, dtype)
    assert plan is not None and plan[4] == 3 and plan[5] > 1, plan
    inputs, dout = make_inputs(1, 37, 16, 2, 48, seed=3)
    check_all(inputs, dout, window, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dtypes_decode(dtype):
    inputs, dout = make_inputs(2, 1, 70, 2, 32, seed=4)
    check_all(inputs, dout, None, dtype)


@pytest.mark.parametrize("path,window", [("tiled", 3), ("decode", None)], indirect=["path"])
def test_gradcheck(path, window):
    """Full (not fast-mode) gradcheck in fp64 on a tiny shape (D 3, padded to a 16-wide tile, keeps
    the 72 perturbed inputs affordable), for every input."""
    inputs, _ = make_inputs(1, 4, 2, 1, 3, seed=5)
    leaves = [x.clone().requires_grad_() for x in inputs]

    def f(*xs):
        with backend.use_backend("triton"):
            return rel_attention(*xs, scale=0.25, window=window)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=False)


def test_strided_time_major_inputs():
    """HF's time-major (L, B, H, D) tensors as transpose(0, 1) views, r and the biases with a
    non-unit last stride: the op reads them through their strides and copies nothing."""
    B, Lq, mlen, H, D = 2, 19, 7, 2, 16
    Lk = Lq + mlen
    (q, k, v, r, u, w), dout = make_inputs(B, Lq, mlen, H, D, seed=6)
    tq = q.transpose(0, 1).contiguous().transpose(0, 1)                     # (B, Lq, H, D) view of (Lq, B, H, D)
    tk = k.transpose(0, 1).contiguous().transpose(0, 1)
    tv = v.transpose(0, 1).contiguous().transpose(0, 1)
    tr = r.permute(0, 2, 1).contiguous().permute(0, 2, 1)                   # d stride H
    tu, tw = u.t().contiguous().t(), w.t().contiguous().t()
    assert not tq.is_contiguous() and tr.stride(-1) == H and tu.stride(-1) == H
    check_all([tq, tk, tv, tr, tu, tw], dout.transpose(0, 1).contiguous().transpose(0, 1), 11, torch.float64)
    assert Lk == tk.shape[1]


class PoisonAllocations(TorchDispatchMode):
    """Every float tensor the op allocates is a slice of a larger buffer: NaN everywhere at first
    (an element the kernels fail to write stays NaN), with NaN canaries before and after."""

    PAD = 64
    FACTORIES = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
                 torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default}

    def __init__(self):
        super().__init__()
        self.buffers = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.FACTORIES and out.is_floating_point() and out.is_contiguous():
            buf = torch.full((out.numel() + 2 * self.PAD,), float("nan"), dtype=out.dtype)
            view = buf[self.PAD:self.PAD + out.numel()].view(out.shape)
            if func in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default):
                view.zero_()
            self.buffers.append((buf, out.numel()))
            return view
        return out

    def canaries_intact(self) -> bool:
        return all(torch.isnan(b[:self.PAD]).all() and torch.isnan(b[self.PAD + n:]).all() for b, n in self.buffers)


def embed_in_nan(x: torch.Tensor, pad: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    """x copied into the middle of a NaN-filled buffer; returns (view, buffer)."""
    buf = torch.full((x.numel() + 2 * pad,), float("nan"), dtype=x.dtype)
    view = buf[pad:pad + x.numel()].view(x.shape)
    view.copy_(x)
    return view, buf


@pytest.mark.parametrize("lq", [21, 2])
def test_nan_poison_and_canaries(lq):
    """Inputs inside NaN buffers (a read past any edge would make the result NaN), every
    allocation NaN-poisoned with canaries (a missed or stray write shows), forward and backward."""
    inputs, dout = make_inputs(1, lq, 12, 2, 16, seed=7)
    embedded = [embed_in_nan(x) for x in inputs + [dout]]
    views = [v.requires_grad_() if i < 6 else v for i, (v, _) in enumerate(embedded)]
    mode = PoisonAllocations()
    with mode, backend.use_backend("triton"):
        out = rel_attention(*views[:6], scale=0.25, window=9)
        out.backward(views[6])
    ref = naive.rel_attention(*[x.double() for x in inputs], 0.25, 9)[0]
    assert_rel_close(out, ref, torch.float64, "out")
    for name, x in zip(NAMES, views[:6]):
        assert torch.isfinite(x.grad).all(), f"d{name} has non-finite values"
    assert len(mode.buffers) >= 5 and mode.canaries_intact(), "a kernel wrote outside its buffer"
    for (v, buf), x in zip(embedded, inputs + [dout]):
        pad = 37
        assert torch.isnan(buf[:pad]).all() and torch.isnan(buf[pad + x.numel():]).all()
        assert torch.equal(v.detach(), x), "an input was modified"


class RecordAllocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # in-place ops (copy_, set_, zero_) allocate nothing; uint8 views are the interpreter's
        # byte views of existing tensors
        if not func.__name__.split(".")[0].endswith("_"):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                    self.sizes.append((str(func), tuple(t.shape), t.numel()))
        return out


@pytest.mark.parametrize("lq,mlen,D", [(48, 32, 16), (12, 300, 8)])
def test_no_score_sized_allocation(lq, mlen, D):
    """No tensor the op creates in forward or backward holds Lq * Lk elements per (batch, head).
    (D < Lq so that dk and dv, Lk * D per (batch, head), stay under the bound by construction.)"""
    B, H = 2, 2
    inputs, dout = make_inputs(B, lq, mlen, H, D, seed=8)
    leaves = [x.clone().requires_grad_() for x in inputs]
    rec = RecordAllocations()
    with rec, backend.use_backend("triton"):
        out = rel_attention(*leaves, scale=0.25, window=None)
        out.backward(dout)
    limit = lq * (lq + mlen) * B * H
    big = [s for s in rec.sizes if s[2] >= limit]
    assert rec.sizes and not big, f"score-sized allocations: {big}"


def test_bad_inputs_raise_before_launch(monkeypatch):
    inputs, _ = make_inputs(1, 4, 2, 1, 16)
    q, k, v, r, u, w = inputs
    with backend.use_backend("triton"):
        with pytest.raises(ValueError, match="d_head must be in 1..128"):
            big = [torch.zeros(*x.shape[:-1], 130, dtype=x.dtype) for x in inputs]
            rel_attention(*big, scale=1.0)
        with pytest.raises(ValueError, match="dtype"):
            rel_attention(q, k.float(), v, r, u, w, scale=1.0)
        with pytest.raises(ValueError, match="r must be"):
            rel_attention(q, k, v, torch.cat([r, r[:1]]), u, w, scale=1.0)      # Lr > Lk
        with pytest.raises(ValueError, match="window"):
            rel_attention(q, k, v, r, u, w, scale=1.0, window=-1)
        with pytest.raises(ValueError, match="bfloat16"):
            rel_attention(*[x.bfloat16() for x in inputs], scale=1.0)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            rel_attention(*inputs, scale=1.0)


def test_tolerance_table_is_the_shared_one():
    assert TOLERANCE[torch.float64] == 1e-10 and TOLERANCE[torch.float32] == 1e-5 and TOLERANCE[torch.float16] == 1e-2


# ---- the bidirectional mode (Conformer encoders) and key padding -------------------------------

# (B, Lq, mlen, H, D, causal, window or context, key lengths or None): batch rows of length 0
# (every query empty), windows one-sided on either side, a memory before the chunk (Lq != Lk)
MODES = {
    "bidi": (2, 13, 0, 2, 8, False, None, None),
    "bidi_lengths": (3, 11, 0, 2, 8, False, None, [11, 6, 0]),
    "bidi_context": (2, 19, 0, 2, 8, False, (3, 2), [19, 9]),
    "bidi_left_only": (2, 18, 0, 1, 8, False, (4, 0), [18, 11]),
    "bidi_right_only": (2, 17, 0, 1, 8, False, (0, 3), [17, 4]),
    "bidi_memory": (2, 7, 9, 2, 8, False, (6, 1), [16, 5]),          # NeMo's cache, ESPnet's left context
    "causal_lengths": (3, 9, 6, 2, 8, True, None, [15, 7, 0]),
    "causal_window_lengths": (2, 19, 5, 1, 8, True, 4, [24, 9]),
}


def mode_inputs(case, seed=0):
    """float64 inputs of a MODES case (r with a row per distance), the op's mode keywords, dout."""
    B, Lq, mlen, H, D, causal, extent, lengths = MODES[case]
    Lk = Lq + mlen
    inputs, dout = make_inputs(B, Lq, mlen, H, D, seed=seed, rows_r=Lk if causal else Lk + Lq - 1)
    mode = dict(causal=causal, **{"window" if causal else "context": extent})
    if lengths is not None:
        mode["key_lengths"] = torch.tensor(lengths)
    return inputs, mode, dout


def check_mode(inputs, mode, dout, dtype, empty_rows):
    """Output and all six gradients of the triton backend against the float64 naive path."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    scale = inputs[0].shape[-1] ** -0.5
    with backend.use_backend("triton"):
        out = rel_attention(*leaves, scale=scale, empty_rows=empty_rows, **mode)
    out.backward(dout.to(dtype))
    refs = [x.detach().to(dtype).double().requires_grad_() for x in inputs]
    naive_mode = {n: x for n, x in mode.items() if n not in ("key_lengths", "key_starts")}
    if "key_lengths" in mode or "key_starts" in mode:
        j = torch.arange(inputs[1].shape[1])[None, :]
        naive_mode["key_mask"] = (j < mode.get("key_lengths", inputs[1].shape[1]).view(-1, 1)
                                  if "key_lengths" in mode else j >= 0)
    ref = naive.rel_attention(*refs, scale, empty_rows=empty_rows, **naive_mode)[0]
    ref.backward(dout)
    assert_rel_close(out, ref, dtype, "out")
    for name, x, rx in zip(NAMES, leaves, refs):
        assert x.grad is not None and x.grad.dtype == dtype, name
        assert_rel_close(x.grad, rx.grad, dtype, f"d{name}")
    return out


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("case", list(MODES))
def test_modes_match_naive(case, empty_rows):
    inputs, mode, dout = mode_inputs(case, seed=len(case))
    check_mode(inputs, mode, dout, torch.float64, empty_rows)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("case", ["bidi_lengths", "bidi_context", "bidi_memory"])
@pytest.mark.parametrize("path", ["decode", "split"], indirect=True)
def test_modes_on_the_split_paths(path, case, empty_rows):
    """Split over keys: decode (Lq <= 16 in one query tile) and any Lq (several query tiles, the
    chunks of an empty row or of a skipped key range merged)."""
    inputs, mode, dout = mode_inputs(case, seed=len(case) + 1)
    check_mode(inputs, mode, dout, torch.float64, empty_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_modes_low_precision(dtype):
    inputs, mode, dout = mode_inputs("bidi_context", seed=2)
    check_mode(inputs, mode, dout, dtype, "zero")


def test_empty_rows_exact_and_finite():
    """Every key padding (lengths 0): "zero" gives exact zeros and zero gradients, never NaN (l = 0
    is not divided by); "uniform" gives HF's uniform row, the mean value over all Lk keys."""
    inputs, mode, dout = mode_inputs("bidi_lengths", seed=3)
    mode["key_lengths"] = torch.zeros(3, dtype=torch.int64)
    out = check_mode(inputs, mode, dout, torch.float64, "zero")
    assert torch.equal(out, torch.zeros_like(out))
    leaves = [x.clone().requires_grad_() for x in inputs]
    with backend.use_backend("triton"):
        rel_attention(*leaves, scale=0.3, empty_rows="zero", **mode).backward(dout)
        uniform = rel_attention(*inputs, scale=0.3, **mode)
    assert all(torch.equal(x.grad, torch.zeros_like(x)) for x in leaves)
    torch.testing.assert_close(uniform, inputs[2].mean(1, keepdim=True).expand_as(uniform), rtol=1e-12, atol=1e-12)


def test_tiles_past_the_key_length_are_never_read():
    """Keys and values past each row's length (a whole 16-key tile) hold NaN: the kernels skip the
    tiles no query of the row may see, so nothing of them reaches the output or a gradient."""
    B, Lq, H, D = 2, 20, 2, 8
    inputs, dout = make_inputs(B, Lq, 0, H, D, seed=4, rows_r=2 * Lq - 1)
    mode = dict(causal=False, key_lengths=torch.tensor([16, 16]))
    poisoned = [x.clone() for x in inputs]
    for x in poisoned[1:3]:
        x[:, 16:] = float("nan")
    leaves = [x.clone().requires_grad_() for x in poisoned]
    with backend.use_backend("triton"):
        out = rel_attention(*leaves, scale=0.3, empty_rows="zero", **mode)
    out.backward(dout)
    refs = [x.clone().requires_grad_() for x in inputs]
    keys = torch.arange(Lq)[None, :] < 16
    ref = naive.rel_attention(*refs, 0.3, causal=False, key_mask=keys.expand(B, Lq), empty_rows="zero")[0]
    ref.backward(dout)
    assert_rel_close(out, ref, torch.float64, "out")
    for name, x, rx in zip(NAMES, leaves, refs):
        grad, ref_grad = (x.grad, rx.grad) if name not in ("k", "v") else (x.grad[:, :16], rx.grad[:, :16])
        assert_rel_close(grad, ref_grad, torch.float64, f"d{name}")
        if name in ("k", "v"):
            assert torch.equal(x.grad[:, 16:], torch.zeros_like(x.grad[:, 16:])), f"d{name} past the length"


def test_gradcheck_bidirectional():
    """Full gradcheck in fp64 on a tiny shape with a limited context, memory, a short batch row and
    one whose keys are all padding."""
    inputs, _ = make_inputs(2, 3, 1, 1, 2, seed=9, rows_r=6)
    leaves = [x.clone().requires_grad_() for x in inputs]

    def f(*xs):
        with backend.use_backend("triton"):
            return rel_attention(*xs, scale=0.25, causal=False, context=(2, 1), key_lengths=torch.tensor([2, 0]),
                                 empty_rows="zero")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=False)


def test_nan_poison_and_canaries_bidirectional():
    """As test_nan_poison_and_canaries, in the bidirectional mode with padding and empty rows."""
    inputs, mode, dout = mode_inputs("bidi_context", seed=7)
    mode["key_lengths"] = torch.tensor([19, 0])
    embedded = [embed_in_nan(x) for x in inputs + [dout]]
    views = [v.requires_grad_() if i < 6 else v for i, (v, _) in enumerate(embedded)]
    poison = PoisonAllocations()
    with poison, backend.use_backend("triton"):
        out = rel_attention(*views[:6], scale=0.25, empty_rows="zero", **mode)
        out.backward(views[6])
    keys = torch.arange(19)[None, :] < mode["key_lengths"][:, None]
    ref = naive.rel_attention(*inputs, 0.25, causal=False, context=mode["context"], key_mask=keys, empty_rows="zero")[0]
    assert_rel_close(out, ref, torch.float64, "out")
    assert all(torch.isfinite(x.grad).all() for x in views[:6])
    assert len(poison.buffers) >= 5 and poison.canaries_intact(), "a kernel wrote outside its buffer"


def test_prefix_key_mask_runs_as_lengths_and_holes_are_refused(monkeypatch):
    """A key mask of keys [0, n) per row reaches the kernels as lengths (same result, bit for bit);
    one with holes is refused by an explicit triton backend with the reason, and runs on the torch
    path under auto (here forced to resolve to triton, as it would on CUDA)."""
    inputs, mode, _ = mode_inputs("bidi_context", seed=8)
    lengths = mode.pop("key_lengths")
    prefix = torch.arange(19)[None, :] < lengths[:, None]
    launches = []
    original = K.forward
    monkeypatch.setattr(K, "forward", lambda *a, **kw: (launches.append(kw["key_lengths"]), original(*a, **kw))[1])
    with backend.use_backend("triton"):
        by_mask = rel_attention(*inputs, scale=0.5, key_mask=prefix, **mode)
        by_lengths = rel_attention(*inputs, scale=0.5, key_lengths=lengths, **mode)
    assert torch.equal(by_mask, by_lengths) and launches[0].tolist() == lengths.tolist()
    holes = prefix.clone()
    holes[0, 3] = False
    with backend.use_backend("triton"), pytest.raises(ValueError, match="key padding as one range of keys per batch row"):
        rel_attention(*inputs, scale=0.5, key_mask=holes, **mode)
    monkeypatch.setattr(backend, "resolve", lambda tensor, name=None: "triton")
    with backend.use_backend("auto"):
        out = rel_attention(*inputs, scale=0.5, key_mask=holes, **mode)
    ref = naive.rel_attention(*inputs, 0.5, key_mask=holes, **mode)[0]
    assert_rel_close(out, ref, torch.float64, "out")
    assert len(launches) == 2


# ---- the key loops split into full tiles (no mask) and edge tiles -------------------------------

# (B, Lq, mlen, H, D, causal, window or context, key lengths or None, empty rows), each with tiles
# that every query row of a tile sees whole, in the forward and (Lq >= 16) in dq and dkdv: a window
# and a context wider than a 16 x 16 tile needs (31), memory, lengths that cut a key tile
FULL_TILE_MODES = {
    "causal_memory": (1, 40, 30, 1, 8, True, None, None, "uniform"),
    "causal_window_lengths": (2, 40, 32, 1, 8, True, 36, [72, 61], "uniform"),
    "bidi_context_lengths": (2, 48, 0, 1, 8, False, (20, 20), [48, 37], "zero"),
    "decode_window": (1, 5, 60, 1, 8, True, 50, None, "uniform"),
}


def run_counting_full_tiles(monkeypatch, inputs, mode, dout, empty_rows, full_tiles):
    """Output and the six gradients (fp64, triton backend) with ``full_tiles`` in place of the
    kernels' ``full_tiles``, and the full tiles each program took: {"fwd": [...], "bwd": [...]}
    (the backward's dq programs first, then dkdv's)."""
    taken = {"fwd": [], "bwd": []}
    phase = ["fwd"]

    def counting(start, stop, first, last, BLOCK):
        a, b = full_tiles(start, stop, first, last, BLOCK)
        taken[phase[0]].append((b.handle.data.item() - a.handle.data.item()) // BLOCK)
        return a, b

    monkeypatch.setattr(K, "full_tiles", counting)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    with backend.use_backend("triton"):
        out = rel_attention(*leaves, scale=inputs[0].shape[-1] ** -0.5, empty_rows=empty_rows, **mode)
    phase[0] = "bwd"
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves], taken


@pytest.mark.parametrize("case, path", [("causal_memory", "tiled"), ("causal_window_lengths", "tiled"),
                                        ("causal_window_lengths", "split"), ("bidi_context_lengths", "tiled"),
                                        ("bidi_context_lengths", "split"), ("decode_window", "decode")],
                         indirect=["path"])
def test_full_tiles_are_taken_and_change_no_bit(monkeypatch, case, path):
    """The unmasked loop runs (the forward on every path, dq and dkdv when a query tile is whole),
    the result matches naive, and it is bit for bit the result with every tile masked (each tile
    an edge tile): a mask on a visible score is the identity, and the tiles keep their order."""
    B, Lq, mlen, H, D, causal, extent, lengths, empty_rows = FULL_TILE_MODES[case]
    inputs, dout = make_inputs(B, Lq, mlen, H, D, seed=len(case), rows_r=Lq + mlen if causal else 2 * Lq + mlen - 1)
    mode = dict(causal=causal, **{"window" if causal else "context": extent})
    if lengths is not None:
        mode["key_lengths"] = torch.tensor(lengths)
    monkeypatch.setattr(K, "FULL_TILES", True)           # the split is off by default (ptxas spills)
    original = K.full_tiles
    split, taken = run_counting_full_tiles(monkeypatch, inputs, mode, dout, empty_rows, original.fn)
    dq_programs = -(-Lq // K.INTERPRET_BLOCK) * B * H
    assert sum(taken["fwd"]) > 0, taken
    if Lq >= K.INTERPRET_BLOCK:
        assert sum(taken["bwd"][:dq_programs]) > 0 and sum(taken["bwd"][dq_programs:]) > 0, taken
    masked, none = run_counting_full_tiles(monkeypatch, inputs, mode, dout, empty_rows,
                                           lambda start, stop, first, last, BLOCK: (start, start))
    assert not any(none["fwd"] + none["bwd"])
    for name, a, b in zip(("out",) + NAMES, split, masked):
        assert torch.equal(a, b), f"{name} differs with every tile masked"
    refs = [x.detach().clone().requires_grad_() for x in inputs]
    naive_mode = {n: x for n, x in mode.items() if n != "key_lengths"}
    if lengths is not None:
        naive_mode["key_mask"] = torch.arange(Lq + mlen)[None, :] < mode["key_lengths"][:, None]
    ref = naive.rel_attention(*refs, D ** -0.5, empty_rows=empty_rows, **naive_mode)[0]
    ref.backward(dout)
    for name, a, b in zip(("out",) + NAMES, split, [ref] + [x.grad for x in refs]):
        assert_rel_close(a, b, torch.float64, name)


# ---- chunk_context (per-query key ranges) and query lengths -------------------------------------

# (B, Lq, mlen, H, D, mode keywords, key lengths, query lengths): chunks of 4 with unlimited, 0 and
# 1 chunks to the left and 0 or 2 keys to the right, memory (Lk 19), ragged rows of both kinds (a
# batch row of no query; queries of row 1 past its keys see nothing), several query and key tiles
CHUNK_MODES = {
    "chunk_unlimited": (2, 13, 0, 2, 16, dict(chunk_context=(4, -1, 0)), None, None),
    "chunk_l0_r2": (2, 13, 0, 2, 16, dict(chunk_context=(4, 0, 2)), [13, 7], [13, 9]),
    "chunk_l1_memory": (2, 13, 6, 2, 16, dict(chunk_context=(4, 1, 0)), [19, 11], [9, 13]),
    "chunk_l1_r2_memory": (2, 13, 6, 2, 16, dict(chunk_context=(4, 1, 2)), [19, 11], [13, 0]),
    "chunk_unlimited_r2_memory": (2, 13, 6, 1, 16, dict(chunk_context=(4, -1, 2)), None, [11, 13]),
    "chunk_tiles": (2, 37, 3, 1, 16, dict(chunk_context=(5, 1, 2)), [40, 30], [37, 22]),
    "bidi_context_queries": (2, 13, 6, 2, 16, dict(context=(3, 2)), [19, 11], [13, 7]),
    "causal_window_queries": (2, 13, 6, 1, 16, dict(causal=True, window=5), [19, 11], [10, 13]),
}


def chunk_inputs(case, seed=0):
    """float64 inputs of a CHUNK_MODES case, the op's keywords (bidirectional unless causal), dout."""
    B, Lq, mlen, H, D, extra, key_lengths, query_lengths = CHUNK_MODES[case]
    mode = {"causal": False, **extra}
    Lk = Lq + mlen
    inputs, dout = make_inputs(B, Lq, mlen, H, D, seed=seed, rows_r=Lk if mode["causal"] else Lk + Lq - 1)
    if key_lengths is not None:
        mode["key_lengths"] = torch.tensor(key_lengths)
    if query_lengths is not None:
        mode["query_lengths"] = torch.tensor(query_lengths)
    return inputs, mode, dout


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("case", list(CHUNK_MODES))
def test_chunk_modes_match_naive(case, empty_rows):
    inputs, mode, dout = chunk_inputs(case, seed=len(case))
    check_mode(inputs, mode, dout, torch.float64, empty_rows)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("case", ["chunk_l1_memory", "chunk_tiles"])
@pytest.mark.parametrize("path", ["decode", "split"], indirect=True)
def test_chunk_modes_on_the_split_paths(path, case, empty_rows):
    inputs, mode, dout = chunk_inputs(case, seed=len(case) + 1)
    check_mode(inputs, mode, dout, torch.float64, empty_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["chunk_l1_r2_memory", "chunk_tiles"])
def test_chunk_modes_low_precision(case, dtype):
    inputs, mode, dout = chunk_inputs(case, seed=5)
    check_mode(inputs, mode, dout, dtype, "uniform")
    check_mode(inputs, mode, dout, dtype, "zero")


def test_gradcheck_chunks():
    """Full gradcheck in fp64: chunks of 2 with one to the left and a key to the right, memory, a
    padded query and a short key row."""
    inputs, _ = make_inputs(2, 4, 1, 1, 2, seed=10, rows_r=8)
    leaves = [x.clone().requires_grad_() for x in inputs]

    def f(*xs):
        with backend.use_backend("triton"):
            return rel_attention(*xs, scale=0.25, causal=False, chunk_context=(2, 1, 1), key_lengths=torch.tensor([5, 3]),
                                 query_lengths=torch.tensor([3, 4]), empty_rows="uniform")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=False)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_nan_poison_and_canaries_chunks(empty_rows):
    """As test_nan_poison_and_canaries, with chunks, key and query padding and empty rows."""
    inputs, mode, dout = chunk_inputs("chunk_l1_r2_memory", seed=7)
    embedded = [embed_in_nan(x) for x in inputs + [dout]]
    views = [v.requires_grad_() if i < 6 else v for i, (v, _) in enumerate(embedded)]
    poison = PoisonAllocations()
    with poison, backend.use_backend("triton"):
        out = rel_attention(*views[:6], scale=0.25, empty_rows=empty_rows, **mode)
        out.backward(views[6])
    keys = torch.arange(19)[None, :] < mode["key_lengths"][:, None]
    ref = naive.rel_attention(*inputs, 0.25, causal=False, chunk_context=mode["chunk_context"], key_mask=keys,
                              query_lengths=mode["query_lengths"], empty_rows=empty_rows)[0]
    assert_rel_close(out, ref, torch.float64, "out")
    assert all(torch.isfinite(x.grad).all() for x in views[:6])
    assert len(poison.buffers) >= 5 and poison.canaries_intact(), "a kernel wrote outside its buffer"


@pytest.mark.parametrize("empty_rows,query_lengths,visits", [
    ("zero", None, (4, 4, 4)),                 # each 16-query tile: the one key tile of its chunk
    ("zero", [40], (3, 3, 3)),                 # the last query tile is all padding: never visited
    ("uniform", [40], (2 + 4 + 4, 3, 4 + 3 + 2 + 2)),  # HF's uniform padded rows (from row 40) see every key
])
def test_query_tiles_visit_only_their_chunk(monkeypatch, empty_rows, query_lengths, visits):
    """Lq = Lk = 64, chunks of 16 with no context on either side, 16 x 16 tiles: the forward, dq
    and dkdv each run one masked tile per pair of tiles that meet a chunk (``_visible`` counted);
    without chunks they would be 16 each. HF's uniform padded rows: a dk/dv program takes the
    rows from the first padded one (or its own first) to the end."""
    inputs, dout = make_inputs(1, 64, 0, 1, 8, seed=11, rows_r=127)
    mode = dict(causal=False, chunk_context=(16, 0, 0), empty_rows=empty_rows)
    if query_lengths is not None:
        mode["query_lengths"] = torch.tensor(query_lengths)
    calls = []
    original = K._visible
    monkeypatch.setattr(K, "_visible", lambda *a: (calls.append(1), original.fn(*a))[1])
    leaves = [x.clone().requires_grad_() for x in inputs]
    with backend.use_backend("triton"):
        out = rel_attention(*leaves, scale=0.3, **mode)
        forward = len(calls)
        out.backward(dout)
    backward = len(calls) - forward
    assert (forward, backward) == (visits[0], visits[1] + visits[2]), (forward, backward)
    check_mode(inputs, {n: x for n, x in mode.items() if n != "empty_rows"}, dout, torch.float64, empty_rows)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_key_ranges_reach_the_kernels(monkeypatch, empty_rows):
    """A key mask of one range [start, end) per row (left padding, a streaming cache's window, an
    empty row) reaches the kernels as starts and ends, and matches naive in every gradient; the
    same with chunks and padded queries."""
    inputs, mode, dout = chunk_inputs("chunk_l1_r2_memory", seed=12)
    mode.pop("key_lengths")
    j = torch.arange(19)[None, :]
    starts, ends = torch.tensor([5, 0]), torch.tensor([19, 0])
    mode["key_mask"] = (j >= starts[:, None]) & (j < ends[:, None])
    launches = []
    original = K.forward
    monkeypatch.setattr(K, "forward", lambda *a, **kw: (launches.append((kw["key_starts"], kw["key_lengths"])),
                                                          original(*a, **kw))[1])
    check_mode(inputs, mode, dout, torch.float64, empty_rows)
    assert launches[0][0].tolist() == starts.tolist() and launches[0][1].tolist() == ends.tolist()
    bidi, _, bidi_dout = mode_inputs("bidi_context", seed=13)
    j = torch.arange(19)[None, :]
    window = dict(causal=False, context=(3, 2), key_mask=(j >= torch.tensor([[4], [11]])) & (j < torch.tensor([[15], [19]])))
    check_mode(bidi, window, bidi_dout, torch.float64, empty_rows)
    assert launches[-1][0].tolist() == [4, 11] and launches[-1][1].tolist() == [15, 19]


# ---- softcap: score -> cap * tanh(score / cap) before the masks ---------------------------------

@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("case,path", [("chunk_l1_r2_memory", "tiled"), ("causal_window_queries", "tiled"),
                                       ("bidi_context_queries", "split"), ("chunk_l1_memory", "decode")],
                         indirect=["path"])
def test_softcap_matches_naive(path, case, empty_rows):
    """Inputs doubled so that scores of a few units meet a cap of 3: every gradient in fp64."""
    inputs, mode, dout = chunk_inputs(case, seed=len(case) + 3)
    check_mode([x * 2 for x in inputs], dict(mode, softcap=3.0), dout, torch.float64, empty_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_low_precision(dtype):
    inputs, mode, dout = chunk_inputs("chunk_tiles", seed=6)
    check_mode([x * 2 for x in inputs], dict(mode, softcap=3.0), dout, dtype, "uniform")


def test_gradcheck_softcap():
    inputs, _ = make_inputs(2, 4, 1, 1, 2, seed=14, rows_r=5)

    def f(*xs):
        with backend.use_backend("triton"):
            return rel_attention(*xs, scale=0.8, window=3, key_lengths=torch.tensor([5, 2]), softcap=1.5)

    leaves = [(x * 2).requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=False)
