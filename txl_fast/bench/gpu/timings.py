"""Stage 4 of the GPU check: timings (``common.bench_ms``: do_bench medians on the GPU) of attention
(fused, torch path, SDPA on the content term alone: the floor, FlexAttention), the decode step, host
time per decode step with and without CUDA graphs, a Conformer attention core (the Triton kernels,
the torch path) against SDPA with a float position mask and against FlexAttention, the
adaptive-softmax loss against a cuBLAS head GEMM, and end-to-end wt103 ``evaluate``; each with its
roofline floor from ``txl_fast.bench.analytic`` on the ceilings of stage 1 (``floor_ms`` and
``of_floor`` in every timing).

``timings(S, ceilings, device, smoke)`` lists them as (name, function, arguments), in the order
they run: the cold torch.compile of FlexAttention last.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from txl_fast import ops, use_backend
from txl_fast.bench import analytic
from txl_fast.bench.gpu.common import (attention_inputs, bench_ms, bidirectional_inputs, flat_params, rel_err,
                                       roofline, small_model, softmax_inputs, synchronize)
from txl_fast.bench.gpu.plan import PUBLISHED_A100, WT103
from txl_fast.bench.machine import alternated_times, time_call
from txl_fast.config import TransfoXLConfig
from txl_fast.inference import GRAPH_SLACK, GraphedDecode, decode_step, evaluate
from txl_fast.cache import trusted_token_ids
from txl_fast.ops.rel_attention import full_positions, rel_shift, visibility_mask


def timings(S: dict, ceilings: dict, device, smoke: bool) -> list:
    """Every timing record of the shapes ``S``: (name, function, arguments)."""
    out = [(f"decode attention B{B}", time_decode, (S, B, ceilings, device, smoke))
           for B in S["bench_decode"]["batches"]]
    out += [("host per decode step B1", time_host_per_step, (S, ceilings, device, smoke))]
    out += [(f"softmax loss fwd+bwd N{n}", time_softmax, (S, n, ceilings, device, smoke))
            for n in S["bench_softmax"]["rows"]]
    out += [(f"evaluate B{B} {dtype}", time_evaluate, (S, B, dtype, ceilings, device, smoke))
            for B in S["bench_eval"]["batches"] for dtype in S["bench_eval"]["dtypes"]]
    out += [(f"attention eval B{B}", time_attention, (S, B, ceilings, device, smoke))
            for B in S["bench_attention"]["batches"]]
    conformer = [(f"B{spec['B']} L{spec['L']} H{spec['H']}", spec) for spec in S["bench_bidirectional"]]
    out += [(f"conformer attention {name}", time_bidirectional, (spec, ceilings, device, smoke))
            for name, spec in conformer]
    out += [(f"flex attention eval B{B}", time_attention, (S, B, ceilings, device, smoke, True))   # last: each
            for B in S["bench_attention"]["batches"]]                                             # a cold compile
    out += [(f"flex conformer attention {name}", time_bidirectional, (spec, ceilings, device, smoke, True))
            for name, spec in conformer]
    return out


def time_attention(S: dict, B: int, ceilings: dict, device, smoke: bool, flex: bool = False) -> dict:
    """Eval shape: fused vs torch path vs SDPA (content term only: the floor); or (flex=True)
    FlexAttention, its compile seconds and its difference from the fused kernel's output."""
    b = S["bench_attention"]
    dtype = getattr(torch, b["dtype"])
    Lq, mlen, H, D = b["tgt"], b["mem"], b["H"], b["D"]
    Lk, window, scale = mlen + Lq, mlen, D ** -0.5
    case = ("bench", B, Lq, mlen, H, D, window, None)
    q, k, v, r, u, w = attention_inputs(case, dtype, device, 41)
    r_clamped = r[Lk - (b["clamp"] + 1):].contiguous()                      # distances clamp .. 0
    r = full_positions(r_clamped, Lk).contiguous()        # written out, as the model stores them for the kernels
    for t in (q, k, v, r, r_clamped, u, w):
        t.requires_grad_()
    dout = torch.randn_like(q)

    def fused():
        with use_backend("triton"):
            return ops.rel_attention(q, k, v, r, u, w, scale=scale, window=window)

    def torch_path():
        with use_backend("torch"):
            return ops.rel_attention(q, k, v, r_clamped, u, w, scale=scale, window=window)

    qh, kh, vh = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]

    def sdpa():
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale)

    es = q.element_size()
    fwd = analytic.rel_attention(B, H, Lq, Lk, D, es, "fused")
    fwd_bwd = analytic.Cost(3.5 * fwd.flops, 3 * fwd.bytes)      # FlashAttention's count: backward 2.5x forward
    result = {"B": B, "shape": f"B{B} H{H} Lq{Lq} Lk{Lk} D{D} {b['dtype']}",
              "floor_model": "analytic.rel_attention fused; fwd+bwd = 3.5x its FLOPs, 3x its bytes"}
    paths = [("fused", fused, [q, k, v, r, u, w]), ("torch", torch_path, [q, k, v, r_clamped, u, w]),
             ("sdpa_content", sdpa, [qh, kh, vh])]
    if flex:
        flex_fn, result["flex_compile_s"], flex_q = flex_attention_fn(qh, kh, vh, r, u, w, mlen, window, scale,
                                                                      device, smoke)
        with torch.no_grad():                             # the same function? (flex against the kernels)
            result["flex_err_vs_fused"] = float(f"{rel_err(flex_fn().transpose(1, 2), fused()):.2e}")
        paths = [("flex", flex_fn, [flex_q, kh, vh])]
    for name, fn, inputs in paths:
        with torch.no_grad():
            result[f"{name}_fwd"] = roofline(bench_ms(fn, smoke), fwd, ceilings, es)
        if name == "flex" and smoke:
            result["flex_fwd_bwd"] = "n/a: FlexAttention has no backward on the CPU"
            continue
        grad = dout if name in ("fused", "torch") else dout.transpose(1, 2)
        result[f"{name}_fwd_bwd"] = roofline(
            bench_ms(lambda: torch.autograd.grad(fn(), inputs, grad), smoke), fwd_bwd, ceilings, es)
    return result


