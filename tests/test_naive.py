"""The validator itself, checked against scalar Python arithmetic written from the paper."""
import math

import pytest
import torch

from txl_fast import naive
from txl_fast.ops.rel_attention import rel_shift


def scalar_attention(q, k, v, r, u, vb, scale, visible, row, empty_weight=1.0):
    """Pure-Python loops over b, h, i, j, d: the paper's equation with no tensor algebra. Key j is
    seen by query i of batch row b when ``visible(b, j, dist)``, dist = i + mlen - j, and its
    position key is ``r[row(dist)]``; a query that sees no key weighs every key ``empty_weight``
    (1: HF's finfo.min fill makes the row uniform; 0: zeros)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    mlen = Lk - Lq
    out = torch.zeros(B, Lq, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                scores = []
                for j in range(Lk):
                    dist = i + mlen - j
                    if not visible(b, j, dist):
                        scores.append(None)
                        continue
                    p = row(dist)
                    a = sum((q[b, i, h, x] + u[h, x]).item() * k[b, j, h, x].item() for x in range(D))
                    c = sum((q[b, i, h, x] + vb[h, x]).item() * r[p, h, x].item() for x in range(D))
                    scores.append(scale * (a + c))
                finite = [s for s in scores if s is not None]
                if finite:
                    m = max(finite)
                    w = [0.0 if s is None else math.exp(s - m) for s in scores]
                else:
                    w = [empty_weight] * Lk
                total = sum(w) or 1.0
                for x in range(D):
                    out[b, i, h, x] = sum(w[j] / total * v[b, j, h, x].item() for j in range(Lk))
    return out


def scalar_rel_attention(q, k, v, r, u, vb, scale, window):
    """Causal: r's rows are distances Lr - 1 … 0, larger distances clamped to row 0 (clamp_len)."""
    Lr = r.shape[0]
    return scalar_attention(q, k, v, r, u, vb, scale,
                            visible=lambda b, j, dist: dist >= 0 and (window is None or dist < window),
                            row=lambda dist: Lr - 1 - min(dist, Lr - 1))


@pytest.mark.parametrize("Lq,Lk,window,Lr", [(3, 5, None, 5), (3, 5, 3, 5), (1, 4, None, 4), (4, 4, None, 4),
                                             (2, 2, 0, 2), (3, 7, None, 3), (1, 6, 5, 2), (4, 5, 3, 1)])
def test_rel_attention_matches_scalar_loops(Lq, Lk, window, Lr):
    """Lr < Lk: clamped position rows."""
    g = torch.Generator().manual_seed(Lq * 10 + Lk + Lr)
    B, H, D = 2, 2, 3
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, r, u, vb = t(B, Lq, H, D), t(B, Lk, H, D), t(B, Lk, H, D), t(Lr, H, D), t(H, D), t(H, D)
    out, prob = naive.rel_attention(q, k, v, r, u, vb, 0.7, window)
    ref = scalar_rel_attention(q, k, v, r, u, vb, 0.7, window)
    assert (out - ref).abs().max() < 1e-12
    assert torch.allclose(prob.sum(-1), torch.ones(()).double())


def scalar_bidirectional(q, k, v, r, u, vb, scale, context, key_mask, empty_rows):
    """Bidirectional: r's rows are the distances Lk - 1 … -(Lq - 1), key j visible when
    -right <= dist <= left and key_mask[b, j]."""
    Lk = k.shape[1]
    return scalar_attention(q, k, v, r, u, vb, scale,
                            visible=lambda b, j, dist: bool(key_mask[b, j]) and (
                                context is None or -context[1] <= dist <= context[0]),
                            row=lambda dist: Lk - 1 - dist, empty_weight=1.0 if empty_rows == "uniform" else 0.0)


@pytest.mark.parametrize("Lq,Lk,context,empty_rows", [(3, 3, None, "zero"), (3, 5, (1, 1), "zero"),
                                                      (4, 4, (0, 2), "uniform"), (2, 6, (3, 0), "zero")])
