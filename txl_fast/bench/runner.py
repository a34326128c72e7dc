"""``txl-fast bench``: the curated benchmark, ours vs HF transformers 4.35, honest about the hardware.

    python -m txl_fast.bench                    # curated set, a few minutes on a 2-core CPU
    python -m txl_fast.bench --full             # the wt103 configuration (much longer)
    python -m txl_fast.bench --results-md benchmarks/RESULTS.md

What it does, in order:
  1. measures this machine (CPU flags, fp32 and bf16 matmul rates, read and copy bandwidth;
     txl_fast.bench.machine);
  2. on a CUDA device, times the Triton kernels against the torch path with CUDA events
     (triton.testing.do_bench, median) at the wt103 shapes and reports TFLOP/s and GB/s against the
     device's measured rates; without a GPU it says so in one line;
  3. end to end, on one set of random weights (HF model -> save_pretrained -> txl_fast.from_pretrained):
     evaluation with the paper's protocol (streamed segments, memory carried, NLL of every token) and
     greedy generation, swept over mem_len and batch size; ours and HF alternated after a warm-up,
     medians; each pair also checks that both sides computed the same NLL / tokens;
  4. prints a table (tokens/s of both sides in the same dtype, ratio, the floor - the machine's time
     for the work ours cannot avoid, at the rates of step 1 - and our fraction of it, peak memory)
     and the analytic H100 prediction for the wt103 protocol;
  5. writes JSON, a PNG plot (matplotlib, the ``bench`` extra), and optionally its section of a
     RESULTS.md (between markers, the rest of the file untouched).

Peak memory on the CPU is the process's resident set sampled every 2 ms during a run, above its
level at the start of the run (freed heap returned with malloc_trim first); on CUDA
torch.cuda.max_memory_allocated above the allocation at the start (``harness.PeakMemory``).

This file measures; the pair of models and each side's NLL and generation are ``harness``'s, the
clock ``machine``'s, and step 4-5 (tables, plot, JSON, RESULTS.md) ``report``'s.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from txl_fast.bench import analytic
from txl_fast.bench.floor import fraction
from txl_fast.bench.harness import PeakMemory, build_pair, hf_generate, hf_nll, ours_nll, set_protocol
from txl_fast.bench.machine import Machine, alternated_times, measure, median_time, versions
from txl_fast.bench.report import publish
from txl_fast.checks import int_at_least
from txl_fast import dtypes

# NVIDIA DeepLearningExamples, Transformer-XL PyTorch, large model (wt103), A100, FP16 TorchScript,
# tgt_len 128, mem_len 1600, clamp_len 1000 (as quoted in the issue).
NVIDIA_A100 = {16: 30783.0, 32: 32162.0}


# ---- the sets of workloads -----------------------------------------------------------------------
@dataclass
class Suite:
    name: str
    config: dict                      # HF TransfoXLConfig arguments ({} = HF's default, wt103)
    tgt_len: int
    segments: int                     # evaluation segments per timed run
    prompt_len: int
    new_tokens: int
    mem_lens: list                    # swept at batch 1
    batches: list                     # swept at mem_len = batch_mem_len
    batch_mem_len: int
    rounds: int
    clamp_len: int = 1000
    notes: str = ""
    points: list = field(default_factory=list)

    def __post_init__(self):
        pts = [(kind, 1, m) for kind in ("eval", "generate") for m in self.mem_lens]
        pts += [(kind, b, self.batch_mem_len) for kind in ("eval", "generate") for b in self.batches]
        self.points = sorted(set(pts), key=lambda p: (p[0], p[1], p[2]))


SUITES = {
    # a wt103-shaped model, narrower and shallower, so the whole sweep takes a few minutes on 2 cores
    "curated": lambda: Suite(
        "curated",
        dict(vocab_size=32000, cutoffs=[4000, 12000], d_model=512, d_embed=512, n_head=8, d_head=64, d_inner=2048,
             div_val=4, n_layer=6, mem_len=256, clamp_len=1000, same_length=True, dropout=0.0),
        tgt_len=64, segments=4, prompt_len=64, new_tokens=16,
        mem_lens=[64, 256, 512, 1024], batches=[1, 2, 4, 8], batch_mem_len=256, rounds=3,
        notes="wt103-shaped, reduced: 6 layers, d_model 512, 8 heads of 64, d_inner 2048, vocab 32k, div_val 4",
    ),
    "full": lambda: Suite(
        "full", {}, tgt_len=128, segments=2, prompt_len=128, new_tokens=16,
        mem_lens=[400, 800, 1600], batches=[1, 2, 4], batch_mem_len=1600, rounds=2,
        notes="HF's default TransfoXLConfig = the wt103 model (18 layers, d_model 1024, 267,735 words)",
    ),
    # seconds: for tests and CI smoke runs only, not a speed claim
    "tiny": lambda: Suite(
        "tiny",
        dict(vocab_size=500, cutoffs=[100, 250], d_model=32, d_embed=32, n_head=2, d_head=16, d_inner=64,
             div_val=2, n_layer=2, mem_len=16, clamp_len=20, same_length=True, dropout=0.0),
        tgt_len=8, segments=2, prompt_len=8, new_tokens=4,
        mem_lens=[8, 16], batches=[1, 2], batch_mem_len=16, rounds=1, clamp_len=20,
        notes="tiny smoke-test model: timings are per-call overheads, not a speed claim",
    ),
}


# ---- one point of the sweep ----------------------------------------------------------------------
def run_point(ours, hf, suite: Suite, kind: str, batch: int, mem_len: int, machine: Machine, device: str,
              dtype: str, log: Callable[[str], None]) -> dict:
    cfg = ours.config
    es = torch.finfo(getattr(torch, dtype)).bits // 8
    set_protocol((ours, hf), mem_len, suite.clamp_len)
    g = torch.Generator().manual_seed(1000 * batch + mem_len)
    path = "fused" if device == "cuda" else "torch"
    if kind == "eval":
        data = torch.randint(0, cfg.vocab_size, (batch, suite.segments * suite.tgt_len + 1), generator=g).to(device)
        tokens = batch * suite.segments * suite.tgt_len
        sides = {"txl_fast": lambda: ours_nll(ours, data, suite.tgt_len, mem_len, suite.clamp_len),
                 "hf": lambda: hf_nll(hf, data, suite.tgt_len)}
        share = analytic.uniform_share(cfg)
        work = {e: analytic.eval_run(cfg, batch, suite.tgt_len, mem_len, suite.segments, engine=e, path=path,
                                     es=es, share=share) for e in analytic.ENGINES}
        floor = analytic.eval_floor_flops(cfg, batch, suite.tgt_len, mem_len, suite.segments, first_real=0, es=es,
                                          share=share) / machine.matmul_rate(dtype)
    else:
        prompt = torch.randint(0, cfg.vocab_size, (batch, suite.prompt_len), generator=g).to(device)
        tokens = batch * suite.new_tokens
        sides = {"txl_fast": lambda: ours.generate(prompt, suite.new_tokens),
                 "hf": lambda: hf_generate(hf, prompt, suite.new_tokens)}
        work = {e: analytic.generate_run(cfg, batch, suite.prompt_len, suite.new_tokens, mem_len, engine=e,
                                         path=path, es=es) for e in analytic.ENGINES}
        floor = analytic.generate_floor_seconds(cfg, batch, suite.prompt_len, suite.new_tokens, mem_len,
                                                machine.matmul_rate(dtype), machine.read_rate, es)
    warm = {name: fn() for name, fn in sides.items()}                       # warm-up, and the check
    if kind == "eval":
        nll_ours, nll_hf = warm["txl_fast"], warm["hf"]
        agree = abs(nll_ours - nll_hf) <= (1e-4 if es == 4 else 1e-2) * max(1.0, abs(nll_hf))
        check = f"NLL/token ours {nll_ours / tokens:.5f}, HF {nll_hf / tokens:.5f}"
    else:
        same = warm["txl_fast"][:, -suite.new_tokens:].cpu() == warm["hf"][:, -suite.new_tokens:].cpu()
        # fp32: identical; bf16 rounds differently on each side, and a greedy run that parts stays apart
        agree = bool(same.all()) or es < 4
        check = "greedy tokens identical" if bool(same.all()) else \
            f"greedy tokens {int(same.sum())}/{same.numel()} identical"
    peaks = {name: 0 for name in sides}

    @contextlib.contextmanager
    def peak_memory(name):
        with PeakMemory(device) as mem:
            yield
        peaks[name] = max(peaks[name], mem.peak)

    # alternated: ours, HF, ours, HF (warmed up above), wall time synchronised
    times = alternated_times(sides, device, suite.rounds, warmup=0, events=False, around=peak_memory)
    row = dict(kind=kind, batch=batch, mem_len=mem_len, tokens=tokens, mode="cached", agree=agree, check=check,
               floor_seconds=floor)
    for name in sides:
        t = statistics.median(times[name])
        w = work[name]
        row[name] = dict(
            seconds=t, times=times[name], tokens_per_s=tokens / t, peak_mem_bytes=peaks[name],
            flops=w.flops, bytes=w.bytes, gflops_per_s=w.flops / t / 1e9, gbytes_per_s=w.bytes / t / 1e9,
            frac_floor=fraction(floor, t),
        )
    row["ratio"] = row["txl_fast"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
    log(f"  {kind:8s} batch {batch:2d} mem_len {mem_len:5d}: ours {row['txl_fast']['tokens_per_s']:9.1f} tok/s, "
        f"HF {row['hf']['tokens_per_s']:9.1f} tok/s, {row['ratio']:.2f}x, ours "
        f"{row['txl_fast']['frac_floor']:.0%} of the floor ({check})")
    return row


# ---- CUDA: the kernels themselves ----------------------------------------------------------------
def cuda_kernels(machine: Machine, log: Callable[[str], None]) -> list[dict]:
    """Triton vs torch path at the wt103 shapes, bf16, CUDA events (do_bench median)."""
    from txl_fast import TransfoXLConfig, ops, use_backend  # noqa: PLC0415

    cfg, dt, es, dev = TransfoXLConfig(), torch.bfloat16, 2, "cuda"
    H, D = cfg.n_head, cfg.d_head
    rows = []

    def record(op, shape, backend, fn, cost):
        t = median_time(fn, "cuda")
        rows.append(dict(op=op, shape=shape, backend=backend, seconds=t, tflops_per_s=cost.flops / t / 1e12,
                         gbytes_per_s=cost.bytes / t / 1e9,
                         frac_matmul=cost.flops / t / machine.matmul_rate("bfloat16"),
                         frac_bandwidth=cost.bytes / t / machine.read_rate))
        log(f"  {op:22s} {shape:28s} {backend:6s} {t * 1e6:9.1f} us  {rows[-1]['tflops_per_s']:7.2f} TFLOP/s "
            f"({rows[-1]['frac_matmul']:.0%})  {rows[-1]['gbytes_per_s']:7.1f} GB/s ({rows[-1]['frac_bandwidth']:.0%})")

    for B, Lq in ((1, 128), (16, 128), (16, 1)):
        Lk = 1600 + Lq
        q = torch.randn(B, Lq, H, D, device=dev, dtype=dt)
        k, v = torch.randn(B, Lk, H, D, device=dev, dtype=dt), torch.randn(B, Lk, H, D, device=dev, dtype=dt)
        r = torch.randn(Lk, H, D, device=dev, dtype=dt)
        u, w = torch.randn(H, D, device=dev, dtype=dt), torch.randn(H, D, device=dev, dtype=dt)
        for backend in ("triton", "torch"):
            path = "fused" if backend == "triton" else "torch"
            cost = analytic.rel_attention(B, H, Lq, Lk, D, es, path)

            def fn(backend=backend):
                with use_backend(backend):
                    return ops.rel_attention(q, k, v, r, u, w, scale=D ** -0.5, window=None)
            record("rel_attention", f"B{B} H{H} Lq{Lq} Lk{Lk} D{D}", backend, fn, cost)
    from txl_fast.modules import ProjectedAdaptiveLogSoftmax  # noqa: PLC0415

    crit = ProjectedAdaptiveLogSoftmax(cfg.vocab_size, cfg.d_embed, cfg.d_model, cfg.cutoffs, cfg.div_val)
    with torch.no_grad():
        for p in crit.parameters():
            p.normal_(0, 0.02)
    crit = crit.to(dev, dt)
    params = crit.clusters()
    share = analytic.uniform_share(cfg)
    for N, labels in ((2048, True), (16, False)):
        hidden = torch.randn(N, cfg.d_model, device=dev, dtype=dt)
        target = torch.randint(0, cfg.vocab_size, (N,), device=dev)
        cost = analytic.adaptive_softmax(N, cfg, es, labels, "fused", share)
        for backend in ("triton", "torch"):
            def fn(backend=backend):
                with use_backend(backend), torch.no_grad():
                    if labels:
                        return ops.adaptive_nll(hidden, target, *params)
                    return ops.adaptive_log_softmax(hidden, *params)
            record("adaptive_nll" if labels else "adaptive_log_softmax", f"N{N} V{cfg.vocab_size}", backend, fn, cost)
    return rows


# ---- the analytic prediction for the wt103 protocol ----------------------------------------------
def wt103_prediction() -> dict:
    """Roofline prediction for the wt103 eval protocol on an H100, next to NVIDIA's A100 figures.

    Calibration: NVIDIA's A100 figure is set against the A100 roofline of the same (uncached,
    unfused) computation; that fraction, applied to the H100 fused roofline, is a second, less
    optimistic prediction. Both are predictions, not measurements.
    """
    from txl_fast.config import TransfoXLConfig  # noqa: PLC0415

    cfg, es = TransfoXLConfig(), 2
    share = None        # real text: most targets in the head
    rows = []
    for B in (16, 32):
        tokens = B * 128
        fused = analytic.eval_segment(cfg, B, 128, 1600, cached=True, path="fused", es=es, share=share)
        uncached = analytic.eval_segment(cfg, B, 128, 1600, cached=False, path="hf", es=es, share=share)
        a100_bound = analytic.predict_tokens_per_s(uncached, tokens, analytic.A100)
        efficiency = NVIDIA_A100[B] / a100_bound
        h100_bound = analytic.predict_tokens_per_s(fused, tokens, analytic.H100)
        rows.append(dict(
            batch=B, gflop_per_segment_cached=fused.flops / 1e9, gflop_per_segment_uncached=uncached.flops / 1e9,
            gbyte_per_segment_fused=fused.bytes / 1e9, h100_fused_roofline_tokens_per_s=h100_bound,
            h100_fused_calibrated_tokens_per_s=h100_bound * efficiency,
            h100_uncached_roofline_tokens_per_s=analytic.predict_tokens_per_s(uncached, tokens, analytic.H100),
            a100_uncached_roofline_tokens_per_s=a100_bound, nvidia_a100_tokens_per_s=NVIDIA_A100[B],
            nvidia_a100_fraction_of_roofline=efficiency,
        ))
    return dict(devices=[analytic.H100.__dict__, analytic.A100.__dict__], rows=rows)


def wt103_counts() -> list[tuple[str, float, str]]:
    """The analytic model's counts for the wt103 configuration, batch 1, fp32 (the issue's figures)."""
    from txl_fast.config import TransfoXLConfig  # noqa: PLC0415

    cfg = TransfoXLConfig()
    reads = analytic.decode_reads(cfg, 1600)
    return [
        ("eval segment, HF (uncached), GFLOP", analytic.eval_segment(cfg, cached=False, path="hf").flops / 1e9, "≈335"),
        ("eval segment, cached, GFLOP", analytic.eval_segment(cfg, cached=True).flops / 1e9, "≈88"),
        ("generated token, HF (uncached), GFLOP", analytic.generated_token(cfg, cached=False, path="hf").flops / 1e9,
         "≈246"),
        ("generated token, cached, GFLOP", analytic.generated_token(cfg, cached=True).flops / 1e9, "<1"),
        ("generated token, cached: weights read, GB", reads["weights"] / 1e9, "≈1.05"),
        ("generated token, cached: memory K/V read, GB", reads["kv"] / 1e9, "≈0.24"),
        ("generated token, cached: position keys read, GB", reads["positions"] / 1e9, "—"),
    ]


# ---- entry point ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Errors on one line, as the rest of the command line's."""

    def error(self, message):
        self.exit(2, f"txl-fast: error: {message} (see {self.prog} --help)\n")


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    p = _Parser(prog="txl-fast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the wt103 configuration (HF's default config): long")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # tests / CI smoke runs
    p.add_argument("--json", default="txl_fast_bench.json", metavar="PATH", help="results as JSON (default %(default)s)")
    p.add_argument("--plot", default="txl_fast_bench.png", metavar="PATH",
                   help="PNG plot, needs matplotlib (default %(default)s; '' for none)")
    p.add_argument("--results-md", default=None, metavar="PATH",
                   help="write/replace this command's section of a RESULTS.md")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16; float16 on CUDA")
    p.add_argument("--rounds", type=int_at_least(1), default=None, help="timed rounds per side (default: the suite's)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.full and args.tiny:
        p.error("--full and --tiny exclude each other")
    if args.threads and args.threads > (os.cpu_count() or 1):
        p.error(f"--threads {args.threads}: this machine has {os.cpu_count()} CPUs")
    # the outputs are checked before the minutes of measuring, not after
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--results-md", args.results_md)):
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            p.error(f"{flag} {path}: not a file in an existing directory")
    if args.results_md and os.path.exists(args.results_md):
        try:
            with open(args.results_md, encoding="utf-8") as f:
                f.read()
        except UnicodeDecodeError:
            p.error(f"--results-md {args.results_md} is not UTF-8 text: its section cannot be replaced")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    timed = [name for name in dtypes.supported(device) if name != "float64"]      # float64: validation only
    if args.dtype not in timed:
        p.error(f"--dtype {args.dtype} is not supported on {device}: use one of {', '.join(timed)}")
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if argv is None:                                     # python -m txl_fast.bench ...
        command = shlex.join(["python", "-m", "txl_fast.bench", *sys.argv[1:]])
    else:                                                # txl-fast bench ... (the CLI passes its argv)
        command = shlex.join(["txl-fast", "bench", *argv])
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("txl-fast bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401, PLC0415
    except ImportError:
        print("txl-fast bench: the comparison needs the peer, `pip install transformers==4.35.0`", file=sys.stderr)
        return 2
    suite = SUITES["full" if args.full else "tiny" if args.tiny else "curated"]()
    if args.rounds:
        suite.rounds = args.rounds
    dtype = getattr(torch, args.dtype)

    log("measuring this machine ...")
    machine = measure(device)
    log("  " + machine.summary())
    kernels, gpu_line = [], None
    if device == "cuda":
        log("Triton kernels vs the torch path (CUDA events, do_bench median, bf16, wt103 shapes):")
        kernels = cuda_kernels(machine, log)
    else:
        gpu_line = ("No GPU on this machine: the Triton kernels were not timed (on the CPU they run only in "
                    "the interpreter, a correctness tool); GPU figures below are predictions.")
        log(gpu_line)

    log(f"building the models ({suite.notes}) ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, hf = build_pair(suite.config, device, dtype)
    log(f"end to end, {len(suite.points)} points, {suite.rounds} rounds each, ours and HF alternated:")
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, batch, mem_len in suite.points:
            results.append(run_point(ours, hf, suite, kind, batch, mem_len, machine, device, args.dtype, log))
    del ours, hf

    report = dict(
        command=command, versions=versions(), machine=machine.as_dict(), device=device, dtype=args.dtype,
        gpu_line=gpu_line, suite={k: v for k, v in suite.__dict__.items() if k != "points"},
        results=results, kernels=kernels, wt103_counts=wt103_counts(), prediction=wt103_prediction(),
    )
    report["wall_seconds"] = time.perf_counter() - start
    report["outputs"] = dict(json=args.json or None, plot=args.plot or None)
    publish(report, args.json, args.plot, args.results_md)
    return 0 if all(r["agree"] for r in results) else 1