def time_bidirectional(spec: dict, ceilings: dict, device, smoke: bool, flex: bool = False) -> dict:
    """A Conformer self-attention core, ragged padding: the Triton kernels (``txl_fast``) and the
    torch path's inference and autograd paths vs the same maths through SDPA with the shifted
    position term as a float mask (what the speech libraries' fastest routes do), forward and
    forward + backward; or (flex=True) FlexAttention, its compile seconds and its difference from
    the kernels' output."""
    B, L, H, D = spec["B"], spec["L"], spec["H"], spec["D"]
    dtype = getattr(torch, spec["dtype"])
    (q, k, v, r, u, w), lengths = bidirectional_inputs(("bench", B, L, 0, H, D, None), dtype, device, seed=43)
    hidden = torch.arange(L, device=device)[None, :] >= lengths[:, None]                     # (B, L) padding
    scale = D ** -0.5
    for t in (q, k, v, r, u, w):
        t.requires_grad_()

    def on(backend_name):
        def attend():
            with use_backend(backend_name):
                return ops.rel_attention(q, k, v, r, u, w, scale=scale, causal=False, key_lengths=lengths,
                                         empty_rows="zero")
        return attend

    def sdpa_float_mask():
        qt = q.transpose(1, 2)                                                               # (B, H, L, D)
        position = rel_shift((qt + w[:, None]) @ r.permute(1, 2, 0), L) * scale              # (B, H, L, L)
        position = position.masked_fill(hidden[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(qt + u[:, None], k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=position, scale=scale)
        return out.transpose(1, 2)

    es = q.element_size()
    fwd = analytic.rel_attention(B, H, L, L, D, es, "fused")
    fwd_bwd = analytic.Cost(3.5 * fwd.flops, 3 * fwd.bytes)
    result = {"shape": f"B{B} H{H} L{L} D{D} {spec['dtype']}, ragged lengths",
              "floor_model": "analytic.rel_attention fused at Lq = Lk = L; fwd+bwd 3.5x FLOPs, 3x bytes"}
    dout = torch.randn_like(q)
    if flex:
        flex_fn, result["flex_compile_s"], flex_q = flex_bidirectional_fn(q, k, v, r, u, w, lengths, scale, device,
                                                                          smoke)
        with torch.no_grad():                             # the same function? (flex against the kernels)
            result["flex_err_vs_fused"] = float(f"{rel_err(flex_fn().transpose(1, 2), on('triton')()):.2e}")
            result["flex_fwd"] = roofline(bench_ms(flex_fn, smoke), fwd, ceilings, es)
        result["flex_fwd_bwd"] = "n/a: FlexAttention has no backward on the CPU" if smoke else roofline(
            bench_ms(lambda: torch.autograd.grad(flex_fn(), flex_q, dout.transpose(1, 2)), smoke), fwd_bwd, ceilings,
            es)
        return result
    for name, fn in (("txl_fast", on("triton")), ("torch_path", on("torch")), ("sdpa_float_mask", sdpa_float_mask)):
        with torch.no_grad():
            result[f"{name}_fwd"] = roofline(bench_ms(fn, smoke), fwd, ceilings, es)
        result[f"{name}_fwd_bwd"] = roofline(
            bench_ms(lambda: torch.autograd.grad(fn(), (q, k, v, r, u, w), dout), smoke), fwd_bwd, ceilings, es)
    return result


def flex_bidirectional_fn(q, k, v, r, u, w, lengths, scale, device, smoke: bool):
    """FlexAttention for a Conformer core: the shifted position term as a precomputed score tensor,
    key padding (one length per batch row) as a per-row block mask."""
    L = q.shape[1]
    qh, kh, vh = [t.detach().transpose(1, 2).contiguous() for t in (q, k, v)]              # (B, H, L, D)
    with torch.no_grad():                  # (B, H, L, L): scale * (q_i + pos_bias_v) . r_{i - j}
        position = rel_shift((qh + w.detach()[:, None]) @ r.detach().permute(1, 2, 0), L) * scale

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    return compiled_flex(qh + u.detach()[:, None], kh, vh, position, mask_mod, q.shape[0], scale, device, smoke)


def flex_attention_fn(qh, kh, vh, r, u, w, mlen, window, scale, device, smoke: bool):
    """FlexAttention with the position term as a precomputed score tensor (score_mod) and the
    causal + memory + same_length visibility as a block mask; its compile seconds apart."""
    B, H, Lq, D = qh.shape
    Lk = kh.shape[2]
    with torch.no_grad():          # (B, H, Lq, Lk): scale * (q_i + r_r_bias) . r_{distance(i, j)}, 0 where hidden
        rows = full_positions(r.detach(), Lk)                                        # (Lk, H, D)
        raw = ((qh.detach() + w.detach()[None, :, None]) @ rows.permute(1, 2, 0)) * scale     # (B, H, Lq, Lk)
        distance = (torch.arange(Lq, device=device)[:, None] + mlen - torch.arange(Lk, device=device)[None, :])
        index = (Lk - 1 - distance.clamp(0, Lk - 1)).expand(B, H, Lq, Lk)
        position = raw.gather(3, index).masked_fill(~visibility_mask(Lq, Lk, window, device), 0)

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx + mlen - kv_idx
        return (d >= 0) & (d < window)

    return compiled_flex(qh + u.detach()[None, :, None], kh, vh, position, mask_mod, None, scale, device, smoke)


def compiled_flex(q_content, kh, vh, position, mask_mod, batch, scale, device, smoke: bool, backward: bool = True):
    """FlexAttention of (B, H, Lq, D) queries (the content bias already added) with ``position``
    (B, H, Lq, Lk) added to the scores and ``mask_mod`` as the block mask (per batch row when
    ``batch`` is B, shared when None): the function, its compile seconds (forward, and backward on
    a GPU unless ``backward`` is False) and the query leaf its gradient is taken for."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + position[b, h, q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, batch, None, q_content.shape[2], kh.shape[2], device=str(device))
    run = flex_attention if smoke else torch.compile(flex_attention)
    grad = backward and not smoke                    # no gradient on the CPU, where FlexAttention has no backward
    qb = q_content.detach().requires_grad_(grad)
    kf, vf = (kh, vh) if grad else (kh.detach(), vh.detach())

    def flex():
        return run(qb, kf, vf, score_mod=score_mod, block_mask=block_mask, scale=scale)

    def first_call():
        out = flex()
        if grad:
            torch.autograd.grad(out, [qb, kf, vf], torch.ones_like(out))
    compile_s, _ = time_call(first_call)
    return flex, round(compile_s, 2), qb


def time_decode(S: dict, B: int, ceilings: dict, device, smoke: bool) -> dict:
    """One decode step's attention (Lq 1 over a full memory): fused vs torch path vs SDPA content."""
    d = S["bench_decode"]
    dtype = getattr(torch, d["dtype"])
    case = ("decode", B, 1, d["mem"], d["H"], d["D"], d["mem"], None)
    q, k, v, r, u, w = attention_inputs(case, dtype, device, 51)
    scale = d["D"] ** -0.5
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    cost = analytic.rel_attention(B, d["H"], 1, k.shape[1], d["D"], q.element_size(), "fused")
    result = {"B": B, "shape": f"B{B} H{d['H']} Lq1 Lk{k.shape[1]} D{d['D']} {d['dtype']}"}
    with torch.no_grad():
        for name, backend_name in (("fused", "triton"), ("torch", "torch")):
            def step(backend_name=backend_name):
                with use_backend(backend_name):
                    return ops.rel_attention(q, k, v, r, u, w, scale=scale, window=d["mem"])
            result[name] = roofline(bench_ms(step, smoke), cost, ceilings, q.element_size())
        result["sdpa_content"] = roofline(bench_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=scale),
                                                   smoke), cost, ceilings, q.element_size())
    return result


