"""SpeechBrain and ESPnet Conformer modules for the benchmarks and tests of ``txl_fast.patch_speech``.

The libraries are installed without their dependency trees (``pip install --no-deps -r
tests/requirements-speech.txt``; what their attention and Conformer modules import comes with the
``test`` extra). SpeechBrain imports torchaudio when it is imported, and torchaudio's wheels are
built for other torch releases: when torchaudio is not installed, ``speechbrain()`` puts a stand-in
module (a version string, nothing else; no audio is loaded) in its place while SpeechBrain's
modules are imported, and removes it from ``sys.modules`` afterwards, so nothing else
(transformers looks torchaudio up) ever sees it.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings

import torch


@contextlib.contextmanager
def _torchaudio_stand_in():
    if importlib.util.find_spec("torchaudio") is not None or "torchaudio" in sys.modules:
        yield
        return
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    sys.modules["torchaudio"].__version__ = "2.9.0"
    try:
        yield
    finally:
        del sys.modules["torchaudio"]


def speechbrain() -> types.SimpleNamespace:
    """SpeechBrain's RelPosMHAXL, RelPosEncXL and ConformerEncoder (ImportError when not installed)."""
    with _torchaudio_stand_in():
        attention = importlib.import_module("speechbrain.nnet.attention")
        conformer = importlib.import_module("speechbrain.lobes.models.transformer.Conformer")
    return types.SimpleNamespace(RelPosMHAXL=attention.RelPosMHAXL, RelPosEncXL=attention.RelPosEncXL,
                                 ConformerEncoder=conformer.ConformerEncoder)


def espnet() -> types.SimpleNamespace:
    """ESPnet's RelPositionMultiHeadedAttention ("latest"), RelPositionalEncoding, Conformer Encoder
    and the transducer's attention (ImportError when not installed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attention = importlib.import_module("espnet.nets.pytorch_backend.transformer.attention")
        embedding = importlib.import_module("espnet.nets.pytorch_backend.transformer.embedding")
        encoder = importlib.import_module("espnet.nets.pytorch_backend.conformer.encoder")
        transducer = importlib.import_module("espnet2.asr_transducer.encoder.modules.attention")
    return types.SimpleNamespace(RelPositionMultiHeadedAttention=attention.RelPositionMultiHeadedAttention,
                                 RelPositionalEncoding=embedding.RelPositionalEncoding, Encoder=encoder.Encoder,
                                 TransducerRelPositionMultiHeadedAttention=transducer.RelPositionMultiHeadedAttention)


def espnet_conformer(d_model: int, heads: int, layers: int, kernel: int = 31) -> torch.nn.Module:
    """ESPnet's Conformer encoder with "latest" relative positions, a linear input layer, no dropout."""
    return espnet().Encoder(idim=d_model, attention_dim=d_model, attention_heads=heads, linear_units=4 * d_model,
                            num_blocks=layers, dropout_rate=0.0, positional_dropout_rate=0.0, input_layer="linear",
                            pos_enc_layer_type="rel_pos", selfattention_layer_type="rel_selfattn",
                            macaron_style=True, use_cnn_module=True, cnn_module_kernel=kernel)


def speechbrain_conformer(d_model: int, heads: int, layers: int, kernel: int = 31) -> torch.nn.Module:
    """SpeechBrain's ConformerEncoder with RelPosMHAXL attention, no dropout."""
    return speechbrain().ConformerEncoder(num_layers=layers, d_model=d_model, d_ffn=4 * d_model, nhead=heads,
                                          kernel_size=kernel, dropout=0.0)


def padding_mask(lengths, frames: int) -> torch.Tensor:
    """(B, frames) bool, True = padding (SpeechBrain's key_padding_mask; ESPnet keeps its negation)."""
    return torch.arange(frames)[None, :] >= torch.as_tensor(lengths)[:, None]
