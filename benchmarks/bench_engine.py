"""Ours vs HF transformers 4.35 on the wt103 configuration, each row against this machine's floor.

    python benchmarks/bench_engine.py [--dtype float32|bfloat16] [--segments 4] [--new-tokens 16] [--compile]
                                      [--batch 1 4] [--decode-batch 1 4 8] [--rounds 2] [--json PATH]

First the machine, measured in the same run (``txl_fast.bench.machine``: CPU flags, fp32 and bf16
matmul rates, read bandwidth), printed as one line. Then the same random weights on both sides (HF
model -> save_pretrained -> txl_fast from_pretrained), both in ``--dtype`` (HF cast to it), the
paper's wt103 protocol (tgt_len 128, mem_len 1600, clamp_len 1000, same_length), both warmed up,
runs alternated (ours, HF, ours, HF, ...), medians. Every row: our time, HF's, the ratio, the floor
(the machine's time for the work ours cannot avoid: FLOPs / the matmul rate of the dtype for
evaluation and prompts, bytes / the read bandwidth for a decode step; ``txl_fast.bench.floor``) and
our fraction of it. The rates of a row's floor are measured beside it: a 2048^3 matmul in the dtype
and a read (``sum``) of each of our model's large weights, the pages a decode step reads, called in
turn with the row's runs, best of them (``Probes``). The machine line's own buffer is not used for
the floor: on the development machine a separately allocated buffer read 20-40 % faster or slower
than the weights from one allocation to the next.

Rows: evaluation in the steady state of a long stream (our cache first runs enough untimed segments
to fill its memory with real tokens; HF's work per segment does not depend on what its memory holds,
so it runs from its zero memory), and our first segments on HF's zero memory (whose rows we score
in closed form); greedy generation after a 128-token prompt on the zero memory (HF's ``generate``;
the greedy tokens of both sides compared); a decode step with a memory full of real tokens (ours:
after a prompt of mem_len tokens; HF: one token forward with mem_len rows of memory, which costs
HF the same whatever they hold) at each ``--decode-batch``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch

import txl_fast
from txl_fast.bench import analytic
from txl_fast.bench.floor import fraction
from txl_fast.bench.harness import build_pair, hf_generate, hf_nll
from txl_fast.bench.machine import alternated_times, measure
from txl_fast.bench.report import format_ms

warnings.filterwarnings("ignore")
TINY = dict(vocab_size=500, cutoffs=[100, 250], d_model=32, d_embed=32, n_head=2, d_head=16, d_inner=64,
            div_val=2, n_layer=2, mem_len=16, clamp_len=20, same_length=True, dropout=0.0)


def ours_eval(model, data, tgt_len, segments, cache=None):
    """``segments`` segments of ``data`` on ``cache`` (a fresh zero-memory one when None)."""
    cache = cache if cache is not None else model.new_cache(data.shape[0], "zeros", step_hint=tgt_len)
    with torch.no_grad():
        for s in range(segments):
            ids = data[:, s * tgt_len : (s + 1) * tgt_len]
            hidden = model.transformer(ids, cache=cache).last_hidden_state
            txl_fast.ops.adaptive_nll(hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1),
                                      *model.crit.clusters())
    return cache


def ours_decode(model, cache, token, steps):
    """``steps`` greedy decode steps (forward and next-token choice) on ``cache``."""
    with torch.no_grad():
        for _ in range(steps):
            hidden = model.transformer(token, cache=cache).last_hidden_state
            token = txl_fast.inference.choose_next(model.crit, hidden[:, -1], False, 1.0, 0, 1.0, None)[:, None]


def hf_decode(hf, token, mems, steps):
    """``steps`` of HF's greedy step on a full memory: one token forward (full log-probs), the argmax."""
    with torch.no_grad():
        for _ in range(steps):
            token = hf(token, mems=mems).prediction_scores[:, -1].argmax(-1, keepdim=True)