def time_host_per_step(S: dict, ceilings: dict, device, smoke: bool) -> dict:
    """wt103-config model, batch 1: generate's tokens/s and one decode step's host microseconds,
    eager and replayed from a CUDA graph."""
    h = S["bench_host"]
    model = small_model(S["model"], getattr(torch, h["dtype"]), device)
    prompt = torch.randint(0, model.config.vocab_size, (1, h["prompt"]), device=device)
    result = {}
    with use_backend("triton"):
        for graph in ([False, True] if device.type == "cuda" else [False]):
            model.generate(prompt, 4, cuda_graph=graph)                          # warm (and capture)
            seconds, _ = time_call(lambda: model.generate(prompt, h["tokens"], cuda_graph=graph), device.type)
            key = "generate_tok_per_s_graph" if graph else "generate_tok_per_s"   # graph: captures included
            result[key] = round(h["tokens"] / seconds, 1)
        with torch.no_grad():
            _, cand, cache = decode_step(model.transformer, model.crit, prompt, model.new_cache(1), False, 0)
            ids = cand[:, :1]
            with trusted_token_ids():
                def host_us(fn, n=10):          # host time: the device idle before each call, not waited for
                    synchronize(device)
                    times = alternated_times({"step": fn}, "cpu", n, warmup=0,
                                             after_round=lambda: synchronize(device))["step"]
                    return round(1e6 * statistics.median(times), 1)
                result["host_us_eager"] = host_us(lambda: decode_step(model.transformer, model.crit, ids, cache,
                                                                      False, 0))
                if device.type == "cuda":
                    cache.fix_for_graphs(1, GRAPH_SLACK)
                    graphed = GraphedDecode(lambda x: decode_step(model.transformer, model.crit, x, cache,
                                                                   False, 0)[:2], cache, ids)
                    for _ in range(GRAPH_SLACK + 2):
                        graphed(ids)                                            # capture every layout
                    result["host_us_graph"] = host_us(lambda: graphed(ids))
    cfg = TransfoXLConfig(**S["model"])
    step = analytic.generated_token(cfg, 1, cfg.mem_len, cached=True, es=next(model.parameters()).element_size())
    result["floor_ms_per_token"] = round(1e3 * max(step.flops / ceilings["matmul_bf16_flops"],
                                                   step.bytes / ceilings["copy_bytes_per_s"]), 4)
    return result


