"""Drop-in relative attention for Conformer speech models, through ``txl_fast.patch(model)``.

Transformer-XL's attention lives on, bidirectionally, in the Conformer encoders of speech
recognisers. ``patch`` swaps, per instance, the class of every supported attention module inside
any ``nn.Module`` for a subclass, ``TxlFastPatched<Library><Name>``, whose ``forward`` computes the
same maths with ``txl_fast.ops.rel_attention(causal=False, ...)``; parameters, ``state_dict`` and
the library's own projections are untouched, and ``unpatch`` restores the class. Supported (the
exact classes, not their subclasses):

  SpeechBrain  ``speechbrain.nnet.attention.RelPosMHAXL`` (self-attention, ``vbias`` on or off)
  ESPnet       ``espnet.nets.pytorch_backend.transformer.attention.RelPositionMultiHeadedAttention``
               (the "latest" relative positions, ``RelPositionalEncoding``)
  ESPnet       ``espnet2.asr_transducer.encoder.modules.attention.RelPositionMultiHeadedAttention``
               (``left_context`` frames of memory before the chunk)
  transformers ``transformers.models.parakeet.modeling_parakeet.ParakeetEncoderAttention`` (5.x:
               Parakeet CTC / TDT, NeMo's FastConformer; in ParakeetEncoder, ParakeetForCTC, ...)
               and, for long form (docs/conformer.md), ``ParakeetEncoderSubsamplingConv2D`` (run in
               time chunks) and ``ParakeetEncoder`` (padding handed to its layers as frames, not T x T)
  transformers ``transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer.
               Wav2Vec2ConformerSelfAttention`` (5.x), ``position_embeddings_type="relative"`` only
  transformers ``transformers.models.wav2vec2_bert.modeling_wav2vec2_bert.Wav2Vec2BertSelfAttention``
               (5.x), ``"relative"`` (as Wav2Vec2Conformer) or ``"relative_key"`` (Shaw's distance table)
  transformers ``transformers.models.nemotron_asr_streaming.modeling_nemotron_asr_streaming.
               NemotronAsrStreamingEncoderAttention`` (5.x; offline chunked and cache-aware streaming)
  transformers ``transformers.models.fastspeech2_conformer.modeling_fastspeech2_conformer.
               FastSpeech2ConformerAttention`` (5.x; ESPnet's "latest", in encoder and decoder)
  NeMo         ``RelPositionMultiHeadAttention`` and ``...Longformer``: ``txl_fast.patch_nemo``, which
               adds its adapters to this module's table (``register``)

In our conventions (checked against each library's own forward in tests/test_patch_speech.py):
q, k, v (B, L, H, D) from the module's projections; r = linear_pos(pos_emb) viewed (Lk + Lq - 1, H, D),
row p the distance Lk - 1 - p (their rel_shift is ``txl_fast.ops.rel_shift``); u, v of the paper
``pos_bias_u`` / ``pos_bias_v`` ((D, H) in SpeechBrain, reinterpreted as (H, D) as it does);
scale 1/sqrt(embed_dim) (SpeechBrain) or 1/sqrt(d_k) (ESPnet, Parakeet); padded keys hidden; a
query that sees no key gets zeros (``empty_rows="zero"``), as SpeechBrain and ESPnet give.
Parakeet: u, v are ``bias_u`` / ``bias_v`` (H, D), r = relative_k_proj(position_embeddings[0]);
its mask (B, 1, T, T) is valid-query AND valid-key (checked once per forward: one host sync), and
its padded query rows, all finfo.min, come out uniform over all T keys: we give the same (the mean
of the values), but no gradient through their scores (HF's autograd sends one, through scores
that the forward rounds away). Wav2Vec2Conformer: ``pos_bias_u`` / ``pos_bias_v`` (H, D),
r = linear_pos(relative_position_embeddings[0]); its mask (B, 1, T, T) is key padding (every query
row the same; bool under sdpa, 0 / finfo.min under eager), a batch row with no visible key is
uniform over all keys (``empty_rows="uniform"``) as HF gives under both. FastSpeech2Conformer:
ESPnet's conventions (mask (B, 1, T), nonzero = keep; a row with no key gets zeros), weights only
with ``output_attentions=True`` as HF (or always with ``"always"``).

What the op cannot express exactly runs the library's own code, with one warning per reason:
a float or per-query ``attn_mask`` / ``chunk_mask``, SpeechBrain's ``mask_pos_future`` and
cross-attention layouts, ESPnet's ``zero_triu``, legacy relative positions (a different class,
never swapped), the transducer's simplified score, position embeddings per batch row or of
another length; Parakeet's masks of another form (limited context), position tables that differ per
batch row (``dropout_positions`` in training), attention functions other than eager / sdpa / flex;
Wav2Vec2Conformer's masks other than key padding, flex attention (its mask is a BlockMask);
FastSpeech2Conformer's masks other than (B, 1, T) (HF raises on them).

Attention weights. SpeechBrain's modules return the probabilities by default and its encoder
layers always take them; ESPnet's keep them in ``self.attn`` for plots. Producing them costs the
full (B, H, Lq, Lk) probabilities the fused path never writes, so with
``attention_weights="on_request"`` (the default) a patched SpeechBrain module returns them only
when the caller passes ``return_attn_weights=True`` explicitly (``None`` in their place
otherwise), and a patched ESPnet module sets ``self.attn = None``; ``attention_weights="always"``
keeps the libraries' behaviour. Parakeet and Wav2Vec2Conformer return them (as their second
output, which the model's ``output_attentions`` collects) under the eager attention only, as HF:
when ``output_attentions`` is asked for, or always with ``"always"``; under sdpa never (HF warns).
In training mode with attention dropout the probabilities path runs (dropout draws a different
random mask than the library's).

Low precision: under ``torch.autocast`` (SpeechBrain's modules need it for bf16) the projections
come out in bf16 / fp16 and the op runs in that dtype, the fp32 biases cast to it. The transformers
adapters' bf16 / fp16 (weights or autocast) run the torch path in float32
(``accumulate_fp32``): rounding scores and probabilities to bf16 left it less accurate than HF's SDPA.
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from txl_fast import backend, ops

__all__ = ["patch_modules", "unpatch_modules", "SUPPORTED"]

_PREFIX = "TxlFastPatched"
_WEIGHTS = "_txl_fast_weights"      # the one instance attribute patch adds: "always" or "on_request"
_UNSET = object()                    # SpeechBrain's return_attn_weights left at its default
WEIGHT_MODES = ("on_request", "always")


def fallback(module: nn.Module, reason: str) -> None:
    """Warn once per (class, reason) that the library's own attention runs."""
    key = (type(module).__name__, reason)
    if key not in warned:
        warned.add(key)
        warnings.warn(f"txl_fast.patch: {reason}; running the library's own attention for such calls", stacklevel=3)


