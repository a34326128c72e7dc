"""Word surprisal: the log-probability of every token of many documents, memory carried within each.

    score(model, documents, ...)            one DocumentScores per document (ids in), input order
    read_documents(text, tokenizer, ...)    text -> documents of sentences of tokens (the conventions)
    score_text(model, tokenizer, text, ...) TokenScore rows, what ``txl-fast score`` writes

A document is read as ``evaluate`` reads a stream: segments of ``tgt_len`` tokens, the memory of
``mem_len`` positions carried from segment to segment, from an empty memory (the original code;
``init_mems="zeros"``: HF's zero memory). One context token (``<eos>``, the symbol that precedes
every line of the training stream) goes before its first token, so every token is predicted.

Many documents run at once: each batch row reads a series of documents, each started afresh
(``InferenceCache.start_documents``: the keys before its start hidden from it), so each number is
the one the document alone gives. With same_length on an empty memory (the paper's protocol) a
token sees exactly the last mem_len positions of its document however the document is cut into
segments, so the documents of a row follow each other without a gap; otherwise what a token sees
depends on where the segments start, and each document starts at a segment boundary of its row,
the rest of the segment before it padding. Documents go longest first to the row that ends first
(then swapped while that ends the last row sooner), so rows end together; the batch shrinks as
rows end.

Under ``torchrun`` (an initialised process group, gloo or nccl) the documents are dealt to the
ranks (longest first, round robin: even loads), each rank scores its own, and every rank gets
every result back, in input order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from txl_fast import ops
from txl_fast.checks import is_int
from txl_fast.distributed import all_gather_rows, world
from txl_fast.inference import check_cache_fits, check_lm_model, check_protocol

LN2 = math.log(2)


@dataclass
class DocumentScores:
    logprobs: torch.Tensor                  # (n,) float32: ln p(token | the tokens before it)
    hidden_states: dict = field(default_factory=dict)   # layer -> (n, d_model): the state at each token

    @property
    def surprisal(self) -> torch.Tensor:
        """(n,) bits: -log2 p."""
        return -self.logprobs / LN2


def _document_ids(doc, i: int, vocab: int) -> torch.Tensor:
    if isinstance(doc, np.ndarray):
        doc = torch.from_numpy(doc) if doc.dtype != np.bool_ and np.issubdtype(doc.dtype, np.integer) else doc
    if isinstance(doc, torch.Tensor):
        if doc.dim() != 1 or doc.dtype.is_floating_point or doc.dtype == torch.bool or doc.is_complex():
            raise ValueError(f"document {i}: expected a 1-D tensor of token ids, got {doc.dtype} {tuple(doc.shape)}")
        ids = doc.to("cpu", torch.int64)
    elif isinstance(doc, (list, tuple)) and all(is_int(t) for t in doc):
        ids = torch.tensor(doc, dtype=torch.int64)
    else:
        raise ValueError(f"document {i}: expected a sequence of int token ids, got {type(doc).__name__}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"document {i}: token ids must be in [0, {vocab}), got {int(ids.min())} … {int(ids.max())}")
    return ids


def _layer_indices(layers, n_layer: int) -> list[int]:
    """Hidden-state indices: 0 the embeddings, i the output of layer i, n_layer the last; negative
    from the end, as Python's."""
    if layers is None:
        return []
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(is_int(x) for x in layers):
        raise ValueError(f"layers must be a list of ints in [0, {n_layer}], got {layers!r}")
    bad = [x for x in layers if not -(n_layer + 1) <= x <= n_layer]
    if bad:
        raise ValueError(f"layers must lie in [0, {n_layer}] (0: the embeddings, {n_layer}: the last layer's "
                         f"output), got {bad}")
    return [x % (n_layer + 1) for x in layers]


