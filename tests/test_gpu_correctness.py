"""The GPU check's correctness records (``txl_fast.bench.gpu.correctness``, and the Parakeet stage's
checks, ``parakeet.parakeet_checks``) as pytest tests: the same functions ``scripts/gpu_check.py``
records, one test each.

On a CUDA machine, the GPU shapes (TF32 off, as the check runs them):

    TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu_correctness.py [-k attention]

On the CPU, the smoke's shapes in Triton's interpreter; only the cheapest two run here (the CPU
rehearsal of the whole check, tests/test_gpu_check.py, runs every one of them in its subprocess),
the rest are skipped saying so. A check that reports ``skipped`` (bf16 in the interpreter, CUDA
graphs on the CPU) is skipped with its reason.
"""
import pytest
import torch

from txl_fast.bench.gpu.correctness import checks
from txl_fast.bench.gpu.parakeet import parakeet_checks
from txl_fast.bench.gpu.plan import SHAPES

SMOKE = not torch.cuda.is_available()
DEVICE = torch.device("cpu" if SMOKE else "cuda")
S = SHAPES["smoke" if SMOKE else "gpu"]
CHECKS = checks(S, DEVICE, SMOKE) + parakeet_checks(S, DEVICE, SMOKE)     # with Parakeet's (head size 128, T 1,000)
ON_THE_CPU = {CHECKS[0][0], "adaptive top-k k=1"}           # the rest: tests/test_gpu_check.py's smoke


@pytest.fixture(autouse=True)
def no_tf32():
    """References and fp32 in true fp32, as the check's environment stage sets it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name,fn,args", CHECKS, ids=[name for name, _, _ in CHECKS])
def test_gpu_check_correctness(name, fn, args):
    if SMOKE and name not in ON_THE_CPU:
        pytest.skip("on the CPU the GPU check's smoke (tests/test_gpu_check.py) runs this one")
    result = fn(*args)
    if result["status_check"] == "skipped":
        pytest.skip(result["why"])
    assert result["status_check"] == "pass", result
