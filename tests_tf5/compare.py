"""What the tf5 tests share: patched vs HF's own code on one model, and the checks (tests/helpers.py's
tolerance table and relative error)."""
import copy
import warnings

import torch
from helpers import TOLERANCE, rel_err

import txl_fast

TOL = TOLERANCE[torch.float32]          # outputs; gradients 1e-4 (the brief's standard for whole models)
GRAD_TOL = 1e-4


def perturb(module, seed=0, scale=0.1):
    """Random weights everywhere (HF's biases start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def frames(lengths, T):
    """(B, T) bool, True = valid frame."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def weighted(out, valid):
    """A loss that reads every valid frame of ``out`` (B, T, ...) with a different weight, no padded one."""
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    return (out * w * valid.view(*valid.shape, *[1] * (out.dim() - 2))).sum()


def run_both(model, run):
    """``run(model, patched)`` unpatched then patched -> (reference, ours), each (outputs, gradients)."""
    results = []
    for patched in (False, True):
        if patched:
            txl_fast.patch(model)
        model.zero_grad(set_to_none=True)
        results.append(run(model))
    txl_fast.unpatch(model)
    return results


def check(ours, ref, what, tol=TOL):
    assert ours.shape == ref.shape, f"{what}: {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite"
    assert rel_err(ours, ref) <= tol, f"{what}: {rel_err(ours, ref):.2e} > {tol:.0e}"


def check_grads(ours, ref, what, tol=GRAD_TOL, ref64=None):
    """Every parameter's gradient; one that is zero in exact arithmetic (k_proj's bias: softmax
    ignores a shift per query) is rounding noise on both sides and must stay that small.
    With ``ref64`` (HF's float64 gradients; whole fp32 models, where HF's own fp32 gradients of the
    first layers' projections lie up to ~1e-3 from float64): a gradient further than ``tol`` from
    HF's must be no further from float64 than HF's own, twice over."""
    assert ours.keys() == ref.keys(), f"{what}: gradients of {sorted(ours.keys() ^ ref.keys())}"
    zero = tol * max(g.norm() for g in ref.values())
    for name, g in ref.items():
        if g.norm() <= zero:
            assert ours[name].norm() <= zero, f"{what} d{name}: {ours[name].norm():.2e}, not ~0"
        elif ref64 is not None and rel_err(ours[name], g) > tol:
            ours_err, hf_err = rel_err(ours[name], ref64[name]), rel_err(g, ref64[name])
            assert ours_err <= 2 * hf_err, f"{what} d{name}: {ours_err:.2e} from float64, HF's fp32 {hf_err:.2e}"
        else:
            check(ours[name], g, f"{what} d{name}", tol)


def grads(model, *inputs):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out.update({f"input{i}": x.grad.clone() for i, x in enumerate(inputs)})
    return out


def run_models(model, run, dtype, reference64=True):
    """(HF, ours) results of ``run`` in ``dtype``, and in fp32 also HF's float64 gradients (unless
    ``reference64`` is False: a model that cannot run in float64)."""
    model = model.to(dtype)
    ref64 = None
    if dtype == torch.float32 and reference64:
        double = copy.deepcopy(model).double()
        for m in double.modules():             # HF's eager softmax runs in fp32: finfo(float64).min -> -inf, NaN
            if hasattr(m, "config"):
                m.config._attn_implementation = "sdpa"
        ref64 = run(double)[1]
    (ref, ref_g), (ours, our_g) = run_both(model, run)
    return ref, ours, ref_g, our_g, ref64


def bf16_errors(module, run, x, pos, autocast: bool) -> list[float]:
    """[HF's, ours]: the relative errors against float64 of ``run(module, x, pos)`` (the output
    compared) in bf16 (bf16 weights and inputs, or fp32 ones under autocast), unpatched then patched."""
    ref = run(copy.deepcopy(module).double(), x.double(), pos.double())
    low, xs, ps = (module, x, pos) if autocast else (copy.deepcopy(module).bfloat16(), x.bfloat16(), pos.bfloat16())
    errors = []
    for patched in (False, True):
        if patched:
            txl_fast.patch(low)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run(low, xs, ps)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        errors.append(rel_err(out, ref))
    txl_fast.unpatch(low)
    return errors


def check_bf16(module, run, x, pos, autocast: bool) -> None:
    """``bf16_errors``: ours within the bf16 tolerance and no less accurate than HF's (5 % margin)."""
    library, ours = bf16_errors(module, run, x, pos, autocast)
    assert ours <= 1.05 * library, f"bf16: ours {ours:.2e}, HF's {library:.2e}"
    assert ours <= TOLERANCE[torch.bfloat16], f"bf16: {ours:.2e}"


def check_encoder_bf16(model, x, attention_mask, autocast: bool) -> None:
    """A whole encoder (its output has ``last_hidden_state`` and ``attention_mask``) in bf16, weights
    or autocast: on the valid frames, patched, as close to its float64 run as HF's own bf16 (5 % margin)."""
    ref = copy.deepcopy(model).double()(x.double(), attention_mask=attention_mask)
    valid = ref.attention_mask.bool()
    low, xs = (model, x) if autocast else (copy.deepcopy(model).bfloat16(), x.bfloat16())
    errors = []
    for patched in (False, True):
        if patched:
            txl_fast.patch(low)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = low(xs, attention_mask=attention_mask).last_hidden_state
        assert torch.isfinite(out).all()
        errors.append(rel_err(out[valid], ref.last_hidden_state[valid]))
    txl_fast.unpatch(low)
    library, ours = errors
    assert ours <= 1.05 * library, f"bf16 encoder: ours {ours:.2e}, HF's {library:.2e}"


def warns_once_and_agrees(module, call) -> None:
    """A call the op cannot express: the patched module runs HF's own code, with one warning for
    three calls, and gives HF's output exactly."""
    from txl_fast import patch_speech

    ref = call(module)
    patch_speech.warned.clear()
    txl_fast.patch(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [call(module) for _ in range(3)]
    txl_fast.unpatch(module)
    assert len([w for w in caught if "txl_fast.patch" in str(w.message)]) == 1
    assert all(torch.equal(out, ref) for out in outs)
