"""txl_fast: a custom-kernel accelerated runtime for Transformer-XL (HF TransfoXL compatible)."""
from txl_fast.backend import get_backend, set_backend, use_backend
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
]
__version__ = "0.1.0"