def test_bidirectional_matches_scalar_loops(Lq, Lk, context, empty_rows):
    """Batch row 1 hides its last keys; batch row 2 hides every key (an empty row of each kind)."""
    g = torch.Generator().manual_seed(Lq * 10 + Lk)
    B, H, D = 3, 2, 3
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, r, u, vb = t(B, Lq, H, D), t(B, Lk, H, D), t(B, Lk, H, D), t(Lk + Lq - 1, H, D), t(H, D), t(H, D)
    key_mask = torch.ones(B, Lk, dtype=torch.bool)
    key_mask[1, -2:] = False
    key_mask[2] = False
    out, prob = naive.rel_attention(q, k, v, r, u, vb, 0.7, causal=False, context=context, key_mask=key_mask,
                                    empty_rows=empty_rows)
    ref = scalar_bidirectional(q, k, v, r, u, vb, 0.7, context, key_mask, empty_rows)
    assert (out - ref).abs().max() < 1e-12
    sums = prob.sum(-1)                                  # 1, or 0 for the empty rows of empty_rows="zero"
    assert torch.allclose(sums, torch.ones(()).double()) or empty_rows == "zero" and sums[2].abs().max() == 0


def test_rel_shift_index_formula():
    Lq, Lk = 4, 7
    raw = torch.arange(2 * Lq * (Lk + Lq - 1), dtype=torch.float64).view(2, Lq, Lk + Lq - 1)
    shifted = rel_shift(raw, Lk)
    assert shifted.shape == (2, Lq, Lk)
    with pytest.raises(ValueError, match="klen \\+ Lq - 1"):
        rel_shift(raw[..., 1:], Lk)                      # one distance short
    for i in range(Lq):
        for j in range(Lk):                   # every key: raw column j + Lq - 1 - i, in row i
            assert shifted[:, i, j].tolist() == raw[:, i, j + Lq - 1 - i].tolist()


def test_adaptive_log_softmax_matches_scalar_definition():
    g = torch.Generator().manual_seed(3)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    d_proj = 4
    weights = [t(3, 4), t(2, 2), t(4, 1)]
    biases = [t(3), t(2), t(4)]
    projs = [None, t(d_proj, 2), t(d_proj, 1)]
    cw, cb = t(2, 4), t(2)
    hidden = t(5, d_proj)
    logprob = naive.adaptive_log_softmax(hidden, weights, biases, projs, cw, cb)
    assert logprob.shape == (5, 9)
    for n in range(5):
        h = hidden[n].tolist()

        def logits(w, b, p):
            x = h if p is None else [sum(h[a] * p[a, c].item() for a in range(d_proj)) for c in range(p.shape[1])]
            return [sum(x[c] * w[o, c].item() for c in range(len(x))) + b[o].item() for o in range(w.shape[0])]

        def log_softmax(z):
            m = max(z)
            lse = m + math.log(sum(math.exp(x - m) for x in z))
            return [x - lse for x in z]

        head = log_softmax(logits(weights[0], biases[0], None) + logits(cw, cb, None))
        expected = head[:3]
        for c in (1, 2):
            expected += [head[3 + c - 1] + x for x in log_softmax(logits(weights[c], biases[c], projs[c]))]
        assert max(abs(a - b) for a, b in zip(logprob[n].tolist(), expected)) < 1e-12
    assert torch.allclose(logprob.exp().sum(-1), torch.ones(()).double())


def test_adaptive_nll_ignores_minus_100():
    g = torch.Generator().manual_seed(4)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    weights, biases = [t(6, 3)], [t(6)]
    hidden, target = t(4, 3), torch.tensor([0, -100, 5, 2])
    nll = naive.adaptive_nll(hidden, target, weights, biases, [None], None, None)
    ref = -torch.log_softmax(hidden @ weights[0].t() + biases[0], -1)
    assert nll[1] == 0
    assert torch.allclose(nll[[0, 2, 3]], ref[[0, 2, 3], [0, 5, 2]])
