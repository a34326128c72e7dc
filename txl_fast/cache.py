"""Inference cache: what Transformer-XL would otherwise recompute at every segment and token.

Per layer, the projected keys and values of the memory (the last ``mem_len`` positions), and
once per model the projected position embeddings ``r_net(pos_emb)`` of each layer.

Keys stay in time order, as the attention op expects (key j at index j; r row p for distance
Lr - 1 - p, larger distances clamped to row 0), in a sliding buffer: each layer owns a head-major
(B, H, capacity, D) buffer holding the memory in rows [start, end); a step writes its new rows at
[end, end + L) in place and attends
to the (B, Lk, H, D) view of [start, end + L); the memory then becomes the last ``mem_len`` rows.
Head-major, each head's keys are one contiguous block, which a decode step's per-head products
read faster than rows strided by H * D (wt103 decode, 18 layers: 9.9 -> 7.1 ms for q.k and
9.4 -> 6.9 ms for p.v; the position keys are stored the same way). When a step would run past
the buffer, the memory (mem_len rows) is moved to the front, in place. The capacity is
mem_len + L + slack, slack = max(L, mem_len // 8): a move every (L + slack) / L steps, amortised to
at most 8 rows copied per new row (wt103, generation: ~1 MB a token against the ~1.3 GB of weights
and memory it reads; evaluation: ~1 % of a segment's time), while the buffers hold at most
1.25 mem_len + 2 L rows instead of 2 mem_len + L. Nothing is concatenated per step.

HF's zero-filled initial memory is written out like any other, and its rows are also counted
(``LayerKV.uniform_rows``: every one holds the projection of the same zero row) while they stay in
the memory, so that attention scores them in closed form (the op's ``uniform_keys``). A
128-token prompt leaves 1472 such rows of wt103's 1600, and a short generation never gets past
them: a decode step then multiplies only the real rows' keys and values.

Position projections (``PositionKeys``, one per model, shared by all its caches): with clamp_len
fixed, the embedding of distance d does not depend on klen, and for any klen the rows needed are
the last ones of the longest sequence (distances klen-1 … 0, or clamp_len … 0 when clamp_len
is shorter: the attention op clamps larger distances). So each layer's ``r_net(pos_emb)`` is
computed once for the largest klen seen (at most clamp_len + 1 rows) and sliced, and kept across
calls (``generate`` and ``evaluate`` make a new cache per call) for as long as the weights it was made
from are unchanged: the key holds each weight's storage and version counter, which every in-place
update (an optimizer step, ``load_state_dict``) bumps. Only used with autograd off.

What a model keeps for all its caches is one ``InferenceState`` (``TransfoXLModel.inference_state``):
the position keys and the decode step's packed weights (``PackedWeights``, one ``LayerWeights`` per
layer). Token ids a caller vouches for skip their range check inside ``trusted_token_ids``.

The cache is exact: it stores what the uncached forward would recompute from the same inputs.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple, Optional

import torch

from txl_fast.ops.linear import pack, packing_helps


# Token ids the caller vouches for (generate's own argmax or samples): their value check, a host
# sync, is skipped. generate() checks the prompt, once per call; see trusted_token_ids.
_ids_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("txl_fast_ids_trusted", default=False)


@contextlib.contextmanager
def trusted_token_ids():
    """Inside this block the models skip the range check of ``input_ids`` (``int(ids.max())``, a host
    sync): for decode steps fed with tokens the model itself produced, so that a step queues its
    launches without waiting for the GPU and can be captured in a CUDA graph."""
    token = _ids_trusted.set(True)
    try:
        yield
    finally:
        _ids_trusted.reset(token)


def ids_trusted() -> bool:
    """Inside ``trusted_token_ids``: the models skip the value check of their input ids."""
    return _ids_trusted.get()


class LayerKV:
    """Keys and values of one layer's memory, time-ordered in a sliding buffer."""

    def __init__(self, bsz: int, capacity: int, n_head: int, d_head: int, dtype, device):
        self.k = torch.empty(bsz, n_head, capacity, d_head, dtype=dtype, device=device)     # head-major
        self.v = torch.empty_like(self.k)
        self.start = self.end = 0
        self.uniform_end = 0                # rows [start, uniform_end) are copies of one filled row

    @property
    def mlen(self) -> int:
        return self.end - self.start

    def extend(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, L, H, D) new keys/values after the memory; return the (B, mlen + L, H, D) views."""
        L = k_new.shape[1]
        if self.end + L > self.k.shape[2]:
            self.make_room(L)
        self.k[:, :, self.end : self.end + L] = k_new.transpose(1, 2)
        self.v[:, :, self.end : self.end + L] = v_new.transpose(1, 2)
        rows = slice(self.start, self.end + L)
        return self.k[:, :, rows].transpose(1, 2), self.v[:, :, rows].transpose(1, 2)

    def fill(self, k_row: torch.Tensor, v_row: torch.Tensor, rows: int) -> None:
        """Start the memory as ``rows`` copies of one (B, 1, H, D) key/value row (HF's zero memory):
        written out, and counted by ``uniform_rows`` while they stay in the memory."""
        if self.mlen:
            raise ValueError("LayerKV.fill starts an empty memory; this one holds rows")
        B, _, H, D = k_row.shape
        self.extend(k_row.expand(B, rows, H, D), v_row.expand(B, rows, H, D))
        self.uniform_end = self.end + rows

    @property
    def uniform_rows(self) -> int:
        """How many leading rows of the views ``extend`` returns are the filled row (attention's
        ``uniform_keys``: they are scored in closed form)."""
        return max(0, self.uniform_end - self.start)

    def commit(self, new_rows: int, mem_len: int) -> None:
        """After a step of ``new_rows`` rows: keep the last ``mem_len`` rows as memory."""
        self.end += new_rows
        self.start = max(self.start, self.end - mem_len)

    def make_room(self, L: int) -> None:
        M, gap = self.mlen, self.start
        if M + L > self.k.shape[2]:                  # a step longer than the buffer: grow it
            B, H, _, D = self.k.shape
            k, v = self.k.new_empty(B, H, 2 * M + L, D), self.v.new_empty(B, H, 2 * M + L, D)
            k[:, :, :M], v[:, :, :M] = self.k[:, :, self.start : self.end], self.v[:, :, self.start : self.end]
            self.k, self.v = k, v
        elif self.k.is_cuda:
            # one move through a temporary: the caching allocator reuses its block (no page faults
            # as on the CPU below), and a graph-captured step (inference.generate) holds 2 copies, not M / gap
            self.k[:, :, :M] = self.k[:, :, gap : gap + M].clone()
            self.v[:, :, :M] = self.v[:, :, gap : gap + M].clone()
        else:
            # move rows [gap, gap + M) to [0, M) in place, front to back in pieces of at most `gap`
            # rows: no piece overlaps its own source, and nothing is allocated (a temporary copy of
            # the memory is fresh pages to fault in: wt103 at batch 4, 18 layers, 130-800 ms a move
            # with it, 69 ms without; 2.4 s in the profile of a whole segment)
            for lo in range(0, M, gap):
                hi = min(lo + gap, M)
                self.k[:, :, lo:hi] = self.k[:, :, gap + lo : gap + hi]
                self.v[:, :, lo:hi] = self.v[:, :, gap + lo : gap + hi]
        self.start, self.end = 0, M
        self.uniform_end = max(0, self.uniform_end - gap)


class InferenceCache:
    """Everything a model's cached forward needs between calls; make one with ``model.new_cache``.

    The cache also holds the protocol its calls run with (``mem_len``, ``clamp_len``,
    ``same_length``, by default the model's): a call passes it with the cache instead of setting
    it on the model, so one model serves callers with different protocols at once.

    A batch row can start a new document at any position (``start_documents``) while the other
    rows go on: on an "empty" cache the keys before its start are hidden from the document's
    queries (``key_mask``), on a "zeros" one HF's zero memory is written into the row again.
    """

    def __init__(self, owner, bsz: int, mem_len: int, n_layer: int, n_head: int, d_head: int, dtype, device,
                 step_hint: int = 128, clamp_len: int = 0, same_length: bool = False):
        self.owner_id = id(owner)
        self.owner_mem_len = owner.mem_len                 # the model's own, to catch reset_memory_length
        self.bsz, self.mem_len, self.clamp_len, self.same_length = bsz, mem_len, clamp_len, same_length
        capacity = mem_len + step_hint + max(step_hint, mem_len // 8)     # see the module docstring
        self.layers = [LayerKV(bsz, capacity, n_head, d_head, dtype, device) for _ in range(n_layer)]
        self.fill_rows: Optional[list] = None              # per layer the zero memory's (k, v) row, "zeros"
        self.position = 0                                  # positions written per row: the next step's first
        self.starts: list[list[int]] = [[] for _ in range(bsz)]   # per row, document starts the keys may span

    @property
    def mlen(self) -> int:
        return self.layers[0].mlen

    def check(self, owner, bsz: int) -> None:
        if self.owner_id != id(owner):
            raise ValueError("this inference cache belongs to another model")
        if bsz != self.bsz:
            raise ValueError(f"the inference cache was made for batch size {self.bsz}, got {bsz}")
        if owner.mem_len != self.owner_mem_len:
            raise ValueError(f"the inference cache was made when the model had mem_len {self.owner_mem_len}, it now "
                             f"has {owner.mem_len} (reset_memory_length): make a new cache")

    def start_documents(self, row_offsets: list[tuple[int, int]]) -> None:
        """Batch row ``row`` starts a new document at ``offset`` of the next step, for each pair:
        its queries from there on see no key before it, as a new cache would start. On a "zeros"
        cache (HF's zero memory written again) the offset must be 0."""
        for row, offset in row_offsets:
            if self.fill_rows is None:
                self.starts[row].append(self.position + offset)
            elif offset:
                raise ValueError("a document starts mid-step only on an 'empty' cache: HF's zero memory is "
                                 "written before a step")
        rows = [row for row, _ in row_offsets]
        if self.fill_rows is not None and rows:
            for kv, (k_row, v_row) in zip(self.layers, self.fill_rows):
                kv.k[rows, :, kv.start : kv.end] = k_row
                kv.v[rows, :, kv.start : kv.end] = v_row
                kv.uniform_end = kv.start                  # the rows differ now: no closed form

    def key_mask(self, qlen: int) -> Optional[torch.Tensor]:
        """(B, qlen, mlen + qlen) bool for the next step of ``qlen`` positions: False where a query
        would see a key before its document's start; None when no row has a start among the keys."""
        first = self.position - self.mlen                                   # the position of key 0
        live = [[s for s in row if s > first] for row in self.starts]
        if not any(live):
            return None
        queries = torch.arange(self.position, self.position + qlen)
        doc_start = torch.full((self.bsz, qlen), first)                    # (B, qlen): each query's document
        for b, row in enumerate(live):
            for start in sorted(row):
                doc_start[b, queries >= start] = start
        keys = torch.arange(first, self.position + qlen)
        return (keys >= doc_start[:, :, None]).to(self.layers[0].k.device)  # (B, qlen, mlen + qlen)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only the batch rows ``rows`` (in that order): the batch shrinks to them (a copy)."""
        index = torch.tensor(rows, device=self.layers[0].k.device)
        for kv in self.layers:
            kv.k, kv.v = kv.k.index_select(0, index), kv.v.index_select(0, index)
        self.bsz, self.starts = len(rows), [self.starts[b] for b in rows]

    def commit(self, new_rows: int) -> None:
        for layer in self.layers:
            layer.commit(new_rows, self.mem_len)
        self.position += new_rows
        first = self.position - self.mlen
        self.starts = [[s for s in row if s > first] for row in self.starts]

    def layout(self) -> tuple:
        """Where every layer's memory lies: its buffer and rows. A step of a given length on equal
        layouts reads and writes the same addresses with the same shapes (what a CUDA graph fixes)."""
        return tuple((kv.k.data_ptr(), kv.start, kv.end, kv.uniform_end) for kv in self.layers)

    def restore(self, layout: tuple) -> None:
        """Set the rows bookkeeping back to ``layout`` (of these same buffers); the data is not touched."""
        for kv, (ptr, start, end, uniform_end) in zip(self.layers, layout):
            if kv.k.data_ptr() != ptr:
                raise ValueError("InferenceCache.restore: the layout is of other buffers")
            kv.start, kv.end, kv.uniform_end = start, end, uniform_end

    def fix_for_graphs(self, step_rows: int, slack: int) -> None:
        """Make steps of ``step_rows`` rows repeat a few layouts: each layer's buffer reallocated to
        mem_len + step_rows + slack rows, the memory at its front (slack + 2 layouts, the last one
        moving the memory back to the front), and the uniform rows no longer counted (their count
        changes at every step, and with it the closed form's shapes: attention then scores every
        key, the same result up to rounding)."""
        for kv in self.layers:
            B, H, _, D = kv.k.shape
            M = kv.mlen
            k = kv.k.new_empty(B, H, self.mem_len + step_rows + slack, D)
            v = kv.v.new_empty(k.shape)
            k[:, :, :M], v[:, :, :M] = kv.k[:, :, kv.start : kv.end], kv.v[:, :, kv.start : kv.end]
            kv.k, kv.v = k, v
            kv.start, kv.end, kv.uniform_end = 0, M, 0


class DerivedStore:
    """What a model keeps derived from its weights: copies of the model (``copy.deepcopy``,
    ``pickle``, ``torch.save``) start it empty, as it would be remade from the copy's own weights
    (and oneDNN's packed tensors cannot be copied or pickled at all).

    Safe when threads share the model: an entry is one (key, value) tuple, read once into a local
    and replaced whole, so a caller never pairs one caller's key with another's value; two
    threads that miss at once both compute it (the same value), and the last one is kept.
    """

    def __init__(self):
        self._entry: Optional[tuple] = None              # (key, value)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @property
    def value(self):
        """What is stored now, or None."""
        entry = self._entry
        return None if entry is None else entry[1]

    def clear(self) -> None:
        self._entry = None


class PositionKeys(DerivedStore):
    """A model's projected position embeddings, kept while the key they were made with holds."""

    def get(self, klen: int, rows: int, key, make) -> list:
        """Per layer (klen, H, D) position keys (distances klen - 1 … 0); ``make(rows)`` computes
        ``rows`` >= klen of them (the longest expected) when the stored ones are too short or their
        key differs. With autograd on they are made afresh and neither kept nor taken from the
        store: a kept graph would outlive its step, and stored keys carry no gradient to ``r_net``."""
        if torch.is_grad_enabled():
            return [r[r.shape[0] - klen :] for r in make(rows)]
        entry = self._entry
        if entry is None or entry[0] != key or entry[1][0].shape[0] < klen:
            entry = self._entry = (key, make(rows))
        return [r[r.shape[0] - klen :] for r in entry[1]]


class LayerWeights(NamedTuple):
    """One decoder layer's weights of a cached step's four products (``RelPartialLearnableDecoderLayer.
    decode_weights``), or their packed copies (``PackedWeights``)."""
    qkv: Optional[torch.Tensor]         # dec_attn.qkv_net
    o: Optional[torch.Tensor]           # dec_attn.o_net
    ff1: Optional[torch.Tensor]         # pos_ff.CoreNet[0]
    ff2: Optional[torch.Tensor]         # pos_ff.CoreNet[3]


NOT_PACKED = LayerWeights(None, None, None, None)      # a layer whose products take their weights as they are


class PackedWeights(DerivedStore):
    """A model's decode-step weights in oneDNN's layout (``ops.linear.pack``), kept while they hold.

    ``get(layers, rows)`` returns per layer a ``LayerWeights`` of packed copies, or None where they
    would not help (``ops.linear.packing_helps``: bf16, or fp32 at 2 or more rows or on one thread;
    a CPU with oneDNN) or while autograd is on; the copies are remade when the row count or a weight's storage
    or version counter changes (an optimizer step, ``load_state_dict``): never stale. They cost a
    second copy of the weights they pack (wt103's 18 layers: 453 MB bf16, 906 MB fp32), freed when
    a step finds packing no help (more rows, more threads) or by ``clear_position_cache``.
    """

    def get(self, layers: list[LayerWeights], rows: int) -> Optional[list[LayerWeights]]:
        if torch.is_grad_enabled():
            return None
        if not packing_helps(layers[0].qkv, rows):   # e.g. fp32 single rows on more threads: the copies go
            self.clear()
            return None
        key = (rows, tuple((w.data_ptr(), w._version, w.dtype) for layer in layers for w in layer))
        entry = self._entry
        if entry is None or entry[0] != key:
            self._entry = None                                      # the old copies freed first
            entry = self._entry = (key, [LayerWeights(*(pack(w, rows) for w in layer)) for layer in layers])
        return entry[1]


class InferenceState:
    """What one model keeps for the cached calls of all its caches and threads, derived from its
    weights: the position keys and the decode step's packed weights. Each store replaces its entry
    whole (``DerivedStore``), and copies of the model start both empty."""

    def __init__(self):
        self.positions = PositionKeys()         # per layer r_net(pos_emb), see the module docstring
        self.packed = PackedWeights()           # per layer the decode step's weights in oneDNN's layout

    def clear(self) -> None:
        self.positions.clear()
        self.packed.clear()
