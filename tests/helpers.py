"""Shared by the tests: the one tolerance table and the relative-error check."""
import torch

# relative error ||out - ref|| / ||ref|| allowed per dtype, against a float64 reference
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype, what: str = "") -> None:
    """NaN or inf never passes; then the relative error must be within TOLERANCE[dtype]."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bad = ~torch.isfinite(out.detach())
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite values, first at {bad.nonzero()[0].tolist()}"
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


# Small configurations covering the features the reference must reproduce (HF argument names).
BASE = dict(vocab_size=97, cutoffs=[20, 50], d_model=32, d_embed=32, n_head=4, d_head=8, d_inner=48,
            div_val=2, n_layer=2, mem_len=6, clamp_len=5, same_length=True, dropout=0.0, dropatt=0.0)
CONFIGS = {
    "default": {},
    "no_same_length": dict(same_length=False, clamp_len=0),
    "untie_r_false": dict(untie_r=False),
    "pre_lnorm": dict(pre_lnorm=True),
    "div_val_1": dict(div_val=1),
    "div_val_1_d_embed": dict(div_val=1, d_embed=24),
    "d_embed_div4": dict(d_embed=64, div_val=4, cutoffs=[10, 30, 60]),
    "no_proj_share": dict(proj_share_all_but_first=False),
    "no_cutoffs": dict(cutoffs=[], div_val=1),
    "no_cutoffs_proj": dict(cutoffs=[], div_val=1, d_embed=16),
    "mem_len_0": dict(mem_len=0),
    "long_mem_clamp": dict(mem_len=9, clamp_len=3),
    "clamp_negative": dict(clamp_len=-1),        # HF and the original code: no clamp
    "adaptive_false": dict(adaptive=False),
    "uniform_init": dict(init="uniform"),
}


def config_kwargs(name: str, **over) -> dict:
    return {**BASE, **CONFIGS[name], **over}


def perturbed(model: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Add noise to every parameter (non-zero biases, non-unit norms, so every parameter matters); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def our_model(name: str = "default", dtype=torch.float32, seed: int = 0, **over):
    """A small random txl_fast LM-head model of the named configuration."""
    from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel

    torch.manual_seed(seed)
    return perturbed(TransfoXLLMHeadModel(TransfoXLConfig(**config_kwargs(name, **over))).to(dtype), seed)


def hf_model(cls, kwargs: dict, seed: int = 0):
    """A small random HF transformers model (the peer) of class ``cls``."""
    import transformers

    torch.manual_seed(seed)
    return perturbed(cls(transformers.TransfoXLConfig(**kwargs)), seed)


def max_diff(a, b) -> float:
    """Max absolute difference of two tensors or (nested) sequences of them, with shape checks."""
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