warned: set = set()


def _always(module) -> bool:
    return getattr(module, _WEIGHTS) == "always"


def attend(module, q, k, v, r, u, w, scale, key_mask, weights: bool, accumulate_fp32: bool = False,
            empty_rows: str = "zero", **layout):
    """The op on (B, L, H, D) tensors; -> out (B, Lq, H, D), probabilities (B, H, Lq, Lk) when
    ``weights`` (else None; the probabilities path also runs for attention dropout). ``layout``: the
    op's other visibility arguments (context, chunk_context, key_lengths, query_lengths).

    ``accumulate_fp32``: bf16 / fp16 inputs that would run on the torch path (the CPU, or the
    probabilities) run it in float32, results cast back: scores and probabilities are not rounded
    to 8 bits of mantissa (the Triton kernels accumulate in float32 anyway)."""
    dtype = q.dtype
    dropout = module._txl_fast_dropout_p() if module.training else 0.0
    upcast = (accumulate_fp32 and dtype in (torch.bfloat16, torch.float16)
              and (weights or dropout > 0 or backend.resolve(q) != "triton"))
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    u, w, r = (t.to(q.dtype) for t in (u, w, r))     # under autocast the projections are low precision,
    mode = dict(scale=scale, causal=False, key_mask=key_mask, empty_rows=empty_rows,  # the biases fp32 parameters
                **layout)
    with torch.autocast(q.device.type, enabled=False) if upcast else contextlib.nullcontext():
        if weights or dropout > 0:
            out, prob = ops.rel_attention_with_probs(q, k, v, r, u, w, dropout_p=dropout, **mode)
            return out.to(dtype), prob.to(dtype)
        return ops.rel_attention(q, k, v, r, u, w, **mode).to(dtype), None


class _SpeechBrainRelPosMHAXL:
    """Overrides for ``speechbrain.nnet.attention.RelPosMHAXL``; its signature and outputs."""

    def _txl_fast_dropout_p(self) -> float:
        return self.dropout_att.p

    def forward(self, query, key, value, pos_embs, key_padding_mask=None, attn_mask=None,
                return_attn_weights=_UNSET):
        """query, key, value (B, L, E), pos_embs (1, 2L - 1, E), key_padding_mask (B, L) bool,
        True = padding -> out (B, L, E) and, when asked (see the module docstring), the
        probabilities (B, H, L, L)."""
        explicit = return_attn_weights is not _UNSET
        B, L, E = query.shape
        reason = None
        if not self._qkv_same_embed_dim or self.mask_pos_future:
            reason = "RelPosMHAXL with vdim != embed_dim or mask_pos_future"
        elif attn_mask is not None:
            reason = "RelPosMHAXL called with an attn_mask"
        elif key.shape != query.shape or value.shape != query.shape:
            reason = "RelPosMHAXL with keys or values of another length than the queries"
        elif pos_embs.dim() != 3 or pos_embs.shape[0] != 1 or pos_embs.shape[1] != 2 * L - 1:
            reason = "RelPosMHAXL with position embeddings other than (1, 2L - 1, E)"
        elif key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (B, L)):
            reason = "RelPosMHAXL with a key_padding_mask that is not a (B, L) bool tensor"
        if reason is not None:
            fallback(self, reason)
            return self._txl_fast_base.forward(self, query, key, value, pos_embs, key_padding_mask, attn_mask,
                                               True if not explicit else return_attn_weights)
        H, D = self.num_heads, self.head_dim
        if (query is key or torch.equal(query, key)) and (key is value or torch.equal(key, value)):
            # self-attention: rows of in_proj_weight interleave per head, (H, 3, D, E)
            q, k, v = nn.functional.linear(query, self.in_proj_weight).view(B, L, H, 3 * D).chunk(3, dim=-1)
        else:
            qw, kw, vw = self.in_proj_weight.chunk(3, dim=0)
            q, k, v = (nn.functional.linear(x, wt).view(B, L, H, D) for x, wt in ((query, qw), (key, kw), (value, vw)))
        if self.vbias is not None:
            v = v + self.value_bias_weight.view(H, D).to(v.dtype)
        r = self.linear_pos(pos_embs).view(2 * L - 1, H, D)                       # distances L-1 … -(L-1)
        keep = None if key_padding_mask is None else ~key_padding_mask
        weights = bool(return_attn_weights) if explicit else _always(self)
        out, prob = attend(self, q, k, v, r, self.pos_bias_u.view(H, D), self.pos_bias_v.view(H, D), self.scale,
                            keep, weights)
        out = self.out_proj(out.reshape(B, L, H * D))                             # (B, L, E)
        if explicit and not return_attn_weights:
            return out
        return out, prob


def _espnet_projections(module, query, key, value):
    """ESPnet's linear_q / linear_k / linear_v, as (B, L, H, D) views."""
    B, H, D = query.shape[0], module._txl_fast_heads(), module.d_k
    return (lin(x).view(B, -1, H, D) for lin, x in ((module.linear_q, query), (module.linear_k, key),
                                                    (module.linear_v, value)))


