"""Drop-in acceleration of live HuggingFace TransfoXL models: ``patch(model)`` / ``unpatch(model)``.

``patch`` takes an HF ``transformers==4.35.0`` ``TransfoXLModel``, ``TransfoXLLMHeadModel`` or
``TransfoXLForSequenceClassification`` and, per instance, routes the two heavy computations to
``txl_fast.ops``:

  - every ``RelPartialLearnableMultiHeadAttn``: the score / softmax / weighted-sum core runs in
    ``ops.rel_attention`` (fused kernel on the triton backend); q, k, v and r still come from the
    module's own ``qkv_net`` / ``r_net``, and ``o_net``, dropout and layer norm are the module's own.
  - the LM head's ``ProjectedAdaptiveLogSoftmax`` (``crit``): ``forward`` runs in
    ``ops.adaptive_nll`` / ``ops.adaptive_log_softmax``.

How: each such module's ``__class__`` is swapped for a subclass of its HF class,
``TxlFastPatched<HFName>``, that overrides ``forward`` and ``extra_repr`` (so ``print(model)``
shows the swap). Nothing about the parameters changes: same tensors, same ``state_dict`` keys,
same tying, and nothing global in ``transformers`` is touched. Why a class swap and not an instance
``forward`` attribute: ``DataParallel`` replicas copy ``__dict__``, so a bound method stored there
would keep calling the *original* module (with the original device's parameters); a class travels
with the replica, with ``deepcopy`` and with ``pickle`` (the classes resolve by name in this module).
HF's class-name matching (``_init_weights``) still works because the names keep HF's as suffix.
``unpatch`` restores the class and deletes the one instance attribute ``patch`` added, so
``vars(module)`` is exactly as before.

Contract: patched outputs equal unpatched ones (fp32 <= 1e-5): hidden states, mems, attentions,
losses *in HF's order* (grouped by cluster unless ``keep_order``), log-probabilities, and
gradients. Inputs the fused op cannot express exactly run HF's own code instead (see
``_TxlFastAttention.forward``), so results never silently differ. Not swapped:
``crit.log_prob`` (HF's raises or reads the wrong cluster with two or more tail clusters; use
``forward(hidden)`` for log-probabilities), embeddings and feed-forward (plain PyTorch already).
"""
from __future__ import annotations

import sys
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from txl_fast import backend, ops, patch_nemo, patch_speech  # noqa: F401 (patch_nemo adds NeMo to patch_speech)
from txl_fast.ops.rel_attention import visibility_mask

__all__ = ["patch", "unpatch", "is_patched"]

_PREFIX = "TxlFastPatched"
_STATE = "_txl_fast_patch"          # the one instance attribute patch() adds


def _hf():
    """HF's TransfoXL modules, or None when transformers (or its TransfoXL) is not importable."""
    if "transformers" not in sys.modules:          # a model of HF's can only exist if it was imported
        return None
    try:
        from transformers.models.transfo_xl import modeling_transfo_xl as modeling
        from transformers.models.transfo_xl import modeling_transfo_xl_utilities as utilities
    except ImportError:                             # transformers >= 4.36 moved it to models.deprecated
        try:
            from transformers.models.deprecated.transfo_xl import modeling_transfo_xl as modeling
            from transformers.models.deprecated.transfo_xl import modeling_transfo_xl_utilities as utilities
        except ImportError:
            return None
    return modeling, utilities


