"""nn.Linear's weight layout and the speed of the dense products of a decode step and a segment.

    python scripts/bench_gemv.py

For each wt103 layer shape (qkv 3072 x 1024, feed-forward 4096 x 1024 and 1024 x 4096), six fp32
weights (together larger than the L3), inputs of 1, 128 and 512 rows, 2 threads: ``F.linear``
with the weight in nn.Linear's row-major (out, in) layout and with the same values stored
column-major (a (in, out) contiguous tensor seen transposed). Medians of 9 passes, the best of 3;
ms per product. The last line is a plain reduction over the same bytes: the read-bandwidth ceiling
a one-row product could reach.
"""
import torch
import torch.nn.functional as F

from txl_fast.bench.machine import median_time


def best_ms(fn, n: int) -> float:
    """ms per product: the best of 3 medians of 9 passes, each pass running ``n`` products."""
    return min(median_time(fn, reps=9) for _ in range(3)) / n * 1e3


def main() -> None:
    torch.set_num_threads(2)
    print("| weight (out, in) | rows | row-major ms | column-major ms | row-major GB/s (1 row) |")
    print("|---|---:|---:|---:|---:|")
    with torch.no_grad():
        for shape in [(3072, 1024), (4096, 1024), (1024, 4096)]:
            row_major = [torch.randn(*shape) for _ in range(6)]
            col_major = [w.t().contiguous().t() for w in row_major]
            for rows in (1, 128, 512):
                x = torch.randn(rows, shape[1])
                a = best_ms(lambda: [F.linear(x, w) for w in row_major], 6)
                b = best_ms(lambda: [F.linear(x, w) for w in col_major], 6)
                rate = f"{shape[0] * shape[1] * 4 / a / 1e6:.1f}" if rows == 1 else ""
                print(f"| {shape} | {rows} | {a:.2f} | {b:.2f} | {rate} |")
            ceiling = row_major[0].numel() * 4 / best_ms(lambda: [w.sum() for w in row_major], 6) / 1e6
        print(f"\nW.sum() over the same weights: {ceiling:.1f} GB/s")


if __name__ == "__main__":
    main()
