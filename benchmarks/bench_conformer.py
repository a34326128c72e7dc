"""Conformer attention and encoders: ``txl_fast.patch`` vs the libraries' own code, on the CPU.

    python benchmarks/bench_conformer.py [--threads N] [--rounds R] [--full] [--json PATH]

Rows (batch 8, ragged lengths: batch row b keeps ``frames - 12 b`` frames, the rest padding):
  - attention module: SpeechBrain's RelPosMHAXL and ESPnet's RelPositionMultiHeadedAttention,
    library vs patched, plus (SpeechBrain, forward) the same maths through
    ``F.scaled_dot_product_attention`` with the shifted position term as a float mask ("sdpa");
  - encoder: SpeechBrain's ConformerEncoder and ESPnet's Conformer Encoder, 12 layers.
Configurations d 256 / 4 heads and d 512 / 8 heads, 400 frames (``--full``: 1500 too); fp32 and
bf16 (``torch.autocast``: SpeechBrain's modules fail in plain bf16); forward (no autograd) and
forward + backward (fp32; encoders at 400 frames: at 1500 the libraries keep ~3 GB of scores a layer).

Each row: best-of-R seconds, library and patched alternated in every round (this machine is
shared and noisy), the speed-up, and the patched run's share of the machine's floor: the matmul
FLOPs the maths needs (projections, content, position term once per (query, key); the encoders'
feed-forward and convolution projections), counted by torch's FlopCounterMode on the library's
forward less its redundant position columns, over the measured matmul rate in that dtype.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import txl_fast  # noqa: E402
from txl_fast.bench import machine, speech  # noqa: E402
from txl_fast.bench.machine import alternated_times, best_time  # noqa: E402

BATCH = 8
LAYERS = 12
CONFIGS = {"d256_h4": (256, 4), "d512_h8": (512, 8)}


def matmul_rate(dtype: torch.dtype, reps: int = 5) -> float:
    """Best FLOP/s of a (3200, 512) x (512, 2048) matmul, a Conformer feed-forward's shape."""
    a, b = torch.randn(3200, 512, dtype=dtype), torch.randn(512, 2048, dtype=dtype)
    return 2 * 3200 * 512 * 2048 / best_time(lambda: a @ b, reps=reps)


def ragged(frames: int) -> torch.Tensor:
    return speech.padding_mask([frames - 12 * b for b in range(BATCH)], frames)       # (B, T), True = padding


def sb_attention(d, heads, frames):
    sb = speech.speechbrain()
    module = sb.RelPosMHAXL(d, heads).eval()
    x = torch.randn(BATCH, frames, d)
    pos, mask = sb.RelPosEncXL(d)(x), ragged(frames)
    return module, (lambda m, x: m(x, x, x, pos, key_padding_mask=mask)[0]), x, pos, mask


def sdpa_route(module, x, pos, mask):
    """SpeechBrain's maths with the position term as SDPA's float mask: its projections, its
    pad-and-copy shift, its fill."""
    B, L, E = x.shape
    H, D = module.num_heads, module.head_dim
    q, k, v = torch.nn.functional.linear(x, module.in_proj_weight).view(B, L, H, 3 * D).chunk(3, dim=-1)
    p = module.linear_pos(pos).view(1, -1, H, D)
    position = module.rel_shift((q + module.pos_bias_v.view(H, D)).transpose(1, 2) * module.scale
                                @ p.permute(0, 2, 3, 1))
    position = position.masked_fill(mask[:, None, None, :], float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        (q + module.pos_bias_u.view(H, D)).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=position.to(q.dtype), scale=module.scale)
    return module.out_proj(out.transpose(1, 2).reshape(B, L, E))


def espnet_attention(d, heads, frames):
    esp = speech.espnet()
    module = esp.RelPositionMultiHeadedAttention(heads, d, 0.0).eval()
    x = torch.randn(BATCH, frames, d)
    pos, keep = esp.RelPositionalEncoding(d, 0.0)(x)[1], ~ragged(frames)[:, None, :]
    return module, (lambda m, x: m(x, x, x, pos, keep)), x


def sb_encoder(d, heads, frames):
    module = speech.speechbrain_conformer(d, heads, LAYERS).eval()
    x = torch.randn(BATCH, frames, d)
    pos, mask = speech.speechbrain().RelPosEncXL(d)(x), ragged(frames)
    return module, (lambda m, x: m(x, src_key_padding_mask=mask, pos_embs=pos)[0]), x