class _AttentionState:
    """What a patched attention module needs: the enclosing HF TransfoXLModel (for ``same_length``
    and ``mem_len``, read at every call so ``reset_memory_length`` is honoured) and the last mask
    checked (HF builds one mask per forward and hands the same tensor to every layer)."""

    def __init__(self, transformer: nn.Module, check_mask: bool):
        self.transformer = transformer              # a plain reference, not a registered submodule
        self.check_mask = check_mask
        self._checked = None                        # (weakref to mask, window) last found equal

    def window(self, qlen: int, klen: int) -> Optional[int]:
        """HF's dec_attn_mask as a visibility window (``txl_fast.model.TransfoXLModel.attention_window``)."""
        t = self.transformer
        if not t.same_length:
            return None
        mlen = klen - qlen
        mask_len = klen - t.mem_len
        return mlen + (qlen - mask_len if mask_len > 0 else qlen)

    def mask_agrees(self, attn_mask: torch.Tensor, qlen: int, klen: int, window: Optional[int]) -> bool:
        """True when HF's mask (True/1 = hidden) is exactly the complement of the window's visibility."""
        if not self.check_mask or torch.compiler.is_compiling():
            return True
        cached = self._checked
        if cached is not None and cached[0]() is attn_mask and cached[1] == window:
            return True
        mask = attn_mask[..., 0] if attn_mask.dim() == 3 and attn_mask.shape[-1] == 1 else attn_mask
        if mask.shape != (qlen, klen):
            return False
        ok = torch.equal(mask == 1, ~visibility_mask(qlen, klen, window, mask.device))   # one host sync
        if ok:
            self._checked = (weakref.ref(attn_mask), window)
        return ok

    def __getstate__(self):                         # pickle: a weakref cannot be pickled, the cache is disposable
        return {**self.__dict__, "_checked": None}

    def __deepcopy__(self, memo):
        import copy

        new = _AttentionState.__new__(_AttentionState)
        memo[id(self)] = new
        new.transformer = copy.deepcopy(self.transformer, memo)   # the copy's own transformer (via memo)
        new.check_mask, new._checked = self.check_mask, None
        return new


# ---- the patched classes ---------------------------------------------------------------------------
# Each is created on first use as a subclass of the HF class (so isinstance checks keep working) with
# these mixins first in the MRO; they are cached here and registered as attributes of this module.
class _TxlFastAttention:
    """Overrides for HF's RelPartialLearnableMultiHeadAttn; HF's time-major signature and outputs."""

    def extra_repr(self) -> str:
        return (
            f"txl_fast=rel_attention, backend={backend.get_backend()}, n_head={self.n_head}, "
            f"d_head={self.d_head}, pre_lnorm={self.pre_lnorm}"
        )

    def forward(self, w, r, attn_mask=None, mems=None, head_mask=None, output_attentions=False):
        """w (qlen, bsz, d), r (klen, 1, d), attn_mask (qlen, klen, 1), mems (mlen, bsz, d) -> [out, prob?].

        Runs HF's own forward instead when the inputs are outside what the fused op expresses
        exactly: no mask (HF then attends to every key, even future ones), a mask that is not
        HF's causal / same_length mask, a head_mask that is not one scale per head, or r not one row
        per key.
        """
        qlen, bsz = w.shape[0], w.shape[1]
        klen = qlen + (0 if mems is None else mems.shape[0])
        H, D = self.n_head, self.d_head
        state: _AttentionState = getattr(self, _STATE)
        window = state.window(qlen, klen)
        head_scale = _per_head_scale(head_mask, H)
        if (
            attn_mask is None
            or (head_mask is not None and head_scale is None)
            or r.shape[0] != klen
            or (r.dim() == 3 and r.shape[1] != 1)
            or not state.mask_agrees(attn_mask, qlen, klen, window)
        ):
            warnings.warn(
                "txl_fast.patch: inputs outside the fused attention's contract (mask, head_mask or r); "
                "running HF's attention for this call",
                stacklevel=2,
            )
            return self._txl_fast_base.forward(self, w, r, attn_mask, mems, head_mask, output_attentions)

        cat = w if mems is None else torch.cat([mems, w], dim=0)                  # (klen, bsz, d)
        heads = self.qkv_net(self.layer_norm(cat) if self.pre_lnorm else cat)     # (klen, bsz, 3*H*D)
        q, k, v = heads.chunk(3, dim=-1)
        # HF's time-major (L, B, H, D) as batch-first (B, L, H, D) views: no copies
        q = q[klen - qlen :].view(qlen, bsz, H, D).transpose(0, 1)
        k = k.view(klen, bsz, H, D).transpose(0, 1)
        v = v.view(klen, bsz, H, D).transpose(0, 1)
        rk = self.r_net(r).view(klen, H, D)

        prob = None
        if output_attentions or (self.training and self.dropatt.p > 0):
            out, prob = ops.rel_attention_with_probs(                              # (B, Lq, H, D), (B, H, Lq, Lk)
                q, k, v, rk, self.r_w_bias, self.r_r_bias, scale=self.scale, window=window,
                dropout_p=self.dropatt.p if self.training else 0.0,
            )
        else:
            out = ops.rel_attention(q, k, v, rk, self.r_w_bias, self.r_r_bias, scale=self.scale, window=window)
        if head_scale is not None:          # HF scales the probabilities per head: the same as scaling the output
            out = out * head_scale[:, None]
            prob = None if prob is None else prob * head_scale[:, None, None]

        attn_vec = out.transpose(0, 1).reshape(qlen, bsz, H * D)                  # (qlen, bsz, H*D)
        attn_out = self.drop(self.o_net(attn_vec))
        outputs = [w + attn_out if self.pre_lnorm else self.layer_norm(w + attn_out)]
        if output_attentions:
            outputs.append(prob.permute(2, 3, 0, 1))                               # HF's (qlen, klen, bsz, H)
        return outputs


