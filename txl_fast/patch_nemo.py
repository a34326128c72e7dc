"""NeMo's Conformer attention through ``txl_fast.patch``: adapters for ``nemo-toolkit`` 3.0's
``RelPositionMultiHeadAttention`` (full, limited and chunked-limited context, the cache-aware
streaming step) and ``RelPositionMultiHeadAttentionLongformer`` (local attention), added to
``txl_fast.patch_speech``'s table; the mapping and the fallbacks are in docs/conformer.md."""
from __future__ import annotations

import math
import sys

import torch

from txl_fast import patch_speech

__all__ = ["SUPPORTED"]

_MODULE = "nemo.collections.asr.parts.submodules.multi_head_attention"


def _prefix_lengths(valid: torch.Tensor):
    """valid (B, L) bool -> lengths (B,) int64 when every row is a prefix (positions [0, n)), else None."""
    lengths = valid.sum(dim=1)
    prefix = torch.arange(valid.shape[1], device=valid.device) < lengths[:, None]
    return lengths if torch.equal(valid, prefix) else None


def _visible(Lq: int, Lk: int, device, context=None, chunk_context=None) -> torch.Tensor:
    """(Lq, Lk) bool: the op's context or chunk_context pattern (query i at position p = i + Lk - Lq)."""
    p = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=device)[None, :]
    if context is not None:
        return (p - j <= context[0]) & (j - p <= context[1])
    C, L, R = chunk_context
    c = p // C
    return ((j >= (c - L) * C) | (L < 0)) & (j < (c + 1) * C + R)


