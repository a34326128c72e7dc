"""FLOPs and minimum bytes of Transformer-XL's operations, and a roofline time prediction.

Counting rules (used everywhere below):
  - A matrix product of (m, k) by (k, n) is 2·m·k·n FLOPs (a multiply-add is 2). Masked attention
    scores are counted dense: the kernels compute them, then mask.
  - Elementwise work is a few FLOPs per element (softmax 5, layer norm 8, log-softmax 4, ReLU or
    residual add 1): small next to the products, but the bytes it moves are counted in full.
  - Bytes are the traffic of the algorithm as written: every operand read once and every result
    written once, plus, for unfused paths, each materialised intermediate written once and read
    once (no cache reuse assumed inside a pass, none across passes). ``es`` is the element size
    in bytes of the model's dtype (4 fp32, 2 fp16/bf16).
  - Predicted time of an op on a device = max(FLOPs / peak FLOP/s, bytes / peak bandwidth); a
    model step is the sum over its ops (a roofline: a lower bound, launch overheads and imperfect
    overlap ignored).

Paths of the relative attention (``path=``):
  ``fused``  one kernel (txl_fast.kernels): reads q, k, v, r, writes out and the row log-sum-exp.
  ``torch``  txl_fast's PyTorch inference path (ops/rel_attention.py): the raw position scores
             (B, H, Lq, Lr) written and read, the position mask (B, H, Lq, Lk + Lq - 1) written
             and read by scaled_dot_product_attention, which fuses the content scores, softmax and PV.
  ``hf``     HF 4.35: AC, BD, the padded BD copy, the shifted BD, the score and the probabilities
             as six (Lq, Lk, B, H) tensors, each written and read.
The adaptive softmax has ``fused`` (weights and hidden read once, the result written) and ``hf``
(HF's logits written and re-read by log_softmax and the copies, the head weight concatenated with
the cluster weight at every call). ``torch`` counts as ``fused`` there (txl_fast avoids the copies;
its logits passes are small next to the weights at the sizes that matter; it does project the head's
hidden states twice, for the words and for the cluster logits, which is not counted: ~5 % of the
output layer's FLOPs at wt103).

Model steps (``segment``): an evaluation segment or a generated token, cached (txl_fast's inference
cache: only the new rows are projected to q, k, v; the position projections are made once per
cache and not counted per step) or uncached (HF: q, k, v of memory + segment, r_net of every
position, at every step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

ATTENTION_PATHS = ("fused", "torch", "hf")


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one operation (or a sum of them)."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, n: float) -> "Cost":
        return Cost(self.flops * n, self.bytes * n)

    __rmul__ = __mul__

    def time_on(self, device: "Device") -> float:
        """Roofline time in seconds: max(FLOPs / peak FLOP/s, bytes / peak bandwidth)."""
        return max(self.flops / device.flops, self.bytes / device.bandwidth)

    @property
    def intensity(self) -> float:
        """FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else float("inf")


@dataclass(frozen=True)
class Device:
    """Peak rates of a device: FLOP/s of the dtype the prediction assumes, bytes/s of its memory."""

    name: str
    flops: float
    bandwidth: float
    note: str = ""


# Published / assumed peaks, not measurements (dense, no sparsity).
H100 = Device("H100 SXM", 800e12, 3.0e12, "assumed: ~800 TFLOP/s dense bf16 matrix, ~3.0 TB/s HBM3")
A100 = Device("A100 SXM 80GB", 312e12, 2.0e12, "published: 312 TFLOP/s dense fp16/bf16 matrix, 2.0 TB/s HBM2e")


@dataclass
class Breakdown:
    """Cost per named op of one model step; ``total`` and ``time_on`` sum them."""

    ops: dict = field(default_factory=dict)

    def add(self, name: str, cost: Cost) -> None:
        self.ops[name] = self.ops.get(name, Cost()) + cost

    @property
    def total(self) -> Cost:
        out = Cost()
        for c in self.ops.values():
            out = out + c
        return out

    @property
    def flops(self) -> float:
        return self.total.flops

    @property
    def bytes(self) -> float:
        return self.total.bytes

    def time_on(self, device: Device) -> float:
        """Roofline time per op, summed (each op is either compute or memory bound)."""
        return sum(c.time_on(device) for c in self.ops.values())

    def __mul__(self, n: float) -> "Breakdown":
        return Breakdown({k: c * n for k, c in self.ops.items()})


