"""Convert an HF TransfoXL directory or hub name (config.json + pickled pytorch_model.bin +
vocab.pkl) to txl_fast's files (config.json + model.safetensors + vocab.json), through the safe
loaders only: ``torch.load(weights_only=True)`` for the weights, the restricted unpickler for the
vocabulary. A hub name fetches only what loading needs (txl_fast.hub)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from txl_fast.checkpoint import CONFIG
from txl_fast.hub import check_args, is_hub_name
from txl_fast.model import TransfoXLLMHeadModel
from txl_fast.tokenizer import TransfoXLTokenizer


def convert(src, dst, *, revision: Optional[str] = None, local_files_only: bool = False, cache_dir=None) -> list[Path]:
    check_args(revision, local_files_only, cache_dir)
    fetch = {"revision": revision, "local_files_only": local_files_only, "cache_dir": cache_dir}
    if not is_hub_name(src):
        src = Path(src)
        if src.exists() and not src.is_dir():
            raise ValueError(f"source {src} is a file: give the HF model's directory")
        if not src.is_dir():
            raise FileNotFoundError(f"source directory {src} does not exist")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} is an existing file: give a new directory")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"destination {dst} exists and is not empty")
    if not dst.exists() and dst.parent.exists() and not dst.parent.is_dir():
        raise ValueError(f"destination {dst}: its parent {dst.parent} is not a directory")
    model = TransfoXLLMHeadModel.from_pretrained(src, **fetch)
    tokenizer = TransfoXLTokenizer.from_pretrained(src, **fetch)     # vocab.pkl via the restricted unpickler
    if len(tokenizer) != model.config.vocab_size:     # the command line's eval and generate refuse the pair
        raise ValueError(f"the vocabulary has {len(tokenizer)} symbols but the model {model.config.vocab_size}: "
                         "they do not belong together")
    model.save_pretrained(dst)
    vocab = Path(tokenizer.save_vocabulary(dst))
    return [dst / CONFIG, dst / "model.safetensors", vocab]
