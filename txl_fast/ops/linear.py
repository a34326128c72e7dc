"""``F.linear`` for a few rows at a time (decode steps) on the CPU, at memory bandwidth.

    linear(x (..., K), weight (N, K), bias (N,) or None) -> (..., N)

A decode step multiplies one row per sequence by every weight matrix: products that only have to
read the weights once. MKL runs ``F.linear``'s one-row product at 13-19 GB/s on this machine's
2 threads, no faster than on one thread. ``split_linear`` computes the same product as one batched
matmul over SPLIT row blocks of the weight (a view: nothing is copied), one block per thread,
and reads the same bytes at 19-23 GB/s (a plain reduction over them: 26-29 GB/s). Measured by
``scripts/bench_gemv.py`` (numbers in benchmarks/RESULTS.md): faster up to 64 rows, mixed at
128, slower at 512; hence MAX_ROWS. Each output is the same dot product as F.linear's, summed
in another order (fp32: ~1e-7 relative). Elsewhere (more rows, other devices, weights that are
not contiguous) ``linear`` is ``F.linear``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

SPLIT = 2            # row blocks of the weight: one per thread of this machine
MAX_ROWS = 64        # above this, F.linear's blocked matmul is as fast or faster


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T + bias as a (SPLIT, N / SPLIT, K) batched matmul; weight contiguous, N % SPLIT == 0."""
    N, K = weight.shape
    rows = x.numel() // K
    blocks = weight.view(SPLIT, N // SPLIT, K)                                   # (S, N/S, K)
    xt = x.reshape(rows, K).t().expand(SPLIT, K, rows)                          # (S, K, rows), no copy
    if bias is None:
        out = torch.bmm(blocks, xt)                                             # (S, N/S, rows)
    else:
        out = torch.baddbmm(bias.view(SPLIT, N // SPLIT, 1), blocks, xt)
    return out.view(N, rows).t().reshape(*x.shape[:-1], N)                     # (..., N)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    N, K = weight.shape
    rows = x.numel() // K if K else 0
    if (x.device.type == "cpu" and 0 < rows <= MAX_ROWS and N % SPLIT == 0 and weight.is_contiguous()
            and x.shape[-1] == K and (bias is None or bias.shape == (N,))):
        return split_linear(x, weight, bias)
    return F.linear(x, weight, bias)
