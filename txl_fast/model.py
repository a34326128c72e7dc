"""Transformer-XL models: TransfoXLModel, TransfoXLLMHeadModel, TransfoXLForSequenceClassification.

HF's names, constructor (a TransfoXLConfig), forward arguments and outputs, so that code written
for HF's TransfoXL ports by changing the import. Tensors are batch-first at the edges and
inside; ``mems`` keep HF's layout, a list of n_layer tensors (mem_len, bsz, d_model).

Memory semantics (both as HF 4.35):
  - ``mems=None``: HF's zero-filled memory of ``mem_len`` positions. The first segment attends
    to ``mem_len`` zero vectors (that is what HF and its checkpoints do).
  - explicitly empty memories, n_layer tensors of shape (0, bsz, d_model) (``model.empty_mems(bsz)``):
    the original paper code's behaviour, the first segment attends only to itself.
The memory of the next segment is the last ``mem_len`` positions of [memory, segment] of every
layer's input, detached.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import nn

from txl_fast import backend
from txl_fast import checkpoint
from txl_fast.cache import InferenceCache, InferenceState, ids_trusted
from txl_fast.checks import is_int
from txl_fast.config import TransfoXLConfig
from txl_fast.inference import generate
from txl_fast.modules import (
    AdaptiveEmbedding,
    PositionalEmbedding,
    ProjectedAdaptiveLogSoftmax,
    RelPartialLearnableDecoderLayer,
    RelPartialLearnableMultiHeadAttn,
)


# ---- outputs -------------------------------------------------------------------------------------
class ModelOutput:
    """A dataclass that also indexes like HF's ModelOutput: by field name, or by position over the set fields."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class TransfoXLModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None                  # (B, L, d_model)
    mems: Optional[list] = None                             # n_layer x (mem_len, B, d_model)
    hidden_states: Optional[tuple] = None                   # n_layer + 1 x (B, L, d_model)
    attentions: Optional[tuple] = None                      # n_layer x (B, H, L, mlen + L)
    cache: Optional[Any] = None                             # the InferenceCache, when one was passed


@dataclass
class TransfoXLLMHeadModelOutput(ModelOutput):
    losses: Optional[torch.Tensor] = None                   # (B, L - 1), position order
    prediction_scores: Optional[torch.Tensor] = None        # (B, L, vocab) log-probs, when labels is None
    mems: Optional[list] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    loss: Optional[torch.Tensor] = None                     # () mean NLL over labelled positions
    cache: Optional[Any] = None                             # the InferenceCache, when one was passed

    @property
    def logits(self):
        return self.prediction_scores


