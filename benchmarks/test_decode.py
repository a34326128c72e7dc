"""``bench_decode.py`` on a small model (seconds, CI): every op class is printed with its bytes, and
the step it times computes what the previous decode path computes (the same next tokens)."""
import pytest
import torch

import bench_decode
import txl_fast
from txl_fast import backend
from txl_fast.inference import decode_step
from txl_fast.cache import trusted_token_ids

SMALL = dict(vocab_size=2000, cutoffs=[500, 1000], d_model=64, d_embed=64, n_head=4, d_head=16, d_inner=128,
             div_val=2, n_layer=2, mem_len=48, clamp_len=40, same_length=True, dropout=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return txl_fast.TransfoXLLMHeadModel(txl_fast.TransfoXLConfig(**SMALL)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bsz", [1, 3])
def test_breakdown_and_comparison_run(model, dtype, bsz, capsys):
    model = model.to(dtype)
    bandwidth = bench_decode.Bandwidth.__new__(bench_decode.Bandwidth)          # a small buffer: quick
    bandwidth.buffer, bandwidth.samples = torch.randn(1000), []
    with torch.no_grad(), backend.use_backend("torch"):
        bench_decode.report(model, bsz, dtype, 1, bandwidth)
        row = bench_decode.compare(model, bsz, dtype, 1, bandwidth, compiled=False)
    out = capsys.readouterr().out
    for name in ("qkv_net", "attention (K, V, r)", "o_net", "ff1 + relu", "ff2", "next token", "rest"):
        assert f"| {name}" in out, name
    assert row[:2] == (str(dtype).removeprefix("torch."), bsz) and row[2] > 0


def test_compiled_comparison_runs(model, capsys):
    """--compare --compile: the eager step against the compiled one, on a copy of a model whose
    weights were packed by eager steps (the copy must not carry the packed copies)."""
    model = model.to(torch.bfloat16)
    bandwidth = bench_decode.Bandwidth.__new__(bench_decode.Bandwidth)
    bandwidth.buffer, bandwidth.samples = torch.randn(1000), []
    with torch.no_grad(), backend.use_backend("torch"):
        bench_decode.fixed_step(model, 1, torch.bfloat16)                       # packs the bf16 weights
        row = bench_decode.compare(model, 1, torch.bfloat16, 1, bandwidth, compiled=True)
    assert row[:2] == ("bfloat16", 1) and row[3] > 0 and row[4] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_before_and_after_choose_the_same_tokens(model, dtype):
    model = model.to(dtype)
    tr = model.transformer
    cache = bench_decode.full_cache(tr, 3, dtype)
    layout = cache.layout()
    ids = torch.randint(tr.n_token, (3, 1), generator=torch.Generator().manual_seed(1))

    def step():
        cache.restore(layout)
        with trusted_token_ids():
            return decode_step(tr, model.crit, ids, cache, False, 0)[:2]

    with torch.no_grad(), backend.use_backend("torch"):
        after = step()
        with bench_decode.before():
            before = step()
    assert torch.equal(after[1], before[1])
    torch.testing.assert_close(after[0].float(), before[0].float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