class _ESPnetRelPosition:
    """Overrides for ESPnet's ``RelPositionMultiHeadedAttention`` ("latest")."""

    def _txl_fast_dropout_p(self) -> float:
        return self.dropout.p

    def _txl_fast_heads(self) -> int:
        return self.h

    def forward(self, query, key, value, pos_emb, mask):
        """query, key, value (B, T, F), pos_emb (1, 2T - 1, F), mask (B, 1, T) (nonzero = keep) or
        None -> (B, T, F); ``self.attn`` as set out in the module docstring."""
        B, T, _ = query.shape
        reason = None
        if self.zero_triu:
            reason = "ESPnet RelPositionMultiHeadedAttention with zero_triu"
        elif not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            reason = "ESPnet RelPositionMultiHeadedAttention with qk_norm"
        elif key.shape[:2] != (B, T) or value.shape[:2] != (B, T):
            reason = "ESPnet RelPositionMultiHeadedAttention with keys of another length than the queries"
        elif pos_emb.dim() != 3 or pos_emb.shape[0] != 1 or pos_emb.shape[1] != 2 * T - 1:
            reason = "ESPnet RelPositionMultiHeadedAttention with pos_emb other than (1, 2T - 1, F)"
        elif mask is not None and (mask.dim() != 3 or mask.shape != (B, 1, T)):
            reason = "ESPnet RelPositionMultiHeadedAttention with a per-query mask (B, T, T)"
        if reason is not None:
            fallback(self, reason)
            return self._txl_fast_base.forward(self, query, key, value, pos_emb, mask)
        q, k, v = _espnet_projections(self, query, key, value)
        r = self.linear_pos(pos_emb).view(2 * T - 1, self.h, self.d_k)            # distances T-1 … -(T-1)
        keep = None if mask is None else mask[:, 0] != 0                          # (B, T)
        out, self.attn = attend(self, q, k, v, r, self.pos_bias_u, self.pos_bias_v, 1 / math.sqrt(self.d_k), keep,
                                 _always(self))
        return self.linear_out(out.reshape(B, T, self.h * self.d_k))


class _ESPnetTransducerRelPosition:
    """Overrides for ``espnet2.asr_transducer.encoder.modules.attention.RelPositionMultiHeadedAttention``."""

    def _txl_fast_dropout_p(self) -> float:
        return self.dropout.p

    def _txl_fast_heads(self) -> int:
        return self.num_heads

    def forward(self, query, key, value, pos_enc, mask, chunk_mask=None, left_context=0):
        """query (B, T1, F), key, value (B, T2, F) with T2 = T1 + left_context (the memory), pos_enc
        (1, T1 + T2 - 1, F), mask (B, T2) bool (True = padding) -> (B, T1, F)."""
        B, T1, _ = query.shape
        T2 = T1 + left_context
        reason = None
        if getattr(self.compute_att_score, "__name__", "") != "compute_attention_score":
            reason = "ESPnet transducer attention with the simplified score"
        elif chunk_mask is not None:
            reason = "ESPnet transducer attention with a chunk_mask"
        elif key.shape[:2] != (B, T2) or value.shape[:2] != (B, T2):
            reason = "ESPnet transducer attention with keys of another length than T1 + left_context"
        elif pos_enc.dim() != 3 or pos_enc.shape[0] != 1 or pos_enc.shape[1] != T1 + T2 - 1:
            reason = "ESPnet transducer attention with pos_enc other than (1, T1 + T2 - 1, F)"
        elif mask.dtype != torch.bool or mask.shape != (B, T2):
            reason = "ESPnet transducer attention with a mask that is not a (B, T2) bool tensor"
        if reason is not None:
            fallback(self, reason)
            return self._txl_fast_base.forward(self, query, key, value, pos_enc, mask, chunk_mask, left_context)
        q, k, v = _espnet_projections(self, query, key, value)
        H, D = self.num_heads, self.d_k
        r = self.linear_pos(pos_enc).view(T1 + T2 - 1, H, D)                      # distances T2-1 … -(T1-1)
        out, self.attn = attend(self, q, k, v, r, self.pos_bias_u, self.pos_bias_v, 1 / math.sqrt(D), ~mask,
                                 _always(self))
        return self.linear_out(out.reshape(B, T1, H * D))


# ---- HuggingFace transformers 5.x: Parakeet (NeMo's FastConformer), Wav2Vec2Conformer, FastSpeech2Conformer ----
# Derived facts about the tensors a forward hands to every layer (HF builds the mask and the position
# embeddings once per forward): the last result per kind, kept while the same tensor, unmodified, comes back.
_SEEN: dict = {}


def once_per_tensor(kind: str, t: torch.Tensor, derive):
    """``derive(t)``, reused while ``t`` is the same unmodified tensor (one check per forward, not per layer)."""
    seen = _SEEN.get(kind)
    if seen is not None and seen[0]() is t and seen[1] == t._version:
        return seen[2]
    result = derive(t)
    _SEEN[kind] = (weakref.ref(t), t._version, result)
    return result


def _query_and_key_padding(mask: torch.Tensor):
    """mask (B, 1, T, T) bool -> (queries, keys) (B, T) bool, True = valid, when the mask is exactly
    valid-query AND valid-key (what ParakeetEncoder builds), both None when nothing is padded;
    False when the mask is anything else. Reads the mask's values: one host sync."""
    m = mask[:, 0]
    queries, keys = m.any(dim=2), m.any(dim=1)
    if not torch.equal(m, queries[:, :, None] & keys[:, None, :]):
        return False
    if bool(keys.all()):
        return None, None
    return queries, keys


def same_rows(pos: torch.Tensor) -> bool:
    """True when every batch row of pos (B, 2T - 1, E) is row 0 (HF expands one table over the batch)."""
    return pos.shape[0] == 1 or pos.stride(0) == 0 or torch.equal(pos, pos[:1].expand_as(pos))


