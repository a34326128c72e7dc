"""Train the embedded default model: python scripts/train_default.py [--steps N] [--out DIR]

Corpus: Python's documentation topics (pydoc_data, PSF licence), see txl_fast.train.default_corpus.
The last 10 % of its lines are held out; they ship with the model as heldout.txt.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel, evaluate
from txl_fast.tokenizer import TransfoXLTokenizer
from txl_fast.train import TrainConfig, default_corpus, train

OUT = Path(__file__).resolve().parents[1] / "txl_fast" / "default_model"
MODEL = dict(cutoffs=[500, 1500], d_model=256, d_embed=256, n_head=8, d_head=32, d_inner=1024, div_val=2,
             n_layer=4, mem_len=64, clamp_len=256, same_length=True, dropout=0.15, dropatt=0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--min-freq", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    lines = default_corpus().splitlines()
    split = int(len(lines) * 0.9)
    train_text, heldout_text = "\n".join(lines[:split]) + "\n", "\n".join(lines[split:]) + "\n"
    tok = TransfoXLTokenizer(special=["<unk>", "<eos>"], min_freq=args.min_freq, lower_case=False)
    with tempfile.TemporaryDirectory() as tmp:
        train_file, heldout_file = Path(tmp) / "train.txt", Path(tmp) / "heldout.txt"
        train_file.write_text(train_text)
        heldout_file.write_text(heldout_text)
        tok.count_file(train_file, add_eos=True)
        tok.build_vocab()
        train_ids = tok.encode_file(train_file, ordered=True, add_eos=True)
        heldout_ids = tok.encode_file(heldout_file, ordered=True, add_eos=True)
    config = TransfoXLConfig(vocab_size=len(tok), **MODEL)
    model = TransfoXLLMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}, train tokens {train_ids.numel()}, held-out tokens {heldout_ids.numel()}, "
          f"parameters {n_params / 1e6:.2f}M", flush=True)
    cfg = TrainConfig(steps=args.steps, batch_size=16, tgt_len=64, lr=1e-3, warmup=200, checkpoint_every=500)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    metrics = train(model, train_ids, None, cfg, out_dir=str(args.out), progress=True)
    metrics["train_seconds"] = time.perf_counter() - start
    protocol = dict(tgt_len=64, mem_len=config.mem_len, clamp_len=config.clamp_len, same_length=config.same_length,
                    batch_size=1, init_mems="empty")
    result = evaluate(model, heldout_ids, **protocol, progress=False)
    metrics.update(heldout_nll=result.nll, heldout_ppl=result.perplexity, heldout_tokens=result.tokens,
                   parameters=n_params, eval_protocol=protocol)
    for name in ("training_state.safetensors", "training_state.json"):
        (args.out / name).unlink(missing_ok=True)                  # not shipped
    tok.save_vocabulary(args.out)
    (args.out / "heldout.txt").write_text(heldout_text)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