@torch.no_grad()
def score(
    model,
    documents: Sequence,
    *,
    tgt_len: int = 128,
    mem_len: Optional[int] = None,
    clamp_len: Optional[int] = None,
    same_length: Optional[bool] = None,
    batch_size: int = 8,
    init_mems: str = "empty",
    context_id: int,
    layers: Optional[Sequence[int]] = None,
) -> list[DocumentScores]:
    """Per-token log-probabilities of each document (a 1-D sequence of token ids) under ``model``
    (a TransfoXLLMHeadModel), see the module docstring; mem_len, clamp_len, same_length: the
    model's own where None (the model is not changed: one model serves many callers).

    context_id: the token read before each document, so that its first token is predicted too:
    the vocabulary's ``<eos>`` (``tokenizer.eos_token_id``), as a line of the training stream starts.
    layers: hidden states to return per token, by index (0: the embeddings, n_layer: the output):
    the state at a token is the one computed where it is the input, having read it.
    Every argument is checked before any compute.
    """
    check_lm_model(model)
    t = model.transformer
    mem_len = t.mem_len if mem_len is None else mem_len
    clamp_len = max(t.clamp_len, 0) if clamp_len is None else clamp_len         # < 0 (HF): no clamp
    same_length = (t.same_length and mem_len > 0) if same_length is None else same_length
    check_protocol(tgt_len, mem_len, clamp_len, same_length, batch_size, init_mems)
    vocab = model.config.vocab_size
    if not is_int(context_id) or not 0 <= context_id < vocab:
        raise ValueError(f"context_id must be a token id in [0, {vocab}), got {context_id!r}")
    layers = _layer_indices(layers, t.n_layer)
    if isinstance(documents, (str, bytes, torch.Tensor)) or not isinstance(documents, Sequence):
        raise ValueError("documents must be a list of documents, each a sequence of token ids")
    docs = [_document_ids(d, i, vocab) for i, d in enumerate(documents)]

    p = next(model.parameters())
    results = [DocumentScores(torch.full((len(d),), math.nan), {l: torch.full((len(d), t.d_model), math.nan,
                                                                              dtype=p.dtype) for l in layers})
               for d in docs]
    rank, world_size = world()
    order = sorted((i for i, d in enumerate(docs) if len(d)), key=lambda i: -len(docs[i]))
    shards = [order[r::world_size] for r in range(world_size)]                 # longest first, dealt round robin
    mine = shards[rank]
    if mine:
        if init_mems == "empty":    # a row's memory never holds more than its document: the same numbers
            mem_len = min(mem_len, len(docs[mine[0]]) + 1)
        # same_length from an empty memory: a token sees the last mem_len positions of its document
        # however the document is cut into segments, so documents follow each other in a row;
        # otherwise (the segments' memory decides what is seen) each starts at a segment boundary
        packed = same_length and init_mems == "empty"
        rows = min(batch_size, len(mine))
        check_cache_fits(t, rows, mem_len, tgt_len)
        cache = t.new_cache(rows, init_mems, tgt_len, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
        _run(model, cache, _lay_out(docs, mine, rows, 1 if packed else tgt_len), docs, results, context_id, tgt_len,
             layers)
    if world_size > 1 and results:
        _share(results, shards, rank, device=p.device, layers=layers)
    return results


def _lay_out(docs: list, order: list, rows: int, align: int) -> list[list[tuple[int, int]]]:
    """Per batch row, its (document, start) pairs, starts in increasing order: each document of
    ``order`` (longest first) goes to the row that ends first, then documents are swapped between
    the row that ends last and the others while that ends it sooner (the batch runs until its last
    row ends). A document takes its context token and ids, rounded up to a multiple of ``align``."""
    size = {d: -(-(len(docs[d]) + 1) // align) * align for d in order}
    members: list[list[int]] = [[] for _ in range(rows)]
    ends = [0] * rows
    for d in order:
        row = min(range(rows), key=ends.__getitem__)
        members[row].append(d)
        ends[row] += size[d]
    # few documents a row (many make LPT's rows end within a small document of each other): each
    # swap lowers the sum of the ends' squares, so this ends; bounded all the same
    improved, swaps = len(order) <= 64 * rows, 0
    while improved and swaps < 4 * len(order):
        improved, swaps = False, swaps + 1
        last = max(range(rows), key=ends.__getitem__)
        for row in range(rows):
            gap = ends[last] - ends[row]
            swap = next(((i, j) for i, a in enumerate(members[last]) for j, b in enumerate(members[row] + [None])
                         if 0 < size[a] - (size[b] if b is not None else 0) < gap), None)
            if swap is not None:
                i, j = swap
                a = members[last].pop(i)
                b = members[row].pop(j) if j < len(members[row]) else None
                members[row].append(a)
                if b is not None:
                    members[last].append(b)
                moved = size[a] - (size[b] if b is not None else 0)
                ends[last], ends[row] = ends[last] - moved, ends[row] + moved
                improved = True
                break
    placed = []
    for row in members:
        start, pairs = 0, []
        for d in row:
            pairs.append((d, start))
            start += size[d]
        placed.append(pairs)
    return placed


def _run(model, cache, placed: list, docs: list, results: list, context_id: int, tgt_len: int, layers: list) -> None:
    """Read each batch row's documents (``placed``, from ``_lay_out``) in segments of tgt_len,
    each document started afresh in its row (``cache.start_documents``), writing each step's
    log-probabilities and states straight into ``results``."""
    t, crit = model.transformer, model.crit
    device = next(model.parameters()).device
    lengths = [max((start + len(docs[d]) + 1 for d, start in row), default=0) for row in placed]
    stream = torch.full((len(placed), max(lengths)), context_id)                     # (B, T): context, doc, ...
    for b, row in enumerate(placed):
        for d, start in row:
            stream[b, start + 1 : start + 1 + len(docs[d])] = docs[d]
    rows = list(range(len(placed)))                                                  # the cache's rows, as rows of stream
    first = [0] * len(placed)                    # per row of stream, its first document not yet read to the end
    for pos in range(0, stream.shape[1], tgt_len):
        if any(lengths[b] <= pos for b in rows):                                     # rows done: the batch shrinks
            keep = [i for i, b in enumerate(rows) if lengths[b] > pos]
            cache.keep_rows(keep)
            rows = [rows[i] for i in keep]
        L = min(tgt_len, max(lengths[b] for b in rows) - pos)
        in_step = [list(_overlapping(placed[b], first[b], docs, pos, pos + L)) for b in rows]
        cache.start_documents([(i, start - pos) for i, row in enumerate(in_step) for _, start in row
                               if pos <= start and start > 0])                       # a row's first needs no start
        ids = stream[rows, pos : pos + L]                                            # (B, L)
        targets = stream[rows, pos + 1 : pos + 1 + L]
        targets = torch.cat([targets, ids[:, targets.shape[1] :]], dim=1)            # past the end: any id
        out = t(ids.to(device), cache=cache, output_hidden_states=bool(layers))
        nll = ops.adaptive_nll(out.last_hidden_state.reshape(-1, t.d_model), targets.reshape(-1).to(device),
                               *crit.clusters())
        logprobs = nll.view(len(rows), L).neg().float().cpu()                        # (B, L): position predicts next
        states = {layer: out.hidden_states[layer].cpu() for layer in layers}         # (B, L, d) each
        for i, (b, row) in enumerate(zip(rows, in_step)):
            for d, start in row:
                n, res = len(docs[d]), results[d]
                k0, k1 = max(0, pos - start), min(n, pos + L - start)                # token k predicted at start + k
                res.logprobs[k0:k1] = logprobs[i, start + k0 - pos : start + k1 - pos]
                k0, k1 = max(0, pos - start - 1), min(n, pos + L - start - 1)        # token k read at start + 1 + k
                for layer in layers:
                    res.hidden_states[layer][k0:k1] = states[layer][i, start + 1 + k0 - pos : start + 1 + k1 - pos]
                if start + n + 1 <= pos + L:
                    first[b] += 1


def _overlapping(row: list, first: int, docs: list, lo: int, hi: int):
    """The (document, start) pairs of ``row`` from index ``first`` on whose positions (start …
    start + n) meet [lo, hi); a row's documents are in order of their starts."""
    for d, start in row[first:]:
        if start >= hi:
            return
        if start + len(docs[d]) + 1 > lo:
            yield d, start


def _share(results: list, shards: list, rank: int, device, layers: list) -> None:
    """Fill every rank's ``results`` with the documents the other ranks scored (``shards[r]``)."""
    def gather(get):                             # get(result) -> (n, ...) rows of one document
        local = torch.cat([get(results[i]) for i in shards[rank]]) if shards[rank] else None
        counts = [sum(len(results[i].logprobs) for i in shard) for shard in shards]
        if local is None:
            local = get(results[0])[:0]
        parts = all_gather_rows(local.to(device), counts)
        for shard, part in zip(shards, parts):
            for i, rows in zip(shard, part.cpu().split([len(results[i].logprobs) for i in shard])):
                get(results[i]).copy_(rows)

    gather(lambda r: r.logprobs)
    for layer in layers:
        gather(lambda r, layer=layer: r.hidden_states[layer])


# ---- text ------------------------------------------------------------------------------------------
@dataclass
class TokenScore:
    """One row of ``txl-fast score``'s output."""
    document: int               # 0-based, in input order
    sentence: int               # 0-based within the document: one per non-blank line
    token: int                  # 0-based within the sentence
    text: str                   # the token as tokenised (the word itself when it is <unk>)
    id: int
    unk: bool
    logprob: float              # natural log
    surprisal: float            # bits


def read_documents(text: str, tokenizer, pretokenized: bool = False) -> list[list[list[str]]]:
    """Documents (separated by one or more blank lines) of sentences (one per non-blank line) of
    tokens, each sentence ending in ``<eos>``. The tokenizer splits each line as ``txl-fast eval``
    does (Moses: punctuation its own token); ``pretokenized``: split at whitespace only (lower-cased
    if the vocabulary is)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    documents, sentences = [], []
    for line in text.splitlines() + [""]:
        if not line.strip():
            if sentences:
                documents.append(sentences)
            sentences = []
            continue
        if pretokenized:
            tokens = (line.lower() if tokenizer.lower_case else line).split() + ["<eos>"]
        else:
            tokens = tokenizer.tokenize(line, add_eos=True)
        sentences.append(tokens)
    return documents


def score_text(model, tokenizer, text: str, *, pretokenized: bool = False, **kwargs):
    """``read_documents`` then ``score``: (TokenScore rows in input order, the DocumentScores).
    kwargs: ``score``'s protocol, batch and ``layers``."""
    documents = read_documents(text, tokenizer, pretokenized)
    if tokenizer.eos_token_id is None:
        raise ValueError("the vocabulary has no <eos>: it cannot mark the ends of sentences")
    ids = [[tokenizer.convert_tokens_to_ids(tok) for sent in doc for tok in sent] for doc in documents]
    scores = score(model, ids, context_id=tokenizer.eos_token_id, **kwargs)
    unk = tokenizer.unk_token_id
    rows = []
    for d, (doc, doc_ids, result) in enumerate(zip(documents, ids, scores)):
        flat = iter(zip(doc_ids, result.logprobs.tolist()))
        for s, sentence in enumerate(doc):
            for i, token in enumerate(sentence):
                token_id, logprob = next(flat)
                rows.append(TokenScore(d, s, i, token, token_id, token_id == unk, logprob, -logprob / LN2))
    return rows, scores