# ---- single operations ---------------------------------------------------------------------------
def linear(rows: int, d_in: int, d_out: int, es: int = 4, bias: bool = False) -> Cost:
    """y = x W^T (+ b): x (rows, d_in), W (d_out, d_in)."""
    flops = 2.0 * rows * d_in * d_out + (rows * d_out if bias else 0)
    nbytes = es * (rows * d_in + d_in * d_out + rows * d_out + (d_out if bias else 0))
    return Cost(flops, nbytes)


def add_layer_norm(rows: int, d: int, es: int = 4) -> Cost:
    """LayerNorm(x + y): reads x and y, writes the result; weight and bias read once."""
    return Cost(9.0 * rows * d, es * (3 * rows * d + 2 * d))


def feed_forward(rows: int, d_model: int, d_inner: int, es: int = 4) -> Cost:
    """Linear(d_model, d_inner) + ReLU (in place: one read, one write) + Linear(d_inner, d_model)."""
    relu = Cost(1.0 * rows * d_inner, es * 2 * rows * d_inner)
    return linear(rows, d_model, d_inner, es, bias=True) + relu + linear(rows, d_inner, d_model, es, bias=True)


def rel_attention(batch: int, n_head: int, qlen: int, klen: int, d_head: int, es: int = 4,
                  path: str = "fused", position_rows: Optional[int] = None) -> Cost:
    """Relative attention of q (B, Lq, H, D) over k, v (B, Lk, H, D) and r (Lr, H, D).

    FLOPs: content QKᵀ and PV, Lq·Lk·D each per (batch, head), and the position product Q·Rᵀ,
    Lq·Lr·D (the torch path multiplies the Lr = ``position_rows`` distinct rows of a clamped r,
    default Lk; the fused kernels and HF every key's), plus 5 per score for the softmax. Bytes: q,
    k, v, r, out (+ the fp32 row log-sum-exp for ``fused``), plus the intermediates of the unfused
    paths (see the module docstring).
    """
    if path not in ATTENTION_PATHS:
        raise ValueError(f"path must be one of {ATTENTION_PATHS}, got {path!r}")
    scores = batch * n_head * qlen * klen
    rows = klen if path != "torch" or position_rows is None else position_rows
    flops = 2 * 2.0 * scores * d_head + 2.0 * batch * n_head * qlen * rows * d_head + 5.0 * scores
    io = es * (2 * batch * qlen * n_head * d_head + 2 * batch * klen * n_head * d_head + rows * n_head * d_head)
    if path == "fused":
        return Cost(flops, io + 4 * batch * n_head * qlen)
    if path == "torch":
        position, mask = batch * n_head * qlen * rows, batch * n_head * qlen * (klen + qlen - 1)
        return Cost(flops, io + 2 * es * (position + mask))
    padded = batch * n_head * qlen * (klen + 1)
    return Cost(flops, io + 2 * es * (5 * scores + padded))