class Probes:
    """The machine measured beside every row: a square matmul in the dtype and a read of the
    tensors ``read`` (our weights), called in turn with the row's sides, so that a row's floor uses
    the rates the machine gave while that row ran (a load that comes and goes hits both)."""

    def __init__(self, dtype: torch.dtype, square: int, read: list):
        self.a, self.b = torch.randn(square, square).to(dtype), torch.randn(square, square).to(dtype)
        self.read = read
        self.flops, self.bytes = 2.0 * square**3, sum(t.numel() * t.element_size() for t in read)
        self.sides = {"matmul probe": lambda: self.a @ self.b, "read probe": self.read_all}
        for fn in self.sides.values():                                      # warm-up
            fn()

    def read_all(self) -> None:
        for t in self.read:
            t.sum()

    def rates(self, times: dict) -> tuple[float, float]:
        """(matmul FLOP/s, read bytes/s): the best of the row's probe runs."""
        return self.flops / min(times["matmul probe"]), self.bytes / min(times["read probe"])


def alternated(sides: dict, rounds: int, probes: Probes) -> tuple[dict, tuple[float, float]]:
    """Median seconds of each side's call and the probes' rates, all called in turn for ``rounds`` rounds."""
    times = alternated_times({**sides, **probes.sides}, reps=rounds, warmup=0)
    return {name: statistics.median(times[name]) for name in sides}, probes.rates(times)


def row(name, unit, ours_s, hf_s, floor_s, rates):
    return dict(workload=name, unit=unit, ours_s=ours_s, hf_s=hf_s, ratio=hf_s / ours_s, floor_s=floor_s,
                fraction_of_floor=fraction(floor_s, ours_s), matmul_flops_per_s=rates[0], read_bytes_per_s=rates[1])


