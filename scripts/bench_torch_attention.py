"""The torch path of rel_attention at the wt103 shapes: all heads at once vs cache-sized chunks.

    python scripts/bench_torch_attention.py [--reps 10]

16 heads, d_head 64, memory 1600, keys and values strided as the inference cache holds them
(B, capacity, H, D), same_length window; eval steps (Lq 128) and decode steps (Lq 1) at batch 1
and 4. Both variants alternate in one process; medians in ms per layer. The chunk size is
``txl_fast.ops.rel_attention.SCORE_CHUNK``.
"""
from __future__ import annotations

import argparse
import importlib

import torch

from txl_fast.bench.machine import median_time

ra = importlib.import_module("txl_fast.ops.rel_attention")     # the module, not the re-exported function
H, D, MEM = 16, 64, 1600


def median_ms(fn, reps: int) -> float:
    return median_time(fn, reps=reps) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"chunk: {ra.SCORE_CHUNK} score elements\n")
    print("| step | batch | all heads at once, ms | chunked, ms | rel. difference |")
    print("|---|---:|---:|---:|---:|")
    with torch.no_grad():
        for lq, bsz in [(128, 1), (128, 4), (1, 1), (1, 4)]:
            lk = MEM + lq
            q = torch.randn(bsz, lq, 3, H, D).unbind(2)[0]                  # a view of the qkv output
            k = torch.randn(bsz, lk + 200, H, D)[:, :lk]
            v = torch.randn(bsz, lk + 200, H, D)[:, :lk]
            r, u, w = torch.randn(lk, H, D), torch.randn(H, D), torch.randn(H, D)
            inputs = (q, k, v, r, u, w, D**-0.5, MEM)
            whole = lambda: ra._torch_rel_attention(*inputs)[0]                     # noqa: E731
            chunked = lambda: ra._torch_rel_attention_out(*inputs)                  # noqa: E731
            ref, out = whole(), chunked()
            diff = ((out - ref).norm() / ref.norm()).item()
            reps = args.reps * (10 if lq == 1 else 1)
            t_whole, t_chunked = [], []
            for _ in range(3):
                t_whole.append(median_ms(whole, reps))
                t_chunked.append(median_ms(chunked, reps))
            step = "eval (Lq 128)" if lq > 1 else "decode (Lq 1)"
            print(f"| {step} | {bsz} | {sorted(t_whole)[1]:.1f} | {sorted(t_chunked)[1]:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
