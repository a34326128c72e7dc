"""The cached decode step against the machine's read bandwidth, op class by op class.

    python benchmarks/bench_decode.py [--dtype float32 bfloat16] [--batch 1 4] [--rounds 7] [--compare] [--compile]

wt103 configuration (HF's default TransfoXLConfig, 285M parameters, mem_len 1600, clamp_len 1000,
same_length), random weights, 2 threads, the torch backend. The memory is full: each layer's cache
holds mem_len rows of random keys and values (a step's cost does not depend on their values), so
every step reads all of them, and the position keys are the clamp_len + 1 distinct rows. A step
is ``inference.decode_step`` for greedy decoding: embedding, 18 layers, the next token
(``ops.adaptive_topk``).

The first line is the machine: CPU, threads, and the read bandwidth, ``x.sum()`` over a 600 MB
fp32 buffer, measured between the timings of the same run (median). Then per dtype and batch, the
step replayed op class by op class over the 18 layers in sequence (so each weight comes from
memory, as in a step), the classes alternated round by round with the whole step, medians: ms,
bytes it must read, GB/s, and its fraction of the floor (bytes / bandwidth over its time). The
rest of the step (Python, dispatch, the views and bookkeeping between the ops) is the step less
the sum of the classes. ``--compare`` times instead the whole step against the previous decode
path (before packed weights, the decode branch of ``ops.rel_attention`` and unsplit bf16 rows:
``before()``), alternated step by step; with ``--compile``, the eager step as it is now against the
step whose attention is compiled (``backend.use_cpu_compile``, ``ops.compiled_decode``; alone,
``--compile`` runs the op table so). Bytes: the weights (qkv_net, o_net, both feed-forward
layers, layer norms), the cached keys and values (B x (mem_len + 1) rows x d_model, each twice), the position keys (one
(clamp_len + 1, d_model) block per layer, shared by the batch: r_net is not re-read, its
projection is cached), the head cluster and its projection, and a tail cluster only when the
step scans it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import statistics
from unittest import mock

import torch

import txl_fast
from txl_fast import backend, dtypes, ops
from txl_fast.inference import candidates, decode_step
from txl_fast.bench.machine import alternated_times, cpu_name, flags_line, time_call
from txl_fast.cache import NOT_PACKED, trusted_token_ids

topk_module = importlib.import_module("txl_fast.ops.adaptive_topk")
linear_module = importlib.import_module("txl_fast.ops.linear")
attention_module = importlib.import_module("txl_fast.ops.rel_attention")


class Bandwidth:
    """Read bandwidth, ``x.sum()`` over a 600 MB fp32 buffer, sampled between the timings."""

    def __init__(self):
        self.buffer = torch.randn(150_000_000)
        self.samples: list[float] = []

    def sample(self) -> None:
        seconds, _ = time_call(self.buffer.sum)
        self.samples.append(self.buffer.numel() * 4 / seconds / 1e9)

    @property
    def gbps(self) -> float:
        return statistics.median(self.samples)


def full_cache(transformer, bsz: int, dtype):
    """A cache whose memory holds mem_len rows of random keys and values in every layer."""
    cache = transformer.new_cache(bsz, "empty", step_hint=1)
    M, H, D = transformer.mem_len, transformer.n_head, transformer.d_head
    g = torch.Generator().manual_seed(0)
    for kv in cache.layers:
        kv.extend(torch.randn(bsz, M, H, D, generator=g).to(dtype), torch.randn(bsz, M, H, D, generator=g).to(dtype))
    cache.commit(M)
    return cache


def op_classes(model, cache, bsz: int, dtype) -> dict:
    """Each op class of a decode step over the 18 layers: name -> (run(), bytes read)."""
    tr, crit = model.transformer, model.crit
    layers, H, D, d = tr.layers, tr.n_head, tr.d_head, tr.d_model
    es = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(1)
    h = torch.randn(bsz, 1, d, generator=g).to(dtype)
    heads = torch.randn(bsz, 1, 3, H, D, generator=g).to(dtype)
    q, k_new, v_new = heads.unbind(2)
    inner = torch.randn(bsz, 1, tr.config.d_inner, generator=g).to(dtype)
    mlen = cache.mlen
    window = tr.attention_window(1, mlen)
    positions = tr.position_keys(mlen + 1, 1, written_out=False)
    ids = torch.randint(tr.n_token, (bsz, 1), generator=g)
    packed = (tr.inference_state.packed.get([layer.decode_weights() for layer in layers], bsz)   # as the step
              or [NOT_PACKED] * len(layers))                                                       # takes them
    qkv, o, ff1, ff2 = (list(zip(layers, weights)) for weights in zip(*packed))

    def kv_views(kv):
        return (kv.k[:, :, kv.start : kv.end + 1].transpose(1, 2), kv.v[:, :, kv.start : kv.end + 1].transpose(1, 2))

    def weight_bytes(*modules):
        return sum(p.numel() * es for m in modules for p in m.parameters(recurse=False))

    def attention():
        for layer, kv, r in zip(layers, cache.layers, positions):
            a = layer.dec_attn
            ops.rel_attention(q, *kv_views(kv), r, a.r_w_bias, a.r_r_bias, scale=a.scale, window=window)

    def norms():
        for layer in layers:
            layer.pos_ff.layer_norm(layer.dec_attn.layer_norm(h + h) + h)

    kv_bytes = sum(kv.k[:, :, kv.start : kv.end + 1].numel() * 2 * es for kv in cache.layers)
    r_bytes = sum(r.shape[0] * H * D * es for r in positions)
    tails = tail_clusters(model, ids, cache)
    head, _, projs, cw, _ = crit.clusters()
    head_bytes = (head[0].numel() + head[0].shape[0] + (projs[0].numel() if projs[0] is not None else 0)
                  + cw.numel() + cw.shape[0]) * es
    head_bytes += sum((head[c].numel() + head[c].shape[0] + projs[c].numel()) * es for c in tails)
    return {
        "embedding": (lambda: tr.word_emb(ids), 0),
        "qkv_net": (lambda: [ops.linear(h, l.dec_attn.qkv_net.weight, None, p) for l, p in qkv],
                    sum(weight_bytes(l.dec_attn.qkv_net) for l in layers)),
        "cache write": (lambda: [(kv.k[:, :, kv.end : kv.end + 1].copy_(k_new.transpose(1, 2)),
                                  kv.v[:, :, kv.end : kv.end + 1].copy_(v_new.transpose(1, 2))) for kv in cache.layers],
                        0),
        "attention (K, V, r)": (attention, kv_bytes + r_bytes),
        "o_net": (lambda: [ops.linear(h, l.dec_attn.o_net.weight, None, p) for l, p in o],
                  sum(weight_bytes(l.dec_attn.o_net) for l in layers)),
        "ff1 + relu": (lambda: [torch.relu(ops.linear(h, l.pos_ff.CoreNet[0].weight, l.pos_ff.CoreNet[0].bias, p))
                                for l, p in ff1], sum(weight_bytes(l.pos_ff.CoreNet[0]) for l in layers)),
        "ff2": (lambda: [ops.linear(inner, l.pos_ff.CoreNet[3].weight, l.pos_ff.CoreNet[3].bias, p) for l, p in ff2],
                sum(weight_bytes(l.pos_ff.CoreNet[3]) for l in layers)),
        "layer norms + adds": (norms, sum(weight_bytes(l.dec_attn.layer_norm, l.pos_ff.layer_norm) for l in layers)),
        "next token (head" + (f" + tails {tails}" if tails else "") + ")": (
            lambda: candidates(crit, h[:, -1], False, 0), head_bytes),
    }


def tail_clusters(model, ids, cache) -> list:
    """The tail clusters a greedy step scans (its bytes count only then): one step, recorded."""
    scanned = []
    tail_topk = topk_module.tail_topk

    def recording(hidden, c, *args):
        scanned.append(c)
        return tail_topk(hidden, c, *args)

    layout = cache.layout()
    with mock.patch.object(topk_module, "tail_topk", recording), trusted_token_ids():
        decode_step(model.transformer, model.crit, ids, cache, False, 0)
    cache.restore(layout)
    return sorted(set(scanned))


@contextlib.contextmanager
def before():
    """The decode step as it was before packed weights (none are made, and bf16 rows are split as
    fp32's), and before rel_attention's decode branch (the fused SDPA path takes one query too)."""
    with mock.patch.object(linear_module, "MAX_PACKED_ROWS", 0), \
            mock.patch.object(attention_module, "DECODE_DTYPES", ()):
        yield


def time_rounds(fns: dict, rounds: int, bandwidth: Bandwidth) -> dict:
    """Median seconds per call, the functions alternated round by round (one warm-up round), the
    bandwidth sampled after each round."""
    times = alternated_times(fns, reps=rounds, after_round=bandwidth.sample)
    return {name: statistics.median(t) for name, t in times.items()}


def fixed_step(model, bsz: int, dtype):
    """A full cache and a greedy decode step that runs on the same full memory every time."""
    tr, crit = model.transformer, model.crit
    cache = full_cache(tr, bsz, dtype)
    ids = torch.randint(tr.n_token, (bsz, 1))
    layout = cache.layout()

    def step():
        cache.restore(layout)                       # every step on the same full memory
        with trusted_token_ids():
            decode_step(tr, crit, ids, cache, False, 0)

    step()                                          # position keys made and kept
    return cache, step


def report(model, bsz: int, dtype, rounds: int, bandwidth: Bandwidth) -> None:
    cache, step = fixed_step(model, bsz, dtype)
    classes = op_classes(model, cache, bsz, dtype)
    t = time_rounds({"step": step, **{name: fn for name, (fn, _) in classes.items()}}, rounds, bandwidth)
    gbps = bandwidth.gbps
    total_bytes = sum(b for _, b in classes.values())
    print(f"\n{str(dtype).removeprefix('torch.')}, batch {bsz}: step {t['step'] * 1e3:.1f} ms, reads "
          f"{total_bytes / 1e6:.0f} MB: floor {total_bytes / gbps / 1e6:.1f} ms at {gbps:.1f} GB/s, "
          f"**{total_bytes / gbps / 1e9 / t['step']:.0%} of the floor**\n")
    print("| op class (18 layers) | ms | % of step | MB read | GB/s | fraction of floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (_, nbytes) in classes.items():
        rate = f"{nbytes / t[name] / 1e9:.1f} | {nbytes / gbps / 1e9 / t[name]:.0%}" if nbytes else " | "
        print(f"| {name} | {t[name] * 1e3:.2f} | {t[name] / t['step']:.0%} | {nbytes / 1e6:.1f} | {rate} |")
    rest = t["step"] - sum(t[name] for name in classes)
    print(f"| rest (Python, dispatch, views) | {rest * 1e3:.2f} | {rest / t['step']:.0%} | | | |")


def compare(model, bsz: int, dtype, rounds: int, bandwidth: Bandwidth, compiled: bool) -> tuple:
    """The step before and after, alternated: (dtype, batch, bytes read, seconds before, seconds after).
    compiled: "before" is the eager step as it is now, "after" the step compiled (attention, bf16 rows),
    on a copy of the model: each side keeps its own packed weights (the compiled bf16 rows free them)."""
    contexts = (contextlib.nullcontext, backend.use_cpu_compile) if compiled else (before, contextlib.nullcontext)
    if compiled:
        model.clear_position_cache()                    # the packed copies (oneDNN tensors) do not deep-copy
    models = (model, copy.deepcopy(model) if compiled else model)
    caches, steps = [], []
    for m, context in zip(models, contexts):
        with context():
            cache, step = fixed_step(m, bsz, dtype)     # a first step: compiled, weights packed, before timing

        def run(step=step, context=context):
            with context():
                step()
        caches.append(cache)
        steps.append(run)
    nbytes = sum(b for _, b in op_classes(model, caches[0], bsz, dtype).values())
    t = time_rounds({"before": steps[0], "after": steps[1]}, rounds, bandwidth)
    return str(dtype).removeprefix("torch."), bsz, nbytes, t["before"], t["after"]


def print_comparison(rows: list, gbps: float) -> None:
    print(f"\nfloor: bytes / {gbps:.1f} GB/s (the run's median read bandwidth)\n")
    print("| dtype | batch | MB read | floor ms | before ms | after ms | speed-up | before: of floor | "
          "after: of floor |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, bsz, nbytes, before_s, after_s in rows:
        floor = nbytes / gbps / 1e9
        print(f"| {dtype} | {bsz} | {nbytes / 1e6:.0f} | {floor * 1e3:.1f} | {before_s * 1e3:.1f} | "
              f"{after_s * 1e3:.1f} | {before_s / after_s:.2f}x | {floor / before_s:.0%} | {floor / after_s:.0%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--compare", action="store_true", help="the whole step, before and after, alternated")
    p.add_argument("--compile", action="store_true",
                   help="the attention compiled (backend.use_cpu_compile); with --compare: the eager step against it")
    args = p.parse_args()
    torch.set_num_threads(2)
    backend.set_backend("torch")
    bandwidth = Bandwidth()
    for _ in range(3):
        bandwidth.sample()
    print(f"machine: {cpu_name()} ({flags_line(dtypes.cpu_flags())}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; "
          f"read bandwidth x.sum() over 600 MB fp32: {bandwidth.gbps:.1f} GB/s (before the timings)")
    torch.manual_seed(0)
    base = txl_fast.TransfoXLLMHeadModel(txl_fast.TransfoXLConfig()).eval()
    compared = []
    with torch.no_grad():
        for name in args.dtype:
            model = base.to(getattr(torch, name))
            for bsz in args.batch:
                if args.compare:
                    compared.append(compare(model, bsz, getattr(torch, name), args.rounds, bandwidth, args.compile))
                else:
                    with backend.use_cpu_compile(args.compile):
                        report(model, bsz, getattr(torch, name), args.rounds, bandwidth)
    if compared:
        print_comparison(compared, bandwidth.gbps)
    print(f"\nread bandwidth over the whole run: median {bandwidth.gbps:.1f} GB/s, "
          f"range {min(bandwidth.samples):.1f}-{max(bandwidth.samples):.1f}")


if __name__ == "__main__":
    main()