def _hf_attentions_wanted(module, kwargs) -> bool:
    """The attention weights are asked for, and HF's own module would return them: its eager attention
    (sdpa and flex return None, HF warns), with ``output_attentions`` passed to the module or to the
    model (its output collector then records them), or ``attention_weights="always"``."""
    if module.config._attn_implementation not in (None, "eager"):
        return False
    if _always(module) or kwargs.get("output_attentions") or getattr(module.config, "output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector  # noqa: PLC0415
    except ImportError:                                  # another layout: the kwargs and config above decide
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


# the same maths as the op (None: a module built outside a model, HF then runs eager); others run HF's
_HF_ATTENTION_FUNCTIONS = (None, "eager", "sdpa", "flex_attention")


class _HFParakeetEncoderAttention:
    """Overrides for transformers 5.x ``ParakeetEncoderAttention``; its signature and outputs."""

    def _txl_fast_dropout_p(self) -> float:
        return self.attention_dropout

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        """hidden_states (B, T, E), position_embeddings (B or 1, 2T - 1, E) (row p: distance T - 1 - p),
        attention_mask (B, 1, T, T) bool (valid query AND valid key), the patched encoder's (B, 1, 1, T)
        frames mask (``_frames_mask``) or None -> (out (B, T, E), probabilities (B, H, T, T) when
        asked, else None)."""
        B, T, _ = hidden_states.shape
        H, D = self.config.num_attention_heads, self.head_dim
        frames = getattr(attention_mask, _FRAMES, None)        # the patched encoder's mask: valid frames (B, T)
        reason, padding = None, (None, None)
        if self.config._attn_implementation not in _HF_ATTENTION_FUNCTIONS:
            reason = f"ParakeetEncoderAttention with attn_implementation={self.config._attn_implementation!r}"
        elif (not isinstance(position_embeddings, torch.Tensor) or position_embeddings.dim() != 3
              or position_embeddings.shape[0] not in (1, B) or position_embeddings.shape[1] != 2 * T - 1):
            reason = "ParakeetEncoderAttention with position embeddings other than (B, 2T - 1, E)"
        elif frames is None and attention_mask is not None and (
                attention_mask.dtype != torch.bool or attention_mask.shape != (B, 1, T, T)
                or not once_per_tensor("mask", attention_mask, _query_and_key_padding)):
            reason = "ParakeetEncoderAttention with a mask that is not valid-query AND valid-key (B, 1, T, T) bool"
        elif frames is not None and frames.shape != (B, T):
            reason = "ParakeetEncoderAttention with a frames mask of another shape than (B, T)"
        elif not once_per_tensor("positions", position_embeddings, same_rows):
            reason = "ParakeetEncoderAttention with position embeddings that differ per batch row (dropout_positions)"
        if reason is not None:
            fallback(self, reason)
            if frames is not None:                             # the library needs its own (B, 1, T, T) mask
                attention_mask = (frames[:, None, :] & frames[:, :, None])[:, None]
            return self._txl_fast_base.forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
        if frames is not None:
            padding = (frames, frames)
        elif attention_mask is not None:
            padding = once_per_tensor("mask", attention_mask, _query_and_key_padding)
        queries, keys = padding
        q = self.q_proj(hidden_states).view(B, T, H, D)
        k = self.k_proj(hidden_states).view(B, T, -1, D)
        v = self.v_proj(hidden_states).view(B, T, -1, D)
        if k.shape[2] != H:                              # grouped keys and values: head h reads group h // (H / groups)
            k, v = k.repeat_interleave(H // k.shape[2], dim=2), v.repeat_interleave(H // v.shape[2], dim=2)
        r = self.relative_k_proj(position_embeddings[:1]).view(2 * T - 1, H, D)  # distances T-1 … -(T-1)
        out, prob = attend(self, q, k, v, r, self.bias_u, self.bias_v, self.scaling, keys,
                            _hf_attentions_wanted(self, kwargs), accumulate_fp32=True)
        if queries is not None:
            # HF's padded query rows see only finfo.min scores: uniform over all T keys, the mean value
            out = torch.where(queries[:, :, None, None], out, v.mean(dim=1, keepdim=True).to(out.dtype))
            if prob is not None:
                prob = torch.where(queries[:, None, :, None], prob, torch.full((), 1 / T, dtype=prob.dtype))
        return self.o_proj(out.reshape(B, T, H * D)), prob


# ---- Parakeet long form: the subsampling in time chunks, the encoder's padding as frames ----------------
# Bytes of the largest activation one chunk of the subsampling convolutions writes (all batch rows
# together; the first convolution's, at the mel rate / 2): the chunk's output frames follow from it.
SUBSAMPLING_CHUNK_BYTES = 64 * 2**20
_FRAMES = "_txl_fast_frames"         # on the patched encoder's (B, 1, 1, T) mask: its valid frames (B, T) bool
_POINTWISE = (nn.ReLU, nn.SiLU, nn.GELU, nn.Identity)      # activations of the stack: frame by frame


def _conv_stack(layers) -> Optional[str]:
    """Why ``layers`` (the subsampling's ModuleList) cannot run in time chunks, None when it can:
    every layer a plain Conv2d (zero padding given as numbers, no dilation) or a pointwise activation."""
    for layer in layers:
        if type(layer) is nn.Conv2d:
            if isinstance(layer.padding, str) or layer.padding_mode != "zeros" or layer.dilation != (1, 1):
                return "ParakeetEncoderSubsamplingConv2D with a convolution padded by name, not by zeros, or dilated"
        elif type(layer) not in _POINTWISE:
            return f"ParakeetEncoderSubsamplingConv2D with a {type(layer).__name__} layer"
    return None


def _receptive_range(layers, sizes, lo: int, hi: int):
    """Output frames [lo, hi) of ``layers`` -> spans: ``spans[i]`` = (start, stop, (left, right)), the
    frames [start, stop) of layer i's input (``sizes[i]`` frames) it reads and the zero frames its
    padding adds on the time axis; ``spans[-1]`` = (lo, hi, (0, 0)), the output."""
    spans = [None] * len(layers) + [(lo, hi, (0, 0))]
    for i in reversed(range(len(layers))):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d):
            (k, _), (s, _), (p, _) = layer.kernel_size, layer.stride, layer.padding
            lo, hi = lo * s - p, (hi - 1) * s - p + k           # output frame j reads j*s - p ... j*s - p + k - 1
            pads = (max(0, -lo), max(0, hi - sizes[i]))
            lo, hi = max(lo, 0), min(hi, sizes[i])
        else:
            pads = (0, 0)
        spans[i] = (lo, hi, pads)
    return spans


class _HFParakeetSubsampling:
    """Overrides for transformers 5.x ``ParakeetEncoderSubsamplingConv2D``: the same stack, run on time
    chunks of output frames, each from its receptive field of input frames (docs/conformer.md, Long form)."""

    _txl_fast_what = "subsampling in time chunks"

    @staticmethod
    def _txl_fast_applies(module) -> bool:
        return _transformers_5()

    def forward(self, input_features, attention_mask=None):
        """input_features (B, T_in, F) mel frames, attention_mask (B, T_in) (1 = frame) or None -> (B, T, E)."""
        reason = _conv_stack(self.layers)
        if reason is not None:
            fallback(self, reason)
            return self._txl_fast_base.forward(self, input_features, attention_mask)
        B, T_in, width = input_features.shape
        length = attention_mask.sum(-1) if attention_mask is not None else None
        sizes, lengths, widths = [T_in], {}, []      # frames into each layer; valid frames after each conv; C x F'
        channels = 1
        for i, layer in enumerate(self.layers):
            frames = sizes[-1]
            if isinstance(layer, nn.Conv2d):
                (k, kw), (s, sw), (p, pw) = layer.kernel_size, layer.stride, layer.padding
                frames, width, channels = (frames + 2 * p - k) // s + 1, (width + 2 * pw - kw) // sw + 1, layer.out_channels
                if length is not None:
                    length = self._get_output_length(length, layer)    # the library's own formula
                lengths[i] = length
            sizes.append(frames)
            widths.append(channels * width)
        T = sizes[-1]
        if T < 1 or width < 1:                         # too short: the library's own error
            return self._txl_fast_base.forward(self, input_features, attention_mask)
        # bytes of layer i's output per output frame: (B, C, frames, F') over T frames
        largest = max(B * w * sizes[i + 1] / T for i, w in enumerate(widths)) * input_features.element_size()
        chunk = max(1, int(SUBSAMPLING_CHUNK_BYTES // largest))
        out = None
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            spans = _receptive_range(self.layers, sizes, a, b)
            x = input_features[:, spans[0][0] : spans[0][1]].unsqueeze(1)             # (B, 1, frames, F)
            for i, layer in enumerate(self.layers):
                if i not in lengths:
                    x = layer(x)
                    continue
                if any(spans[i][2]):
                    x = nn.functional.pad(x, (0, 0, *spans[i][2]))                        # the time axis' zeros
                x = nn.functional.conv2d(x, layer.weight, layer.bias, layer.stride, (0, layer.padding[1]),
                                         layer.dilation, layer.groups)                   # (B, C, frames, F')
                if lengths[i] is not None:             # the library's masking, at the frames' global indices
                    first = spans[i + 1][0]
                    keep = torch.arange(first, first + x.shape[2], device=x.device) < lengths[i][:, None]
                    x *= keep[:, None, :, None]
            y = self.linear(x.transpose(1, 2).reshape(B, b - a, -1))                      # (B, b - a, E)
            if out is None:
                out = y.new_empty(B, T, y.shape[-1])
            out[:, a:b] = y
        return out


def _frames_mask(valid: torch.Tensor) -> Optional[torch.Tensor]:
    """valid (B, T) bool -> the mask the patched encoder hands its layers: None when every frame is
    valid (one host sync), else ``valid`` as a (B, 1, 1, T) view that carries ``valid`` itself
    (``_FRAMES``): the convolution module reads it as HF's (B, 1, T, T) mask (its padded key
    columns), the patched attention as the padding of queries and keys."""
    if bool(valid.all()):
        return None
    mask = valid[:, None, None, :]
    setattr(mask, _FRAMES, valid)
    return mask


class _HFParakeetEncoder:
    """Overrides for transformers 5.x ``ParakeetEncoder``: its forward with the padding handed to the
    layers as frames (``_frames_mask``), not a (B, 1, T, T) mask, and one position table for the batch."""

    _txl_fast_what = "padding as frames"

    @staticmethod
    def _txl_fast_applies(module) -> bool:
        library = sys.modules[_key(module)[0]]
        return _transformers_5() and all(hasattr(library, name) for name in _ENCODER_NEEDS)

    @staticmethod
    def _txl_fast_init_class(cls, base) -> None:
        """The library's decorators around our forward (config defaults, hidden states and attentions
        collected), and our class in the registry of what its instances record."""
        library = sys.modules[base.__module__]
        cls.forward = library.capture_outputs(library.merge_with_config_defaults(cls._txl_fast_forward))
        from transformers.utils import output_capturing  # noqa: PLC0415

        dict.__setitem__(output_capturing._CAN_RECORD_REGISTRY, str(cls), base._can_record_outputs)

    def _txl_fast_forward(self, input_features, attention_mask=None, output_attention_mask=True, **kwargs):
        """input_features (B, T_in, F), attention_mask (B, T_in) or None -> ParakeetEncoderModelOutput
        (last_hidden_state (B, T, E), attention_mask (B, T) int when asked), as the library's."""
        library = sys.modules[self._txl_fast_base.__module__]
        hidden_states = self.subsampling(input_features, attention_mask)                # (B, T, E)
        hidden_states = hidden_states * self.input_scale
        B, T, _ = hidden_states.shape
        position_embeddings = self.encode_positions(hidden_states[:1]).expand(B, -1, -1)  # (B, 2T - 1, E), one row
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        position_embeddings = nn.functional.dropout(position_embeddings, p=self.dropout_positions,
                                                    training=self.training)
        output_mask = mask = None
        if attention_mask is not None:
            output_mask = self._get_output_attention_mask(attention_mask, target_length=T)       # (B, T) bool
            if all(is_patched(layer.self_attn) for layer in self.layers):
                mask = _frames_mask(output_mask)
            else:
                fallback(self, "ParakeetEncoder with attention modules that are not patched: the (B, 1, T, T) mask")
                mask = (output_mask[:, None, :] & output_mask[:, :, None])[:, None]
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue                                                             # LayerDrop, as the library
            hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                                  **kwargs)
        return library.ParakeetEncoderModelOutput(
            last_hidden_state=hidden_states,
            attention_mask=output_mask.int() if attention_mask is not None and output_attention_mask else None)


# what the encoder's forward takes from the library's module
_ENCODER_NEEDS = ("capture_outputs", "merge_with_config_defaults", "ParakeetEncoderModelOutput")


def _key_padding(mask: torch.Tensor):
    """HF's bidirectional mask (B, 1, T, T), bool (True = attend) or additive float (0 or finfo.min),
    -> keys (B, T) bool, True = visible, when every query row is the same key padding (what
    ``create_bidirectional_mask`` builds), None when nothing is padded; False for anything else.
    Reads the mask's values: one host sync."""
    if mask.is_floating_point():
        low = torch.finfo(mask.dtype).min
        if not bool(((mask == 0) | (mask == low)).all()):
            return False
        mask = mask == 0
    rows = mask[:, 0, 0]                                                       # (B, T)
    if mask.stride(2) != 0 and not torch.equal(mask[:, 0], rows[:, None, :].expand_as(mask[:, 0])):
        return False
    return None if bool(rows.all()) else rows


def _transformers_5() -> bool:
    """The transformers imported is 5.x or later (the adapters' signatures are 5.x's, tested on 5.23)."""
    version = getattr(sys.modules.get("transformers"), "__version__", "0")
    return int(version.split(".")[0]) >= 5


class _HFFastSpeech2ConformerAttention:
    """Overrides for transformers 5.x ``FastSpeech2ConformerAttention`` (ESPnet's "latest" relative
    attention, in FastSpeech2Conformer's encoder and decoder); its signature and outputs."""

    @staticmethod
    def _txl_fast_applies(module) -> bool:
        return _transformers_5()

    def _txl_fast_dropout_p(self) -> float:
        return self.dropout.p

    def forward(self, hidden_states, attention_mask=None, pos_emb=None, output_attentions=False):
        """hidden_states (B, T, E), attention_mask (B, 1, T) (nonzero = keep) or None, pos_emb
        (1, 2T - 1, E) (row p: distance T - 1 - p) -> (out (B, T, E), probabilities (B, H, T, T) or None)."""
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        reason = None
        if not isinstance(pos_emb, torch.Tensor) or pos_emb.dim() != 3 or pos_emb.shape[0] not in (1, B) \
                or pos_emb.shape[1] != 2 * T - 1:
            reason = "FastSpeech2ConformerAttention with pos_emb other than (1, 2T - 1, E)"
        elif attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                             or attention_mask.shape != (B, 1, T)):
            reason = "FastSpeech2ConformerAttention with a mask other than (B, 1, T)"   # HF raises, says why
        elif not once_per_tensor("positions", pos_emb, same_rows):
            reason = "FastSpeech2ConformerAttention with position embeddings that differ per batch row"
        if reason is not None:
            fallback(self, reason)
            return self._txl_fast_base.forward(self, hidden_states, attention_mask, pos_emb, output_attentions)
        q, k, v = (lin(hidden_states).view(B, T, H, D) for lin in (self.linear_q, self.linear_k, self.linear_v))
        r = self.linear_pos(pos_emb[:1]).view(2 * T - 1, H, D)                   # distances T-1 … -(T-1)
        keep = None if attention_mask is None else attention_mask[:, 0] != 0       # (B, T)
        out, prob = attend(self, q, k, v, r, self.pos_bias_u, self.pos_bias_v, 1 / math.sqrt(self.dim_key), keep,
                            bool(output_attentions) or _always(self), accumulate_fp32=True)
        return self.linear_out(out.reshape(B, T, H * D)), prob


def _distance_table(module, T: int) -> torch.Tensor:
    """Wav2Vec2Bert's "relative_key" table as the op's r (2T - 1, H, D), row p the distance T - 1 - p:
    HF adds q_i . E[clamp(j - i, -left, right) + left] (query side only), j - i = p - (T - 1)."""
    left, right = module.left_max_position_embeddings, module.right_max_position_embeddings
    index = torch.arange(-(T - 1), T, device=module.distance_embedding.weight.device).clamp(-left, right) + left
    return module.distance_embedding(index)[:, None, :].expand(-1, module.num_heads, -1)      # (2T - 1, H, D)


class _HFWav2Vec2ConformerSelfAttention:
    """Overrides for transformers 5.x ``Wav2Vec2ConformerSelfAttention`` with
    ``position_embeddings_type="relative"`` and ``Wav2Vec2BertSelfAttention`` with "relative" (the
    same formula) or "relative_key" (Shaw's head-shared distance table, no biases); their signature
    and outputs. (Rotary, absolute or no positions: the same classes, never swapped.)"""

    @staticmethod
    def _txl_fast_applies(module) -> bool:
        """Relative positions, and transformers 5's module (4.x has a class of the same name with
        another signature, mask and outputs)."""
        return module.position_embeddings_type in ("relative", "relative_key") and _transformers_5()

    def _txl_fast_dropout_p(self) -> float:
        return self.dropout.p

    def forward(self, hidden_states, attention_mask=None, relative_position_embeddings=None, **kwargs):
        """hidden_states (B, T, E), attention_mask (B, 1, T, T) bool or additive float (key padding),
        relative_position_embeddings (1, 2T - 1, E) (row p: distance T - 1 - p; "relative" only)
        -> (out (B, T, E), probabilities (B, H, T, T) when asked, else None)."""
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_size
        name = self._txl_fast_base.__name__
        shaw = self.position_embeddings_type == "relative_key"
        pos = relative_position_embeddings
        reason = None
        if self.config._attn_implementation not in (None, "eager", "sdpa"):      # flex: a BlockMask
            reason = f"{name} with attn_implementation={self.config._attn_implementation!r}"
        elif not shaw and (not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[0] not in (1, B)
                           or pos.shape[1] != 2 * T - 1):
            reason = f"{name} with position embeddings other than (1, 2T - 1, E)"
        elif attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                             or attention_mask.shape != (B, 1, T, T)
                                             or once_per_tensor("key mask", attention_mask, _key_padding) is False):
            reason = f"{name} with a mask that is not key padding (B, 1, T, T)"
        elif not shaw and not once_per_tensor("positions", pos, same_rows):
            reason = f"{name} with position embeddings that differ per batch row"
        if reason is not None:
            fallback(self, reason)
            return self._txl_fast_base.forward(self, hidden_states, attention_mask, relative_position_embeddings,
                                               **kwargs)
        keys = None if attention_mask is None else once_per_tensor("key mask", attention_mask, _key_padding)
        q, k, v = (lin(hidden_states).view(B, T, H, D) for lin in (self.linear_q, self.linear_k, self.linear_v))
        if shaw:
            r = _distance_table(self, T)                                         # distances T-1 … -(T-1)
            u = w = torch.zeros(H, D, dtype=r.dtype, device=r.device)
        else:
            r = self.linear_pos(pos[:1]).view(2 * T - 1, H, D)                   # distances T-1 … -(T-1)
            u, w = self.pos_bias_u, self.pos_bias_v
        out, prob = attend(self, q, k, v, r, u, w, self.scaling, keys,
                            _hf_attentions_wanted(self, kwargs), accumulate_fp32=True, empty_rows="uniform")
        return self.linear_out(out.reshape(B, T, H * D)), prob


