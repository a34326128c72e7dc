"""Inference: streaming evaluation with the paper's protocol, and generation.

evaluate(model, token_ids, ...)   per-token NLL, perplexity (bits per character for character
                                  vocabularies) and tokens/s, over a stream of any length
generate(model, input_ids, ...)   greedy or sampled continuation, batched, memory carried

Evaluation follows the original Transformer-XL eval: the stream is cut into ``batch_size``
contiguous rows, each row is read in segments of ``tgt_len`` tokens, every token after the
first of a row is predicted once, and the memory of ``mem_len`` positions is carried from
segment to segment. Extra memory is constant in the stream's length: one segment's activations
and the memory.

Both run on the model's inference cache (txl_fast.cache): the memory's keys and values are
projected once, when their tokens are new, and the position projections once per model, instead
of at every segment and every generated token as HF does. ``use_cache=False`` runs the plain
HF-style path (memory of hidden states, everything recomputed) for comparison.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from txl_fast import ops
from txl_fast.cache import InferenceCache, trusted_token_ids
from txl_fast.checkpoint import METRICS
from txl_fast.checks import is_int, is_real
from txl_fast.dtypes import check_dtype
from txl_fast.config import TransfoXLConfig

# The paper's evaluation protocols (Dai et al. 2019, and the original code's run scripts).
PRESETS = {
    "wt103": dict(tgt_len=128, mem_len=1600, clamp_len=1000, same_length=True),
    "enwik8": dict(tgt_len=128, mem_len=3800, clamp_len=1000, same_length=True),
    "text8": dict(tgt_len=128, mem_len=3800, clamp_len=1000, same_length=True),
}


def stored_protocol(model_dir: Optional[Path]) -> dict:
    """The evaluation protocol a trained model was validated with (``metrics.json`` in
    ``model_dir``: its training's, see txl_fast.train), or {} (none stored, or no directory: a hub
    model's metrics.json is not fetched). Values of the wrong type are refused, not misread."""
    metrics = None if model_dir is None else Path(model_dir) / METRICS
    if metrics is None or not metrics.is_file():
        return {}
    try:
        data = json.loads(metrics.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{metrics} is not valid JSON: {e}") from None
    protocol = data.get("eval_protocol", {}) if isinstance(data, dict) else None
    if not isinstance(protocol, dict):
        raise ValueError(f"{metrics}: eval_protocol must be a JSON object")
    for key, ok, what in (("tgt_len", lambda v: is_int(v) and v > 0, "a positive integer"),
                          ("batch_size", lambda v: is_int(v) and v > 0, "a positive integer"),
                          ("mem_len", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
                          ("clamp_len", is_int, "an integer"),
                          ("same_length", lambda v: isinstance(v, bool), "true or false"),
                          ("init_mems", lambda v: v in ("empty", "zeros"), '"empty" or "zeros"')):
        if key in protocol and not ok(protocol[key]):      # "same_length": "no" would be truthy
            raise ValueError(f"{metrics}: eval_protocol.{key} must be {what}, got {protocol[key]!r}")
    return protocol


def resolve_protocol(config, model_dir: Optional[Path] = None, preset: Optional[str] = None,
                     **flags) -> tuple[dict, str]:
    """The evaluation protocol (tgt_len, mem_len, clamp_len, same_length, batch_size, init_mems) and
    where it came from: the one stored with the model (``stored_protocol``; else the config's with
    tgt_len 128), then a ``preset`` (PRESETS), then the ``flags`` that are not None. A clamp_len < 0
    (HF, the original code) means no clamp: 0; with mem_len 0 same_length is off unless a flag says."""
    protocol = {"tgt_len": 128, "mem_len": config.mem_len, "clamp_len": config.clamp_len,
                "same_length": config.same_length, "batch_size": 1, "init_mems": "empty"}
    stored = stored_protocol(model_dir)
    protocol.update({k: v for k, v in stored.items() if k in protocol})
    source = f"the model's training protocol ({METRICS})" if stored else "the model's config, tgt_len 128"
    if preset is not None:
        protocol.update(PRESETS[preset])
        source = f"the paper's {preset} protocol"
    unknown = set(flags) - set(protocol)
    if unknown:
        raise TypeError(f"resolve_protocol: unknown settings {sorted(unknown)}")
    given = {k: v for k, v in flags.items() if v is not None}
    protocol.update(given)
    protocol["clamp_len"] = max(protocol["clamp_len"], 0)
    if protocol["mem_len"] == 0 and "same_length" not in given:
        protocol["same_length"] = False                 # HF's same_length mask needs a memory
    if given:
        source += ", flags " + ", ".join(sorted(given))
    return protocol, source


@dataclass
class EvalResult:
    nll: float                  # mean negative log-likelihood per predicted token, nats
    tokens: int                 # predicted tokens
    seconds: float
    char_level: bool = False

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bpc(self) -> Optional[float]:
        """Bits per character, for character vocabularies."""
        return self.nll / math.log(2) if self.char_level else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def protocol_view(transformer, mem_len: int, clamp_len: int, same_length: bool):
    """The HF-style (uncached) path's way to run another protocol without touching the model: a
    shallow copy of the TransfoXLModel module sharing its parameters, buffers, submodules and
    derived stores, with its own mem_len, clamp_len and same_length. (The cached path carries the
    protocol in its cache.)"""
    view = copy.copy(transformer)
    view.mem_len, view.clamp_len, view.same_length = mem_len, clamp_len, same_length
    return view


def _positive(name: str, value) -> None:
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_lm_model(model) -> None:
    """Not a txl_fast LM-head model (a module with txl_fast's config, a transformer and the adaptive
    softmax ``crit``: checked by what the loops use, so that this module needs nothing of
    txl_fast.model, which builds on it), or one in a dtype its device cannot run (float16 on a CPU
    without fp16 matmul): refused."""
    if not (isinstance(model, torch.nn.Module) and isinstance(getattr(model, "config", None), TransfoXLConfig)
            and hasattr(model, "transformer") and hasattr(model, "crit")):
        raise TypeError(f"expected a txl_fast TransfoXLLMHeadModel (from_pretrained, or txl_fast.convert for an HF "
                        f"directory), got {type(model).__name__}")
    p = next(model.parameters())
    check_dtype(p.dtype, p.device)


def check_protocol(tgt_len, mem_len, clamp_len, same_length, batch_size, init_mems) -> None:
    """The reading protocol of ``evaluate`` and ``score``: a ValueError naming the bad argument."""
    for name, value in (("tgt_len", tgt_len), ("batch_size", batch_size)):
        _positive(name, value)
    for name, value in (("mem_len", mem_len), ("clamp_len", clamp_len)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: no memory / no clamp), got {value!r}")
    if not isinstance(same_length, bool):
        raise ValueError(f"same_length must be True or False, got {same_length!r}")
    if init_mems not in ("empty", "zeros"):
        raise ValueError(f"init_mems must be 'empty' or 'zeros', got {init_mems!r}")
    if mem_len == 0 and same_length:
        # HF's same_length mask is mem_len-relative: without a memory it hides every key
        raise ValueError("same_length needs a memory: with mem_len 0 pass same_length=False")


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for new tensors on ``device``: MemAvailable of /proc/meminfo on the CPU, the
    driver's free memory on CUDA; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024
    except (OSError, StopIteration, ValueError):
        return None


def check_cache_fits(transformer, bsz: int, mem_len: int, step: int) -> None:
    """Refuse, before allocating, an inference cache larger than the memory left on the model's device.
    Its buffers hold per layer keys and values of mem_len + step + max(step, mem_len // 8) rows."""
    p = next(transformer.parameters())
    rows = mem_len + step + max(step, mem_len // 8)
    need = 2 * transformer.n_layer * bsz * rows * transformer.n_head * transformer.d_head * p.element_size()
    free = available_memory(p.device)
    if free is not None and need > free:
        raise ValueError(f"mem_len {mem_len} needs {need / 2**30:.1f} GiB of memory cache at batch size {bsz} and "
                         f"segments of {step}, {free / 2**30:.1f} GiB is available on {p.device}: lower mem_len "
                         "or tgt_len")


@torch.no_grad()
def evaluate(
    model,
    token_ids: torch.Tensor,
    tgt_len: int = 128,
    mem_len: int = 1600,
    clamp_len: int = 1000,
    same_length: bool = True,
    batch_size: int = 1,
    init_mems: str = "empty",
    char_level: bool = False,
    progress: Optional[bool] = None,
    use_cache: bool = True,
) -> EvalResult:
    """Mean NLL of a token stream under ``model`` (a TransfoXLLMHeadModel), paper protocol.

    token_ids: (T,) int64. mem_len: 0 for a model without memory (each segment sees only itself).
    init_mems: "empty" (the original code: the first segment sees only itself) or "zeros" (HF's
    zero-filled memory). A cache that would not fit in the device's free memory is a ValueError.
    progress: a tqdm bar; default when stderr is a terminal.
    """
    check_lm_model(model)
    check_protocol(tgt_len, mem_len, clamp_len, same_length, batch_size, init_mems)
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1 or token_ids.dtype != torch.int64:
        raise ValueError("token_ids must be a 1-D int64 tensor")
    rows = token_ids.numel() // batch_size
    if rows < 2:
        raise ValueError(f"{token_ids.numel()} tokens are too few for batch_size {batch_size}")
    vocab = model.config.vocab_size
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab})")

    device = next(model.parameters()).device
    data = token_ids[: rows * batch_size].view(batch_size, rows)              # (B, T/B), contiguous rows
    transformer, crit = model.transformer, model.crit
    if init_mems == "empty":
        # a row's memory never holds more than its past: a longer mem_len gives the same numbers
        mem_len = min(mem_len, rows)
    tgt_len = min(tgt_len, max(rows - 1, 1))        # a segment never runs past the stream: the same numbers
    if use_cache:
        check_cache_fits(transformer, batch_size, mem_len, tgt_len)
    show = sys.stderr.isatty() if progress is None else progress
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    protocol = dict(mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
    if not use_cache:
        transformer = protocol_view(transformer, **protocol)
    state = _initial_state(transformer, batch_size, init_mems, use_cache, tgt_len, protocol)
    bar = None
    if show:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=(rows - 1) * batch_size, unit="tok", desc="eval", leave=False)
    for i in range(0, rows - 1, tgt_len):
        seq_len = min(tgt_len, rows - 1 - i)
        inp = data[:, i : i + seq_len].to(device)
        target = data[:, i + 1 : i + 1 + seq_len].to(device)
        hidden, state = _step(transformer, inp, state)
        nll = ops.adaptive_nll(hidden.reshape(-1, transformer.d_model), target.reshape(-1), *crit.clusters())
        total_nll += nll.double().sum().item()
        total_tokens += target.numel()
        if bar is not None:
            bar.update(target.numel())
            bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.2f}")
    if bar is not None:
        bar.close()
    return EvalResult(total_nll / total_tokens, total_tokens, time.perf_counter() - start, char_level)


def _initial_state(transformer, bsz: int, init_mems: str, use_cache: bool, step_hint: int,
                   protocol: Optional[dict] = None):
    """The memory to start from: an inference cache (with ``protocol``, the model's if None), or
    HF-layout mems (use_cache=False: the transformer's own protocol)."""
    if use_cache:
        return transformer.new_cache(bsz, init_mems, step_hint, **(protocol or {}))
    return transformer.empty_mems(bsz) if init_mems == "empty" else transformer.init_mems(bsz)


def _step(transformer, ids, state):
    """One segment: (B, L) ids -> last hidden states (B, L, d) and the state for the next segment."""
    if isinstance(state, InferenceCache):
        return transformer(ids, cache=state).last_hidden_state, state
    out = transformer(ids, mems=state)
    return out.last_hidden_state, out.mems


def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
    if not is_real(temperature) or not math.isfinite(temperature) or (do_sample and not temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def _sample(logprobs: torch.Tensor, ids: Optional[torch.Tensor], temperature: float, top_p: float,
            generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, n) log-probs of n candidates, sorted best first when ``ids`` (B, n) names them, else the
    whole vocabulary -> (B,) a sample after temperature and top-p (the smallest set reaching top_p)."""
    scores = logprobs.float() / temperature
    # a tiny temperature overflows every score to -inf: then divide the scores less their best
    shifted = (logprobs.float() - logprobs.float().amax(-1, keepdim=True)) / temperature
    scores = torch.where(torch.isfinite(scores.amax(-1, keepdim=True)), scores, shifted)   # no host sync
    if top_p < 1:
        sorted_scores, order = (scores, None) if ids is not None else scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        scores = scores.masked_fill(drop_sorted if order is None else drop_sorted.scatter(1, order, drop_sorted),
                                    float("-inf"))
    choice = torch.multinomial(scores.softmax(-1), 1, generator=generator)         # (B, 1)
    return (choice if ids is None else ids.gather(1, choice)).squeeze(1)


def next_token(logprobs: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, V) log-probabilities -> (B,) next tokens: argmax, or a sample after temperature, top-k, top-p."""
    if not do_sample:
        return logprobs.argmax(dim=-1)
    if top_k > 0:
        return _sample(*logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1), temperature, top_p, generator)
    return _sample(logprobs, None, temperature, top_p, generator)


def candidates(crit, hidden: torch.Tensor, do_sample: bool, top_k: int):
    """(B, d) last hidden states -> the next token's candidates: log-probs (B, n) and their ids
    (B, n) best first, or ids None when n is the whole vocabulary (sampling without top-k)."""
    if do_sample and top_k == 0:
        return crit.log_prob(hidden), None
    k = min(top_k, crit.n_token) if do_sample else 1
    return ops.adaptive_topk(hidden, k, *crit.clusters())                          # (B, k), best first


def _pick(logprobs: torch.Tensor, ids: Optional[torch.Tensor], do_sample: bool, temperature: float, top_p: float,
          generator: Optional[torch.Generator]) -> torch.Tensor:
    """The candidates of ``candidates`` -> (B,) next tokens: the best, or a sample."""
    return _sample(logprobs, ids, temperature, top_p, generator) if do_sample else ids[:, 0]


def choose_next(crit, hidden: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, d) last hidden states -> (B,) next tokens, as ``next_token`` on the full log-probs, but
    greedy and top-k decoding see only the k best words (``ops.adaptive_topk``: no (B, V) row; the
    tail clusters are scanned only where they can win). Sampling without top-k needs every word."""
    return _pick(*candidates(crit, hidden, do_sample, top_k), do_sample, temperature, top_p, generator)


# generate(): decode steps between the host's looks at "has every row produced eos" (each one a
# sync); the output is cut where they all had, so the result is the same as looking at every step
EOS_CHECK_EVERY = 16
# generate(cuda_graph=True): spare rows in each layer's key/value buffer, so that the decode steps
# cycle through GRAPH_SLACK + 2 cache layouts, one CUDA graph each, captured per generate() call
# (the last one moves the memory to the front of its buffer: 2 M rows copied every GRAPH_SLACK + 2
# steps; wt103 batch 1, fp16: ~30 MB a token against the ~650 MB of weights and memory a step reads)
GRAPH_SLACK = 14


def decode_step(transformer, crit, step_ids: torch.Tensor, state, do_sample: bool, top_k: int):
    """One generation step on the model's state: (B, L) ids -> the candidates for the next token
    (``candidates``: log-probs, ids or None), the state after. The function generate() runs
    eagerly and captures in a CUDA graph; on CUDA a decode step (one token, cached, ids trusted:
    ``txl_fast.cache.trusted_token_ids``) performs no host synchronisation."""
    hidden, state = _step(transformer, step_ids, state)
    return (*candidates(crit, hidden[:, -1], do_sample, top_k), state)


class GraphedDecode:
    """Cached decode steps replayed from CUDA graphs, one graph per layout of the cache.

    The cache is first fixed (``InferenceCache.fix_for_graphs``), so a few layouts repeat. A layout
    seen for the first time is captured: the capture runs the Python step, which advances the
    cache's bookkeeping but no kernel, so the layout is set back, the graph replayed, and the layout
    the capture ended on recorded for later replays. Static buffers: the input ids (B, 1), copied
    into before each replay, and the candidates each graph returns, overwritten by its next replay.
    """

    def __init__(self, step, cache, ids: torch.Tensor):
        self.step, self.cache = step, cache                           # step(ids (B, 1)) -> candidates
        self.ids = ids.clone()
        self.graphs: dict = {}                                        # layout -> (graph, outputs, layout after)
        self.pool = torch.cuda.graph_pool_handle()                    # shared: replayed in capture order
        # warm up on a side stream (lazy initialisations stay out of the capture); the step's only
        # write outside the memory rows is the new row after them, so setting the layout back undoes it
        layout, side = cache.layout(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(self.ids)
        torch.cuda.current_stream().wait_stream(side)
        cache.restore(layout)

    def __call__(self, ids: torch.Tensor):
        self.ids.copy_(ids)
        layout = self.cache.layout()
        if layout not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.step(self.ids)
            self.graphs[layout] = (graph, outputs, self.cache.layout())
        graph, outputs, after = self.graphs[layout]
        self.cache.restore(layout)
        graph.replay()
        self.cache.restore(after)
        return outputs


def _check_graphable(model, use_cache: bool, mem_len: int) -> None:
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if not use_cache:
        raise ValueError("cuda_graph=True needs use_cache=True (graphs replay the cached decode step)")
    if mem_len <= 0:
        raise ValueError("cuda_graph=True needs mem_len > 0 (without memory every step is longer)")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    init_mems: str = "zeros",
    streamer=None,
    use_cache: bool = True,
    cuda_graph: bool = False,
    mem_len: Optional[int] = None,
    clamp_len: Optional[int] = None,
    same_length: Optional[bool] = None,
) -> torch.LongTensor:
    """Continue ``input_ids`` (B, L) by up to ``max_new_tokens``: (B, L + new) int64.

    As HF's generate for TransfoXL: the prompt runs first (on HF's zero memory by default,
    ``init_mems="zeros"``; ``"empty"`` for the paper's), then one token at a time with the memory
    carried; greedy output equals HF 4.35's. Rows that produced ``eos_token_id`` keep emitting it;
    generation stops when every row has. ``streamer(tokens (B,))`` is called with each step's tokens.

    Host syncs: the prompt's ids are range-checked once; the decode steps feed back the model's
    own tokens unchecked and, on CUDA, sync nowhere (``decode_step``). Whether every row has
    finished is read every EOS_CHECK_EVERY steps (every step with a streamer, which reads the
    tokens anyway), and the output is cut where they all had: the same result.

    cuda_graph=True (model on CUDA, use_cache, mem_len > 0): once the memory is full (right after
    the prompt with init_mems="zeros"; with "empty", after mem_len tokens) the decode step - the
    model on one token and the next token's candidates (``candidates``: greedy's best, top-k's k,
    or the full log-probs) - is replayed from CUDA graphs (``GraphedDecode``: GRAPH_SLACK + 2 of
    them, captured on first use), so a step costs a few launches of host time instead of hundreds.
    Sampling from the candidates (the generator), eos and the streamer run eagerly around it. The
    graphs score HF's zero memory rows as ordinary keys (the torch backend's closed form has
    shapes that change every step), so on the torch backend tokens can differ from eager ones by
    rounding; on the triton backend the arithmetic is the same. Off by default.

    mem_len, clamp_len, same_length: this call's protocol, the model's own where None (the model
    is not changed).
    """
    check_lm_model(model)
    transformer, crit = model.transformer, model.crit
    own = dict(mem_len=transformer.mem_len, clamp_len=transformer.clamp_len, same_length=transformer.same_length)
    given = {k: v for k, v in (("mem_len", mem_len), ("clamp_len", clamp_len), ("same_length", same_length))
             if v is not None}
    protocol = {**own, **given}
    if given:                                            # the model's own settings are HF's to judge
        check_protocol(1, protocol["mem_len"], max(protocol["clamp_len"], 0), protocol["same_length"], 1,
                       init_mems)
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty (B, L) tensor: generation needs a prompt")
    model.transformer.check_input_ids(input_ids)         # also when no token is to be generated
    if init_mems not in ("empty", "zeros"):
        raise ValueError(f"init_mems must be 'empty' or 'zeros', got {init_mems!r}")
    n_token = model.transformer.n_token
    if eos_token_id is not None and not (is_int(eos_token_id) and 0 <= eos_token_id < n_token):
        raise ValueError(f"eos_token_id must be None or an id in [0, {n_token}), got {eos_token_id!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if streamer is not None and not callable(streamer):
        raise TypeError(f"streamer must be callable (it receives each step's tokens), got {type(streamer).__name__}")
    if cuda_graph:
        _check_graphable(model, use_cache, protocol["mem_len"])
    if not use_cache:
        transformer = protocol_view(transformer, **protocol)
    B, L = input_ids.shape
    free = available_memory(input_ids.device)
    if free is not None and B * (L + max_new_tokens) * 8 > free:
        raise ValueError(f"max_new_tokens={max_new_tokens}: the output ({B} x {L + max_new_tokens} ids) would not "
                         f"fit in the {free / 2**30:.1f} GiB of free memory")
    state = _initial_state(transformer, B, init_mems, use_cache, L, protocol)
    out = torch.empty(B, L + max_new_tokens, dtype=torch.int64, device=input_ids.device)
    out[:, :L] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    all_finished = torch.zeros(max_new_tokens, dtype=torch.bool, device=input_ids.device)   # per step

    def step(ids):
        nonlocal state
        logprobs, candidate_ids, state = decode_step(transformer, crit, ids, state, do_sample, top_k)
        return logprobs, candidate_ids

    graphed, step_ids, steps = None, input_ids, 0
    for i in range(max_new_tokens):
        if i == 0:
            with trusted_token_ids():                                 # the prompt: its ids checked above
                candidates = step(step_ids)
        else:
            with trusted_token_ids():
                if cuda_graph and graphed is None and state.mlen == protocol["mem_len"]:
                    state.fix_for_graphs(1, GRAPH_SLACK)
                    graphed = GraphedDecode(step, state, step_ids)
                candidates = graphed(step_ids) if graphed is not None else step(step_ids)
        token = _pick(*candidates, do_sample, temperature, top_p, generator)                  # (B,)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
            all_finished[i] = finished.all()
        out[:, L + i] = token
        steps = i + 1
        if streamer is not None:
            streamer(out[:, L + i])
        if eos_token_id is not None and (streamer is not None or steps % EOS_CHECK_EVERY == 0) \
                and bool(all_finished[i]):
            break
        # without any memory (mem_len 0) HF feeds the whole sequence again; so do we
        step_ids = out[:, : L + steps] if protocol["mem_len"] == 0 else out[:, L + i : L + steps]
    done_steps = int(all_finished[:steps].sum()) if eos_token_id is not None else 0
    if done_steps:                          # cut after the first step where every row had finished
        steps -= done_steps - 1
    return out[:, : L + steps]