def _per_head_scale(head_mask: Optional[torch.Tensor], n_head: int) -> Optional[torch.Tensor]:
    """HF hands each layer head_mask[i] of shape (1, 1, 1, H): as (H,), or None if it is not one scale per head."""
    if head_mask is None or head_mask.dim() == 0 or head_mask.shape[-1] != n_head or head_mask.numel() != n_head:
        return None
    return head_mask.reshape(n_head)


class _TxlFastCrit:
    """Overrides for HF's ProjectedAdaptiveLogSoftmax.forward, keeping HF's output contract exactly."""

    def extra_repr(self) -> str:
        return (
            f"txl_fast=adaptive_softmax, backend={backend.get_backend()}, n_token={self.n_token}, "
            f"cutoffs={self.cutoffs[:-1]}, div_val={self.div_val}"
        )

    def _clusters(self):
        """(weights, biases, projs, cluster_weight, cluster_bias) as ``txl_fast.ops`` takes them: views, no copies."""
        spans = list(zip(self.cutoff_ends, self.cutoff_ends[1:]))
        if self.div_val == 1:
            layer = self.out_layers[0]
            weights = [layer.weight[a:b] for a, b in spans]
            biases = [layer.bias[a:b] for a, b in spans]
        else:
            weights = [layer.weight for layer in self.out_layers]
            biases = [layer.bias for layer in self.out_layers]
        projs = [self.out_projs[i] for i in range(len(spans))]
        if self.n_clusters == 0:
            return weights, biases, projs, None, None
        return weights, biases, projs, self.cluster_weight, self.cluster_bias

    def forward(self, hidden, labels=None, keep_order=False):
        """HF's contract: labels None -> log-probs (N, n_token); labels -> NLL (N,) of the shifted labels,
        grouped by cluster (cluster 0's rows first, each group in row order, ignored rows as trailing
        zeros) unless keep_order / self.keep_order, then in row order with zeros at ignored rows."""
        if labels is None:
            return ops.adaptive_log_softmax(hidden.reshape(-1, hidden.shape[-1]), *self._clusters())
        hidden = hidden[..., :-1, :]                                               # position t predicts t + 1
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = labels[..., 1:].reshape(-1)
        if hidden.shape[0] != labels.shape[0]:
            raise RuntimeError("Input and labels should have the same size in the batch dimension.")
        nll = ops.adaptive_nll(hidden, labels, *self._clusters())                  # (N,), row order, 0 if ignored
        if self.n_clusters == 0 or keep_order or getattr(self, "keep_order", False):
            return nll
        # HF's order: rows grouped by cluster (stable), rows labelled -100 last (HF leaves them 0)
        bounds = torch.tensor(self.cutoffs[:-1], device=labels.device)
        group = torch.bucketize(labels, bounds, right=True).masked_fill(labels == -100, self.n_clusters + 1)
        return nll[torch.sort(group, stable=True).indices]


_MIXINS = {"RelPartialLearnableMultiHeadAttn": _TxlFastAttention, "ProjectedAdaptiveLogSoftmax": _TxlFastCrit}
_CLASSES: dict[str, type] = {}


def _patched_class(base: type) -> type:
    name = _PREFIX + base.__name__
    cls = _CLASSES.get(name)
    if cls is None:
        mixin = _MIXINS[base.__name__]
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "_txl_fast_base": base})
        _CLASSES[name] = cls
        setattr(sys.modules[__name__], name, cls)   # so pickle finds it by name
    return cls


