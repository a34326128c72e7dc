"""What torch.compile and patch() gain on this machine: LM-head forward (eval, labels, memory carried).

    python benchmarks/bench_compile.py [--bsz 4] [--tgt-len 64] [--iters 10]

Rows: HF TransfoXLLMHeadModel eager, the same patched by txl_fast.patch, txl_fast's model eager
(the same weights: ``txl_fast.bench.harness.build_pair``), and txl_fast's model under torch.compile
(Inductor, torch backend). Reports tokens/s (median of
--iters timed forwards after warm-up) and the one-off compile time. A small model, so that it runs
on a laptop CPU; the triton backend is not involved.
"""
from __future__ import annotations

import argparse
import os
import platform
import warnings

import torch

import txl_fast
from txl_fast.bench.harness import build_pair
from txl_fast.bench.machine import median_time, time_call

warnings.filterwarnings("ignore")
CONFIG = dict(vocab_size=10000, cutoffs=[2000, 5000], d_model=256, d_embed=256, n_head=8, d_head=32,
              d_inner=1024, div_val=2, n_layer=4, mem_len=64, clamp_len=256, same_length=True,
              dropout=0.0, dropatt=0.0)


def timed(model, data, tgt_len: int, iters: int) -> float:
    """Median seconds per segment (2 warm-up segments), memory carried from one segment to the next."""
    state = {"i": 0, "mems": None}

    def segment():
        i = state["i"] % 4
        ids = data[:, i * tgt_len : (i + 1) * tgt_len]
        with torch.no_grad():
            state["mems"] = model(ids, mems=state["mems"], labels=ids).mems
        state["i"] += 1

    return median_time(segment, reps=iters, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bsz", type=int, default=4)
    parser.add_argument("--tgt-len", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = torch.randint(0, CONFIG["vocab_size"], (args.bsz, 4 * args.tgt_len))
    tokens = args.bsz * args.tgt_len
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; bsz {args.bsz}, tgt_len {args.tgt_len}, mem_len {CONFIG['mem_len']}, "
          f"d_model {CONFIG['d_model']}, {CONFIG['n_layer']} layers, vocab {CONFIG['vocab_size']}")
    rows = []
    try:
        ours, hf = build_pair(CONFIG)
        rows.append(("HF eager", timed(hf, data, args.tgt_len, args.iters), None))
        txl_fast.patch(hf)
        rows.append(("HF + txl_fast.patch", timed(hf, data, args.tgt_len, args.iters), None))
    except ImportError:                                   # no peer: our rows alone
        ours = txl_fast.TransfoXLLMHeadModel(txl_fast.TransfoXLConfig(**CONFIG)).eval()
    with txl_fast.use_backend("torch"):
        rows.append(("txl_fast eager", timed(ours, data, args.tgt_len, args.iters), None))
        compiled = torch.compile(ours)
        with torch.no_grad():
            compile_s, _ = time_call(lambda: compiled(data[:, : args.tgt_len], mems=ours.init_mems(args.bsz),
                                                      labels=data[:, : args.tgt_len]))
        rows.append(("txl_fast torch.compile", timed(compiled, data, args.tgt_len, args.iters), compile_s))
    print(f"{'':24s} {'ms/segment':>10s} {'tokens/s':>10s}")
    for name, sec, comp in rows:
        extra = f"   (first call incl. compile: {comp:.1f} s)" if comp else ""
        print(f"{name:24s} {sec * 1e3:10.2f} {tokens / sec:10.0f}{extra}")


if __name__ == "__main__":
    main()