def time_softmax(S: dict, n: int, ceilings: dict, device, smoke: bool) -> dict:
    """Adaptive-softmax loss forward+backward (triton, torch path) vs the head's cuBLAS GEMMs."""
    b = S["bench_softmax"]
    dtype = getattr(torch, b["dtype"])
    spec = dict(S["softmax"], n=n)
    hidden, target, params = softmax_inputs(spec, dtype, device, 61)
    leaves = [hidden.requires_grad_(), *(p.requires_grad_() for p in flat_params(params))]
    cfg = TransfoXLConfig(**{**WT103, "vocab_size": spec["vocab"], "cutoffs": spec["cutoffs"],
                             "div_val": spec["div_val"], "d_model": spec["d_proj"], "d_embed": spec["d_embed"]})
    es = hidden.element_size()
    fwd = analytic.adaptive_softmax(n, cfg, es, labels=True, share=analytic.uniform_share(cfg))
    fwd_bwd = analytic.Cost(3 * fwd.flops, 2 * fwd.bytes)
    result = {"N": n, "dtype": b["dtype"], "floor_model": "analytic.adaptive_softmax; fwd+bwd = 3x FLOPs, 2x bytes"}
    for name in ("triton", "torch"):
        def loss(name=name):
            with use_backend(name):
                return torch.autograd.grad(ops.adaptive_nll(hidden, target, *params).sum(), leaves)
        result[name] = roofline(bench_ms(loss, smoke), fwd_bwd, ceilings, es)
    h0 = (hidden @ params[2][0]).detach()                                     # (N, d_0): the head's input
    w0, g = params[0][0].detach(), torch.randn(n, params[0][0].shape[0], device=device, dtype=dtype)

    def head_gemms():
        return h0 @ w0.t(), g @ w0, g.t() @ h0                                 # logits, dh, dW
    head = analytic.linear(n, w0.shape[1], w0.shape[0], es) * 3
    result["cublas_head_gemms"] = roofline(bench_ms(head_gemms, smoke), head, ceilings, es)
    return result