def __getattr__(name: str):
    """Resolve ``txl_fast.patch.TxlFastPatched<HFName>`` in a fresh process (unpickling a patched model)."""
    if name.startswith(_PREFIX) and name[len(_PREFIX):] in _MIXINS and _hf() is not None:
        modeling, utilities = _hf()
        base_name = name[len(_PREFIX):]
        base = getattr(modeling, base_name, None) or getattr(utilities, base_name)
        return _patched_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- public API --------------------------------------------------------------------------------------
def _hf_model(model):
    """HF's modules when ``model`` is an HF TransfoXL model, else None."""
    hf = _hf()
    if hf is not None:
        modeling = hf[0]
        kinds = (modeling.TransfoXLModel, modeling.TransfoXLLMHeadModel, modeling.TransfoXLForSequenceClassification)
        if isinstance(model, kinds):
            return hf
    return None


def _not_supported(model, verb: str) -> TypeError:
    what = type(model).__module__ + "." + type(model).__qualname__
    hint = " (txl_fast's own models already run txl_fast's ops)" if what.startswith("txl_fast.") else ""
    speech = ", ".join(f"{module}.{name}" for module, name in patch_speech.SUPPORTED)
    return TypeError(
        f"txl_fast.{verb} expects a HuggingFace transformers TransfoXLModel, TransfoXLLMHeadModel or "
        f"TransfoXLForSequenceClassification, or a module holding one of {speech}; got {what}{hint}"
    )


def _targets(model, hf):
    modeling, utilities = hf
    bases = (modeling.RelPartialLearnableMultiHeadAttn, utilities.ProjectedAdaptiveLogSoftmax)
    return [m for m in model.modules() if isinstance(m, bases)]


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` (an HF attention or adaptive softmax, or a speech attention) runs txl_fast's ops."""
    return type(module).__name__.startswith(_PREFIX) and hasattr(type(module), "_txl_fast_base")


def patch(model: nn.Module, *, check_mask: bool = True, attention_weights: str = "on_request") -> nn.Module:
    """Route ``model``'s attention (and adaptive softmax) to txl_fast's ops, in place; returns ``model``.

    ``model`` is an HF TransfoXLModel, TransfoXLLMHeadModel or TransfoXLForSequenceClassification,
    or any module holding supported Conformer attention modules (SpeechBrain, ESPnet, transformers
    5.x Parakeet: ``txl_fast.patch_speech``; NeMo: ``txl_fast.patch_nemo``); anything else:
    TypeError. Parameters, buffers and ``state_dict`` are untouched. Patching twice is a no-op.

    HF: the fused op derives its mask from the model's ``same_length`` / ``mem_len``;
    ``check_mask`` (default) compares it with the mask HF built, once per forward (a host sync on a
    GPU, where HF itself syncs once per layer), and runs HF's attention if they differ.
    Speech models: ``attention_weights`` ("on_request" or "always") says when the attention
    probabilities are produced (``txl_fast.patch_speech``).
    """
    if not isinstance(model, nn.Module):
        raise _not_supported(model, "patch")
    hf = _hf_model(model)
    if hf is None:
        if patch_speech.patch_modules(model, attention_weights) is None:
            raise _not_supported(model, "patch")
        return model
    modeling = hf[0]
    transformers_of = {}
    for m in model.modules():                       # each attention module's enclosing TransfoXLModel
        if isinstance(m, modeling.TransfoXLModel):
            for sub in m.modules():
                transformers_of[id(sub)] = m
    states = {}
    for m in _targets(model, hf):
        if is_patched(m):
            continue
        if isinstance(m, modeling.RelPartialLearnableMultiHeadAttn):
            owner = transformers_of[id(m)]
            if id(owner) not in states:
                states[id(owner)] = _AttentionState(owner, check_mask)
            object.__setattr__(m, _STATE, states[id(owner)])   # plain attribute, never a submodule
        m.__class__ = _patched_class(type(m))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: every swapped module gets its library's class back and loses what patch added."""
    if not isinstance(model, nn.Module):
        raise _not_supported(model, "unpatch")
    hf = _hf_model(model)
    if hf is None:
        if patch_speech.unpatch_modules(model) is None:
            raise _not_supported(model, "unpatch")
        return model
    for m in _targets(model, hf):
        if is_patched(m):
            m.__class__ = type(m)._txl_fast_base
            m.__dict__.pop(_STATE, None)
    return model
