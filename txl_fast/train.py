"""A small but real training loop for txl_fast's Transformer-XL, and the default model's corpus.

    train(model, train_ids, valid_ids, TrainConfig(...)) -> dict of metrics
    train_directory(out, text=..., ...)                  what ``txl-fast train`` runs: a text to a model directory

AdamW, linear warm-up then cosine decay, gradient clipping, memory carried across segments
(the stream is cut into ``batch_size`` contiguous rows, as in the original code), a progress bar
with loss and tokens/s, checkpoints (config.json + model.safetensors + training state) that
resume exactly where they stopped, and an evaluation on the held-out split at the end. With an
output directory, ``metrics.json`` keeps the metrics and the evaluation protocol (``eval_protocol``:
what ``txl-fast eval --model DIR`` uses by default), written before the final evaluation too.

The default model's corpus is the English text of Python's own documentation topics
(``pydoc_data.topics``, shipped with CPython under the PSF licence), see ``default_corpus``.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from txl_fast.checkpoint import CONFIG, HELDOUT, METRICS, SAFETENSORS
from txl_fast.checks import is_int
from txl_fast.config import TransfoXLConfig
from txl_fast.inference import evaluate
from txl_fast.model import TransfoXLLMHeadModel
from txl_fast.tokenizer import VOCAB_JSON, TransfoXLTokenizer

STATE_FILE = "training_state.safetensors"
STATE_JSON = "training_state.json"
MODEL_FILES = (CONFIG, SAFETENSORS, STATE_JSON, STATE_FILE, VOCAB_JSON, METRICS, HELDOUT)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    tgt_len: int = 64
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    clip: float = 0.25
    seed: int = 0
    checkpoint_every: int = 200
    eval_batch_size: int = 1


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_rows(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    rows = ids.numel() // batch_size
    if rows < 2:
        raise ValueError(f"{ids.numel()} training tokens are too few for batch_size {batch_size}")
    return ids[: rows * batch_size].view(batch_size, rows)                    # (B, T/B)


def _save(model, optimizer, step: int, cfg: TrainConfig, directory: Path) -> None:
    model.save_pretrained(directory)
    state = {}
    for i, group_state in optimizer.state_dict()["state"].items():
        for name, value in group_state.items():
            state[f"{i}.{name}"] = value.detach().clone().reshape(-1) if value.dim() == 0 else value.detach().clone()
    save_file(state, str(directory / STATE_FILE))
    (directory / STATE_JSON).write_text(json.dumps({"step": step, "train_config": asdict(cfg)}, indent=2))


def _resume(model, optimizer, directory: Path) -> int:
    """Load optimizer moments and the step from a checkpoint directory; returns the step to continue from."""
    meta = json.loads((directory / STATE_JSON).read_text())
    try:
        tensors = load_file(str(directory / STATE_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing to resume in {directory}: no {STATE_FILE}") from None
    except Exception as e:  # noqa: BLE001 (safetensors' own error types: a truncated or foreign file)
        raise ValueError(f"{directory / STATE_FILE} is damaged ({e}): cannot resume") from None
    state = optimizer.state_dict()
    restored = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        restored.setdefault(int(i), {})[name] = value.reshape(()) if name == "step" else value
    state["state"] = restored
    optimizer.load_state_dict(state)
    return int(meta["step"])


def train(model, train_ids: torch.Tensor, valid_ids: Optional[torch.Tensor], cfg: TrainConfig,
          out_dir: Optional[str] = None, resume: bool = False, progress: Optional[bool] = None) -> dict:
    """Train ``model`` (a TransfoXLLMHeadModel) on a token stream; returns final metrics."""
    if not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ValueError(f"steps must be a positive integer, got {cfg.steps!r}")
    torch.manual_seed(cfg.seed)
    out = Path(out_dir) if out_dir else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if resume:
        if out is None or not (out / STATE_JSON).is_file():
            raise FileNotFoundError(f"nothing to resume in {out}")
        from txl_fast.checkpoint import load_state_dict_into, read_state_dict  # noqa: PLC0415

        load_state_dict_into(model, read_state_dict(out))
        step = _resume(model, optimizer, out)
        if step > cfg.steps:
            raise ValueError(f"{out} has already trained {step} steps, more than steps={cfg.steps}")
    data = train_rows(train_ids, cfg.batch_size)
    n_segments = (data.shape[1] - 1 + cfg.tgt_len - 1) // cfg.tgt_len
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step")
    model.train()
    mems, losses = None, []
    start, tokens = time.perf_counter(), 0
    while step < cfg.steps:
        seg = step % n_segments
        if seg == 0:
            mems = model.empty_mems(cfg.batch_size)                             # a new pass over the stream
        i = seg * cfg.tgt_len
        seq_len = min(cfg.tgt_len, data.shape[1] - 1 - i)
        inp, target = data[:, i : i + seq_len], data[:, i + 1 : i + 1 + seq_len]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        out_t = model.transformer(inp, mems=mems)
        mems = out_t.mems
        hidden = out_t.last_hidden_state.reshape(-1, model.transformer.d_model)
        from txl_fast import ops  # noqa: PLC0415

        loss = ops.adaptive_nll(hidden, target.reshape(-1), *model.crit.clusters()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        step += 1
        tokens += target.numel()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        if out is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            _save(model, optimizer, step, cfg, out)
    if bar is not None:
        bar.close()
    model.eval()
    metrics = {"steps": step, "train_loss_last": sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
               "train_tokens_per_s": tokens / max(1e-9, time.perf_counter() - start)}
    c = model.config
    metrics["eval_protocol"] = dict(tgt_len=cfg.tgt_len, mem_len=c.mem_len, clamp_len=c.clamp_len,
                                    same_length=c.same_length and c.mem_len > 0,   # the mask needs a memory
                                    batch_size=cfg.eval_batch_size, init_mems="empty")
    _write_metrics(out, metrics)
    if valid_ids is not None:
        result = evaluate(model, valid_ids, progress=False, **metrics["eval_protocol"])
        metrics.update(valid_nll=result.nll, valid_ppl=result.perplexity, valid_tokens=result.tokens)
        _write_metrics(out, metrics)
    return metrics


def _write_metrics(out: Optional[Path], metrics: dict) -> None:
    if out is not None:
        (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


def default_corpus() -> str:
    """English text shipped with CPython: the documentation topics behind ``help()`` (PSF licence).

    Deterministic: topics in sorted key order, one line per non-empty line, whitespace normalised,
    lines without a letter or digit (reST rules such as "*****") dropped.
    """
    from pydoc_data import topics  # noqa: PLC0415

    lines = []
    for key in sorted(topics.topics):
        for line in topics.topics[key].splitlines():
            line = " ".join(line.split())
            if any(ch.isalnum() for ch in line):                          # drop rules such as "*****"
                lines.append(line)
    return "\n".join(lines) + "\n"


def _check_resumable(out: Path, steps: int) -> None:
    """--resume: the training state in ``out`` is readable and ``steps`` reaches its step count;
    checked before a file is written."""
    if not (out / STATE_JSON).is_file():
        raise FileNotFoundError(f"nothing to resume in {out}: no {STATE_JSON}")
    try:
        done = json.loads((out / STATE_JSON).read_text())["step"]
        if not is_int(done) or done < 0:
            raise ValueError(f"step {done!r} is not a step count")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{out / STATE_JSON} is damaged ({e}): cannot resume") from None
    if steps < done:
        raise ValueError(f"{out} has already trained {done} steps: --steps {steps} must be at least that")
    try:                                             # the optimizer state
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(out / STATE_FILE), "pt"):
            pass
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing to resume in {out}: no {STATE_FILE}") from None
    except Exception as e:  # noqa: BLE001 (safetensors' own error types)
        raise ValueError(f"{out / STATE_FILE} is damaged ({e}): cannot resume") from None


def _read_text(text: Optional[str]) -> str:
    """The training text: the file ``text``, or the default corpus when None."""
    if text is None:
        return default_corpus()
    if Path(text).is_dir():
        raise ValueError(f"--text {text} is a directory: give a text file")
    if not Path(text).is_file():
        raise FileNotFoundError(f"text file {text} does not exist")
    try:
        return Path(text).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {text} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") \
            from None


def _encode_split(tok, lines: list[str], split: int, new_vocabulary: bool):
    """(train ids, held-out ids or None) of ``lines`` split at ``split``, as ``txl-fast eval`` encodes
    a file; ``new_vocabulary``: ``tok``'s vocabulary built from the training split first."""
    with tempfile.TemporaryDirectory() as tmp:
        train_file, valid_file = Path(tmp) / "train.txt", Path(tmp) / "valid.txt"
        train_file.write_text("\n".join(lines[:split]) + "\n")
        valid_file.write_text("\n".join(lines[split:]) + "\n")
        if new_vocabulary:
            tok.count_file(train_file, add_eos=True)
            tok.build_vocab()
        train_ids = tok.encode_file(train_file, ordered=True, add_eos=True)
        valid_ids = tok.encode_file(valid_file, ordered=True, add_eos=True) if split < len(lines) else None
    return train_ids, valid_ids


