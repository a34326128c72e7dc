"""Stage 3 of the GPU check: correctness, each against the float64 ``txl_fast.naive`` reference on fresh
random inputs and against the torch path (relative Frobenius errors, thresholds in ``plan.LIMITS``):
attention output and its 6 gradients per case and dtype; the adaptive softmax at the table's
vocabulary (NLL, every gradient, log-probs, top-k); torch.compile(fullgraph=True) against eager;
gradients bitwise repeatable (dr within ``plan.DR_REPEAT``); the cached decode step's host syncs on
CUDA (0 expected); generate(cuda_graph=True) against eager tokens; the bidirectional mode
(Conformer encoders) with padding and a limited context.

``checks(S, device, smoke)`` lists them as (name, function, arguments): the driver records each,
``tests/test_gpu_correctness.py`` runs each as a test (the smoke's shapes in Triton's interpreter on
the CPU, the GPU's on CUDA). Each returns a dict with ``status_check``: pass, fail or skipped.
"""
from __future__ import annotations

import contextlib

import torch

from txl_fast import backend, naive, ops, use_backend
from txl_fast.bench.gpu.common import (attention_inputs, bidirectional_inputs, finite, flat_params, poison, rel_err,
                                       small_model, softmax_inputs)
from txl_fast.bench.gpu.plan import BIDIRECTIONAL_DTYPES, DR_REPEAT, LIMITS
from txl_fast.bench.machine import time_call
from txl_fast.bench.syncs import SyncCounter
from txl_fast.inference import decode_step
from txl_fast.cache import trusted_token_ids

GRADS = ("dq", "dk", "dv", "dr", "du", "dw")


def checks(S: dict, device, smoke: bool) -> list:
    """Every correctness record of the shapes ``S``: (name, function, arguments)."""
    out = [(f"attention {case[0]} {dtype}", check_attention, (case, dtype, device, smoke))
           for case in S["attention"] for dtype in S["dtypes"]]
    out += [(f"adaptive softmax V{S['softmax']['vocab']} N{S['softmax']['n']} {dtype}", check_softmax,
             (S, dtype, device, smoke)) for dtype in S["softmax_dtypes"]]
    out += [(f"adaptive top-k k={k}", check_topk, (S, k, device, smoke)) for k in S["topk"]]
    out += [(f"bidirectional {case[0]} {dtype}", check_bidirectional, (case, dtype, device, smoke))
            for case in S["bidirectional"] for dtype in (BIDIRECTIONAL_DTYPES if not smoke else ("float32",))]
    out += [("decode step host syncs", check_decode_syncs, (S, device, smoke)),
            ("generate cuda_graph vs eager", check_graph_generate, (S, device, smoke)),
            ("gradients repeat", check_determinism, (S, device, smoke)),
            ("torch.compile fullgraph fwd+bwd", check_compile, (S, device, smoke))]
    return out


def verdict(errors: dict, torch_errors: dict, dtype: str, all_finite: bool) -> dict:
    """pass/fail of named errors (``out`` or a gradient) against LIMITS[dtype] and 2x the torch path."""
    out_limit, grad_limit = LIMITS[dtype]
    failures = [] if all_finite else ["non-finite values"]
    for name, err in errors.items():
        limit = out_limit if name == "out" else grad_limit
        if not err <= limit:
            failures.append(f"{name} {err:.2e} > {limit:.0e}")
        if dtype != "float32" and name in torch_errors and not err <= 2 * torch_errors[name]:
            failures.append(f"{name} {err:.2e} > 2x torch {torch_errors[name]:.2e}")
    return {"status_check": "pass" if not failures else "fail", "failures": failures,
            "errors": {k: float(f"{v:.3e}") for k, v in errors.items()},
            "torch_errors": {k: float(f"{v:.3e}") for k, v in torch_errors.items()}}


