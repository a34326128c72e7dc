"""Transformer-XL building blocks with HF's constructor arguments and parameter names.

Layout inside: batch-first, hidden states (B, L, d). The modules hold parameters and call
``txl_fast.ops`` for the two heavy computations (relative attention, adaptive softmax), so
the backend choice (naive / torch / triton) applies to them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from txl_fast import backend, ops
from txl_fast.cache import NOT_PACKED, LayerKV, LayerWeights


class PositionalEmbedding(nn.Module):
    """Sinusoids of (relative) positions: pos_seq (L,) -> (L, demb)."""

    def __init__(self, demb: int):
        super().__init__()
        self.demb = demb
        inv_freq = 1 / (10000 ** (torch.arange(0.0, demb, 2.0) / demb))
        self.register_buffer("inv_freq", inv_freq)      # persistent: HF checkpoints carry it

    def forward(self, pos_seq: torch.Tensor) -> torch.Tensor:
        sinusoid = torch.outer(pos_seq, self.inv_freq.to(pos_seq.dtype))           # (L, demb/2)
        return torch.cat([sinusoid.sin(), sinusoid.cos()], dim=-1)                  # (L, demb)


class PositionwiseFF(nn.Module):
    def __init__(self, d_model, d_inner, dropout, pre_lnorm=False, layer_norm_epsilon=1e-5):
        super().__init__()
        self.d_model, self.d_inner, self.dropout = d_model, d_inner, dropout
        self.CoreNet = nn.Sequential(
            nn.Linear(d_model, d_inner),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(d_inner, d_model),
            nn.Dropout(dropout),
        )
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_epsilon)
        self.pre_lnorm = pre_lnorm

    def core(self, x: torch.Tensor, packed=(None, None)) -> torch.Tensor:
        """CoreNet's computation, through ``ops.linear`` (faster for a decode step's or a cached segment's
        rows); packed: the two weights as ``ops.linear.pack`` made them, or None."""
        first, _, inner_drop, second, out_drop = self.CoreNet
        x = inner_drop(torch.relu(ops.linear(x, first.weight, first.bias, packed[0])))    # (B, L, d_inner)
        return out_drop(ops.linear(x, second.weight, second.bias, packed[1]))             # (B, L, d)

    def forward(self, inp: torch.Tensor, packed=(None, None)) -> torch.Tensor:
        if self.pre_lnorm:
            return inp + self.core(self.layer_norm(inp), packed)
        return self.layer_norm(inp + self.core(inp, packed))


class RelPartialLearnableMultiHeadAttn(nn.Module):
    """Multi-head attention with Transformer-XL's relative positions and segment memory.

    forward(h (B, Lq, d), pos_emb, mems (B, M, d) or None, window, head_mask (H,), output_attentions,
            cache, packed, key_mask)
    -> (out (B, Lq, d), probabilities (B, H, Lq, Lk) or None), with Lk = M + Lq.

    pos_emb: the (Lk, d) position embeddings, projected here by r_net, or the (Lr, H, D) position
    keys already projected (distances Lr - 1 … 0; ``TransfoXLModel.position_keys``, where Lr may be
    clamp_len + 1). cache: the layer's ``txl_fast.cache.LayerKV``, holding the memory's keys and
    values (then mems is None and M is the cache's): only the new rows are projected, and written
    after the memory. packed: the layer's ``LayerWeights`` packed by ``ops.linear.pack``, or None.
    key_mask: (B, Lq, Lk) bool, False for keys a query must not see (rows that started a new
    document), or None.
    """

    def __init__(
        self, n_head, d_model, d_head, dropout, dropatt=0, pre_lnorm=False, r_r_bias=None, r_w_bias=None,
        layer_norm_epsilon=1e-5,
    ):
        super().__init__()
        self.n_head, self.d_model, self.d_head, self.dropout = n_head, d_model, d_head, dropout
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_epsilon)
        self.scale = 1 / (d_head**0.5)
        self.pre_lnorm = pre_lnorm
        if r_r_bias is None or r_w_bias is None:        # biases untied: one pair per layer
            self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
            self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
        else:                                           # shared with the model (untie_r=False)
            self.r_r_bias = r_r_bias
            self.r_w_bias = r_w_bias
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, d_head={self.d_head}, pre_lnorm={self.pre_lnorm}"

    def _heads(self, x: torch.Tensor, packed=None) -> torch.Tensor:
        return ops.linear(self.layer_norm(x) if self.pre_lnorm else x, self.qkv_net.weight, None, packed)  # (B, L, 3*H*D)

    def forward(self, h, pos_emb, mems=None, window=None, head_mask=None, output_attentions=False,
                cache: Optional[LayerKV] = None, packed: Optional[LayerWeights] = None, key_mask=None):
        B, Lq, _ = h.shape
        H, D = self.n_head, self.d_head
        packed = packed or NOT_PACKED
        if cache is None:
            cat = h if mems is None else torch.cat([mems, h], dim=1)                # (B, Lk, d)
            Lk = cat.shape[1]
            q, k, v = self._heads(cat, packed.qkv).chunk(3, dim=-1)
            q = q[:, Lk - Lq :].view(B, Lq, H, D)                                   # strided views, no copies
            k, v = k.view(B, Lk, H, D), v.view(B, Lk, H, D)
            uniform_keys = 0
        elif mems is None:
            q, k_new, v_new = self._heads(h, packed.qkv).view(B, Lq, 3, H, D).unbind(2)
            k, v = cache.extend(k_new, v_new)                                       # (B, Lk, H, D)
            uniform_keys = cache.uniform_rows if key_mask is None else 0
        else:
            raise ValueError("pass the memory as mems or as an inference cache, not both")
        r = pos_emb if pos_emb.dim() == 3 else self.r_net(pos_emb).view(-1, H, D)   # (Lr, H, D)

        prob = None
        if output_attentions or (self.training and self.dropatt.p > 0):
            out, prob = ops.rel_attention_with_probs(
                q, k, v, r, self.r_w_bias, self.r_r_bias, scale=self.scale, window=window,
                dropout_p=self.dropatt.p if self.training else 0.0, key_mask=key_mask,
            )
        else:
            out = ops.rel_attention(q, k, v, r, self.r_w_bias, self.r_r_bias, scale=self.scale, window=window,
                                    uniform_keys=uniform_keys, key_mask=key_mask)
        if head_mask is not None:                       # a per-head scale of the probabilities
            out = out * head_mask[:, None]
            prob = None if prob is None else prob * head_mask[:, None, None]

        attn_out = self.drop(ops.linear(out.reshape(B, Lq, H * D), self.o_net.weight, None, packed.o))   # (B, Lq, d)
        out = h + attn_out if self.pre_lnorm else self.layer_norm(h + attn_out)
        return out, prob


class RelPartialLearnableDecoderLayer(nn.Module):
    """forward: the attention's (see there), then the feed-forward: -> (out (B, Lq, d), probabilities or None)."""

    def __init__(self, n_head, d_model, d_head, d_inner, dropout, layer_norm_epsilon=1e-5, **kwargs):
        super().__init__()
        self.dec_attn = RelPartialLearnableMultiHeadAttn(
            n_head, d_model, d_head, dropout, layer_norm_epsilon=layer_norm_epsilon, **kwargs
        )
        self.pos_ff = PositionwiseFF(
            d_model, d_inner, dropout, pre_lnorm=kwargs.get("pre_lnorm"), layer_norm_epsilon=layer_norm_epsilon
        )

    def forward(self, h, pos_emb, mems=None, window=None, head_mask=None, output_attentions=False,
                cache: Optional[LayerKV] = None, packed: Optional[LayerWeights] = None, key_mask=None):
        out, prob = self.dec_attn(h, pos_emb, mems, window, head_mask, output_attentions, cache, packed, key_mask)
        packed = packed or NOT_PACKED
        return self.pos_ff(out, (packed.ff1, packed.ff2)), prob

    def decode_weights(self) -> LayerWeights:
        """The weights of a cached step's products, as ``forward`` takes them packed."""
        return LayerWeights(self.dec_attn.qkv_net.weight, self.dec_attn.o_net.weight,
                            self.pos_ff.CoreNet[0].weight, self.pos_ff.CoreNet[3].weight)


def _cluster_bounds(cutoffs: list[int], n_token: int) -> list[int]:
    return [0] + list(cutoffs) + [n_token]


class AdaptiveEmbedding(nn.Module):
    """Adaptive input embeddings (Baevski & Auli 2019): ids (...) -> (..., d_proj), scaled by sqrt(d_proj).

    Cluster i covers ids [cutoff_ends[i], cutoff_ends[i+1]) with width d_embed // div_val**i,
    projected to d_proj by emb_projs[i].
    """

    def __init__(self, n_token, d_embed, d_proj, cutoffs, div_val=1, sample_softmax=False):
        super().__init__()
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.cutoffs = list(cutoffs) + [n_token]
        self.cutoff_ends = [0] + self.cutoffs
        self.emb_scale = d_proj**0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(n_token, d_embed, sparse=sample_softmax > 0))
            if d_proj != d_embed:
                self.emb_projs.append(nn.Parameter(torch.zeros(d_proj, d_embed)))
        else:
            for i in range(len(self.cutoffs)):
                d_emb_i = d_embed // (div_val**i)
                n_i = self.cutoff_ends[i + 1] - self.cutoff_ends[i]
                self.emb_layers.append(nn.Embedding(n_i, d_emb_i))
                self.emb_projs.append(nn.Parameter(torch.zeros(d_proj, d_emb_i)))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if self.div_val == 1:
            embed = self.emb_layers[0](inp)
            if self.d_proj != self.d_embed:
                embed = ops.linear(embed, self.emb_projs[0])
            return embed * self.emb_scale
        return self._clustered(inp)

    def _clustered(self, inp: torch.Tensor) -> torch.Tensor:
        inp_flat = inp.reshape(-1)
        weight = self.emb_projs[0]
        emb_flat = torch.zeros(inp_flat.shape[0], self.d_proj, dtype=weight.dtype, device=weight.device)
        # compiled: the same formulation, whose shapes do not depend on the ids
        sync_free = torch.compiler.is_compiling() or backend.sync_free(inp_flat)
        for i, (start, end) in enumerate(zip(self.cutoff_ends, self.cutoff_ends[1:])):
            in_cluster = (inp_flat >= start) & (inp_flat < end)                          # (N,)
            if sync_free:
                # no host sync (CUDA: a graph-captured decode step): every row takes every cluster's
                # embedding of its clamped id, and keeps its own cluster's
                local = (inp_flat - start).clamp(0, end - start - 1)
                emb_i = ops.linear(self.emb_layers[i](local), self.emb_projs[i])          # (N, d_proj)
                emb_flat = torch.where(in_cluster[:, None], emb_i, emb_flat)
                continue
            rows = in_cluster.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            emb_i = ops.linear(self.emb_layers[i](inp_flat[rows] - start), self.emb_projs[i])
            emb_flat = emb_flat.index_copy(0, rows, emb_i)
        return emb_flat.view(*inp.shape, self.d_proj) * self.emb_scale


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Projected adaptive log-softmax over n_token words (HF's parameters and names).

    forward(hidden (..., L, d_proj), labels (..., L) or None):
      labels given: labels are shifted inside (position t predicts label t+1); returns the NLL of
                    every predicted position, flattened (N,) in position order, 0 where the label
                    is -100. (HF returns them grouped by cluster; the values and their mean agree.)
      labels None:  log-probabilities (N, n_token), N the number of positions.
    """

    def __init__(self, n_token, d_embed, d_proj, cutoffs, div_val=1, keep_order=False):
        super().__init__()
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.cutoffs = list(cutoffs) + [n_token]
        self.cutoff_ends = [0] + self.cutoffs
        self.shortlist_size = self.cutoffs[0]
        self.n_clusters = len(self.cutoffs) - 1
        self.head_size = self.shortlist_size + self.n_clusters
        self.keep_order = keep_order        # accepted for HF compatibility; losses are always in order
        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        if div_val == 1:
            for _ in self.cutoffs:
                self.out_projs.append(nn.Parameter(torch.zeros(d_proj, d_embed)) if d_proj != d_embed else None)
            self.out_layers.append(nn.Linear(d_embed, n_token))
        else:
            for i in range(len(self.cutoffs)):
                d_emb_i = d_embed // (div_val**i)
                self.out_projs.append(nn.Parameter(torch.zeros(d_proj, d_emb_i)))
                self.out_layers.append(nn.Linear(d_emb_i, self.cutoff_ends[i + 1] - self.cutoff_ends[i]))

    def extra_repr(self) -> str:
        return f"n_token={self.n_token}, cutoffs={self.cutoffs[:-1]}, div_val={self.div_val}, d_proj={self.d_proj}"

    def clusters(self):
        """(weights, biases, projs, cluster_weight, cluster_bias) in the layout of ``txl_fast.ops``.

        With div_val == 1 the clusters are row slices of the one output matrix: views, no copies.
        """
        if self.div_val == 1:
            layer = self.out_layers[0]
            spans = list(zip(self.cutoff_ends, self.cutoff_ends[1:]))
            weights = [layer.weight[a:b] for a, b in spans]
            biases = [layer.bias[a:b] for a, b in spans]
        else:
            weights = [layer.weight for layer in self.out_layers]
            biases = [layer.bias for layer in self.out_layers]
        projs = [self.out_projs[i] for i in range(len(self.cutoffs))]
        if self.n_clusters == 0:
            return weights, biases, projs, None, None
        return weights, biases, projs, self.cluster_weight, self.cluster_bias

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None, keep_order: bool = False):
        if labels is not None:
            hidden = hidden[..., :-1, :]                # position t predicts label t + 1
            labels = labels[..., 1:]
            if hidden.shape[:-1] != labels.shape:
                raise ValueError(
                    f"labels of shape {tuple(labels.shape) } do not match hidden states {tuple(hidden.shape[:-1])} "
                    "(after the shift)"
                )
            return ops.adaptive_nll(hidden.reshape(-1, self.d_proj), labels.reshape(-1), *self.clusters())
        return self.log_prob(hidden.reshape(-1, self.d_proj))

    def log_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary: (N, d_proj) -> (N, n_token)."""
        return ops.adaptive_log_softmax(hidden, *self.clusters())
