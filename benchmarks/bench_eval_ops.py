"""Where a cached evaluation segment's time goes, op by op, against this machine's matmul rate.

    python benchmarks/bench_eval_ops.py [--batch 1 4] [--dtype float32 bfloat16] [--rounds 3] [--against REV]

The wt103 configuration (HF's default TransfoXLConfig, random weights) in the evaluation protocol:
tgt_len 128, mem_len 1600, clamp_len 1000, same_length, the memory full (1600 rows of random keys
and values written into the inference cache: the work of a segment does not depend on what they
hold; the timed segments then slide it as a long stream does), the NLL of every token of random ids.

First line: the machine. Then per dtype and batch: this machine's matmul rate in that dtype, measured
in every round between the segments (the machine is shared: the two drift together), at the four
128·B-row products of a segment (q/k/v, o, ff1, ff2; the faster of ``F.linear`` and
``ops.linear``'s ``split_linear`` each, both shown; their FLOPs over their summed times) and at
2048³, medians; the larger of the two is "the rate". The segment's time (median of --rounds,
alternated with --against's when given), and each op class timed apart over the 18 layers' own
weights and caches (so each reads what it reads inside a segment), its matmul FLOPs, GFLOP/s and
fraction of the rate. The attention's content scores, softmax and values are its whole time less
the position term's. "overhead" is the segment's time less the ops' sum (Python, views, the
cache's moves, and what the replays do not reproduce: caches and the allocator's state).
FLOPs are the products' (2 per multiply-add), counted as ``txl_fast.bench.analytic`` does: the
content scores and values dense over the keys, the position scores over the clamp_len + 1
distinct distances, the adaptive softmax's head for every token and each tail cluster for its own
tokens. ``--against REV`` also times the segment with ``txl_fast/ops/{linear, rel_attention,
adaptive_softmax}.py`` as they are at git revision REV (loaded from git, swapped in for the
alternate rounds): the before/after of a change to those files.
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import subprocess
import types

import torch
import torch.nn.functional as F

import txl_fast
from txl_fast import dtypes, ops
from txl_fast.bench import analytic
from txl_fast.bench.machine import alternated_times, cpu_name, flags_line, median_time
from txl_fast.ops.linear import split_linear

REPO = pathlib.Path(__file__).resolve().parents[1]
TGT, MEM = 128, 1600
SWAPPED = ("linear", "rel_attention", "adaptive_nll")        # the txl_fast.ops functions --against replaces
ORDER = ("embedding", "q/k/v projection", "cache write", "attention: position scores + mask",
         "attention: content, softmax, values", "o projection", "add + layer norm (2)", "ff1 + relu", "ff2",
         "adaptive softmax NLL")


def matmul_rate(cfg, batch: int, dtype) -> tuple[float, float, float, dict]:
    """(the rate, rate at the segment's 128·B-row products, rate at 2048³) in FLOP/s for ``dtype``, and
    {product: (F.linear's, split_linear's FLOP/s)} at those products."""
    rows, d, hd = TGT * batch, cfg.d_model, cfg.n_head * cfg.d_head
    shapes = {"q/k/v": (d, 3 * hd, False), "o": (hd, d, False), "ff1": (d, cfg.d_inner, True),
              "ff2": (cfg.d_inner, d, True)}
    flops = seconds = 0.0
    each = {}
    for name, (k, n, bias) in shapes.items():
        x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        b = torch.randn(n, dtype=dtype) if bias else None
        threads = torch.get_num_threads()
        times = (median_time(lambda: F.linear(x, w, b)), median_time(lambda: split_linear(x, w, b, threads)))
        each[name] = tuple(2.0 * rows * k * n / t for t in times)
        seconds += min(times)
        flops += 2.0 * rows * k * n
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    square = 2.0 * 2048**3 / median_time(lambda: torch.mm(a, b))
    return max(flops / seconds, square), flops / seconds, square, each


def build(dtype, batch: int):
    torch.manual_seed(0)
    model = txl_fast.TransfoXLLMHeadModel(txl_fast.TransfoXLConfig()).eval().to(dtype)
    tr, cfg = model.transformer, model.config
    cache = tr.new_cache(batch, "empty", step_hint=TGT)
    for kv in cache.layers:
        kv.extend(*(torch.randn(batch, MEM, cfg.n_head, cfg.d_head, dtype=dtype) for _ in range(2)))
    cache.commit(MEM)
    return model, cache


def segment_fn(model, cache, ids):
    """One segment of the protocol: the cached forward and the NLL of its tokens."""
    tr = model.transformer

    def segment():
        hidden = tr(ids[:, :-1], cache=cache).last_hidden_state                     # (B, 128, d)
        return ops.adaptive_nll(hidden.reshape(-1, tr.d_model), ids[:, 1:].reshape(-1), *model.crit.clusters())
    return segment


def op_classes(model, cache, ids):
    """{name: (fn timing the op class over all layers, its matmul FLOPs)} on a segment's inputs."""
    tr, cfg = model.transformer, model.config
    B, Lq = ids.shape[0], ids.shape[1] - 1
    H, D, d, di = cfg.n_head, cfg.d_head, cfg.d_model, cfg.d_inner
    rows, Lk, Lr = B * Lq, MEM + Lq, cfg.clamp_len + 1
    layers = list(tr.layers)
    attn = [layer.dec_attn for layer in layers]
    h = tr.word_emb(ids[:, :-1])                                                     # (B, Lq, d)
    window = tr.attention_window(Lq, MEM)
    positions = tr.position_keys(Lk, Lq, written_out=False)
    heads = [ops.linear(h, a.qkv_net.weight).view(B, Lq, 3, H, D).unbind(2) for a in attn]
    kvs = [kv.extend(k, v) for kv, (_, k, v) in zip(cache.layers, heads)]           # (B, Lk, H, D) views
    inner = torch.relu(ops.linear(h, layers[0].pos_ff.CoreNet[0].weight, layers[0].pos_ff.CoreNet[0].bias))
    attn_out = torch.randn_like(h)

    def each(fn):
        return lambda: [fn(i) for i in range(len(layers))]

    def attention(i):
        q, (k, v), a = heads[i][0], kvs[i], attn[i]
        return ops.rel_attention(q, k, v, positions[i], a.r_w_bias, a.r_r_bias, scale=a.scale, window=window)

    def position_only(q, k, v, r, r_w_bias, r_r_bias, scale, window, uniform_keys=0, **_):
        ops.rel_attention.__globals__["_position_mask"](q, r, r_r_bias, scale, k.shape[1], window, uniform_keys)
        return q.new_empty(q.shape)

    def position(i):
        names = ops.rel_attention.__globals__         # the module of the rel_attention in use
        saved, names["torch_fused_out"] = names["torch_fused_out"], position_only
        try:
            return attention(i)
        finally:
            names["torch_fused_out"] = saved

    targets = ids[:, 1:].reshape(-1)
    clusters = model.crit.clusters()
    weights, _, projs = clusters[:3]
    cluster_of = torch.bucketize(targets, torch.tensor(model.crit.cutoffs[:-1]), right=True)
    softmax_flops = 0.0
    for c, (w, proj) in enumerate(zip(weights, projs)):       # head: every token, its words and the C clusters
        n = rows if c == 0 else int((cluster_of == c).sum())
        size, width = w.shape[0] + (len(weights) - 1 if c == 0 else 0), w.shape[1]
        softmax_flops += 2.0 * n * width * size + (2.0 * n * d * width if proj is not None else 0.0)
    L = len(layers)
    ff1, ff2 = ([layer.pos_ff.CoreNet[i] for layer in layers] for i in (0, 3))
    return {
        "embedding": (lambda: tr.word_emb(ids[:, :-1]), 0.0),
        "q/k/v projection": (each(lambda i: ops.linear(h, attn[i].qkv_net.weight)), L * 2.0 * rows * d * 3 * H * D),
        "cache write": (each(lambda i: cache.layers[i].extend(heads[i][1], heads[i][2])), 0.0),
        "attention: position scores + mask": (each(position), L * 2.0 * B * H * Lq * Lr * D),
        "attention (all)": (each(attention), L * 2.0 * B * H * Lq * (2 * Lk + Lr) * D),
        "o projection": (each(lambda i: ops.linear(attn_out, attn[i].o_net.weight)), L * 2.0 * rows * H * D * d),
        "add + layer norm (2)": (each(lambda i: [layers[i].dec_attn.layer_norm(h + attn_out),
                                                 layers[i].pos_ff.layer_norm(h + attn_out)]), 0.0),
        "ff1 + relu": (each(lambda i: torch.relu(ops.linear(h, ff1[i].weight, ff1[i].bias))), L * 2.0 * rows * d * di),
        "ff2": (each(lambda i: ops.linear(inner, ff2[i].weight, ff2[i].bias)), L * 2.0 * rows * di * d),
        "adaptive softmax NLL": (lambda: ops.adaptive_nll(h.reshape(-1, d), targets, *clusters), softmax_flops),
    }


@contextlib.contextmanager
def swapped(functions: dict | None):
    """Run with txl_fast.ops's functions replaced by ``functions`` (None: as they are)."""
    saved = {name: getattr(ops, name) for name in SWAPPED}
    try:
        for name, fn in (functions or {}).items():
            setattr(ops, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def load_revision(rev: str) -> dict:
    """ops.linear, ops.rel_attention and ops.adaptive_nll as their files are at git revision ``rev``."""
    loaded = {}
    for name in ("linear", "rel_attention", "adaptive_softmax"):
        source = subprocess.run(["git", "show", f"{rev}:txl_fast/ops/{name}.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        module = types.ModuleType(f"{name}_at_{rev}")
        exec(compile(source, f"{rev}:txl_fast/ops/{name}.py", "exec"), module.__dict__)  # noqa: S102 (our own file)
        loaded[name] = module
    loaded["adaptive_softmax"].linear = loaded["linear"].linear          # it imported today's at exec
    return {"linear": loaded["linear"].linear, "rel_attention": loaded["rel_attention"].rel_attention,
            "adaptive_nll": loaded["adaptive_softmax"].adaptive_nll}


def report(dtype, batch: int, rounds: int, against: dict | None, rev: str) -> None:
    model, cache = build(dtype, batch)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, TGT + 1))
    variants = {"now": None} if against is None else {"now": None, rev: against}
    rates = []
    with torch.no_grad():
        segment = segment_fn(model, cache, ids)

        def under(functions):
            def run():
                with swapped(functions):
                    segment()
            return run

        # a warm-up round (position keys, first touches), then the variants alternated, the rate after each round
        times = alternated_times({name: under(functions) for name, functions in variants.items()}, reps=rounds,
                                 after_round=lambda: rates.append(matmul_rate(cfg, batch, dtype)))
        errors = {}
        for name, functions in variants.items():     # the NLL of the last segment's hidden states vs float64
            with swapped(functions):
                hidden = model.transformer(ids[:, :-1], cache=cache).last_hidden_state.reshape(-1, cfg.d_model)
                nll = ops.adaptive_nll(hidden, ids[:, 1:].reshape(-1), *model.crit.clusters())
            wide = [[None if t is None else t.double() for t in c] if isinstance(c, list) else c.double()
                    for c in model.crit.clusters()]
            exact = ops.adaptive_nll(hidden.double(), ids[:, 1:].reshape(-1), *wide)
            errors[name] = (nll.double() - exact).mean().item(), exact.mean().item()
        breakdowns = {}
        for name, functions in variants.items():
            with swapped(functions):
                breakdowns[name] = {op: (median_time(fn, reps=3), flops)
                                    for op, (fn, flops) in op_classes(model, cache, ids).items()}
    rate, at_rows, square = (statistics.median(r[i] for r in rates) for i in range(3))
    products = {name: [statistics.median(r[3][name][i] for r in rates) / 1e9 for i in range(2)] for name in rates[0][3]}
    share = [float(s) for s in torch.bincount(torch.bucketize(ids[:, 1:].reshape(-1),
                                                              torch.tensor(model.crit.cutoffs[:-1]), right=True),
                                              minlength=len(cfg.cutoffs) + 1) / ids[:, 1:].numel()]
    analytic_flops = analytic.eval_segment(cfg, batch, cached=True, path="torch", share=share).flops
    label = str(dtype).replace("torch.", "")
    print(f"\n{label}, batch {batch}: matmul {at_rows / 1e9:.0f} GFLOP/s at the segment's products, "
          f"{square / 1e9:.0f} at 2048³ (medians of {rounds}, measured between the segments): the rate "
          f"{rate / 1e9:.0f} GFLOP/s; F.linear / split_linear: "
          + ", ".join(f"{name} {f:.0f} / {split:.0f}" for name, (f, split) in products.items()))
    for name in variants:
        seconds = statistics.median(times[name])
        ops_ = breakdowns[name]
        total, position = ops_.pop("attention (all)"), ops_["attention: position scores + mask"]
        ops_["attention: content, softmax, values"] = (total[0] - position[0], total[1] - position[1])
        flops = sum(f for _, f in ops_.values())
        print(f"\n{label}, batch {batch}, {name}: segment {seconds * 1e3:.0f} ms (median of {rounds}: "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times[name])}), {flops / 1e9:.1f} GFLOP of products "
              f"(analytic, elementwise included: {analytic_flops / 1e9:.1f}), {flops / seconds / 1e9:.0f} GFLOP/s "
              f"= **{flops / seconds / rate:.0%} of the matmul rate**, {batch * TGT / seconds:.0f} tokens/s; "
              f"mean NLL {errors[name][1]:.3f}, off by {errors[name][0]:+.1e} nats against the same hidden "
              f"states and weights in float64\n")
        print("| op (18 layers) | ms | share | GFLOP | GFLOP/s | of the rate |")
        print("|---|---:|---:|---:|---:|---:|")
        for op in ORDER:
            t, f = ops_[op]
            speed = f"{f / t / 1e9:.0f} | {f / t / rate:.0%}" if f else "- | -"
            print(f"| {op} | {t * 1e3:.1f} | {t / seconds:.0%} | {f / 1e9:.2f} | {speed} |")
        overhead = seconds - sum(t for t, _ in ops_.values())
        print(f"| overhead (segment less the above) | {overhead * 1e3:.1f} | {overhead / seconds:.0%} | | | |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--against", metavar="REV", help="also time the segment with the ops files of this git revision")
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = txl_fast.TransfoXLConfig()
    against = load_revision(args.against) if args.against else None
    print(f"{cpu_name()} ({flags_line(dtypes.cpu_flags())}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for dt in args.dtype:
        for b in args.batch:
            report(getattr(torch, dt), b, args.rounds, against, args.against)


if __name__ == "__main__":
    main()