class _CacheUpdated:
    """Stands in for a cache already updated with this call's keys: its ``update`` returns them (the
    library's own forward, run after ours projected and updated, must not append them twice)."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def update(self, *args, **kwargs):
        return self.k, self.v


def _chunk_layout(mask: torch.Tensor):
    """HF's (B, 1, Lq, Lk) bool mask (True = attend) -> ``patch_nemo.mask_layout`` of it (key padding,
    query lengths, a context or chunk_context), False when the op cannot express it."""
    from txl_fast.patch_nemo import mask_layout  # noqa: PLC0415 (patch_nemo imports this module)

    return mask_layout(~mask[:, 0])


class _HFNemotronAsrStreamingEncoderAttention:
    """Overrides for transformers 5.x ``NemotronAsrStreamingEncoderAttention`` (Parakeet's attention
    with a key / value cache: keys = cache + chunk, Lk >= Lq); its signature and outputs."""

    def _txl_fast_dropout_p(self) -> float:
        return self.attention_dropout

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        """hidden_states (B, Lq, E), position_embeddings (B or 1, 2Lk - 1, E) (row p: distance Lk - 1 - p),
        attention_mask (B, 1, Lq, Lk) bool (True = attend: key padding AND chunked_limited) or None,
        past_key_values a cache (updated with this chunk's keys, as HF) -> (out (B, Lq, E),
        probabilities (B, H, Lq, Lk) when asked, else None)."""
        B, Lq, _ = hidden_states.shape
        H, D = self.config.num_attention_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, Lq, H, D)
        k = self.k_proj(hidden_states).view(B, Lq, -1, D).transpose(1, 2)       # (B, Hkv, Lq, D), the cache's
        v = self.v_proj(hidden_states).view(B, Lq, -1, D).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)                  # (B, Hkv, Lk, D)
        Lk = k.shape[2]
        pos, reason = position_embeddings, None
        if self.config._attn_implementation not in (None, "eager", "sdpa"):      # flex: a BlockMask
            reason = f"NemotronAsrStreamingEncoderAttention with attn_implementation={self.config._attn_implementation!r}"
        elif not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[0] not in (1, B) or pos.shape[1] != 2 * Lk - 1:
            reason = "NemotronAsrStreamingEncoderAttention with position embeddings other than (B, 2Lk - 1, E)"
        elif attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                             or attention_mask.dtype != torch.bool
                                             or attention_mask.shape != (B, 1, Lq, Lk)
                                             or once_per_tensor("chunk mask", attention_mask, _chunk_layout) is False):
            reason = ("NemotronAsrStreamingEncoderAttention with a mask that is not (B, 1, Lq, Lk) bool key padding "
                      "AND a context or chunk_context")
        elif not once_per_tensor("positions", pos, same_rows):
            reason = "NemotronAsrStreamingEncoderAttention with position embeddings that differ per batch row"
        if reason is not None:
            fallback(self, reason)
            cache = None if past_key_values is None else _CacheUpdated(k, v)
            return self._txl_fast_base.forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        keys, layout = (None, {}) if attention_mask is None else once_per_tensor("chunk mask", attention_mask,
                                                                                  _chunk_layout)
        k, v = k.transpose(1, 2), v.transpose(1, 2)                              # (B, Lk, Hkv, D)
        if k.shape[2] != H:                              # grouped keys and values: head h reads group h // (H / groups)
            k, v = k.repeat_interleave(H // k.shape[2], dim=2), v.repeat_interleave(H // v.shape[2], dim=2)
        r = self.relative_k_proj(pos[:1, :Lk + Lq - 1]).view(Lk + Lq - 1, H, D)  # distances Lk-1 … -(Lq-1)
        out, prob = attend(self, q, k, v, r, self.bias_u, self.bias_v, self.scaling, keys,
                            _hf_attentions_wanted(self, kwargs), accumulate_fp32=True, **layout)
        return self.o_proj(out.reshape(B, Lq, H * D)), prob


# (module, qualname) of the library class -> (patched class name, overrides)
SUPPORTED = {
    ("speechbrain.nnet.attention", "RelPosMHAXL"): ("SpeechBrainRelPosMHAXL", _SpeechBrainRelPosMHAXL),
    ("espnet.nets.pytorch_backend.transformer.attention", "RelPositionMultiHeadedAttention"):
        ("ESPnetRelPositionMultiHeadedAttention", _ESPnetRelPosition),
    ("espnet2.asr_transducer.encoder.modules.attention", "RelPositionMultiHeadedAttention"):
        ("ESPnetTransducerRelPositionMultiHeadedAttention", _ESPnetTransducerRelPosition),
    ("transformers.models.parakeet.modeling_parakeet", "ParakeetEncoderAttention"):
        ("HFParakeetEncoderAttention", _HFParakeetEncoderAttention),
    ("transformers.models.parakeet.modeling_parakeet", "ParakeetEncoderSubsamplingConv2D"):
        ("HFParakeetEncoderSubsamplingConv2D", _HFParakeetSubsampling),
    ("transformers.models.parakeet.modeling_parakeet", "ParakeetEncoder"): ("HFParakeetEncoder", _HFParakeetEncoder),
    ("transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer", "Wav2Vec2ConformerSelfAttention"):
        ("HFWav2Vec2ConformerSelfAttention", _HFWav2Vec2ConformerSelfAttention),
    ("transformers.models.fastspeech2_conformer.modeling_fastspeech2_conformer", "FastSpeech2ConformerAttention"):
        ("HFFastSpeech2ConformerAttention", _HFFastSpeech2ConformerAttention),
    ("transformers.models.wav2vec2_bert.modeling_wav2vec2_bert", "Wav2Vec2BertSelfAttention"):
        ("HFWav2Vec2BertSelfAttention", _HFWav2Vec2ConformerSelfAttention),
    ("transformers.models.nemotron_asr_streaming.modeling_nemotron_asr_streaming", "NemotronAsrStreamingEncoderAttention"):
        ("HFNemotronAsrStreamingEncoderAttention", _HFNemotronAsrStreamingEncoderAttention),
}
_BY_NAME = {_PREFIX + name: (key, mixin) for key, (name, mixin) in SUPPORTED.items()}
_CLASSES: dict[str, type] = {}


def register(adapters: dict) -> None:
    """Add another module's adapters, keyed as ``SUPPORTED``, to the one table (``txl_fast.patch_nemo``
    adds NeMo's when imported; ``txl_fast.patch`` imports it)."""
    SUPPORTED.update(adapters)
    _BY_NAME.update({_PREFIX + name: (key, mixin) for key, (name, mixin) in adapters.items()})


