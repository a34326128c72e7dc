"""The torch path of rel_attention at the wt103 shapes: its explicit arithmetic vs the fused one.

    python benchmarks/bench_torch_attention.py [--reps 10]

16 heads, d_head 64, memory 1600, clamp_len 1000 (1001 distinct position keys), same_length
window, keys and values in the inference cache's head-major buffers, queries column-major as
``ops.linear`` returns them; eval steps (Lq 128) and decode steps (Lq 1) at batch 1 and 4, with
a memory of real rows and with HF's zero memory after a 128-token prompt (1472 uniform rows).
"explicit" is the autograd path's arithmetic (content matmul plus the position mask, softmax,
value matmul), "fused" the inference path (the position mask into scaled_dot_product_attention,
uniform keys in closed form); both in the same cache-sized chunks, alternated in one process,
medians in ms per layer.
"""
from __future__ import annotations

import argparse
import importlib

import torch

from txl_fast.bench.machine import median_time

ra = importlib.import_module("txl_fast.ops.rel_attention")     # the module, not the re-exported function
H, D, MEM, CLAMP = 16, 64, 1600, 1000


def inputs(bsz: int, lq: int, uniform: int):
    lk = MEM + lq
    x = torch.randn(bsz * lq, 3 * H * D).t().contiguous().t()                   # column-major, as ops.linear's
    q = x.view(bsz, lq, 3, H, D)[:, :, 0]
    k, v = (torch.randn(bsz, H, lk + 200, D)[:, :, :lk].transpose(1, 2) for _ in range(2))
    if uniform:
        k[:, :uniform], v[:, :uniform] = k[:, :1].clone(), v[:, :1].clone()
    r = torch.randn(H, CLAMP + 1, D).transpose(0, 1)
    return q, k, v, r, torch.randn(H, D), torch.randn(H, D)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(2)
    fused_out = ra.torch_fused_out

    def explicit_out(q, k, v, r, u, w, scale, window, uniform_keys=0, **options):     # keys, causal, ...
        return ra.torch_rel_attention(q, k, v, r, u, w, scale, window, **options)[0]

    print(f"chunk: {ra.SCORE_CHUNK} score elements\n")
    print("| step | batch | memory | explicit, ms | fused, ms | ratio | rel. difference |")
    print("|---|---:|---|---:|---:|---:|---:|")
    with torch.no_grad():
        for lq, bsz, uniform in [(128, 1, 0), (128, 4, 0), (128, 1, MEM), (1, 1, 0), (1, 4, 0), (1, 1, MEM - 128)]:
            args_ = (*inputs(bsz, lq, uniform), D**-0.5, MEM, uniform)
            times = {}
            for name, impl in [("explicit", explicit_out), ("fused", fused_out)] * 3:
                ra.torch_fused_out = impl
                times.setdefault(name, []).append(median_time(lambda: ra.torch_rel_attention_out(*args_),
                                                              reps=args.reps * (10 if lq == 1 else 1)) * 1e3)
            ra.torch_fused_out = explicit_out
            ref = ra.torch_rel_attention_out(*args_)
            ra.torch_fused_out = fused_out
            diff = ((ra.torch_rel_attention_out(*args_) - ref).norm() / ref.norm()).item()
            t_explicit, t_fused = sorted(times["explicit"])[1], sorted(times["fused"])[1]
            step = "eval (Lq 128)" if lq > 1 else "decode (Lq 1)"
            memory = f"zero, {uniform} uniform rows" if uniform else "real"
            print(f"| {step} | {bsz} | {memory} | {t_explicit:.2f} | {t_fused:.2f} | {t_explicit / t_fused:.2f}x "
                  f"| {diff:.1e} |")


if __name__ == "__main__":
    main()