# ---- the adaptive input and output layers --------------------------------------------------------
def _clusters(cfg) -> list[tuple[int, int, bool]]:
    """Per cluster: (size V_c, width d_c, has a projection) as HF lays the adaptive layers out."""
    cutoffs = list(cfg.cutoffs)
    bounds = [0] + cutoffs + [cfg.vocab_size]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if cfg.div_val == 1:
        return [(v, cfg.d_embed, cfg.d_model != cfg.d_embed) for v in sizes]
    return [(v, cfg.d_embed // cfg.div_val ** i, True) for i, v in enumerate(sizes)]


def uniform_share(cfg) -> list[float]:
    """Fraction of targets per cluster when tokens are uniform over the vocabulary (random ids)."""
    return [v / cfg.vocab_size for v, _, _ in _clusters(cfg)]


def _share(cfg, share: Optional[Sequence[float]]) -> list[float]:
    n = len(_clusters(cfg))
    if share is None:
        return [1.0] + [0.0] * (n - 1)
    if len(share) != n or abs(sum(share) - 1.0) > 1e-6:
        raise ValueError(f"share needs {n} fractions summing to 1, got {list(share)}")
    return list(share)


def adaptive_input(rows: int, cfg, es: int = 4, share: Optional[Sequence[float]] = None) -> Cost:
    """Adaptive embedding of ``rows`` tokens: gather + projection per cluster, scale by sqrt(d_model).

    ``share``: fraction of the tokens in each cluster (default: all in the first, see adaptive_softmax).
    """
    d = cfg.d_model
    if cfg.div_val == 1:     # one table; HF's div_val == 1 layout has no per-cluster split
        d_c = cfg.d_embed
        cost = Cost(0.0, es * (rows * d_c))
        if d != d_c:
            cost = cost + linear(rows, d_c, d, es)
        return cost + Cost(rows * d, es * 2 * rows * d)
    cost = Cost()
    for (v, d_c, _), f in zip(_clusters(cfg), _share(cfg, share)):
        n = rows * f
        if n > 0:
            cost = cost + Cost(0.0, es * n * d_c) + linear(n, d_c, d, es)
    return cost + Cost(rows * d, es * 2 * rows * d)


def adaptive_softmax(rows: int, cfg, es: int = 4, labels: bool = True, path: str = "fused",
                     share: Optional[Sequence[float]] = None) -> Cost:
    """Projected adaptive log-softmax of ``rows`` hidden states.

    labels=True: the NLL of each row's target; every row pays the head (projection + V_0 + C logits),
    a row whose target is in tail cluster c also pays that tail's projection and logits. ``share``:
    fraction of targets per cluster (default: all in the head; ``uniform_share(cfg)`` for random ids).
    labels=False: full log-probabilities, every row pays every cluster, (rows, V) written.
    path "fused": weights (of the clusters that have rows) and hidden read once, result written.
    path "hf": plus HF's intermediates: logits written, read and written by log_softmax (and the
    copies into the output when labels is None), the head weight concatenated every call.
    """
    if path not in ATTENTION_PATHS:
        raise ValueError(f"path must be one of {ATTENTION_PATHS}, got {path!r}")
    clusters = _clusters(cfg)
    n_tails = len(clusters) - 1
    d = cfg.d_model
    fractions = [1.0] * len(clusters) if not labels else _share(cfg, share)
    flops = nbytes = 0.0
    for c, ((v, d_c, has_proj), f) in enumerate(zip(clusters, fractions)):
        n = rows if c == 0 else rows * f                # the head sees every row
        if n <= 0:
            continue
        width = v + (n_tails if c == 0 else 0)          # the head also scores the tail clusters
        if has_proj:
            flops += 2.0 * n * d * d_c
            nbytes += es * (d * d_c + (n * d_c if path == "hf" else 0))
        flops += 2.0 * n * d_c * width + n * width + 4.0 * n * width
        nbytes += es * (width * d_c + width)            # weights + biases, read once
        if path == "hf":
            if c == 0 and n_tails:
                nbytes += es * 2 * width * d_c          # torch.cat([head weight, cluster weight])
            passes = 3 if labels else (5 if c == 0 else 7)
            nbytes += es * passes * n * width
    nbytes += es * rows * d                              # hidden read
    nbytes += rows * 4 if labels else es * rows * cfg.vocab_size
    return Cost(flops, nbytes)


# ---- model steps ---------------------------------------------------------------------------------
def segment(cfg, batch: int, qlen: int, mlen: int, *, cached: bool, labels: bool = True, path: str = "fused",
            es: int = 4, share: Optional[Sequence[float]] = None, logits_rows: Optional[int] = None) -> Breakdown:
    """One forward of ``batch`` x ``qlen`` new tokens over ``mlen`` memory positions, LM head included.

    cached: txl_fast's inference cache (q, k, v projected for the qlen new rows only, position
    projections made once per cache and not counted here); uncached: HF's forward (q, k, v of the
    mlen + qlen rows, r_net over mlen + qlen positions, the memory concatenated and updated per layer).
    labels: NLL (evaluation) vs full log-probabilities (generation). logits_rows: rows the output
    layer sees when not every position's (default batch * qlen; txl_fast's generate scores only the
    last position of a prompt, HF's all of them).
    """
    H, D, d, L = cfg.n_head, cfg.d_head, cfg.d_model, cfg.n_layer
    klen = mlen + qlen
    rows = batch * qlen
    out = Breakdown()
    out.add("embedding", adaptive_input(rows, cfg, es, share))
    layer = Breakdown()
    if cached:
        layer.add("qkv", linear(rows, d, 3 * H * D, es))
        layer.add("qkv", Cost(0.0, es * 2 * 2 * rows * H * D))          # new k, v rows copied into the cache
    else:
        layer.add("qkv", linear(batch * klen, d, 3 * H * D, es))
        layer.add("r_net", linear(klen, d, H * D, es) + Cost(0.0, es * klen * d))   # + the sinusoids
        # torch.cat([mems, h]) per layer, then the new memory: cat + slice of the layer's input
        layer.add("mems", Cost(0.0, es * 2 * batch * klen * d * 2))
    # the cache passes the clamp_len + 1 distinct position keys; HF's layout has one per key
    distinct = min(klen, cfg.clamp_len + 1) if cached and cfg.clamp_len > 0 else klen
    layer.add("attention", rel_attention(batch, H, qlen, klen, D, es, path, position_rows=distinct))
    layer.add("o_net", linear(rows, H * D, d, es))
    layer.add("layer_norm", add_layer_norm(rows, d, es) * 2)
    layer.add("ff", feed_forward(rows, d, cfg.d_inner, es))
    for name, cost in (layer * L).ops.items():
        out.add(name, cost)
    out_rows = rows if logits_rows is None else logits_rows
    out.add("softmax", adaptive_softmax(out_rows, cfg, es, labels, "hf" if path == "hf" else "fused", share))
    return out


def eval_segment(cfg, batch: int = 1, tgt_len: int = 128, mem_len: int = 1600, *, cached: bool,
                 path: str = "fused", es: int = 4, share: Optional[Sequence[float]] = None) -> Breakdown:
    """A segment of the evaluation protocol in steady state (memory full: mlen = mem_len), NLL output."""
    return segment(cfg, batch, tgt_len, mem_len, cached=cached, labels=True, path=path, es=es, share=share)


def generated_token(cfg, batch: int = 1, mem_len: int = 1600, *, cached: bool, path: str = "fused",
                    es: int = 4) -> Breakdown:
    """One greedy step after the prompt (memory full: mlen = mem_len), full log-probabilities output."""
    return segment(cfg, batch, 1, mem_len, cached=cached, labels=False, path=path, es=es)


def parameter_count(cfg) -> dict[str, int]:
    """Parameters by part: ``layers`` (r_net included; ``r_net`` repeats that part), the adaptive
    tables (shared by input and output), the output projections and the output biases/cluster head."""
    H, D, d, di, L = cfg.n_head, cfg.d_head, cfg.d_model, cfg.d_inner, cfg.n_layer
    attention = 3 * d * H * D + d * H * D + H * D * d + 2 * H * D + 2 * d    # qkv, r_net, o_net, biases, norm
    per_layer = attention + d * di + di + di * d + d + 2 * d                  # + feed-forward and its norm
    clusters = _clusters(cfg)
    embeddings = sum(v * d_c for v, d_c, _ in clusters)
    projs = sum(d * d_c for _, d_c, has in clusters if has)
    softmax_extra = cfg.vocab_size + (len(clusters) - 1) * (clusters[0][1] + 1)   # biases + cluster head
    return {
        "layers": L * per_layer,
        "r_net": L * d * H * D,
        "embeddings": embeddings,
        "projections": projs,
        "softmax_extra": softmax_extra,
    }


def decode_reads(cfg, mem_len: int = 1600, batch: int = 1, es: int = 4) -> dict[str, float]:
    """Bytes one cached generated token must read: the weights it uses (every layer except r_net,
    whose output is cached, and the whole output layer for the full distribution; the embedding
    tables only for one row), the memory's cached K/V, and the cached position keys."""
    p = parameter_count(cfg)
    weights = p["layers"] - p["r_net"] + p["embeddings"] + p["projections"] + p["softmax_extra"]
    klen = mem_len + 1
    per_layer_rows = klen * cfg.n_head * cfg.d_head
    return {
        "weights": es * weights,
        "kv": es * cfg.n_layer * 2 * batch * per_layer_rows,
        "positions": es * cfg.n_layer * per_layer_rows,
    }


def decode_step_reads(cfg, mem_len: int = 1600, batch: int = 1, es: int = 4,
                      real_rows: Optional[int] = None) -> dict[str, float]:
    """Bytes a cached greedy decode step must read at least (the floor of ``decode_floor_seconds``):

      layers      every layer's weights but r_net's (its output, the position keys, is cached)
      embedding   the input token's: the head cluster's projection, and one row per batch row
      head        the output layer's head cluster (projection, words, biases, the tail clusters'
                  logits); greedy and top-k decoding scan a tail only where it can win (not counted)
      kv          every batch row's cached keys and values: ``real_rows`` memory rows (default mem_len;
                  HF's zero rows are scored in closed form, ``txl_fast.cache``) + the new one
      positions   the cached position keys: the clamp_len + 1 distinct distances when clamped
    """
    p = parameter_count(cfg)
    (_, d_0, has_proj), *tails = _clusters(cfg)
    d, heads = cfg.d_model, cfg.n_head * cfg.d_head
    proj = d * d_0 if has_proj else 0
    real = mem_len if real_rows is None else real_rows
    klen = mem_len + 1
    distinct = min(klen, cfg.clamp_len + 1) if cfg.clamp_len > 0 else klen
    return {
        "layers": es * (p["layers"] - p["r_net"]),
        "embedding": es * (proj + batch * d_0),
        "head": es * (proj + (cfg.cutoffs[0] if tails else cfg.vocab_size) * (d_0 + 1) + len(tails) * (d_0 + 1)),
        "kv": es * cfg.n_layer * 2 * batch * (real + 1) * heads,
        "positions": es * cfg.n_layer * distinct * heads,
    }


def eval_floor_flops(cfg, batch: int, tgt_len: int, mem_len: int, segments: int, *, first_real: Optional[int] = None,
                     es: int = 4, share: Optional[Sequence[float]] = None) -> float:
    """FLOPs of ``segments`` cached evaluation segments (txl_fast's torch path, NLL), the memory
    holding ``first_real`` real rows at the start (default mem_len: the steady state) and growing by
    tgt_len a segment; HF's zero rows (scored in closed form) counted free. The position
    projections, made once per cache, are not counted."""
    real = mem_len if first_real is None else first_real
    return sum(segment(cfg, batch, tgt_len, min(real + s * tgt_len, mem_len), cached=True, path="torch", es=es,
                       share=share).flops for s in range(segments))


def generate_floor_seconds(cfg, batch: int, prompt_len: int, new_tokens: int, mem_len: int, flops_rate: float,
                           read_rate: float, es: int = 4) -> float:
    """Floor of a greedy generation from HF's zero memory: the prompt's FLOPs (its last position
    scored) at ``flops_rate``, then each of the new_tokens - 1 decode steps' ``decode_step_reads``
    (the real memory rows growing from the prompt's) at ``read_rate``."""
    prompt = segment(cfg, batch, prompt_len, 0, cached=True, labels=False, path="torch", es=es, logits_rows=batch)
    steps = sum(sum(decode_step_reads(cfg, mem_len, batch, es, min(prompt_len + i, mem_len)).values())
                for i in range(max(new_tokens - 1, 0)))
    return prompt.flops / flops_rate + steps / read_rate


def predict_tokens_per_s(step: Breakdown, tokens: int, device: Device) -> float:
    """Tokens per second if every op ran at its roofline bound on ``device``."""
    return tokens / step.time_on(device)


# ---- whole benchmark workloads -------------------------------------------------------------------
ENGINES = ("txl_fast", "hf")


def position_keys(cfg, rows: int, es: int = 4) -> Cost:
    """r_net over ``rows`` positions in every layer (txl_fast's cache does this once per cache)."""
    return (linear(rows, cfg.d_model, cfg.n_head * cfg.d_head, es) + Cost(0.0, es * rows * cfg.d_model)) * cfg.n_layer


def _engine(engine: str, path: Optional[str]) -> tuple[bool, str]:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "hf":
        return False, "hf"
    return True, path or "fused"


def eval_run(cfg, batch: int, tgt_len: int, mem_len: int, segments: int, *, engine: str, path: Optional[str] = None,
             es: int = 4, share: Optional[Sequence[float]] = None) -> Breakdown:
    """``segments`` evaluation segments from a full (zero) memory. engine "txl_fast": cached, plus its
    one-off position projections; "hf": uncached, HF's attention. ``path`` for txl_fast: fused / torch."""
    cached, path = _engine(engine, path)
    run = eval_segment(cfg, batch, tgt_len, mem_len, cached=cached, path=path, es=es, share=share) * segments
    if cached:
        run.add("r_net", position_keys(cfg, mem_len + tgt_len, es))
    return run


def generate_run(cfg, batch: int, prompt_len: int, new_tokens: int, mem_len: int, *, engine: str,
                 path: Optional[str] = None, es: int = 4) -> Breakdown:
    """Greedy generation of ``new_tokens`` after a prompt, from a full (zero) memory: one prompt step and
    new_tokens - 1 single-token steps. txl_fast scores only the prompt's last position; HF all of them."""
    cached, path = _engine(engine, path)
    run = segment(cfg, batch, prompt_len, mem_len, cached=cached, labels=False, path=path, es=es,
                  logits_rows=batch if cached else None)
    if cached:
        run.add("r_net", position_keys(cfg, mem_len + prompt_len, es))
    for name, cost in (generated_token(cfg, batch, mem_len, cached=cached, path=path, es=es)
                       * max(new_tokens - 1, 0)).ops.items():
        run.add(name, cost)
    return run
