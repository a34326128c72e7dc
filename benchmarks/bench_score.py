"""Scoring throughput: ``txl_fast.score`` (documents, per-token log-probabilities) against
``evaluate`` on the same tokens and batch, each against this machine's matmul floor.

    python benchmarks/bench_score.py [--batch 8] [--tgt-len 64] [--rounds 5] [--wt103-tokens 0]

The embedded model's held-out text cut into documents of 3-40 lines (seeded), so that documents
end at every offset of a segment: ``score`` reads them batch-wise, a row taking the next document
when its own ends (its memory hidden from it, the rest of its last segment padding); ``evaluate``
reads the same tokens as one stream cut into ``--batch`` contiguous rows, no padding, no mask. The
protocol is the model's stored one (its training's, ``metrics.json``) with ``--tgt-len``. Runs
alternated after a warm-up, best of ``--rounds``; the floor is the FLOPs of ``evaluate``'s
segments, their real lengths and memory (``txl_fast.bench.analytic``), over the fp32 matmul rate
measured in the same run (the best of the machine line's and of a 2048^3 product timed after each
round).
``--wt103-tokens N``: also the wt103 configuration (random weights, random ids) on N tokens per
row, the paper's protocol.
"""
from __future__ import annotations

import argparse
import json
import random

import torch

import txl_fast
from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel, TransfoXLTokenizer, evaluate
from txl_fast.bench import analytic
from txl_fast.bench.floor import fraction
from txl_fast.bench.machine import alternated_times, measure, time_call
from txl_fast.score import score


def embedded_documents(seed: int = 0):
    """The embedded model and its held-out text as documents of 3-40 lines, ids with <eos> per line."""
    path = txl_fast.default_model_path()
    model, tok = TransfoXLLMHeadModel.from_pretrained(path), TransfoXLTokenizer.from_pretrained(path)
    lines = (path / "heldout.txt").read_text(encoding="utf-8").splitlines()
    rng, docs, i = random.Random(seed), [], 0
    while i < len(lines):
        n = rng.randint(3, 40)
        docs.append([t for line in lines[i : i + n] for t in tok.encode(line, add_eos=True)])
        i += n
    protocol = json.loads((path / "metrics.json").read_text())["eval_protocol"]
    return model, docs, tok.eos_token_id, protocol


def evaluate_flops(cfg, stream: torch.Tensor, batch: int, tgt_len: int, mem_len: int) -> float:
    """FLOPs of evaluate's cached segments over ``stream`` in ``batch`` rows from an empty memory
    (the torch path, NLL): segments of tgt_len (the last one shorter), the memory growing to at most
    mem_len (evaluate caps it at a row's length), the adaptive softmax's clusters taken as often as
    the stream's tokens fall in them."""
    bounds = torch.tensor([*cfg.cutoffs, cfg.vocab_size])
    share = (torch.bucketize(stream, bounds, right=True).bincount(minlength=len(bounds)) / stream.numel()).tolist()
    rows = stream.numel() // batch
    mem_len, flops, mlen = min(mem_len, rows), 0.0, 0
    for start in range(0, rows - 1, tgt_len):
        qlen = min(tgt_len, rows - 1 - start)
        flops += analytic.segment(cfg, batch, qlen, mlen, cached=True, path="torch", share=share).flops
        mlen = min(mlen + qlen, mem_len)
    return flops


def compare(model, docs, context_id, protocol, batch, rounds, rate):
    """Alternated best-of-``rounds`` seconds of score and of evaluate on the same tokens; a result row."""
    stream = torch.tensor([t for d in docs for t in d])
    proto = {k: protocol[k] for k in ("tgt_len", "mem_len", "clamp_len", "same_length")}
    init = protocol.get("init_mems", "empty")
    square, probes = torch.randn(2048, 2048), []

    def probe():                        # the matmul rate beside the runs: the best of it and the machine line's
        probes.append(2 * 2048**3 / min(time_call(lambda: torch.mm(square, square))[0] for _ in range(2)))

    times = alternated_times({
        "score": lambda: score(model, docs, batch_size=batch, init_mems=init, context_id=context_id, **proto),
        "evaluate": lambda: evaluate(model, stream, batch_size=batch, init_mems=init, progress=False, **proto),
    }, reps=rounds, after_round=probe)
    rate = max(rate, *probes)
    floor_s = evaluate_flops(model.config, stream, batch, proto["tgt_len"], proto["mem_len"]) / rate
    best = {k: min(v) for k, v in times.items()}
    return {"documents": len(docs), "tokens": stream.numel(), "batch": batch, **proto,
            "score_tokens_per_s": stream.numel() / best["score"], "evaluate_tokens_per_s": stream.numel() / best["evaluate"],
            "ratio": best["evaluate"] / best["score"], "floor_ms": 1e3 * floor_s, "rate": rate,
            "score_of_floor": fraction(floor_s, best["score"]), "evaluate_of_floor": fraction(floor_s, best["evaluate"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--wt103-tokens", type=int, default=0, help="tokens per row of the wt103 case (0: none)")
    args = p.parse_args(argv)
    machine = measure()
    rate = machine.matmul_rate("float32")
    print(f"machine: {machine.summary()}")
    model, docs, eos, protocol = embedded_documents()
    protocol["tgt_len"] = args.tgt_len
    results = [("embedded model, held-out text", compare(model, docs, eos, protocol, args.batch, args.rounds, rate))]
    if args.wt103_tokens:
        torch.manual_seed(0)
        wt103 = TransfoXLLMHeadModel(TransfoXLConfig()).eval()
        rng = random.Random(1)
        lengths = [rng.randint(args.wt103_tokens // 4, args.wt103_tokens) for _ in range(2 * args.batch)]
        docs = [torch.randint(0, wt103.config.vocab_size, (n,)).tolist() for n in lengths]
        results.append(("wt103 configuration, random ids", compare(
            wt103, docs, 0, dict(tgt_len=128, mem_len=1600, clamp_len=1000, same_length=True), args.batch,
            args.rounds, rate)))
    print("\n| text | documents | tokens | batch | tgt_len / mem_len | score tokens/s | evaluate tokens/s | "
          "score / evaluate | floor ms | score of floor | evaluate of floor | fp32 matmul GFLOP/s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results:
        print(f"| {name} | {r['documents']} | {r['tokens']:,} | {r['batch']} | {r['tgt_len']} / {r['mem_len']} | "
              f"{r['score_tokens_per_s']:,.0f} | {r['evaluate_tokens_per_s']:,.0f} | {r['ratio']:.2f}× | "
              f"{r['floor_ms']:.0f} | {r['score_of_floor']:.0%} | {r['evaluate_of_floor']:.0%} | {r['rate'] / 1e9:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