def time_evaluate(S: dict, B: int, dtype_name: str, ceilings: dict, device, smoke: bool) -> dict:
    """End-to-end evaluate() tokens/s of a random-weight model of the table's config, both backends,
    on HF's zero memory (init_mems="zeros": every segment attends to a full memory, the steady state)."""
    e = S["bench_eval"]
    tgt = e.get("tgt", 128)
    model = small_model(S["model"], getattr(torch, dtype_name), device)
    cfg = TransfoXLConfig(**S["model"])
    stream = torch.randint(0, cfg.vocab_size, (B * e["segments"][B] * tgt + B,))
    step = analytic.eval_segment(cfg, B, tgt, cfg.mem_len, cached=True, es=2 if dtype_name != "float32" else 4)
    floor_s = step.time_on(analytic.Device("measured", ceilings["matmul_bf16_flops"] if dtype_name != "float32"
                                           else ceilings["matmul_fp32_flops"], ceilings["copy_bytes_per_s"]))
    out = {"B": B, "dtype": dtype_name, "floor_tok_per_s": round(B * tgt / floor_s, 1),
           "published_a100_fp16_torchscript": PUBLISHED_A100.get(B), "published_note": "NVIDIA's figure, not ours"}
    for backend_name in ("triton", "torch"):
        with use_backend(backend_name):
            kwargs = dict(tgt_len=tgt, mem_len=cfg.mem_len, clamp_len=cfg.clamp_len, batch_size=B, progress=False,
                          init_mems="zeros")
            evaluate(model, stream[: B * tgt + B], **kwargs)                      # warm
            synchronize(device)
            result = evaluate(model, stream, **kwargs)
        out[f"{backend_name}_tok_per_s"] = round(result.tokens_per_s, 1)
        out[f"{backend_name}_of_floor"] = round(result.tokens_per_s / out["floor_tok_per_s"], 3)
    return out