def attend_with_grads(x: list, dout, mode: dict, backend_name: str, device) -> list:
    """[out, *its 6 gradients] of ``ops.rel_attention(*x, **mode)`` on ``backend_name``, on fresh leaves
    (freed allocator blocks poisoned first)."""
    leaves = [t.clone().requires_grad_() for t in x]
    poison(device)
    with use_backend(backend_name):
        out = ops.rel_attention(*leaves, **mode)
        return [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def check_attention(case, dtype_name: str, device, smoke: bool) -> dict:
    """Attention (causal, memory, window, clamped positions): output and every gradient against float64."""
    dtype = getattr(torch, dtype_name)
    if smoke and dtype == torch.bfloat16:
        return {"status_check": "skipped", "why": "bf16 is broken in the Triton interpreter"}
    scale, window = case[5] ** -0.5, case[6]
    x = attention_inputs(case, dtype, device, seed=hash((case[0], dtype_name)) % 2**31)
    x64 = [t.double().requires_grad_() for t in x]                  # the reference of the rounded inputs
    ref = naive.rel_attention(*x64, scale, window)[0]
    dout = torch.randn_like(ref)
    refs = [ref, *torch.autograd.grad(ref, x64, dout)]
    got, torch_got = (attend_with_grads(x, dout, dict(scale=scale, window=window), backend_name, device)
                      for backend_name in ("triton", "torch"))
    names = ("out", *GRADS)
    return verdict({n: rel_err(g, r) for n, g, r in zip(names, got, refs)},
                   {n: rel_err(g, r) for n, g, r in zip(names, torch_got, refs)}, dtype_name, finite(*got))


def check_bidirectional(case, dtype_name: str, device, smoke: bool) -> dict:
    """The bidirectional mode (Conformer encoders) on the device: the Triton kernels against float64,
    output and every gradient, and the output without autograd; padded keys, zero empty rows; the
    torch path's errors beside them (low precision: within 2x of them)."""
    dtype = getattr(torch, dtype_name)
    if smoke and dtype == torch.bfloat16:
        return {"status_check": "skipped", "why": "bf16 is broken in the Triton interpreter"}
    context, D = case[6], case[5]
    x, lengths = bidirectional_inputs(case, dtype, device, seed=7)
    keys = torch.arange(x[1].shape[1], device=device)[None, :] < lengths[:, None]
    x64 = [t.double().requires_grad_() for t in x]
    ref = naive.rel_attention(*x64, D**-0.5, causal=False, context=context, key_mask=keys, empty_rows="zero")[0]
    dout = torch.randn_like(ref)
    refs = [ref, *torch.autograd.grad(ref, x64, dout)]
    mode = dict(scale=D**-0.5, causal=False, context=context, key_lengths=lengths, empty_rows="zero")

    def run(backend_name):
        got = attend_with_grads(x, dout, mode, backend_name, device)
        with use_backend(backend_name), torch.no_grad():
            inference = ops.rel_attention(*x, **mode)
        errors = {n: rel_err(g, r) for n, g, r in zip(("out", *GRADS), got, refs)}
        errors["out_inference"] = rel_err(inference, ref)
        return errors, finite(*got, inference)

    (errors, all_finite), (torch_errors, _) = run("triton"), run("torch")
    return verdict(errors, torch_errors, dtype_name, all_finite)


def check_softmax(S: dict, dtype_name: str, device, smoke: bool) -> dict:
    """NLL and every gradient, and the log-probs, at the table's vocabulary, against float64."""
    dtype = getattr(torch, dtype_name)
    hidden, target, params = softmax_inputs(S["softmax"], dtype, device, seed=11)
    flat = [hidden, *flat_params(params)]

    def unflat(ts):
        n = len(params[0])
        return ts[0], (ts[1 : 1 + n], ts[1 + n : 1 + 2 * n], ts[1 + 2 * n : 1 + 3 * n], ts[-2], ts[-1])

    leaves64 = [t.double().requires_grad_() for t in flat]
    h64, p64 = unflat(leaves64)
    ref = naive.adaptive_nll(h64, target, *p64)
    grad = torch.rand_like(ref) + 0.5
    refs = [ref, *torch.autograd.grad(ref, leaves64, grad)]
    with torch.no_grad():
        ref_logp = naive.adaptive_log_softmax(h64, *p64)

    def run(backend_name):
        leaves = [t.clone().requires_grad_() for t in flat]
        h, p = unflat(leaves)
        poison(device)
        with use_backend(backend_name):
            nll = ops.adaptive_nll(h, target, *p)
            grads = torch.autograd.grad(nll, leaves, grad.to(nll.dtype))
            with torch.no_grad():
                logp = ops.adaptive_log_softmax(h, *p)
        return [nll, *grads], logp

    (got, logp), (torch_got, torch_logp) = run("triton"), run("torch")
    n = len(params[0])
    names = ["out", "dhidden", *(f"dweight{c}" for c in range(n)), *(f"dbias{c}" for c in range(n)),
             *(f"dproj{c}" for c in range(n)), "dcluster_weight", "dcluster_bias"]
    errors = {nm: rel_err(g, r) for nm, g, r in zip(names, got, refs)}
    errors["logprobs"] = rel_err(logp, ref_logp)
    torch_errors = {nm: rel_err(g, r) for nm, g, r in zip(names, torch_got, refs)}
    torch_errors["logprobs"] = rel_err(torch_logp, ref_logp)
    return verdict(errors, torch_errors, dtype_name, finite(*got, logp))


def check_topk(S: dict, k: int, device, smoke: bool) -> dict:
    """adaptive_topk (triton) against the float64 full log-softmax's top k: same ids, close values."""
    hidden, _, params = softmax_inputs(S["softmax"], torch.float32, device, seed=12)
    with torch.no_grad():
        ref_values, ref_ids = naive.adaptive_log_softmax(hidden.double(), *[
            [t.double() for t in p] if isinstance(p, list) else p.double() for p in params]).topk(k, dim=1)
        with use_backend("triton"):
            values, ids = ops.adaptive_topk(hidden, k, *params)
    same = float((ids == ref_ids).double().mean())
    err = rel_err(values, ref_values)
    ok = same == 1.0 and err <= LIMITS["float32"][0] and finite(values)
    return {"status_check": "pass" if ok else "fail", "ids_equal": same, "errors": {"values": float(f"{err:.3e}")}}


def check_compile(S: dict, device, smoke: bool) -> dict:
    """torch.compile(fullgraph=True) of attention -> adaptive NLL, forward and backward, against eager."""
    case = S["attention"][0]
    q, k, v, r, u, w = [t.requires_grad_() for t in attention_inputs(case, torch.float32, device, 21)]
    B, Lq, H, D = q.shape
    spec = dict(S["softmax"], d_proj=H * D, n=B * Lq)
    _, target, params = softmax_inputs(spec, torch.float32, device, 22)
    leaves = [q, k, v, r, u, w, *(p.requires_grad_() for p in flat_params(params))]

    def loss(q, k, v, r, u, w):
        out = ops.rel_attention(q, k, v, r, u, w, scale=D ** -0.5, window=case[6])
        return ops.adaptive_nll(out.reshape(B * Lq, H * D), target, *params).sum()

    eager = loss(q, k, v, r, u, w)
    # a tail cluster without targets: the eager torch path leaves its weights out of the graph (zeros)
    eager_grads = torch.autograd.grad(eager, leaves, allow_unused=True, materialize_grads=True)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if smoke else "inductor")

    def first_call():
        got = compiled(q, k, v, r, u, w)
        return got, torch.autograd.grad(got, leaves, allow_unused=True, materialize_grads=True)
    compile_s, (got, got_grads) = time_call(first_call)
    errors = {"loss": rel_err(got, eager), **{f"grad{i}": rel_err(g, e) for i, (g, e) in
                                                 enumerate(zip(got_grads, eager_grads))}}
    worst = max(errors.values())
    return {"status_check": "pass" if worst <= LIMITS["float32"][1] and finite(got, *got_grads) else "fail",
            "worst_error": float(f"{worst:.3e}"), "compile_s": round(compile_s, 2)}


