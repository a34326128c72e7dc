"""The dtype surface (issue 16): which dtypes run where, one-line refusals before anything is loaded,
bf16 reductions in float32, and bf16's perplexity on the embedded default model against float32."""
import pytest
import torch

import txl_fast
from tests.helpers import assert_rel_close
from txl_fast import TransfoXLLMHeadModel, TransfoXLTokenizer, dtypes, ops
from txl_fast.cli import DEFAULT_MODEL, main

NO_NATIVE = dict.fromkeys(dtypes.CPU_FLAGS, False)                  # a CPU without AVX-512 or AMX
BF16_PPL_TOLERANCE = 0.005      # bf16 perplexity within 0.5 % of float32's (measured: +0.09 % on the held-out text)


@pytest.fixture
def cpu_without_fp16(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: dict(NO_NATIVE, avx512f=True, avx512_bf16=True))


def test_check_dtype_accepts_dtypes_and_names(cpu_without_fp16):
    assert dtypes.check_dtype(torch.bfloat16) is torch.bfloat16
    assert dtypes.check_dtype("bfloat16") is torch.bfloat16
    assert dtypes.check_dtype("torch.float32", "cpu") is torch.float32
    assert dtypes.check_dtype(torch.float64, None) is torch.float64                    # validation stays
    assert dtypes.check_dtype(torch.float16, "cuda") is torch.float16                  # fp16 on CUDA
    assert dtypes.check_dtype("float16", torch.device("cuda", 0)) is torch.float16
    assert dtypes.supported("cpu") == ["float32", "bfloat16", "float64"]


@pytest.mark.parametrize("bad", ["float16", torch.float16, "int8", torch.int8, "bfloat61", "", "float"])
def test_check_dtype_refuses_naming_the_supported_ones(bad, cpu_without_fp16):
    with pytest.raises(ValueError) as e:
        dtypes.check_dtype(bad, "cpu")
    message = str(e.value)
    assert "\n" not in message and message.endswith("use one of float32, bfloat16, float64")
    if "16" in str(bad) and "bfloat" not in str(bad):
        assert "AVX512-FP16 or AMX-FP16" in message


@pytest.mark.parametrize("bad", [3, None, 1.5, ["float32"], torch.zeros(1)])
def test_check_dtype_refuses_what_is_not_a_dtype(bad):
    with pytest.raises(TypeError, match="torch.dtype or its name"):
        dtypes.check_dtype(bad)


def test_native_matmul_flags(monkeypatch):
    assert not dtypes.native_bf16_matmul(NO_NATIVE) and not dtypes.native_fp16_matmul(NO_NATIVE)
    assert dtypes.native_bf16_matmul(dict(NO_NATIVE, amx_bf16=True))
    assert dtypes.native_bf16_matmul(dict(NO_NATIVE, avx512_bf16=True))
    assert dtypes.native_fp16_matmul(dict(NO_NATIVE, avx512_fp16=True))
    assert dtypes.native_fp16_matmul(dict(NO_NATIVE, amx_fp16=True))
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: dict(NO_NATIVE, amx_fp16=True))
    assert "float16" in dtypes.supported("cpu")                          # a CPU with fp16 matmul runs it


def test_cpu_flags_read_this_machine():
    flags = dtypes.cpu_flags()
    assert set(flags) == set(dtypes.CPU_FLAGS) and all(isinstance(v, bool) for v in flags.values())


