#!/usr/bin/env python3
"""The prepared H200 check (issue 15, section 5): one command says what works on a GPU and how fast.

THE COMMAND for the device tool (from the repository root; ≤ 9 minutes with cold compiles):

    run(command="PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT", timeout_s=540)

It needs no installs on the machine's image (python 3.12, torch 2.11 CUDA, triton 3.6; no
sacremoses, no transformers peer): it puts the repository root on sys.path itself. It writes
$OUT/gpu_check.json after every record (a timeout keeps what was done) and prints a short table
last. Copy the JSON to benchmarks/ and the numbers into benchmarks/RESULTS.md as measured.

    python3 scripts/gpu_check.py --cpu-smoke --out DIR     # the CPU rehearsal (tests/test_gpu_check.py)

A short driver over the stage modules in ``txl_fast/bench/gpu/`` (``plan.py``: every shape, budget
and limit; ``record.py``: the JSON and the time bounds; ``common.py``: inputs, errors, the timer).
Stages, in order, each with its own time budget (``plan.BUDGET_S``; the rest of a stage past its
budget, or past the run's deadline ``plan.TOTAL_S``, is recorded as skipped); a record that raises
is recorded with its one-line error and the script goes on, except in stage 1, whose failure ends
the run:

1. environment (``environment.py``): GPU, clocks, versions, and the ceilings measured here (copy
   bandwidth, bf16 and fp32 matrix rates, TF32 off) that every timing is set against.
2. compile (``compile.py``): every kernel warmed up at the exact shapes used later, in a process
   pool (Triton's disk cache), then here (registers, spills, shared memory).
3. correctness (``correctness.py``): every kernel against float64 ``txl_fast.naive`` and the torch
   path, compile, repeatability, host syncs, CUDA graphs. The same checks are the pytest tests of
   ``tests/test_gpu_correctness.py``; on a GPU machine with pytest:
   ``TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu_correctness.py``.
4. timings (``timings.py``): do_bench medians, each against its roofline floor (``floor_ms``,
   ``of_floor``) from ``txl_fast.bench.analytic`` on the ceilings of stage 1.
5. parakeet (``parakeet.py``): Parakeet's attention (8 heads of 128, bidirectional, key lengths):
   the kernels against float64 at T 1,000, then T 375 … 45,000 frames: the fused op vs HF's route
   (a T x 2T position tensor, SDPA with a float mask; skipped where its predicted peak exceeds the
   free memory) vs FlexAttention, times, floors and peak memory. Last: its longest HF route is the
   run's largest allocation.

--cpu-smoke: TRITON_INTERPRET=1 (set before triton is imported), tiny shapes, fp16 as the low
precision (bf16 is broken in the interpreter), CPU timers instead of do_bench, Flex attention
eager, torch.compile with aot_eager: every stage's code runs, in well under 2 minutes; numbers
from it mean nothing. What it cannot rehearse: compiled kernels' metadata, CUDA graphs.

NaN poisoning: the kernels allocate their outputs, so the check fills freed allocator blocks with
NaN before each run (best effort: an output that reuses such a block and is left unwritten shows
as non-finite, and non-finite values always fail).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))           # a script run from the image without an install


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="the CPU rehearsal: interpreter, tiny shapes")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"                 # before triton is first imported
    import torch

    from txl_fast.bench.gpu import compile as compile_stage
    from txl_fast.bench.gpu.correctness import checks
    from txl_fast.bench.gpu.environment import ceilings, environment
    from txl_fast.bench.gpu.parakeet import parakeet
    from txl_fast.bench.gpu.plan import BUDGET_S, SHAPES, TOTAL_S
    from txl_fast.bench.gpu.record import Run, print_table
    from txl_fast.bench.gpu.timings import timings

    mode = "smoke" if smoke else "gpu"
    S = SHAPES[mode]
    run = Run(args.out, mode, BUDGET_S[mode], TOTAL_S[mode])
    if not smoke and not torch.cuda.is_available():
        run.add({"stage": "environment", "name": "cuda", "status": "error", "error": "no CUDA device"})
        return 1
    device = torch.device("cpu" if smoke else "cuda")

    run.stage("environment", fatal=True)
    env = run.record("versions", environment, device, smoke)
    ceil = run.record("ceilings", ceilings, device, smoke)
    if env["status"] != "ok" or ceil["status"] != "ok":
        return 1

    run.stage("compile")
    run.record("process pool", compile_stage.compile_pool, S, smoke, run.left)
    run.record("in process + resources", compile_stage.compile_in_process, S, smoke, run.left)
    for stage, records in (("correctness", checks(S, device, smoke)),
                           ("timings", timings(S, ceil["values"], device, smoke)),
                           ("parakeet", parakeet(S, ceil["values"], device, smoke, run.left))):
        run.stage(stage)
        for name, fn, fn_args in records:
            run.record(name, fn, *fn_args)

    print_table(run.doc["records"])
    return 1 if run.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
