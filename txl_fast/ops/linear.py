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
``linear`` is ``F.linear``; so it is for bf16 at every row count, as bf16 batched products are
slow on this machine (AVX-512-BF16, no AMX): at a cached segment's four products F.linear is
1.0-1.5x faster at 128 rows and 1.1-1.8x at 512 (``python benchmarks/bench_eval_ops.py``'s rate
lines, numbers in benchmarks/RESULTS.md, "Evaluation against the matmul rate"); a decode step's
rows below.

A decode step's few rows (``MAX_PACKED_ROWS``, a batch of single tokens) are faster still against a
weight stored in oneDNN's blocked layout (``pack``, made once: the inference cache's
``PackedWeights`` keeps them while the weights are unchanged): fp32 at 2 or more rows (4 rows:
split_linear reads 10-14 GB/s, the packed product 20-23) and bf16 at any row count (one row:
F.linear 13-15 GB/s, split_linear 7-9, as bf16 batched products are slow, packed 16-19);
``python benchmarks/bench_gemv.py --rows 1 4 --dtype bfloat16``, numbers in benchmarks/RESULTS.md
("Decode step"). fp32 single rows keep split_linear on several threads (25-31 GB/s, packed 23-26,
and no copy); on one thread, where there is nothing to split, they are packed too (a whole decode
step of ``benchmarks/test_floor.py``'s model: 15.4 against 18.0 ms, best of 25 alternated). The
packed product carries no gradient to the weight: it is taken only when no gradient is wanted.

Under ``backend.use_cpu_compile()`` a single bf16 (or fp16) row takes ``compiled_decode.row_linear``
instead, a loop Inductor compiles (faster than the packed product, and no packed copy is made).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from txl_fast import backend
from txl_fast.ops import compiled_decode

MAX_ROWS = 512       # measured faster up to here; slower at 1728
MAX_PACKED_ROWS = 16  # a decode step's batch


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], blocks: int) -> torch.Tensor:
    """x @ weight.T + bias as a (blocks, N / blocks, K) batched matmul; weight contiguous, N % blocks == 0."""
    N, K = weight.shape
    rows = x.numel() // K
    w = weight.view(blocks, N // blocks, K)                                       # (S, N/S, K)
    xt = x.reshape(rows, K).t().expand(blocks, K, rows)                          # (S, K, rows), no copy
    out = torch.bmm(w, xt) if bias is None else torch.baddbmm(bias.view(blocks, N // blocks, 1), w, xt)
    return out.view(N, rows).t().reshape(*x.shape[:-1], N)                      # (S, N/S, rows) -> (..., N)


def compiled_row(weight: torch.Tensor, rows: int) -> bool:
    """Whether a product of ``rows`` rows takes ``compiled_decode.row_linear`` (under
    ``backend.use_cpu_compile()``: one row on the CPU in its ROW_DTYPES)."""
    return (rows == 1 and weight.device.type == "cpu" and weight.dtype in compiled_decode.ROW_DTYPES
            and backend.cpu_compile())


def packing_helps(weight: torch.Tensor, rows: int) -> bool:
    """Whether products of ``rows`` rows with ``weight`` are faster packed (see the module docstring)
    than the product ``linear`` takes otherwise."""
    return (weight.device.type == "cpu" and torch.backends.mkldnn.is_available() and 0 < rows <= MAX_PACKED_ROWS
            and (weight.dtype == torch.bfloat16
                 or (weight.dtype == torch.float32 and (rows > 1 or torch.get_num_threads() == 1)))
            and not compiled_row(weight, rows))


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (N, K) reordered by oneDNN for products of about ``rows`` rows: a copy, for ``linear``'s
    ``packed``; made without autograd."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T + bias; ``packed``: ``pack(weight, ...)``, taken when no gradient is wanted and
    ``packing_helps`` at x's rows. Under ``torch.compile``, ``F.linear``: the compiler picks the product."""
    if torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    N, K = weight.shape
    rows = x.numel() // K if K else 0
    inference = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
    if inference and x.dtype == weight.dtype and x.shape[-1] == K and compiled_row(weight, rows):
        return compiled_decode.row_linear(x, weight, bias)
    if packed is not None and x.dtype == packed.dtype and x.shape[-1] == K and packing_helps(weight, rows) and inference:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    blocks = torch.get_num_threads()
    if (x.device.type == "cpu" and blocks > 1 and 0 < rows <= MAX_ROWS and N % blocks == 0
            and x.dtype != torch.bfloat16                                       # bf16 batched products: slow
            and weight.is_contiguous() and x.shape[-1] == K and (bias is None or bias.shape == (N,))):
        return split_linear(x, weight, bias, blocks)
    return F.linear(x, weight, bias)
