"""Convert an HF TransfoXL directory (config.json + pickled pytorch_model.bin + vocab.pkl) to
txl_fast's files (config.json + model.safetensors + vocab.json), through the safe loaders only:
``torch.load(weights_only=True)`` for the weights, the restricted unpickler for the vocabulary."""
from __future__ import annotations

from pathlib import Path

from txl_fast.checkpoint import CONFIG
from txl_fast.config import TransfoXLConfig
from txl_fast.model import TransfoXLLMHeadModel
from txl_fast.tokenizer import TransfoXLTokenizer


def convert(src, dst) -> list[Path]:
    src, dst = Path(src), Path(dst)
    if src.exists() and not src.is_dir():
        raise ValueError(f"source {src} is a file: give the HF model's directory")
    if not src.is_dir():
        raise FileNotFoundError(f"source directory {src} does not exist")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} is an existing file: give a new directory")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"destination {dst} exists and is not empty")
    if not dst.exists() and dst.parent.exists() and not dst.parent.is_dir():
        raise ValueError(f"destination {dst}: its parent {dst.parent} is not a directory")
    config = TransfoXLConfig.from_json_file(src / CONFIG)
    model = TransfoXLLMHeadModel.from_pretrained(src)
    tokenizer = TransfoXLTokenizer.from_pretrained(src)            # vocab.pkl via the restricted unpickler
    if len(tokenizer) != config.vocab_size:     # the command line's eval and generate refuse the pair
        raise ValueError(f"the vocabulary has {len(tokenizer)} symbols but the model {config.vocab_size}: "
                         "they do not belong together")
    model.save_pretrained(dst)
    vocab = Path(tokenizer.save_vocabulary(dst))
    return [dst / CONFIG, dst / "model.safetensors", vocab]