def _patched_class(base: type) -> type:
    name, mixin = SUPPORTED[(base.__module__, base.__qualname__)]
    name = _PREFIX + name
    cls = _CLASSES.get(name)
    if cls is None:
        what = getattr(mixin, "_txl_fast_what", "rel_attention(causal=False)")

        def extra_repr(self) -> str:
            return f"txl_fast={what}, attention_weights={getattr(self, _WEIGHTS)}, " + base.extra_repr(self)
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "_txl_fast_base": base,
                                         "extra_repr": extra_repr})
        if hasattr(mixin, "_txl_fast_init_class"):      # a class that needs more than its overrides
            mixin._txl_fast_init_class(cls, base)
        _CLASSES[name] = cls
        setattr(sys.modules[__name__], name, cls)   # so pickle finds it by name
    return cls


def __getattr__(name: str):
    """Resolve ``TxlFastPatched<...>`` in a fresh process (unpickling a patched model)."""
    if name in _BY_NAME:
        (module, qualname), _ = _BY_NAME[name]
        import importlib  # noqa: PLC0415

        return _patched_class(getattr(importlib.import_module(module), qualname))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _key(module: nn.Module) -> tuple[str, str]:
    cls = getattr(type(module), "_txl_fast_base", type(module))
    return cls.__module__, cls.__qualname__