def format_rows(rows) -> str:
    lines = ["| workload | txl_fast ms | HF 4.35 ms (same dtype) | ratio | floor ms | ours of floor "
             "| rates beside it |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} ({r['unit']}) | {format_ms(r['ours_s'])} | {format_ms(r['hf_s'])} "
                     f"| {r['ratio']:.1f}× | {format_ms(r['floor_s'])} | {r['fraction_of_floor']:.0%} "
                     f"| {r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, {r['read_bytes_per_s'] / 1e9:.1f} GB/s |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="both sides (default: %(default)s)")
    p.add_argument("--segments", type=int, default=4, help="evaluation segments per timed run")
    p.add_argument("--new-tokens", type=int, default=16, help="generated tokens per timed run")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 4], help="evaluation batch sizes")
    p.add_argument("--decode-batch", type=int, nargs="*", default=[1, 4, 8],
                   help="decode-step batch sizes (each fills a memory of mem_len real tokens first)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="our decode steps' attention compiled (txl_fast.use_cpu_compile): the generation and decode rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="write the machine and the rows as JSON")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)       # tests: a tiny model, seconds
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with txl_fast.use_cpu_compile(args.compile):        # no C++ compiler: refused before any work
        return run(args)


def run(args) -> int:
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()          # HF's generate reminder about max_length

    dtype, es = getattr(torch, args.dtype), 2 if args.dtype == "bfloat16" else 4
    if args.tiny:
        machine = measure("cpu", reps=1, square=256, read_bytes=16 * 2**20, shapes=((16, 64, 32),))
    else:
        machine = measure("cpu")
    print(f"machine: {machine.summary()}", flush=True)
    ours, hf = build_pair(TINY if args.tiny else {}, "cpu", dtype)
    cfg, tgt = ours.config, 8 if args.tiny else 128
    weights = [p.detach() for p in ours.parameters() if p.numel() * p.element_size() >= 2**20]   # a decode step's pages
    probes = Probes(dtype, 256, [torch.ones(2**22)]) if args.tiny else Probes(dtype, 2048, weights)
    share = analytic.uniform_share(cfg)                                     # random ids: uniform over the vocabulary
    params = sum(p.numel() for p in ours.parameters())
    print(f"{'tiny test' if args.tiny else 'wt103'} configuration ({params / 1e6:.0f}M parameters), {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers {transformers.__version__}; "
          f"tgt_len {tgt}, mem_len {cfg.mem_len}, clamp_len {cfg.clamp_len}, same_length {cfg.same_length}; "
          f"medians of {args.rounds} alternated rounds"
          f"{'; our decode steps compiled (use_cpu_compile)' if args.compile else ''}", flush=True)
    rows = []
    fill = -(-cfg.mem_len // tgt)                                   # segments that fill the memory
    for bsz in args.batch:
        data = torch.randint(0, cfg.vocab_size, (bsz, tgt * max(args.segments, fill) + 1))    # + the last target
        full = ours_eval(ours, data, tgt, fill)                     # warm-up, and a memory of real tokens
        hf_nll(hf, data, tgt, 2)
        t, rates = alternated({"ours": lambda: ours_eval(ours, data, tgt, args.segments, full),
                               "hf": lambda: hf_nll(hf, data, tgt, args.segments),
                               "zero": lambda: ours_eval(ours, data, tgt, args.segments)}, args.rounds, probes)
        rate = rates[0]
        n = args.segments
        steady = analytic.eval_floor_flops(cfg, bsz, tgt, cfg.mem_len, n, es=es, share=share) / rate
        zero = analytic.eval_floor_flops(cfg, bsz, tgt, cfg.mem_len, n, first_real=0, es=es, share=share) / rate
        rows.append(row(f"eval, batch {bsz}, memory full", "per segment", t["ours"] / n, t["hf"] / n, steady / n,
                        rates))
        first = f"first {n} segment{'s' if n > 1 else ''}"
        rows.append(row(f"eval, batch {bsz}, {first} on the zero memory", "per segment", t["zero"] / n, t["hf"] / n,
                        zero / n, rates))
    prompt = torch.randint(0, cfg.vocab_size, (1, tgt))
    gen = {"ours": lambda: ours.generate(prompt, args.new_tokens),
           "hf": lambda: hf_generate(hf, prompt, args.new_tokens)}
    tokens = {name: fn()[0, tgt:] for name, fn in gen.items()}          # warm-up, and the check
    both = min(len(tokens["ours"]), len(tokens["hf"]))                  # HF stops early at its eos (id 0)
    same = int((tokens["ours"][:both] == tokens["hf"][:both]).sum())
    t, rates = alternated(gen, args.rounds, probes)
    floor = analytic.generate_floor_seconds(cfg, 1, tgt, args.new_tokens, cfg.mem_len, *rates, es)
    k = args.new_tokens
    rows.append(row(f"greedy generation, {tgt}-token prompt on the zero memory, {k} new, batch 1", "per new token",
                    t["ours"] / k, t["hf"] / k, floor / k, rates))
    steps = max(2, args.new_tokens // 2)
    for bsz in args.decode_batch:
        cache = ours.new_cache(bsz, "zeros", step_hint=1)
        with torch.no_grad():
            ours.transformer(torch.randint(0, cfg.vocab_size, (bsz, cfg.mem_len)), cache=cache)
        mems = [torch.randn(cfg.mem_len, bsz, cfg.d_model, dtype=dtype) for _ in range(cfg.n_layer)]
        token = torch.randint(0, cfg.vocab_size, (bsz, 1))
        ours_decode(ours, cache, token, 1)                                   # warm-up
        t, rates = alternated({"ours": lambda: ours_decode(ours, cache, token, steps),
                               "hf": lambda: hf_decode(hf, token, mems, steps)}, args.rounds, probes)
        need = sum(analytic.decode_step_reads(cfg, cfg.mem_len, bsz, es).values())
        rows.append(row(f"greedy decode step, memory full ({cfg.mem_len} real tokens), batch {bsz}", "per step",
                        t["ours"] / steps, t["hf"] / steps, need / rates[1], rates))
    print()
    print(format_rows(rows))
    print(f"\ngreedy tokens identical to HF's: {same}/{k} (generation row; {args.dtype})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(machine=machine.as_dict(), dtype=args.dtype, rows=rows, greedy_identical=[same, k],
                           argv=vars(args)), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