def check_determinism(S: dict, device, smoke: bool) -> dict:
    """Every gradient twice on the same inputs: bitwise equal, dr within DR_REPEAT (atomics)."""
    dtype = torch.float16 if smoke else torch.bfloat16
    worst = {}
    for case in S["attention"][:2]:
        x = attention_inputs(case, dtype, device, 31)
        dout = torch.randn(x[0].shape, device=device).to(dtype)
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in x]
            with use_backend("triton"):
                out = ops.rel_attention(*leaves, scale=case[5] ** -0.5, window=case[6])
                runs.append(torch.autograd.grad(out, leaves, dout))
        for name, a, b in zip(GRADS, *runs):
            worst[name] = max(worst.get(name, 0.0), rel_err(a, b))
    hidden, target, params = softmax_inputs(dict(S["softmax"], n=64), dtype if not smoke else torch.float32,
                                            device, 32)
    runs = []
    for _ in range(2):
        leaves = [hidden.clone().requires_grad_(), *(p.clone().requires_grad_() for p in flat_params(params))]
        n = len(params[0])
        p = (leaves[1 : 1 + n], leaves[1 + n : 1 + 2 * n], leaves[1 + 2 * n : 1 + 3 * n], leaves[-2], leaves[-1])
        with use_backend("triton"):
            runs.append(torch.autograd.grad(ops.adaptive_nll(leaves[0], target, *p).sum(), leaves))
    worst["softmax"] = max(rel_err(a, b) for a, b in zip(*runs))
    bad = [n for n, e in worst.items() if e > (DR_REPEAT if n == "dr" else 0.0)]
    return {"status_check": "pass" if not bad else "fail", "failures": bad,
            "differences": {k: float(f"{v:.3e}") for k, v in worst.items()}}


