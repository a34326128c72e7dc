"""A decode step's attention over the cache and its one-row products, compiled for the CPU by
torch.compile (Inductor).

    decode_attention(q (B, 1, H, D), k, v (B, Lk, H, D), r (Lr, H, D), r_w_bias, r_r_bias (H, D),
                     scale, uniform_keys) -> out (B, 1, H, D)
    row_linear(x (..., K) of one row, weight (N, K), bias (N,) or None) -> (..., N)

One query per batch row, every key visible (the cases ``rel_attention.is_one_query`` names; the
window's hidden keys already dropped), the scores as in ``ops.rel_attention`` (r's row
Lr - 1 - min(d, Lr - 1) for key j at distance d = Lk - 1 - j; ``uniform_keys=n``: keys 0 .. n-1
taken as key n - 1 with the log-sum-exp of their position scores, the closed form of the torch
path).

Why compile: the step reads each layer's cached keys and values once, B x H blocks of Lk x D, and
torch's eager CPU ops read them at a fraction of the machine's bandwidth (``bmm`` over blocks
``capacity`` rows apart: 6-13 GB/s here; bf16 ``bmm`` copies its operands). Inductor fuses the
position scores, the content scores, the softmax and the values into loops that read k, v and r
once each and accumulate in float32 (float64 for float64 inputs), so bf16 scores are not rounded
before the softmax. wt103 cache, 18 layers, batch 1, this machine: fp32 15-19 ms against the
eager path's 25-29, bf16 10-13 against 17-24 (benchmarks/RESULTS.md, "Compiled decode step").

``row_linear`` is ``ops.linear``'s one-row product in ROW_DTYPES (batch-1 decode steps): the weight
read once, each output a float32 sum of its row. bf16 here: 16-36 GB/s of weight against 15-30 for
the oneDNN-packed product the eager step takes, in the same runs (`python benchmarks/bench_gemv.py
--rows 1 --dtype bfloat16 --compile`); fp32 keeps ``split_linear``, as fast as the compiled loop
(27-37 against 27-33 GB/s) and one compile less.

Opt-in (``txl_fast.use_cpu_compile()``, ``txl-fast generate --compile``): the first call compiles
(a few seconds; Inductor caches the result on disk for later processes) and needs a C++ compiler.
Shapes are dynamic: the memory's growth does not recompile.
"""
from __future__ import annotations

import functools

import torch


def _decode_attention(q, k, v, r, r_w_bias, r_r_bias, scale: float, n: int):
    B, Lk, H, D = k.shape
    Lr = r.shape[0]
    acc = torch.promote_types(q.dtype, torch.float32)
    query = q[:, 0].to(acc)                                                            # (B, H, D)
    position_q = ((query + r_r_bias.to(acc)) * scale)[:, :, None]                      # (B, H, 1, D)
    position = (r.permute(1, 0, 2).to(acc)[None] * position_q).sum(-1)                # (B, H, Lr)
    rows = torch.clamp(torch.arange(Lk, device=q.device) - (Lk - Lr), min=0)           # key j -> r's row
    position = position[:, :, rows]                                                    # (B, H, Lk)
    uniform = torch.logsumexp(position[:, :, :n], dim=-1, keepdim=True)                # keys 0 .. n-1 as one
    position = torch.cat([uniform, position[:, :, n:]], dim=-1)                        # (B, H, Lk - n + 1)
    keys, values = k.transpose(1, 2)[:, :, n - 1 :], v.transpose(1, 2)[:, :, n - 1 :]  # (B, H, Lk - n + 1, D)
    content = (keys.to(acc) * ((query + r_w_bias.to(acc)) * scale)[:, :, None]).sum(-1)
    prob = torch.softmax(content + position, dim=-1)                                   # (B, H, Lk - n + 1)
    out = (prob[..., None] * values.to(acc)).sum(2)                                    # (B, H, D)
    return out[:, None].to(q.dtype)                                                    # (B, 1, H, D)


def _row_linear(x, weight, bias):
    acc = torch.promote_types(x.dtype, torch.float32)
    out = (weight.to(acc) * x.reshape(1, -1).to(acc)).sum(-1)                          # (N,)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


ROW_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def decode_attention(q, k, v, r, r_w_bias, r_r_bias, scale: float, uniform_keys: int = 0) -> torch.Tensor:
    return _compiled(_decode_attention)(q, k, v, r, r_w_bias, r_r_bias, float(scale), max(uniform_keys, 1))


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    return _compiled(_row_linear)(x, weight, bias)