def espnet_encoder(d, heads, frames):
    module = speech.espnet_conformer(d, heads, LAYERS).eval()
    x, keep = torch.randn(BATCH, frames, d), ~ragged(frames)[:, None, :]
    return module, (lambda m, x: m(x, keep)[0]), x


def needed_flops(module, run, x, heads, frames, layers) -> float:
    """Matmul FLOPs of the library's forward, less the position columns no (query, key) uses."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(module, x)
    d_head = x.shape[-1] // heads
    redundant = 2 * BATCH * heads * frames * (frames - 1) * d_head * layers     # 2T - 1 columns computed, T used
    return counter.get_total_flops() - redundant


def timed(fn, dtype, backward):
    def once():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if backward:
                fn().float().square().mean().backward()
            else:
                with torch.no_grad():
                    fn()
    return once


def row(kind, library, config, frames, dtype, backward, rounds, rates):
    d, heads = CONFIGS[config]
    torch.manual_seed(0)
    builders = {("attention", "speechbrain"): sb_attention, ("attention", "espnet"): espnet_attention,
                ("encoder", "speechbrain"): sb_encoder, ("encoder", "espnet"): espnet_encoder}
    module, run, x, *extra = builders[kind, library](d, heads, frames)
    flops = needed_flops(module, run, x, heads, frames, LAYERS if kind == "encoder" else 1) * (3 if backward else 1)
    inputs = x.requires_grad_(backward)
    patched = txl_fast.patch(copy.deepcopy(module))
    fns = {"library": timed(lambda: run(module, inputs), dtype, backward),
           "patched": timed(lambda: run(patched, inputs), dtype, backward)}
    if (kind, library) == ("attention", "speechbrain") and not backward:
        fns["sdpa"] = timed(lambda: sdpa_route(module, inputs, *extra), dtype, backward)
    best = {name: min(t) for name, t in alternated_times(fns, reps=rounds).items()}      # a warm-up round first
    rate = rates["bf16" if dtype == torch.bfloat16 else "fp32"]
    result = dict(kind=kind, library=library, config=config, frames=frames, batch=BATCH,
                  layers=LAYERS if kind == "encoder" else 1, dtype=str(dtype).replace("torch.", ""),
                  mode="fwd+bwd" if backward else "fwd", seconds=best, gflop=flops / 1e9,
                  speedup=best["library"] / best["patched"],
                  floor_fraction=flops / rate / best["patched"])
    if "sdpa" in best:
        result["speedup_vs_sdpa"] = best["sdpa"] / best["patched"]
    return result


def plan(full: bool):
    frames = (400, 1500) if full else (400,)
    for config in CONFIGS:
        for t in frames:
            for dtype in (torch.float32, torch.bfloat16):
                for backward in (False, True):
                    if backward and dtype == torch.bfloat16:
                        continue
                    for library in ("speechbrain", "espnet"):
                        yield "attention", library, config, t, dtype, backward
                        if not (backward and t > 400):
                            yield "encoder", library, config, t, dtype, backward


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also 1500 frames")
    parser.add_argument("--only", default="", help="comma-separated substrings a row's name must contain")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    info = dict(cpu=machine.cpu_name(), threads=torch.get_num_threads(),
                avx512_bf16="avx512_bf16" in flags, amx="amx_bf16" in flags,
                fp32_gflops=rates["fp32"] / 1e9, bf16_gflops=rates["bf16"] / 1e9, versions=machine.versions())
    print(f"# {info['cpu']}, {info['threads']} threads: matmul fp32 {info['fp32_gflops']:.0f} GFLOP/s, "
          f"bf16 {info['bf16_gflops']:.0f} GFLOP/s (avx512_bf16 {info['avx512_bf16']}, amx {info['amx']})")
    print("| case | library | config | frames | dtype | mode | library s | patched s | speed-up | vs sdpa | floor |")
    print("|---|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for spec in plan(args.full):
        kind, library, config, frames, dtype, backward = spec
        name = f"{kind} {library} {config} {frames} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'}"
        if args.only and not all(part in name for part in args.only.split(",")):
            continue
        r = row(*spec, rounds=args.rounds, rates=rates)
        rows.append(r)
        vs = f"{r['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in r else ""
        print(f"| {r['kind']} | {r['library']} | {r['config']} | {r['frames']} | {r['dtype']} | {r['mode']} | "
              f"{r['seconds']['library']:.3f} | {r['seconds']['patched']:.3f} | {r['speedup']:.2f}x | {vs} | "
              f"{r['floor_fraction']:.0%} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(machine=info, rows=rows), indent=1))


if __name__ == "__main__":
    main()
