"""The dense products of a decode step and of a segment: ``F.linear`` against ``split_linear`` (2 blocks).

    python benchmarks/bench_gemv.py [--rounds 9] [--rows 1 4 16 64 128 512]

For each wt103 layer shape (qkv 3072 x 1024, o_net 1024 x 1024, feed-forward 4096 x 1024 and
1024 x 4096), 18 fp32 weights as in the model (together far larger than the L3, so every product
reads its weight from memory), inputs of 1 to 512 rows, 2 threads. The two ways alternate, pass
by pass; medians over the passes, ms per product and, for the one-row product, the weight bytes
read per second. The last line is a plain reduction over the same bytes: the read-bandwidth
ceiling a one-row product could reach. ``ops.linear`` takes split_linear up to MAX_ROWS rows.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from txl_fast.ops.linear import MAX_ROWS, split_linear


def per_product_ms(fns: dict, n: int, rounds: int) -> dict:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()                                                                    # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) / n * 1e3 for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 128, 512])
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"ops.linear uses split_linear (one weight block per thread) up to {MAX_ROWS} rows\n")
    print("| weight (out, in) | rows | F.linear ms | split_linear ms | speed-up | F.linear GB/s | split GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for shape in [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]:
            weights = [torch.randn(*shape) for _ in range(18)]
            for rows in args.rows:
                x = torch.randn(rows, shape[1])
                ms = per_product_ms({"F.linear": lambda: [F.linear(x, w) for w in weights],
                                     "split": lambda: [split_linear(x, w, None, 2) for w in weights]}, 18, args.rounds)
                a, b = ms["F.linear"], ms["split"]
                rates = (f"{shape[0] * shape[1] * 4 / a / 1e6:.1f} | {shape[0] * shape[1] * 4 / b / 1e6:.1f}"
                         if rows == 1 else " | ")
                print(f"| {shape} | {rows} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {rates} |", flush=True)
            ceiling = weights[0].numel() * 4 / per_product_ms({"sum": lambda: [w.sum() for w in weights]}, 18,
                                                             args.rounds)["sum"] / 1e6
        print(f"\nW.sum() over the same weights: {ceiling:.1f} GB/s")


if __name__ == "__main__":
    main()
