"""End-to-end benchmarks (pytest-benchmark): txl_fast's cached engine vs HF transformers 4.35.

Quick mode (default, runs in CI in seconds): a small random model. ``TXL_BENCH_FULL=1`` uses the
wt103 configuration (285M parameters, ~5 GB of RAM for both models, minutes per case). Each case
also checks that both sides compute the same thing, so a benchmark cannot silently measure a wrong
result. Side-by-side ratios (benchmarks/RESULTS.md) come from ``benchmarks/bench_engine.py``.

    python -m pytest benchmarks -q                       # quick, timed
    python -m pytest benchmarks -q --benchmark-disable   # quick, each case once
    TXL_BENCH_FULL=1 python -m pytest benchmarks -q --benchmark-json out.json
"""
import os

import pytest
import torch

import txl_fast
from txl_fast.bench.harness import build_pair, hf_generate, hf_nll

pytest.importorskip("transformers", reason="the peer transformers==4.35.0 is a test extra")
FULL = os.environ.get("TXL_BENCH_FULL") == "1"
QUICK = dict(vocab_size=2000, cutoffs=[500, 1000], d_model=64, d_embed=64, n_head=4, d_head=16, d_inner=128,
             div_val=2, n_layer=2, mem_len=48, clamp_len=40, same_length=True, dropout=0.0)
TGT_LEN = 128 if FULL else 16


@pytest.fixture(scope="module")
def models():
    return build_pair({} if FULL else QUICK)


@pytest.mark.parametrize("bsz", [1, 4])
@pytest.mark.parametrize("side", ["txl_fast", "hf"])
def test_eval_stream(benchmark, models, side, bsz):
    ours, hf = models
    cfg = ours.config
    segments = 3
    data = torch.randint(0, cfg.vocab_size, (bsz, TGT_LEN * segments + 1), generator=torch.Generator().manual_seed(1))
    stream = data.reshape(-1)
    protocol = dict(tgt_len=TGT_LEN, mem_len=cfg.mem_len, clamp_len=cfg.clamp_len, same_length=cfg.same_length,
                    batch_size=bsz, init_mems="zeros", progress=False)
    if side == "txl_fast":
        result = benchmark(txl_fast.evaluate, ours, stream, **protocol)
        assert result.tokens == bsz * TGT_LEN * segments
        expected = hf_nll(hf, data, TGT_LEN) / result.tokens
        assert abs(result.nll - expected) <= 1e-4 * max(1.0, abs(expected))
    else:
        benchmark(hf_nll, hf, data, TGT_LEN)


@pytest.mark.parametrize("side", ["txl_fast", "hf"])
def test_greedy_generation(benchmark, models, side):
    ours, hf = models
    prompt = torch.randint(0, ours.config.vocab_size, (1, TGT_LEN), generator=torch.Generator().manual_seed(2))
    new = 16 if FULL else 8
    if side == "txl_fast":
        out = benchmark(ours.generate, prompt, new)
        assert torch.equal(out, hf_generate(hf, prompt, new))
    else:
        benchmark(hf_generate, hf, prompt, new)