def new_config(vocab: int, *, d_model: int, n_head: int, n_layer: int, mem_len: int, dropout: float) -> TransfoXLConfig:
    """The configuration ``txl-fast train`` gives a new model of ``vocab`` symbols."""
    cutoffs = sorted({c for c in (vocab // 4, vocab // 2) if 0 < c < vocab}) if vocab >= 8 else []
    return TransfoXLConfig(vocab_size=vocab, cutoffs=cutoffs, d_model=d_model, d_embed=d_model, n_head=n_head,
                           d_head=d_model // n_head, d_inner=4 * d_model, div_val=2 if cutoffs else 1, n_layer=n_layer,
                           mem_len=mem_len, clamp_len=4 * mem_len,
                           same_length=mem_len > 0,         # HF's same_length mask needs a memory
                           dropout=dropout)


def train_directory(out: str, *, text: Optional[str] = None, heldout: float = 0.1, steps: int = 1000,
                    batch_size: int = 16, tgt_len: int = 64, mem_len: int = 64, d_model: int = 128, n_head: int = 4,
                    n_layer: int = 4, dropout: float = 0.1, lr: float = 1e-3, warmup: int = 100, min_freq: int = 2,
                    checkpoint_every: int = 200, seed: int = 0, resume: bool = False,
                    overwrite: bool = False) -> dict:
    """``txl-fast train``: a model trained on ``text`` (default: ``default_corpus``) in the directory
    ``out``, the last ``heldout`` share of its lines held out (saved as heldout.txt, evaluated at the
    end); ``resume`` continues the model in ``out``, ``overwrite`` replaces it. Everything is
    checked before a file in ``out`` is touched. Returns the metrics."""
    if not out.strip():
        raise ValueError("--out is empty: give the checkpoint directory")
    directory = Path(out)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--out {directory} is an existing file: give a directory")
    if resume and overwrite:
        raise ValueError("--resume continues the model in --out, --overwrite replaces it: choose one")
    holds_model = directory.is_dir() and any((directory / name).exists() for name in MODEL_FILES)
    if holds_model and not (resume or overwrite):
        raise ValueError(f"{directory} already holds a model: --resume to continue its training, --overwrite to "
                         "replace it")
    if resume:
        _check_resumable(directory, steps)
    if d_model % n_head:
        raise ValueError(f"--d-model {d_model} is not divisible by --n-head {n_head} "
                         "(each head gets d_model / n_head dimensions)")
    lines = _read_text(text).splitlines()
    split = int(len(lines) * (1 - heldout))
    tok = TransfoXLTokenizer.from_pretrained(directory) if resume else \
        TransfoXLTokenizer(special=["<unk>", "<eos>"], min_freq=min_freq)
    train_ids, valid_ids = _encode_split(tok, lines, split, new_vocabulary=not resume)
    config = TransfoXLConfig.from_json_file(directory / CONFIG) if resume else \
        new_config(len(tok), d_model=d_model, n_head=n_head, n_layer=n_layer, mem_len=mem_len, dropout=dropout)
    train_rows(train_ids, batch_size)                # too few tokens: refused before any file is touched
    torch.manual_seed(seed)
    model = TransfoXLLMHeadModel(config)
    if overwrite:                                    # the old model's files go, not only those rewritten
        for name in MODEL_FILES:
            (directory / name).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_vocabulary(directory)
    if valid_ids is not None:
        (directory / HELDOUT).write_text("\n".join(lines[split:]) + "\n", encoding="utf-8")
    else:
        (directory / HELDOUT).unlink(missing_ok=True)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, tgt_len=tgt_len, lr=lr, warmup=min(warmup, steps),
                      seed=seed, checkpoint_every=checkpoint_every)
    return train(model, train_ids, valid_ids, cfg, out_dir=str(directory), resume=resume)