def check_decode_syncs(S: dict, device, smoke: bool) -> dict:
    """Syncing ATen ops in one cached decode step (greedy, top-k, full row), both launch paths."""


    model = small_model(S["graph_model"], torch.float32, device)
    counts = {}
    for backend_name in ("triton", "torch"):
        for do_sample, top_k in ((False, 0), (True, 5), (True, 0)):
            ids = torch.randint(0, model.config.vocab_size, (2, 5), device=device)
            forced = backend.force_sync_free() if smoke else contextlib.nullcontext()
            with torch.no_grad(), backend.use_backend(backend_name), forced:
                _, cand, cache = decode_step(model.transformer, model.crit, ids, model.new_cache(2), False, 0)
                with trusted_token_ids(), SyncCounter() as syncs:
                    decode_step(model.transformer, model.crit, cand[:, :1], cache, do_sample, top_k)
            counts[f"{backend_name} sample={do_sample} top_k={top_k}"] = dict(syncs.ops)
    total = sum(sum(c.values()) for c in counts.values())
    return {"status_check": "pass" if total == 0 else "fail", "syncs": counts,
            "note": "CPU: CUDA formulations forced" if smoke else "CUDA"}


def check_graph_generate(S: dict, device, smoke: bool) -> dict:
    """generate(cuda_graph=True) against eager greedy tokens, past several cache layouts."""
    model = small_model(S["graph_model"], torch.float32, device)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), device=device)
    if device.type != "cuda":
        try:
            model.generate(prompt, 3, cuda_graph=True)
        except ValueError as exc:
            return {"status_check": "skipped", "why": f"CUDA only; on the CPU: {exc}"}
        return {"status_check": "fail", "why": "cuda_graph=True on the CPU did not raise"}
    result = {}
    for backend_name in ("triton", "torch"):
        with use_backend(backend_name):
            eager = model.generate(prompt, S["graph_tokens"])
            graphed = model.generate(prompt, S["graph_tokens"], cuda_graph=True)
        result[backend_name] = float((eager == graphed).double().mean())
    # the torch path's eager steps take HF's zero rows in closed form: rounding may flip a token there
    return {"status_check": "pass" if result["triton"] == 1.0 else "fail", "tokens_equal": result}