def _chunks(rows: list) -> list:
    """The chunk_contexts (C, L, R) that rows (p, lo, hi) suggest, query position p seeing keys [lo, hi):
    chunks start where hi steps, and (chunked_limited: no right context R) hi and lo lie on chunk starts
    except where the first and last keys cut them, so C is the gcd of the steps, or of the steps and
    the inner hi and lo; L and R the largest reach to the left and right of a row's chunk. Guesses,
    checked by the caller."""
    steps = [p for (p, _, b), (_, _, b0) in zip(rows[1:], rows) if b != b0]
    inner = [v for v in {a for _, a, _ in rows} | {b for _, _, b in rows}
             if min(a for _, a, _ in rows) < v < max(b for _, _, b in rows)]
    options = []
    for C in dict.fromkeys([math.gcd(*steps), math.gcd(*steps, *inner)]):
        C = C or max(b for _, _, b in rows)                                    # one chunk
        L = max(p // C - a // C for p, a, _ in rows) if any(a > 0 for _, a, _ in rows) else -1
        options.append((C, L, max(0, max(b - (p // C + 1) * C for p, _, b in rows))))
    return options


def mask_layout(mask: torch.Tensor):
    """NeMo's att_mask (B, Lq, Lk) bool (True = hidden) -> (key_mask or None, the op's other arguments)
    that hide exactly the same scores: key padding (key_lengths when a prefix, else key_mask), query
    padding (query_lengths), and no context, a (left, right) context or a chunk_context; False when the
    op cannot express the mask. Reads the mask's values (a few host syncs; once per forward)."""
    B, Lq, Lk = mask.shape
    seen = ~mask                                                               # (B, Lq, Lk)
    queries, keys = seen.any(dim=2), seen.any(dim=1)                           # (B, Lq), (B, Lk)
    query_lengths = _prefix_lengths(queries)
    if query_lengths is None:
        return False
    padding = queries[:, :, None] & keys[:, None, :]                           # (B, Lq, Lk)
    layout = {}
    if not torch.equal(seen, padding):
        union = seen.any(dim=0)                                                # (Lq, Lk)
        j = torch.arange(Lk, device=mask.device)
        lo = torch.where(union, j, Lk).amin(dim=1).tolist()                   # per query: first and last key seen
        hi = (torch.where(union, j, -1).amax(dim=1) + 1).tolist()
        rows = [(Lk - Lq + i, a, b) for i, (a, b) in enumerate(zip(lo, hi)) if a < Lk]   # (position, lo, hi)
        left, right = max(p - a for p, a, _ in rows), max(b - 1 - p for p, _, b in rows)
        for option in [{"context": (max(left, 0), max(right, 0))}] + [{"chunk_context": c} for c in _chunks(rows)]:
            if torch.equal(seen, padding & _visible(Lq, Lk, mask.device, **option)):
                layout = option
                break
        else:
            return False
    if not bool(queries.all()):
        layout["query_lengths"] = query_lengths
    if bool(keys.all()):
        return None, layout
    key_lengths = _prefix_lengths(keys)
    if key_lengths is None:                      # a cache's leading empty frames: keys [offset, Lk)
        return keys, layout
    return None, {**layout, "key_lengths": key_lengths}


def _pad_layout(pad_mask: torch.Tensor):
    """The Longformer's pad_mask (B, T) bool (True = padding) -> the op's key_lengths and query_lengths
    (none when nothing is padded; its padded queries give zeros); False unless the padding trails."""
    lengths = _prefix_lengths(~pad_mask)
    if lengths is None:
        return False
    return {} if not bool(pad_mask.any()) else dict(key_lengths=lengths, query_lengths=lengths)


def _library(module):
    """The module NeMo's class is defined in (its own ``avoid_float16_autocast_context``)."""
    return sys.modules[module._txl_fast_base.__module__]


class _NeMoAttention:
    """What both NeMo adapters share: dropout, projections under NeMo's autocast rules, the op, linear_out."""

    def _txl_fast_dropout_p(self) -> float:
        return self.dropout.p

    def _txl_fast_attend(self, query, key, value, r_rows, keys, layout):
        """query (B, Lq, E), key, value (B, Lk, E), ``r_rows(project)`` -> r (Lk + Lq - 1, H, D) ->
        linear_out of the attention (B, Lq, E). As NeMo: under CUDA autocast the inputs go to float32
        and float16 autocast becomes bfloat16 (its ``avoid_float16_autocast_context``)."""
        B, Lq, _ = query.shape
        H, D = self.h, self.d_k
        if torch.is_autocast_enabled():
            query, key, value = query.to(torch.float32), key.to(torch.float32), value.to(torch.float32)
        with _library(self).avoid_float16_autocast_context():
            q, k, v = (lin(x).view(B, -1, H, D) for lin, x in ((self.linear_q, query), (self.linear_k, key),
                                                                (self.linear_v, value)))
            r = r_rows(lambda pos: self.linear_pos(pos).view(-1, H, D))
            out, _ = patch_speech.attend(self, q, k, v, r, self.pos_bias_u, self.pos_bias_v, 1 / self.s_d_k, keys,
                                          False, accumulate_fp32=True, empty_rows="zero", **layout)
            return self.linear_out(out.reshape(B, Lq, H * D))                  # (B, Lq, E)


def _positions_ok(pos_emb, B: int, rows: int, exact: bool) -> bool:
    """pos_emb (1 or B, rows or more, E) with one table for every batch row."""
    return (isinstance(pos_emb, torch.Tensor) and pos_emb.dim() == 3 and pos_emb.shape[0] in (1, B)
            and (pos_emb.shape[1] == rows if exact else pos_emb.shape[1] >= rows)
            and patch_speech.once_per_tensor("nemo positions", pos_emb, patch_speech.same_rows))


class _NeMoRelPositionMultiHeadAttention(_NeMoAttention):
    """Overrides for NeMo's ``RelPositionMultiHeadAttention``; its signature and outputs."""

    def forward(self, query, key, value, mask, pos_emb, cache=None):
        """query (B, Lq, E), key, value (B, T, E), mask (B, Lq, Lk) bool (True = hidden) or None, pos_emb
        (1, P, E) with P >= Lq + Lk - 1 (row c: distance Lk - 1 - c), cache (B, Lk - T, E) or None ->
        out (B, Lq, E), and the next cache when a cache was given. Lk = cache frames + T."""
        B, Lq, _ = query.shape
        Lk = key.shape[1] + (0 if cache is None else cache.shape[1])
        reason = None
        if Lk < Lq or value.shape[:2] != key.shape[:2]:
            reason = "RelPositionMultiHeadAttention with fewer keys than queries, or values not as long as keys"
        elif not _positions_ok(pos_emb, B, Lq + Lk - 1, exact=False):
            reason = "RelPositionMultiHeadAttention with pos_emb not (1, >= Lq + Lk - 1, E) or differing per batch row"
        elif mask is not None and (mask.dtype != torch.bool or mask.shape != (B, Lq, Lk)
                                   or patch_speech.once_per_tensor("nemo mask", mask, mask_layout) is False):
            reason = ("RelPositionMultiHeadAttention with a mask that is not padding with a limited or chunked "
                      "context (B, Lq, Lk) bool")
        if reason is not None:
            patch_speech.fallback(self, reason)
            return self._txl_fast_base.forward(self, query, key, value, mask, pos_emb, cache)
        keys, layout = (None, {}) if mask is None else patch_speech.once_per_tensor("nemo mask", mask, mask_layout)
        key, value, query, cache = self.update_cache(key=key, value=value, query=query, cache=cache)
        # NeMo's rel_shift gives query i, key j the raw column Lq - 1 + j - i: the first Lq + Lk - 1 rows
        out = self._txl_fast_attend(query, key, value, lambda project: project(pos_emb[:1, :Lq + Lk - 1]), keys,
                                    layout)
        return out if cache is None else (out, cache)


class _NeMoRelPositionMultiHeadAttentionLongformer(_NeMoAttention):
    """Overrides for NeMo's ``RelPositionMultiHeadAttentionLongformer`` (no global tokens); its signature
    and outputs."""

    def _txl_fast_rows(self, T: int, P: torch.Tensor) -> torch.Tensor:
        """P (left + right + 1, H, D), row c position left - c -> r (2T - 1, H, D) of NeMo's scores: its
        sliding chunks add P's first ``left`` rows to the window's first ``left`` diagonals and the other
        ``right + 1`` to its last, with w = max(left, right) diagonals each side (symmetric windows: distance
        d takes row left - d); a visible distance given none takes a zero row."""
        left, right = self.att_context_size
        w = max(left, right)
        d = torch.arange(T - 1, -T, -1, device=P.device)                       # (2T - 1,) row p: distance T - 1 - p
        col = w - d                                                            # the window's diagonal
        row = torch.where(col < left, col, col - 2 * w + right + left)
        zero = left + right + 1
        row = torch.where((col < left) | (col >= 2 * w - right), row, zero)
        row = torch.where((d >= -right) & (d <= left), row, zero)
        return torch.cat([P, P.new_zeros(1, *P.shape[1:])])[row]

    def forward(self, query, key, value, pad_mask, pos_emb, cache=None):
        """query, key, value (B, T, E), pad_mask (B, T) bool (True = padding), pos_emb (1, left + right + 1, E)
        (row c: distance left - c) -> out (B, T, E); a cache is NeMo's (which refuses it)."""
        B, T, _ = query.shape
        left, right = self.att_context_size
        reason = None
        if self.global_tokens > 0:
            reason = "RelPositionMultiHeadAttentionLongformer with global tokens"
        elif cache is not None:
            reason = "RelPositionMultiHeadAttentionLongformer with a cache"
        elif min(left, right) < 0:
            reason = "RelPositionMultiHeadAttentionLongformer with an unlimited side (att_context_size -1)"
        elif key.shape[:2] != (B, T) or value.shape[:2] != (B, T):
            reason = "RelPositionMultiHeadAttentionLongformer with keys or values of another length than the queries"
        elif not _positions_ok(pos_emb, B, left + right + 1, exact=True):
            reason = "RelPositionMultiHeadAttentionLongformer with pos_emb other than (1, left + right + 1, E)"
        elif (not isinstance(pad_mask, torch.Tensor) or pad_mask.dtype != torch.bool or pad_mask.shape != (B, T)
              or patch_speech.once_per_tensor("nemo pad mask", pad_mask, _pad_layout) is False):
            reason = "RelPositionMultiHeadAttentionLongformer with a pad_mask that is not (B, T) bool trailing padding"
        if reason is not None:
            patch_speech.fallback(self, reason)
            return self._txl_fast_base.forward(self, query, key, value, pad_mask, pos_emb, cache)
        layout = dict(context=(left, right), **patch_speech.once_per_tensor("nemo pad mask", pad_mask, _pad_layout))
        return self._txl_fast_attend(query, key, value, lambda project: self._txl_fast_rows(T, project(pos_emb[:1])),
                                     None, layout)


# (module, qualname) of NeMo's class -> (patched class name, overrides), as patch_speech.SUPPORTED
SUPPORTED = {
    (_MODULE, "RelPositionMultiHeadAttention"):
        ("NeMoRelPositionMultiHeadAttention", _NeMoRelPositionMultiHeadAttention),
    (_MODULE, "RelPositionMultiHeadAttentionLongformer"):
        ("NeMoRelPositionMultiHeadAttentionLongformer", _NeMoRelPositionMultiHeadAttentionLongformer),
}
patch_speech.register(SUPPORTED)
