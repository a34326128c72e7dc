"""Word surprisal: the log-probability of every token of many documents, memory carried within each.

    score(model, documents, ...)            one DocumentScores per document (ids in), input order
    read_documents(text, tokenizer, ...)    text -> documents of sentences of tokens (the conventions)
    score_text(model, tokenizer, text, ...) TokenScore rows, what ``txl-fast score`` writes

A document is read as ``evaluate`` reads a stream: segments of ``tgt_len`` tokens, the memory of
``mem_len`` positions carried from segment to segment, from an empty memory (the original code;
``init_mems="zeros"``: HF's zero memory). One context token (``<eos>``, the symbol that precedes
every line of the training stream) goes before its first token, so every token is predicted.

Many documents run at once, one per batch row. A row whose document has ended takes the next one
at the next segment and starts it afresh (``InferenceCache.reset_rows``: the old memory is hidden
from that row only), so each number is the one the document alone gives: segments start at the
same offsets, the same keys are visible at the same distances. Documents are taken longest first,
so that rows end together, and once none is left the batch shrinks to the rows still reading.

Under ``torchrun`` (an initialised process group, gloo or nccl) the documents are dealt to the
ranks (longest first, round robin: even loads), each rank scores its own, and every rank gets
every result back, in input order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

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
        rows = min(batch_size, len(mine))
        check_cache_fits(t, rows, mem_len, tgt_len)
        cache = t.new_cache(rows, init_mems, tgt_len, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
        _run(model, cache, docs, mine, results, context_id, tgt_len, layers)
    if world_size > 1 and results:
        _share(results, shards, rank, device=p.device, layers=layers)
    return results


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


def _run(model, cache, docs: list, order: list, results: list, context_id: int, tgt_len: int, layers: list) -> None:
    """Stream the documents of ``order`` through the batch rows of ``cache``, filling ``results``."""
    t, crit = model.transformer, model.crit
    device = next(model.parameters()).device
    pending = iter(order)
    row_doc: list[Optional[int]] = [None] * cache.bsz      # the document each row reads, and where it is
    row_pos = [0] * cache.bsz
    inputs = {}                                              # document -> [context, its ids] (n + 1,)
    while True:
        fresh = []
        for b in range(cache.bsz):
            if row_doc[b] is None and (d := next(pending, None)) is not None:
                row_doc[b], row_pos[b] = d, 0
                inputs[d] = torch.cat([torch.tensor([context_id]), docs[d]])
                fresh.append(b)
        active = [b for b in range(cache.bsz) if row_doc[b] is not None]
        if not active:
            return
        if len(active) < cache.bsz:          # nothing left to start: the batch shrinks to the rows reading
            cache.keep_rows(active)
            row_doc, row_pos = [row_doc[b] for b in active], [row_pos[b] for b in active]
            fresh = [active.index(b) for b in fresh]
            active = list(range(len(active)))
        cache.reset_rows(fresh)
        # a step shorter than tgt_len only when every row ends in it: segments stay where they would alone
        L = min(tgt_len, max(len(inputs[row_doc[b]]) - row_pos[b] for b in active))
        ids = torch.full((cache.bsz, L), context_id)                                 # (B, L)
        targets = torch.full((cache.bsz, L), context_id)                             # (B, L): input t predicts t + 1
        for b in active:
            x, pos = inputs[row_doc[b]], row_pos[b]
            seg, nxt = x[pos : pos + L], x[pos + 1 : pos + 1 + L]
            ids[b, : len(seg)], targets[b, : len(nxt)] = seg, nxt
        out = t(ids.to(device), cache=cache, output_hidden_states=bool(layers))
        hidden = out.last_hidden_state                                               # (B, L, d)
        nll = ops.adaptive_nll(hidden.reshape(-1, t.d_model), targets.view(-1).to(device), *crit.clusters())
        logprobs = nll.view(cache.bsz, L).neg().float().cpu()
        states = {l: out.hidden_states[l].cpu() for l in layers}                     # (B, L, d) each
        for b in active:
            d, pos = row_doc[b], row_pos[b]
            n, res = len(docs[d]), results[d]
            k = max(0, min(L, n - pos))                  # inputs pos … pos + k - 1 predict tokens pos …
            res.logprobs[pos : pos + k] = logprobs[b, :k]
            first, last = max(0, 1 - pos), min(L, n + 1 - pos)       # input pos + j holds token pos + j - 1
            for l in layers:
                res.hidden_states[l][pos + first - 1 : pos + last - 1] = states[l][b, first:last]
            row_pos[b] += L
            if row_pos[b] >= n + 1:
                row_doc[b] = None


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
