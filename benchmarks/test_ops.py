"""Per-op benchmarks (pytest-benchmark): relative attention and adaptive softmax on the naive / torch /
triton backends, and one model step (a segment forward) of txl_fast, cached and uncached, vs HF 4.35.
Parametrized by batch size, qlen, mem_len and dtype.

Quick mode (default, runs in CI in seconds): tiny shapes; on a CPU the Triton kernels run in the
interpreter (``benchmarks/conftest.py`` sets TRITON_INTERPRET=1), which checks that the benchmark runs,
not how fast the kernel is. ``TXL_BENCH_FULL=1``: the wt103 shapes (H 16, d_head 64, qlen 128,
mem_len 400 / 1600, batch 1 / 16; Triton on a GPU only).

    python -m pytest benchmarks/test_ops.py -q --benchmark-disable          # quick, each case once
    python -m pytest benchmarks/test_ops.py -q --benchmark-json ops.json    # quick, timed, JSON
    TXL_BENCH_FULL=1 python -m pytest benchmarks/test_ops.py --benchmark-json ops.json

Each case records the analytic FLOPs and minimum bytes (``txl_fast.bench.analytic``) in the JSON's
``extra_info``, so achieved rates can be computed from the saved times. On CUDA every timed call
ends with a synchronize.
"""
import importlib.util
import os

import pytest
import torch

from txl_fast import TransfoXLConfig, backend, ops, use_backend
from txl_fast.bench import analytic
from txl_fast.bench.harness import build_pair
from txl_fast.modules import ProjectedAdaptiveLogSoftmax

FULL = os.environ.get("TXL_BENCH_FULL") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IMPLS = ["naive", "torch", "triton"]
ROUNDS = 10 if FULL else 2

if FULL:
    N_HEAD, D_HEAD = 16, 64
    ATTENTION_SHAPES = [(1, 128, 1600), (16, 128, 1600), (1, 128, 400), (16, 1, 1600)]   # (batch, qlen, mem_len)
    SOFTMAX_CONFIG = TransfoXLConfig()                                                     # wt103
    NLL_SHAPES, LOGPROB_SHAPES = [(1, 128), (16, 128)], [(1, 1), (16, 1)]                  # (batch, qlen)
else:
    N_HEAD, D_HEAD = 2, 16
    ATTENTION_SHAPES = [(1, 5, 0), (2, 5, 7)]
    SOFTMAX_CONFIG = TransfoXLConfig(vocab_size=97, cutoffs=[20, 50], d_model=32, d_embed=32, div_val=2,
                                     n_head=2, d_head=16, d_inner=64, n_layer=1)
    NLL_SHAPES = LOGPROB_SHAPES = [(1, 5), (2, 3)]
NAIVE_LIMIT = 5e7          # elements of the naive path's largest float64 intermediate


def shape_id(shape):
    return "-".join(f"{k}{v}" for k, v in zip(("b", "q", "m"), shape))


def skip_unless_runnable(impl: str, dtype: torch.dtype, op: str, naive_elements: float) -> None:
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        if importlib.util.find_spec(f"txl_fast.kernels.{op}") is None:
            pytest.skip(f"no Triton path for {op} (txl_fast.kernels.{op} is absent)")
        if DEVICE == "cpu":
            if not backend.triton_interpreter():
                pytest.skip("no GPU and TRITON_INTERPRET=1 was not set before triton was imported")
            if dtype == torch.bfloat16:
                pytest.skip("bf16 is broken in the Triton interpreter (triton issue 11584): GPU only")
            if FULL:
                pytest.skip("the Triton interpreter is a correctness tool, not a speed measure: full shapes need a GPU")
    if impl == "naive" and naive_elements > NAIVE_LIMIT:
        pytest.skip(f"the literal float64-style reference would materialise {naive_elements:.1e} elements")


def run(benchmark, fn, rounds: int = ROUNDS):
    """Time ``fn`` (synchronised on CUDA): one warm-up, then ``rounds`` rounds of one call."""
    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


