"""One file per op: input checks, backend dispatch (naive / torch / triton), the functional API and its registered operator."""
from txl_fast.ops.adaptive_softmax import adaptive_log_softmax, adaptive_nll
from txl_fast.ops.adaptive_topk import adaptive_topk
from txl_fast.ops.linear import linear
from txl_fast.ops.rel_attention import rel_attention, rel_attention_with_probs, rel_shift

__all__ = ["adaptive_log_softmax", "adaptive_nll", "adaptive_topk", "linear", "rel_attention", "rel_attention_with_probs", "rel_shift"]