def test_from_pretrained_refuses_before_reading(cpu_without_fp16, tmp_path):
    missing = tmp_path / "no_such_model"                    # the dtype is refused before the path is looked at
    for bad in ("float16", "int8", "bfloat61"):
        with pytest.raises(ValueError, match="use one of float32, bfloat16, float64"):
            TransfoXLLMHeadModel.from_pretrained(missing, dtype=bad)
    with pytest.raises(TypeError, match="torch.dtype or its name"):
        TransfoXLLMHeadModel.from_pretrained(missing, dtype=16)
    model = TransfoXLLMHeadModel.from_pretrained(DEFAULT_MODEL, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_evaluate_and_generate_refuse_a_model_in_an_unsupported_dtype(cpu_without_fp16):
    model = TransfoXLLMHeadModel.from_pretrained(DEFAULT_MODEL).to(torch.float16)
    ids = torch.arange(40)
    with pytest.raises(ValueError, match="dtype float16 is not supported on cpu"):
        txl_fast.evaluate(model, ids, tgt_len=8, mem_len=8)
    with pytest.raises(ValueError, match="dtype float16 is not supported on cpu"):
        model.generate(ids[None, :4], 2)


@pytest.mark.parametrize("command", ["eval", "generate"])
@pytest.mark.parametrize("bad", ["float16", "int8", "bfloat61"])
def test_cli_refuses_an_unsupported_dtype(command, bad, cpu_without_fp16, capsys):
    assert main([command, "--dtype", bad]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"txl-fast: error: dtype {bad} is not supported on cpu"), err
    assert err[0].endswith("use one of float32, bfloat16, float64") and captured.out == ""


def test_info_suggests_bf16_only_with_native_bf16(monkeypatch, capsys):
    from txl_fast.cli import cpu_dtype_line

    monkeypatch.setattr(dtypes, "cpu_flags", lambda: dict(NO_NATIVE, avx512_bf16=True))
    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpu:"))
    assert "native bf16 matmul (AVX512-BF16)" in line and "try --dtype bfloat16" in line
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: dict(NO_NATIVE, amx_bf16=True, avx512_bf16=True))
    assert "native bf16 matmul (AMX-BF16, AVX512-BF16)" in cpu_dtype_line()
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: NO_NATIVE)
    line = cpu_dtype_line()
    assert "no native bf16 matmul" in line and "--dtype bfloat16" not in line


def test_bf16_loss_is_reduced_in_float32():
    """The torch path's log-sum-exp and picked logit come back in float32 for bf16 logits; the NLL
    and the log-probs, rounded to bf16 once, stay within bf16's tolerance of the float64 reference
    on the same values."""
    from txl_fast import naive
    from txl_fast.backend import use_backend
    from txl_fast.ops.adaptive_softmax import lse_and_pick

    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).bfloat16()

    hidden = rand(37, 32)
    weights, biases = [rand(50, 32, scale=0.3), rand(40, 16, scale=0.3)], [rand(50, scale=0.5), rand(40, scale=0.5)]
    projs, cluster_weight, cluster_bias = [rand(32, 32, scale=0.2), rand(32, 16, scale=0.2)], rand(1, 32), rand(1)
    target = torch.randint(0, 90, (37,), generator=g)
    lse, pick = lse_and_pick(hidden, weights[0], biases[0], target)
    assert lse.dtype == pick.dtype == torch.float32
    params = (weights, biases, projs, cluster_weight, cluster_bias)
    as64 = [[t.double() for t in ts] for ts in params[:3]] + [cluster_weight.double(), cluster_bias.double()]
    with use_backend("torch"):
        nll = ops.adaptive_nll(hidden, target, *params)
        logprobs = ops.adaptive_log_softmax(hidden, *params)
    assert nll.dtype == logprobs.dtype == torch.bfloat16
    assert_rel_close(nll, naive.adaptive_nll(hidden.double(), target, *as64), torch.bfloat16, "bf16 NLL")
    assert_rel_close(logprobs, naive.adaptive_log_softmax(hidden.double(), *as64), torch.bfloat16, "bf16 log-probs")


@pytest.mark.slow
def test_bf16_perplexity_close_to_float32_on_the_default_model():
    tok = TransfoXLTokenizer.from_pretrained(DEFAULT_MODEL)
    ids = tok.encode_file(DEFAULT_MODEL / "heldout.txt", ordered=True, add_eos=True)[:640]
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        model = TransfoXLLMHeadModel.from_pretrained(DEFAULT_MODEL, dtype=dtype)
        ppl[dtype] = txl_fast.evaluate(model, ids, tgt_len=64, mem_len=64, clamp_len=256, progress=False).perplexity
    assert abs(ppl["bfloat16"] / ppl["float32"] - 1) <= BF16_PPL_TOLERANCE, ppl
