"""Next-token selection on the wt103 output layer (267,735 words, cutoffs 20k/40k/200k, div_val 4,
d 1024), CPU, fp32: the full log-probs + argmax / top-k (what HF and our log_prob path do) against
ops.adaptive_topk. Random weights; ``--tail-bias`` shifts the cluster logits: with -5 (the tails
rarely win, as with a trained model on ordinary text) the tails are skipped; with +5 every tail is
scanned (the worst case). Medians of alternated runs.

    python benchmarks/bench_next_token.py --batch 1 8 --rounds 20
"""
import argparse
import statistics

import torch

from txl_fast import ops
from txl_fast.bench.machine import alternated_times
from txl_fast.modules import ProjectedAdaptiveLogSoftmax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 40])
    args = ap.parse_args()
    torch.manual_seed(0)
    crit = ProjectedAdaptiveLogSoftmax(267735, 1024, 1024, [20000, 40000, 200000], div_val=4)
    for p in crit.parameters():
        torch.nn.init.normal_(p, std=0.02)
    clusters = crit.clusters()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| batch | k | cluster logits | full log-probs + topk (ms) | adaptive_topk (ms) | ratio |")
    print("|---:|---:|---|---:|---:|---:|")
    with torch.no_grad():
        for tail_bias, label in ((-5.0, "tails lose (skipped)"), (5.0, "tails win (all scanned)")):
            crit.cluster_bias.fill_(tail_bias)
            for b in args.batch:
                h = torch.randn(b, 1024)
                for k in args.k:
                    full = lambda: crit.log_prob(h).topk(k, dim=1)  # noqa: E731
                    fast = lambda: ops.adaptive_topk(h, k, *clusters)  # noqa: E731
                    ref, got = full(), fast()
                    assert torch.equal(ref.indices, got[1]), "selection differs"
                    times = alternated_times({"full": full, "fast": fast}, reps=args.rounds, warmup=0)   # warmed above
                    tf, tq = (statistics.median(times[n]) * 1e3 for n in ("full", "fast"))
                    print(f"| {b} | {k} | {label} | {tf:.1f} | {tq:.1f} | {tf / tq:.1f}x |")


if __name__ == "__main__":
    main()
