"""The torch backend of ``rel_attention`` against the float64 naive path, including its
cache-sized chunks over (batch row, heads); output and every input's gradient."""
import importlib

import pytest
import torch

from helpers import assert_rel_close
from txl_fast import backend, naive
from txl_fast.ops import rel_attention

ra = importlib.import_module("txl_fast.ops.rel_attention")     # the module, not the re-exported function
NAMES = ("q", "k", "v", "r", "r_w_bias", "r_r_bias")

# (B, Lq, mlen, H, D, window)
CASES = {"no_window": (3, 13, 10, 5, 7, None), "window": (2, 11, 9, 3, 8, 6), "decode": (3, 1, 23, 5, 4, 9),
         "window0_uniform": (2, 7, 0, 3, 4, 0)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk,dtype", [(None, torch.float64), (1, torch.float64), (150, torch.float64),
                                         (None, torch.float32), (150, torch.float16)])
@pytest.mark.parametrize("layout", ["time_major", "head_major"])
def test_torch_path_matches_naive(case, chunk, dtype, layout, monkeypatch):
    """chunk: the default; one head per chunk; 2 heads (H = 5 -> 3 groups). layout: how k, v and r
    are stored (HF's time-major tensors; the inference cache's head-major buffers)."""
    B, Lq, mlen, H, D, window = CASES[case]
    if chunk is not None:
        monkeypatch.setattr(ra, "SCORE_CHUNK", chunk * Lq * (Lq + mlen))
    g = torch.Generator().manual_seed(len(case) + (chunk or 0))
    shapes = [(B, Lq, H, D), (B, Lq + mlen, H, D), (B, Lq + mlen, H, D), (Lq + mlen, H, D), (H, D), (H, D)]
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    if layout == "time_major":         # passed as batch-first views, as the uncached models do
        inputs[:3] = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in inputs[:3]]
    else:                              # (B, H, L, D) and (H, L, D) storage, as the inference cache's
        inputs[1:3] = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs[1:3]]
        inputs[3] = inputs[3].transpose(0, 1).contiguous().transpose(0, 1)
    dout = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64)
    ours = [x.to(dtype, copy=True).requires_grad_() for x in inputs]
    with backend.use_backend("torch"):
        out = rel_attention(*ours, scale=D**-0.5, window=window)
    out.backward(dout.to(dtype))
    refs = [x.clone().requires_grad_() for x in inputs]
    ref = naive.rel_attention(*refs, D**-0.5, window)[0]
    ref.backward(dout)
    assert_rel_close(out, ref, dtype, "out")
    for name, x, rx in zip(NAMES, ours, refs):
        assert_rel_close(x.grad, rx.grad, dtype, f"d{name}")
