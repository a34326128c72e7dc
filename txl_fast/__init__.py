"""txl_fast: a custom-kernel accelerated runtime for Transformer-XL (HF TransfoXL compatible).

``import txl_fast`` stays light: the tokenizer (sacremoses), torch's compiler (``torch._dynamo``)
and triton are imported when first used. ``txl_fast.TransfoXLTokenizer`` is a lazy attribute.
"""
from pathlib import Path

# Run from a source checkout without an install (PYTHONPATH=<repo>, as on the GPU machine),
# ``kernels/`` sits beside this package rather than in it: let ``txl_fast.kernels`` find it there,
# as the installed package's mapping (pyproject's package-dir) does.
if not (Path(__file__).parent / "kernels").is_dir() and (Path(__file__).parents[1] / "kernels" / "aot.py").is_file():
    __path__.append(str(Path(__file__).parents[1]))  # noqa: F821 (a package's __path__)

from txl_fast.backend import get_backend, set_backend, use_backend, use_cpu_compile
from txl_fast.config import TransfoXLConfig
from txl_fast.inference import PRESETS, EvalResult, evaluate, generate
from txl_fast.model import (
    TransfoXLForSequenceClassification,
    TransfoXLLMHeadModel,
    TransfoXLModel,
)
from txl_fast.modules import (
    AdaptiveEmbedding,
    PositionwiseFF,
    ProjectedAdaptiveLogSoftmax,
    RelPartialLearnableDecoderLayer,
    RelPartialLearnableMultiHeadAttn,
)
from txl_fast.patch import patch, unpatch

__all__ = [
    "PRESETS",
    "TransfoXLTokenizer",
    "default_model_path",
    "EvalResult",
    "evaluate",
    "generate",
    "AdaptiveEmbedding",
    "PositionwiseFF",
    "ProjectedAdaptiveLogSoftmax",
    "RelPartialLearnableDecoderLayer",
    "RelPartialLearnableMultiHeadAttn",
    "TransfoXLConfig",
    "TransfoXLForSequenceClassification",
    "TransfoXLLMHeadModel",
    "TransfoXLModel",
    "get_backend",
    "patch",
    "set_backend",
    "unpatch",
    "use_backend",
    "use_cpu_compile",
]
__version__ = "0.1.0"


def default_model_path() -> Path:
    """Directory of the small model shipped inside the package (config.json, model.safetensors,
    vocab.json, heldout.txt): what ``txl-fast eval`` / ``generate`` use without ``--model``."""
    return Path(__file__).resolve().parent / "default_model"


def __getattr__(name: str):
    # PEP 562: the tokenizer (and through it sacremoses) is imported at first use, not by `import txl_fast`
    if name == "TransfoXLTokenizer":
        from txl_fast.tokenizer import TransfoXLTokenizer  # noqa: PLC0415

        return TransfoXLTokenizer
    raise AttributeError(f"module 'txl_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "TransfoXLTokenizer"})
