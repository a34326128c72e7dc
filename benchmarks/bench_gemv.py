"""The dense products of a decode step and of a segment: ``F.linear`` against ``split_linear`` (2 blocks)
and, up to MAX_PACKED_ROWS rows, against the weight packed by oneDNN (``ops.linear.pack``).

    python benchmarks/bench_gemv.py [--rounds 9] [--rows 1 4 16 64 128 512] [--dtype float32] [--compile]

For each wt103 layer shape (qkv 3072 x 1024, o_net 1024 x 1024, feed-forward 4096 x 1024 and
1024 x 4096), 18 fp32 weights as in the model (together far larger than the L3, so every product
reads its weight from memory), inputs of 1 to 512 rows, 2 threads. The two ways alternate, pass
by pass; medians over the passes, ms per product and the weight bytes read per second. The last line is a plain reduction over the same bytes: the read-bandwidth
ceiling a one-row product could reach. ``ops.linear`` takes split_linear up to MAX_ROWS rows.
``--compile`` adds, for one row, the loop Inductor compiles (``compiled_decode.row_linear``, which
``ops.linear`` takes for bf16 rows under ``use_cpu_compile``).
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from txl_fast.bench.machine import alternated_times

from txl_fast.ops import compiled_decode
from txl_fast.ops.linear import MAX_PACKED_ROWS, MAX_ROWS, pack, split_linear


def per_product_ms(fns: dict, n: int, rounds: int) -> dict:
    """Median ms per product of each of ``fns`` (n products a call), alternated after a warm-up round."""
    times = alternated_times(fns, reps=rounds)
    return {name: statistics.median(t) / n * 1e3 for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 128, 512])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="one row: also the compiled loop (compiled_decode.row_linear)")
    args = p.parse_args()
    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)
    print(f"ops.linear uses split_linear (one weight block per thread) up to {MAX_ROWS} rows; {args.dtype}\n")
    names = ("F.linear", "split", "packed") + (("compiled",) if args.compile else ())
    print(f"| weight (out, in) | rows | {' | '.join(f'{n} ms' for n in names)} | {' | '.join(f'{n} GB/s' for n in names)} |")
    print(f"|---|---:|{'---:|' * 2 * len(names)}")
    with torch.no_grad():
        for shape in [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]:
            weights = [torch.randn(*shape).to(dtype) for _ in range(18)]
            nbytes = weights[0].numel() * weights[0].element_size()
            for rows in args.rows:
                x = torch.randn(rows, shape[1]).to(dtype)
                ways = {"F.linear": lambda: [F.linear(x, w) for w in weights],
                        "split": lambda: [split_linear(x, w, None, 2) for w in weights]}
                if rows <= MAX_PACKED_ROWS and torch.backends.mkldnn.is_available():
                    packed = [pack(w, rows) for w in weights]
                    ways["packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                              for w in packed]
                if rows == 1 and args.compile:
                    ways["compiled"] = lambda: [compiled_decode.row_linear(x, w) for w in weights]
                ms = per_product_ms(ways, 18, args.rounds)
                times = " | ".join(f"{ms[k]:.2f}" if k in ms else "" for k in names)
                rates = " | ".join(f"{nbytes / ms[k] / 1e6:.1f}" if k in ms else "" for k in names)
                print(f"| {shape} | {rows} | {times} | {rates} |", flush=True)
            ceiling = nbytes / per_product_ms({"sum": lambda: [w.sum() for w in weights]}, 18, args.rounds)["sum"] / 1e6
        print(f"\nW.sum() over the same weights: {ceiling:.1f} GB/s")


if __name__ == "__main__":
    main()