# ---- relative attention --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=shape_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_rel_attention(benchmark, impl, shape, dtype):
    B, Lq, M = shape
    Lk, H, D, dt = Lq + M, N_HEAD, D_HEAD, DTYPES[dtype]
    skip_unless_runnable(impl, dt, "rel_attention", Lq * Lk * H * D)
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=g, device=DEVICE).to(dt)

    q, k, v, r = rand(B, Lq, H, D), rand(B, Lk, H, D), rand(B, Lk, H, D), rand(Lk, H, D)
    u, w = rand(H, D), rand(H, D)
    window = M + Lq if M else None                       # same_length's window when there is memory

    def fn():
        with use_backend(impl), torch.no_grad():
            return ops.rel_attention(q, k, v, r, u, w, scale=D ** -0.5, window=window)

    path = {"triton": "fused", "torch": "torch", "naive": "torch"}[impl]
    cost = analytic.rel_attention(B, H, Lq, Lk, D, torch.finfo(dt).bits // 8, path)
    minimum = analytic.rel_attention(B, H, Lq, Lk, D, torch.finfo(dt).bits // 8, "fused")
    benchmark.extra_info.update(op="rel_attention", impl=impl, dtype=dtype, device=DEVICE, batch=B, qlen=Lq,
                                mem_len=M, n_head=H, d_head=D, flops=cost.flops, bytes=cost.bytes,
                                min_bytes=minimum.bytes)
    out = run(benchmark, fn, rounds=1 if impl == "triton" and DEVICE == "cpu" else ROUNDS)
    assert out.shape == (B, Lq, H, D) and out.dtype == dt
    assert torch.isfinite(out).all()


# ---- adaptive softmax ----------------------------------------------------------------------------
def _softmax_params(dt):
    cfg = SOFTMAX_CONFIG
    crit = ProjectedAdaptiveLogSoftmax(cfg.vocab_size, cfg.d_embed, cfg.d_model, cfg.cutoffs, div_val=cfg.div_val)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in crit.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return crit.to(DEVICE, dt).clusters()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode,shape", [("nll", s) for s in NLL_SHAPES] + [("log_prob", s) for s in LOGPROB_SHAPES],
                         ids=lambda x: x if isinstance(x, str) else shape_id(x))
@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_softmax(benchmark, impl, mode, shape, dtype):
    cfg, dt = SOFTMAX_CONFIG, DTYPES[dtype]
    B, Lq = shape
    N = B * Lq
    skip_unless_runnable(impl, dt, "adaptive_softmax", N * cfg.vocab_size)
    params = _softmax_params(dt)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, cfg.d_model, generator=g).to(DEVICE, dt)
    target = torch.randint(0, cfg.vocab_size, (N,), generator=g).to(DEVICE)

    def fn():
        with use_backend(impl), torch.no_grad():
            if mode == "nll":
                return ops.adaptive_nll(hidden, target, *params)
            return ops.adaptive_log_softmax(hidden, *params)

    es = torch.finfo(dt).bits // 8
    cost = analytic.adaptive_softmax(N, cfg, es, labels=mode == "nll", share=analytic.uniform_share(cfg))
    benchmark.extra_info.update(op=f"adaptive_softmax.{mode}", impl=impl, dtype=dtype, device=DEVICE, batch=B,
                                qlen=Lq, vocab=cfg.vocab_size, flops=cost.flops, min_bytes=cost.bytes)
    out = run(benchmark, fn, rounds=1 if impl == "triton" and DEVICE == "cpu" else ROUNDS)
    assert out.shape == ((N,) if mode == "nll" else (N, cfg.vocab_size))
    assert torch.isfinite(out).all()


# ---- one model step: a segment forward, ours (cached / uncached) vs HF -------------------------------
if FULL:
    STEP_CONFIG, STEP_SHAPES = {}, [(1, 128, 1600), (4, 128, 1600), (1, 128, 400), (1, 1, 1600)]
    STEP_DTYPES = ["float32", "bfloat16"]
else:
    STEP_CONFIG = dict(vocab_size=500, cutoffs=[100, 250], d_model=32, d_embed=32, n_head=2, d_head=16,
                       d_inner=64, div_val=2, n_layer=2, mem_len=16, clamp_len=20, same_length=True, dropout=0.0)
    STEP_SHAPES = [(1, 5, 8), (2, 5, 16), (2, 1, 16)]
    STEP_DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module")
def step_models():
    """dtype name -> (ours, hf) with the same random weights (HF's save_pretrained, loaded by txl_fast)."""
    pytest.importorskip("transformers", reason="the peer transformers==4.35.0 is a test extra")
    built = {}

    def get(dtype):
        if dtype not in built:
            built[dtype] = build_pair(STEP_CONFIG, DEVICE, DTYPES[dtype])
        return built[dtype]

    return get


@pytest.mark.parametrize("dtype", STEP_DTYPES)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=shape_id)
@pytest.mark.parametrize("side", ["txl_fast_cached", "txl_fast_uncached", "hf"])
def test_model_step(benchmark, step_models, side, shape, dtype):
    B, Lq, M = shape
    ours, hf = step_models(dtype)
    ours.transformer.mem_len = hf.transformer.mem_len = M
    if side == "hf" and DEVICE == "cpu" and dtype != "float32" and FULL:
        pytest.skip("HF 4.35 in bf16 on the CPU at the wt103 size: minutes per call")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, ours.config.vocab_size, (B, Lq), generator=g).to(DEVICE)
    labels = ids if Lq > 1 else None                      # a generated token gets full log-probs

    def step():
        """A fresh zero memory (HF's initial state) and a call that runs one step on it."""
        if side == "txl_fast_cached":
            cache = ours.new_cache(B, "zeros", step_hint=Lq)
            return lambda: ours(ids, labels=labels, cache=cache)
        if side == "txl_fast_uncached":
            mems = ours.init_mems(B)
            return lambda: ours(ids, mems=mems, labels=labels)
        mems = hf.init_mems(B)
        return lambda: hf(ids, mems=mems, labels=labels)

    cfg = ours.config
    es = torch.finfo(DTYPES[dtype]).bits // 8
    path = "hf" if side == "hf" else ("fused" if DEVICE == "cuda" else "torch")
    cost = analytic.segment(cfg, B, Lq, M, cached=side == "txl_fast_cached", labels=labels is not None, path=path,
                            es=es, share=analytic.uniform_share(cfg),
                            logits_rows=B * (Lq - 1) if labels is not None else None)
    benchmark.extra_info.update(op="model_step", side=side, dtype=dtype, device=DEVICE, batch=B, qlen=Lq,
                                mem_len=M, flops=cost.flops, bytes=cost.bytes)
    with torch.no_grad():
        first = step()()                                  # on a zero memory: checked against HF below
        out = run(benchmark, step())                      # steady state: the cache keeps mem_len rows
        result = first.loss if labels is not None else first.prediction_scores
        assert torch.isfinite(result).all() and torch.isfinite(out.logits if labels is None else out.loss).all()
        if labels is not None and dtype == "float32":     # the same weights compute the same loss
            expected = hf(ids, mems=hf.init_mems(B), labels=labels).loss
            assert abs(first.loss.item() - expected.item()) <= 1e-4 * max(1.0, abs(expected.item()))