def _supported(module: nn.Module) -> bool:
    key = _key(module)
    if key not in SUPPORTED:
        return False
    applies = getattr(SUPPORTED[key][1], "_txl_fast_applies", None)        # a class serving several kinds
    return applies is None or applies(module)


def targets(model: nn.Module) -> list[nn.Module]:
    """The supported speech attention modules inside ``model`` (patched or not)."""
    return [m for m in model.modules() if _supported(m)]


def is_patched(module: nn.Module) -> bool:
    return type(module).__name__.startswith(_PREFIX) and hasattr(type(module), "_txl_fast_base")


def patch_modules(model: nn.Module, attention_weights: str = "on_request") -> Optional[nn.Module]:
    """Swap every supported speech attention module inside ``model``; None when there is none."""
    if attention_weights not in WEIGHT_MODES:
        raise ValueError(f"txl_fast.patch: attention_weights must be one of {', '.join(WEIGHT_MODES)}, "
                         f"got {attention_weights!r}")
    found = targets(model)
    if not found:
        return None
    for m in found:
        object.__setattr__(m, _WEIGHTS, attention_weights)
        if not is_patched(m):
            m.__class__ = _patched_class(type(m))
    return model


def unpatch_modules(model: nn.Module) -> Optional[nn.Module]:
    """Undo ``patch_modules``; None when ``model`` holds no supported module."""
    found = targets(model)
    if not found:
        return None
    for m in found:
        if is_patched(m):
            m.__class__ = type(m)._txl_fast_base
            m.__dict__.pop(_WEIGHTS, None)
    return model