@dataclass
class TransfoXLSequenceClassifierOutputWithPast(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None                             # (B, num_labels)
    mems: Optional[list] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


# ---- shared base ---------------------------------------------------------------------------------
class TransfoXLPreTrainedModel(nn.Module):
    base_model_prefix = "transformer"

    def __init__(self, config: TransfoXLConfig):
        super().__init__()
        if not isinstance(config, TransfoXLConfig):
            raise ValueError(f"expected a txl_fast.TransfoXLConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self, root: Optional[nn.Module] = None) -> None:
        """Initialise the parameters of ``root`` (default: all) as HF does, then tie.

        Linear and embedding weights normal(0, init_std) (or uniform), biases 0, projections
        normal(0, proj_init_std), LayerNorm weights normal(1, init_std), position biases as weights.
        """
        cfg = self.config

        def weight_(w):
            if cfg.init == "uniform":
                nn.init.uniform_(w, -cfg.init_range, cfg.init_range)
            else:
                nn.init.normal_(w, 0.0, cfg.init_std)

        def projs_(params):
            for p in params:
                if p is not None:
                    nn.init.normal_(p, 0.0, cfg.proj_init_std)

        with torch.no_grad():
            for m in (root or self).modules():
                if isinstance(m, nn.Linear):
                    weight_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    weight_(m.weight)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.normal_(m.weight, 1.0, cfg.init_std)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, AdaptiveEmbedding):
                    projs_(m.emb_projs)
                elif isinstance(m, ProjectedAdaptiveLogSoftmax):
                    projs_(m.out_projs)
                    if m.n_clusters:
                        weight_(m.cluster_weight)
                        nn.init.zeros_(m.cluster_bias)
                elif isinstance(m, (RelPartialLearnableMultiHeadAttn, TransfoXLModel)):
                    for name in ("r_w_bias", "r_r_bias"):
                        if name in m._parameters:
                            weight_(m._parameters[name])
        self.tie_weights()

    def tie_weights(self) -> None:
        """Nothing to tie in a model without an output layer."""

    def tied_parameter_names(self) -> set[str]:
        """state_dict keys that are the same tensor as an earlier key (left out of saved files)."""
        seen, tied = set(), set()
        for name, tensor in self.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                tied.add(name)
            seen.add(id(tensor))
        return tied

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, *, dtype: Optional[torch.dtype] = None, device=None,
                        revision: Optional[str] = None, local_files_only: bool = False, cache_dir=None):
        """Load a local directory in HF's layout (config.json + model.safetensors or pytorch_model.bin),
        or a Hugging Face hub name such as "transfo-xl/transfo-xl-wt103" (only config.json and the
        weights are fetched, into huggingface_hub's cache: docs/hub.md)."""
        return checkpoint.load_pretrained(cls, name_or_dir, dtype=dtype, device=device, revision=revision,
                                          local_files_only=local_files_only, cache_dir=cache_dir)

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None) -> None:
        """Write config.json and model.safetensors (tied tensors stored once, re-tied on load), and
        the tokenizer's vocab.json when ``tokenizer`` is given: a directory ``from_pretrained``,
        ``TransfoXLTokenizer.from_pretrained`` and ``txl-fast ... --model DIR`` all read."""
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} symbols but the model only "
                             f"{self.config.vocab_size} ids: they do not belong together")
        checkpoint.save_pretrained(self, path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def _check_mems(mems, n_layer: int, bsz: int, d_model: int, ref: torch.Tensor) -> None:
    if not isinstance(mems, (list, tuple)) or len(mems) != n_layer:
        got = len(mems) if isinstance(mems, (list, tuple)) else type(mems).__name__
        raise ValueError(f"mems must be a list of {n_layer} tensors (one per layer), got {got}")
    mlen = mems[0].shape[0] if isinstance(mems[0], torch.Tensor) and mems[0].dim() == 3 else None
    for i, m in enumerate(mems):
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[1:] != (bsz, d_model) or m.shape[0] != mlen:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(
                f"mems[{i}] must be (mem_len, bsz={bsz}, d_model={d_model}) with one mem_len for all layers, got {shape}"
            )
        if m.dtype != ref.dtype or m.device != ref.device:
            raise ValueError(f"mems[{i}] is {m.dtype} on {m.device}, the model is {ref.dtype} on {ref.device}")


# ---- the Transformer-XL --------------------------------------------------------------------------
class TransfoXLModel(TransfoXLPreTrainedModel):
    def __init__(self, config: TransfoXLConfig):
        super().__init__(config)
        self.n_token, self.d_embed, self.d_model = config.vocab_size, config.d_embed, config.d_model
        self.n_head, self.d_head, self.n_layer = config.n_head, config.d_head, config.n_layer
        self.mem_len, self.same_length, self.clamp_len = config.mem_len, config.same_length, config.clamp_len
        self.attn_type = config.attn_type
        self.word_emb = AdaptiveEmbedding(
            config.vocab_size, config.d_embed, config.d_model, config.cutoffs, div_val=config.div_val
        )
        self.drop = nn.Dropout(config.dropout)
        if not config.untie_r:                           # one pair of position biases shared by all layers
            self.r_w_bias = nn.Parameter(torch.zeros(self.n_head, self.d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(self.n_head, self.d_head))
        self.layers = nn.ModuleList(
            RelPartialLearnableDecoderLayer(
                config.n_head, config.d_model, config.d_head, config.d_inner, config.dropout,
                dropatt=config.dropatt, pre_lnorm=config.pre_lnorm,
                r_w_bias=None if config.untie_r else self.r_w_bias,
                r_r_bias=None if config.untie_r else self.r_r_bias,
                layer_norm_epsilon=config.layer_norm_epsilon,
            )
            for _ in range(config.n_layer)
        )
        self.pos_emb = PositionalEmbedding(self.d_model)
        self.inference_state = InferenceState()          # position keys, packed weights: see txl_fast.cache
        self.init_weights()

    def get_input_embeddings(self):
        return self.word_emb

    def clear_position_cache(self) -> None:
        """Free the projected position embeddings the cached forward keeps between calls (wt103:
        18 x 1001 x 1024 floats, 74 MB; 127 MB written out for the Triton kernels), and the packed
        copies of the decode step's weights (``txl_fast.cache.PackedWeights``: wt103 bf16, 453 MB;
        fp32 at batch > 1, 906 MB); they are rebuilt on the next cached call."""
        self.inference_state.clear()

    def reset_memory_length(self, mem_len: int) -> None:
        self.mem_len = mem_len

    def _param(self) -> torch.Tensor:
        return self.word_emb.emb_layers[0].weight

    def init_mems(self, bsz: int) -> Optional[list]:
        """HF's initial memory: mem_len zero positions per layer, or None when mem_len is 0."""
        if self.mem_len <= 0:
            return None
        p = self._param()
        return [torch.zeros(self.mem_len, bsz, self.d_model, dtype=p.dtype, device=p.device) for _ in self.layers]

    def empty_mems(self, bsz: int) -> list:
        """Empty memories (0, bsz, d_model): the first segment attends only to itself, as in the paper's code."""
        p = self._param()
        return [torch.zeros(0, bsz, self.d_model, dtype=p.dtype, device=p.device) for _ in self.layers]

    def new_cache(self, bsz: int, init: str = "zeros", step_hint: int = 128, *, mem_len: Optional[int] = None,
                  clamp_len: Optional[int] = None, same_length: Optional[bool] = None) -> InferenceCache:
        """An inference cache for ``bsz`` sequences (see txl_fast.cache): pass it as ``cache=`` to forward.

        init "zeros": HF's zero-filled memory of mem_len positions (what ``mems=None`` means);
        "empty": no memory, as the paper's code starts. mem_len, clamp_len, same_length: the
        protocol the cache's calls run with, the model's own where None; the model is not changed.
        """
        if init not in ("zeros", "empty"):
            raise ValueError(f"init must be 'zeros' or 'empty', got {init!r}")
        mem_len = self.mem_len if mem_len is None else mem_len
        clamp_len = self.clamp_len if clamp_len is None else clamp_len
        same_length = self.same_length if same_length is None else same_length
        if not is_int(mem_len) or mem_len < 0 or not is_int(clamp_len) or not isinstance(same_length, bool):
            raise ValueError(f"new_cache: mem_len must be an integer >= 0, clamp_len an integer and same_length a "
                             f"bool, got {mem_len!r}, {clamp_len!r}, {same_length!r}")
        p = self._param()
        cache = InferenceCache(self, bsz, mem_len, self.n_layer, self.n_head, self.d_head, p.dtype, p.device,
                               step_hint, clamp_len, same_length)
        if init == "zeros" and mem_len > 0:
            # every memory row is the same zero vector, so every row's key/value is the projection
            # of one zero row (zero without pre_lnorm, the layer norm's bias projected with it)
            zero = torch.zeros(1, 1, self.d_model, dtype=p.dtype, device=p.device)
            cache.fill_rows = []
            with torch.no_grad():
                for layer, kv in zip(self.layers, cache.layers):
                    _, k, v = layer.dec_attn._heads(zero).view(1, 1, 3, self.n_head, self.d_head).unbind(2)
                    kv.fill(k.expand(bsz, 1, -1, -1), v.expand(bsz, 1, -1, -1), mem_len)
                    cache.fill_rows.append((k.transpose(1, 2), v.transpose(1, 2)))      # (1, H, 1, D) each
            cache.commit(mem_len)
        return cache

    def position_keys(self, klen: int, qlen: int, written_out: bool, clamp_len: Optional[int] = None,
                       mem_len: Optional[int] = None) -> list:
        """Per layer (Lr, H, D) projected position embeddings of distances Lr - 1 … 0: Lr = klen, or
        clamp_len + 1 when that is less (the attention op takes row 0 for every larger distance,
        wt103: 1001 rows instead of 1728), or always klen when ``written_out`` (the Triton kernels
        index a row per distance: stored so, they are not written out at every call). Kept
        between calls while the weights are unchanged. clamp_len, mem_len: the model's where None."""
        p = self._param()
        clamp_len = self.clamp_len if clamp_len is None else clamp_len
        mem_len = self.mem_len if mem_len is None else mem_len
        clamped = clamp_len > 0 and not written_out

        def make(n):
            distinct = min(n, clamp_len + 1) if clamp_len > 0 else n
            pos_seq = torch.arange(distinct - 1, -1, -1.0, device=p.device, dtype=p.dtype)
            pos_emb = self.pos_emb(pos_seq)                                                  # (distinct, d)
            keys = []
            for layer in self.layers:
                r = layer.dec_attn.r_net(pos_emb).view(distinct, self.n_head, self.d_head).transpose(0, 1)
                # (n, H, D) views of head-major (H, n, D) storage: one head's keys are one block
                keys.append(torch.cat([r[:, :1].expand(-1, n - distinct, -1), r], dim=1).transpose(0, 1))
            return keys

        weights = [self.pos_emb.inv_freq] + [layer.dec_attn.r_net.weight for layer in self.layers]
        key = (clamp_len, written_out, p.dtype, p.device, tuple((w.data_ptr(), w._version) for w in weights))
        longest = max(klen, mem_len + qlen)                            # the klen of a full memory
        if clamped:
            klen, longest = min(klen, clamp_len + 1), min(longest, clamp_len + 1)
        return self.inference_state.positions.get(klen, longest, key, make)

    def attention_window(self, qlen: int, mlen: int, mem_len: Optional[int] = None,
                         same_length: Optional[bool] = None) -> Optional[int]:
        """HF's same_length mask as a window: key j is visible from query i iff 0 <= i + mlen - j < window.

        HF masks j <= i - mask_shift_len with mask_shift_len = qlen - (klen - mem_len) when that
        is positive, else qlen; so window = mlen + mask_shift_len. None without same_length.
        mem_len, same_length: the model's where None.
        """
        if not (self.same_length if same_length is None else same_length):
            return None
        mask_len = mlen + qlen - (self.mem_len if mem_len is None else mem_len)
        return mlen + (qlen - mask_len if mask_len > 0 else qlen)

    def _update_mems(self, hids: list, mems: Optional[list], mlen: int, qlen: int) -> Optional[list]:
        if mems is None:
            return None
        end = mlen + qlen
        beg = max(0, end - self.mem_len)
        with torch.no_grad():                            # hids are (B, L, d); mems (M, B, d)
            return [torch.cat([m, h.transpose(0, 1)], dim=0)[beg:end].detach() for m, h in zip(mems, hids)]

    def _head_masks(self, head_mask: Optional[torch.Tensor]) -> list:
        """HF's head_mask, (n_head,) or (n_layer, n_head), as one (n_head,) scale per layer."""
        if head_mask is None:
            return [None] * self.n_layer
        head_mask = head_mask.to(self._param().dtype)
        if head_mask.shape == (self.n_head,):
            return [head_mask] * self.n_layer
        if head_mask.shape == (self.n_layer, self.n_head):
            return list(head_mask)
        raise ValueError(
            f"head_mask must be (n_head={self.n_head},) or (n_layer={self.n_layer}, n_head={self.n_head}), "
            f"got {tuple(head_mask.shape)}"
        )

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        mems: Optional[list] = None,
        head_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[InferenceCache] = None,
    ):
        """HF's forward, batch-first; with ``cache`` (``new_cache``), inference: the memory's keys and
        values and the protocol are the cache's, only the new rows are computed, no ``mems`` return."""
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.use_return_dict if return_dict is None else return_dict

        word_emb = self._embed(input_ids, inputs_embeds)                           # (B, Lq, d)
        bsz, qlen = word_emb.shape[:2]
        n = self.n_layer
        if cache is None:       # HF's memory: mems (zeros where None) in, the next segment's mems out
            mems = self.init_mems(bsz) if mems is None else mems
            if mems is not None:
                _check_mems(mems, n, bsz, self.d_model, word_emb)
            mlen = 0 if mems is None else mems[0].shape[0]
            window = self.attention_window(qlen, mlen)
            pos_seq = torch.arange(mlen + qlen - 1, -1, -1.0, device=word_emb.device, dtype=word_emb.dtype)
            if self.clamp_len > 0:
                pos_seq = pos_seq.clamp(max=self.clamp_len)
            positions = [self.drop(self.pos_emb(pos_seq))] * n                       # (Lk, d), each layer projects it
            layer_mems = [None] * n if mems is None else [m.transpose(0, 1) for m in mems]  # (B, M, d) views
            kvs = packed = [None] * n
            key_mask = None
        else:                   # inference: the memory's keys and values, and the protocol, are the cache's
            if mems is not None or head_mask is not None or output_attentions:
                raise ValueError("cache= cannot be combined with mems, head_mask or output_attentions")
            cache.check(self, bsz)
            if self.training:
                raise ValueError("the inference cache is for evaluation: call model.eval() first")
            mlen = cache.mlen
            window = self.attention_window(qlen, mlen, cache.mem_len, cache.same_length)
            positions = self.position_keys(mlen + qlen, qlen, backend.resolve(word_emb) == "triton",
                                           cache.clamp_len, cache.mem_len)            # (Lr, H, D) per layer
            layer_mems, kvs = [None] * n, cache.layers
            packed = None if qlen > 1 else self.inference_state.packed.get(                  # decode steps only
                [layer.decode_weights() for layer in self.layers], bsz)
            packed = packed or [None] * n                                             # LayerWeights per layer
            key_mask = cache.key_mask(qlen)                                          # (B, Lq, mlen + Lq) or None
        head_masks = self._head_masks(head_mask)

        core_out = self.drop(word_emb)
        hids, attentions = [], []
        for layer, pos, mem, kv, weights, mask in zip(self.layers, positions, layer_mems, kvs, packed, head_masks):
            hids.append(core_out)
            core_out, prob = layer(core_out, pos, mem, window, mask, output_attentions, kv, weights, key_mask)
            attentions.append(prob)
        core_out = self.drop(core_out)
        if cache is not None:
            cache.commit(qlen)
        new_mems = self._update_mems(hids, mems, mlen, qlen)                         # None with a cache

        hidden_states = tuple(hids) + (core_out,) if output_hidden_states else None
        attentions = tuple(attentions) if output_attentions else None
        if not return_dict:
            return tuple(v for v in (core_out, new_mems, hidden_states, attentions) if v is not None)
        return TransfoXLModelOutput(core_out, new_mems, hidden_states, attentions, cache)

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.d_model:
                raise ValueError(f"inputs_embeds must be (B, L, d_model={self.d_model}), got {tuple(inputs_embeds.shape)}")
            if 0 in inputs_embeds.shape[:2]:
                raise ValueError(f"inputs_embeds has an empty batch or sequence: shape {tuple(inputs_embeds.shape)}")
            p = self._param()
            if inputs_embeds.dtype != p.dtype or inputs_embeds.device != p.device:
                raise ValueError(
                    f"inputs_embeds is {inputs_embeds.dtype} on {inputs_embeds.device}, the model is {p.dtype} on {p.device}"
                )
            return inputs_embeds
        self.check_input_ids(input_ids)
        return self.word_emb(input_ids)

    def check_input_ids(self, input_ids) -> None:
        """ValueError unless ``input_ids`` is a non-empty (B, L) int64/int32 tensor on the model's
        device with every id in [0, n_token) (the values' host sync skipped under torch.compile and
        for the trusted ids of generate's decode steps)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.shape[0] == 0:
            raise ValueError(f"input_ids has an empty batch: shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty int64/int32 tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.device != self._param().device:
            raise ValueError(f"input_ids is on {input_ids.device}, the model on {self._param().device}")
        # The value check needs a host sync; torch.compile traces and trusted ids (generate's decode
        # steps) skip it (shapes and dtypes are still checked).
        checked = not torch.compiler.is_compiling() and not ids_trusted()
        if checked and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.n_token):
            raise ValueError(
                f"token ids must be in [0, {self.n_token}), got min {int(input_ids.min())}, max {int(input_ids.max())}"
            )


class TransfoXLLMHeadModel(TransfoXLPreTrainedModel):
    """Transformer-XL with the projected adaptive softmax on top (weights tied to the adaptive input).

    ``losses`` are in position order, (B, L - 1): HF returns them grouped by cluster when there are
    clusters (same values, other order). ``loss`` is their mean over labelled positions and equals HF's.
    ``prediction_scores`` (log-probabilities) are returned when ``labels`` is None, else None (HF: ``()``).
    """

    def __init__(self, config: TransfoXLConfig):
        super().__init__(config)
        self.transformer = TransfoXLModel(config)
        self.sample_softmax = config.sample_softmax
        self.crit = ProjectedAdaptiveLogSoftmax(
            config.vocab_size, config.d_embed, config.d_model, config.cutoffs, div_val=config.div_val
        )
        self.init_weights(self.crit)           # the transformer initialised itself

    def tie_weights(self) -> None:
        """Tie output and input embeddings, and the projections named by config.tie_projs, as HF does."""
        cfg, emb = self.config, self.transformer.word_emb
        if cfg.tie_word_embeddings:
            for out_layer, emb_layer in zip(self.crit.out_layers, emb.emb_layers):
                out_layer.weight = emb_layer.weight
        for i, tie in enumerate(cfg.tie_projs):
            if tie and cfg.div_val == 1 and cfg.d_model != cfg.d_embed:
                self.crit.out_projs[i] = emb.emb_projs[0]
            elif tie and cfg.div_val != 1:
                self.crit.out_projs[i] = emb.emb_projs[i]

    def init_mems(self, bsz):
        return self.transformer.init_mems(bsz)

    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int = 20, **kwargs) -> torch.LongTensor:
        """Greedy or sampled continuation, (B, L) -> (B, L + new); see ``txl_fast.inference.generate``."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def empty_mems(self, bsz):
        return self.transformer.empty_mems(bsz)

    def new_cache(self, bsz: int, init: str = "zeros", step_hint: int = 128, **protocol):
        return self.transformer.new_cache(bsz, init, step_hint, **protocol)

    def clear_position_cache(self) -> None:
        self.transformer.clear_position_cache()

    def reset_memory_length(self, mem_len: int) -> None:
        self.transformer.reset_memory_length(mem_len)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        mems: Optional[list] = None,
        head_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[InferenceCache] = None,
    ):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if labels is not None:
            labels = self._check_labels(labels, input_ids if input_ids is not None else inputs_embeds)
        out = self.transformer(
            input_ids, mems=mems, head_mask=head_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
            cache=cache,
        )
        hidden = out.last_hidden_state                                             # (B, L, d)
        bsz, tgt_len = hidden.shape[:2]
        losses = loss = scores = None
        if labels is None:
            scores = self.crit(hidden).view(bsz, tgt_len, -1)                      # (B, L, vocab)
        else:
            losses = self.crit(hidden, labels).view(bsz, tgt_len - 1)              # (B, L - 1)
            labelled = labels[:, 1:] != -100
            loss = losses.sum() / labelled.sum()
        result = TransfoXLLMHeadModelOutput(losses, scores, out.mems, out.hidden_states, out.attentions, loss, cache)
        if return_dict:
            return result
        rest = tuple(v for v in (out.mems, out.hidden_states, out.attentions) if v is not None)
        if self.config.extra.get("trainer_compatible", False):
            head = (scores if scores is not None else (),) + ((losses,) if losses is not None else ())
            return ((loss,) if loss is not None else ()) + head + rest
        head = ((losses,) if losses is not None else ()) + (scores if scores is not None else (),)
        return head + rest + ((loss,) if loss is not None else ())

    def _check_labels(self, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if labels.shape != inputs.shape[:2]:
            raise ValueError(f"labels must be (B, L) = {tuple(inputs.shape[:2])}, got {tuple(labels.shape)}")
        if labels.shape[1] < 2:
            raise ValueError("labels need at least 2 positions: position t predicts label t + 1")
        if not torch.compiler.is_compiling():   # value check: a host sync, skipped while compiling
            vocab = self.config.vocab_size
            bad = ((labels < 0) | (labels >= vocab)) & (labels != -100)
            if bool(bad.any()):
                raise ValueError(f"labels must be in [0, {vocab}) or -100, got {labels[bad][0].item()}")
        # HF quirk, kept for equal losses: if the first row has no label at all, HF sets labels[0, 1]
        # to eos_token_id (in place, in the caller's tensor). We do it on a copy, without a host sync.
        row0_unlabelled = (labels[0, 1:] == -100).all()
        labels = labels.clone()
        labels[0, 1] = torch.where(row0_unlabelled, self.config.eos_token_id, labels[0, 1])
        return labels


class TransfoXLForSequenceClassification(TransfoXLPreTrainedModel):
    """Classification from the last token (the last non-pad token when config.pad_token_id is set)."""

    def __init__(self, config: TransfoXLConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = TransfoXLModel(config)
        self.score = nn.Linear(config.d_embed, self.num_labels, bias=False)
        self.init_weights(self.score)          # the transformer initialised itself

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        mems: Optional[list] = None,
        head_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        cfg = self.config
        if cfg.d_embed != cfg.d_model:
            # HF's score layer takes d_embed features of the d_model-wide hidden states: its forward
            # fails inside the product; say why before any compute (the weights still load)
            raise ValueError(f"TransfoXLForSequenceClassification needs d_embed == d_model: its score layer "
                             f"(as HF's) takes d_embed={cfg.d_embed} features, the hidden states have "
                             f"d_model={cfg.d_model}")
        return_dict = cfg.use_return_dict if return_dict is None else return_dict
        out = self.transformer(
            input_ids, mems=mems, head_mask=head_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.score(out.last_hidden_state)                                 # (B, L, num_labels)
        batch_size = logits.shape[0]
        if cfg.pad_token_id is None and batch_size != 1:
            raise ValueError("sequence classification of batches > 1 needs config.pad_token_id")
        if cfg.pad_token_id is None or input_ids is None:
            last = torch.full((batch_size,), -1, device=logits.device)
        else:   # HF: position before the first pad token; -1 (the last token) when a row has none
            last = torch.eq(input_ids, cfg.pad_token_id).long().argmax(-1) - 1
        pooled = logits[torch.arange(batch_size, device=logits.device), last]      # (B, num_labels)
        loss = None if labels is None else self._loss(pooled, labels)
        if not return_dict:
            rest = tuple(v for v in (out.mems, out.hidden_states, out.attentions) if v is not None)
            return ((loss,) if loss is not None else ()) + (pooled,) + rest
        return TransfoXLSequenceClassifierOutputWithPast(loss, pooled, out.mems, out.hidden_states, out.attentions)

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        problem = cfg.problem_type
        if problem is None:     # HF decides on the first call and stores it in the config
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            cfg.problem_type = problem
        if problem == "regression":
            if self.num_labels == 1:
                return nn.functional.mse_loss(pooled.squeeze(), labels.squeeze())
            return nn.functional.mse_loss(pooled, labels)
        if problem == "single_label_classification":
            return nn.functional.cross_entropy(pooled.view(-1, self.num_labels), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(pooled, labels)
