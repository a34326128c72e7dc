"""Ahead-of-time compile of every Triton kernel (relative attention, adaptive softmax) for sm_80 and sm_90.

Runs ``txl-fast kernels --json`` in a separate process with TRITON_INTERPRET unset (an interpreted
kernel cannot be compiled) and checks every row: compiled, shared memory within the arch limit,
tensor-core instructions (mma.sync on sm_80, wgmma or mma on sm_90) in every dot-bearing kernel,
registers and spill bytes reported by ptxas. It does not run anything on a GPU. Compiles are
cached by triton (~/.triton/cache): the first run costs a few minutes on 2 cores, later ones seconds.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

@pytest.fixture(scope="module")
def rows():
    """The report of ``txl-fast kernels --json``, in its own process (TRITON_INTERPRET unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "txl_fast.cli", "kernels", "--json"], capture_output=True,
                         text=True, env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_everything_compiles_within_limits(rows):
    from txl_fast.kernels import aot  # noqa: PLC0415 (import is fine here: no kernel is compiled in-process)

    assert rows, "no specialisation was compiled"
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "compile failures:\n" + aot.format_table(bad)
    over = [r for r in rows if r["shared"] > r["smem_limit"]]
    assert not over, "over the shared-memory limit:\n" + aot.format_table(over)
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in rows if r["arch"] == arch} >= {
            "rel_attention.fwd", "rel_attention.decode", "rel_attention.combine",
            "rel_attention.delta", "rel_attention.dq", "rel_attention.dkdv",
            "adaptive_softmax.lse", "adaptive_softmax.dh", "adaptive_softmax.dw", "adaptive_softmax.logprob"}
    for dt in ("fp32", "fp16", "bf16"):
        for d in (16, 32, 64, 128):
            assert any(f"{dt} D{d} " in r["specialisation"] for r in rows), (dt, d)


@pytest.mark.slow
def test_tensor_cores_and_registers_reported(rows):
    no_mma = [(r["kernel"], r["specialisation"], r["arch"]) for r in rows if r["uses_dot"] and not r["tensor_cores"]]
    assert not no_mma, f"tl.dot not on tensor cores: {no_mma}"
    for r in rows:
        assert isinstance(r["registers"], int) and 0 < r["registers"] <= 255, r
        assert isinstance(r["spill_bytes"], int) and r["spill_bytes"] >= 0, r
