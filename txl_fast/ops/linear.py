"""``F.linear`` for up to a few hundred rows on the CPU: decode steps and cached segments.

    linear(x (..., K), weight (N, K), bias (N,) or None) -> (..., N)

``split_linear`` computes the product as one batched matmul over row blocks of the weight (a
view: nothing is copied), one block per thread, so each thread reads only its own share of the
weight. With 2 threads (``python benchmarks/bench_gemv.py``, wt103 shapes, numbers in
benchmarks/RESULTS.md) it is 1.2-1.5x faster than ``F.linear`` for one row (MKL's one-row product
reads 10-19 GB/s, no faster than on one thread; the split one 13-23 GB/s, against 26-31 GB/s for
a plain reduction over the same bytes), about 2x for 4-16 rows, 1.3x for the 128 rows of a
cached segment, 1.07x for 512, and 0.92-1.0x for HF's 1728; hence MAX_ROWS. Each output is the
same dot product as F.linear's, summed in another order (fp32: ~1e-7 relative). Elsewhere (more
rows, one thread, other devices, weights that are not contiguous or do not split evenly)
``linear`` is ``F.linear``; so it is for bf16 above a decode step's rows: bf16 batched products
run slower than F.linear's on this machine (AVX-512-BF16, 2 threads, wt103's four products of a
cached segment, 6 weights each: 1.1-1.6x at 128 rows, 1.1-1.8x at 512; numbers in
benchmarks/RESULTS.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MAX_ROWS = 512       # measured faster up to here; slower at 1728
DECODE_ROWS = 16     # above: a segment's rows, where bf16 takes F.linear


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], blocks: int) -> torch.Tensor:
    """x @ weight.T + bias as a (blocks, N / blocks, K) batched matmul; weight contiguous, N % blocks == 0."""
    N, K = weight.shape
    rows = x.numel() // K
    w = weight.view(blocks, N // blocks, K)                                       # (S, N/S, K)
    xt = x.reshape(rows, K).t().expand(blocks, K, rows)                          # (S, K, rows), no copy
    out = torch.bmm(w, xt) if bias is None else torch.baddbmm(bias.view(blocks, N // blocks, 1), w, xt)
    return out.view(N, rows).t().reshape(*x.shape[:-1], N)                      # (S, N/S, rows) -> (..., N)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    N, K = weight.shape
    rows = x.numel() // K if K else 0
    if x.dtype == torch.bfloat16 and rows > DECODE_ROWS:
        return F.linear(x, weight, bias)
    blocks = torch.get_num_threads()
    if (x.device.type == "cpu" and blocks > 1 and 0 < rows <= MAX_ROWS and N % blocks == 0
            and weight.is_contiguous() and x.shape[-1] == K and (bias is None or bias.shape == (N,))):
        return split_linear(x, weight, bias, blocks)
    return F.linear(x, weight, bias)
