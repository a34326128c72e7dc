"""The measurement harness every comparison with HF uses: the pair of models, each side's NLL over
a stream, HF's greedy generation, and peak memory. The clock is ``txl_fast.bench.machine``'s
(``time_call``, ``alternated_times``, ``median_time``, ``best_time``).

    ours, hf = build_pair(config, "cpu", torch.bfloat16)     # the same random weights on both sides
    hf_nll(hf, data, tgt_len)                                 # HF's total NLL, segments with mems carried
    ours_nll(ours, data, tgt_len, mem_len, clamp_len)         # ours, through txl_fast.evaluate

The pair: HF 4.35's ``TransfoXLLMHeadModel`` of ``config`` with random weights (``torch.manual_seed``),
written by HF's own ``save_pretrained`` and loaded by our ``from_pretrained``, both in one dtype on
one device. ``write_hf_checkpoint`` writes the same files for a caller that loads them elsewhere
(``benchmarks/peak_memory.py``: each side in its own process).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import threading
import warnings

import torch


# ---- the pair of models --------------------------------------------------------------------------
def random_hf(config: dict, seed: int = 0):
    """HF 4.35's TransfoXLLMHeadModel of ``config`` (TransfoXLConfig arguments, {} = wt103) with random
    weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    import transformers  # noqa: PLC0415 (the peer; optional)

    torch.manual_seed(seed)
    return transformers.TransfoXLLMHeadModel(transformers.TransfoXLConfig(**config)).eval()


def write_hf_checkpoint(config: dict, directory: str, seed: int = 0):
    """``random_hf(config, seed)`` written to ``directory`` by HF's ``save_pretrained``; the HF model."""
    hf = random_hf(config, seed)
    hf.save_pretrained(directory)
    return hf


def build_pair(config: dict, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """(ours, hf): HF's model with random weights, and ours loaded from HF's own save_pretrained files;
    both in ``dtype`` on ``device``, in eval mode."""
    import txl_fast  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        hf = write_hf_checkpoint(config, tmp, seed)
        ours = txl_fast.TransfoXLLMHeadModel.from_pretrained(tmp, dtype=dtype, device=device).eval()
    return ours, hf.to(device=device, dtype=dtype)


def set_protocol(models, mem_len: int, clamp_len: int, same_length: bool = True) -> None:
    """Set the evaluation protocol on the transformers of ``models`` (ours and HF's alike)."""
    for model in models:
        tr = model.transformer
        tr.mem_len, tr.clamp_len, tr.same_length = mem_len, clamp_len, same_length


# ---- each side's NLL -----------------------------------------------------------------------------
def hf_nll(hf, data: torch.Tensor, tgt_len: int, segments: int | None = None) -> float:
    """HF's total NLL of ``data`` (B, S * tgt_len + 1): its transformer with mems carried from segment
    to segment, its adaptive softmax with labels; ``segments``: the first that many (default all).

    HF's crit shifts labels by one inside; a padding row after the hidden states and one before the
    targets make it score exactly hidden[t] against target[t], every token once, as the protocol says.
    """
    end = data.shape[1] - 1 if segments is None else segments * tgt_len
    total, mems = 0.0, None
    with torch.no_grad():
        for i in range(0, end, tgt_len):
            ids, target = data[:, i : i + tgt_len], data[:, i + 1 : i + 1 + tgt_len]
            out = hf.transformer(ids, mems=mems)
            mems = out.mems
            hidden = out.last_hidden_state                                         # (B, L, d)
            hidden = torch.cat([hidden, hidden[:, :1]], dim=1)
            labels = torch.cat([target[:, :1], target], dim=1)
            total += hf.crit(hidden, labels).double().sum().item()
    return total


def ours_nll(ours, data: torch.Tensor, tgt_len: int, mem_len: int, clamp_len: int) -> float:
    """Our total NLL of ``data`` (B, S * tgt_len + 1) with ``txl_fast.evaluate`` (the inference cache),
    HF's zero initial memory, same_length: the protocol ``hf_nll`` runs."""
    import txl_fast  # noqa: PLC0415

    r = txl_fast.evaluate(ours, data.reshape(-1), tgt_len=tgt_len, mem_len=mem_len, clamp_len=clamp_len,
                          same_length=True, batch_size=data.shape[0], init_mems="zeros", progress=False)
    return r.nll * r.tokens


def hf_generate(hf, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """HF's greedy ``generate`` of ``new_tokens`` tokens after ``prompt`` (B, L), no end-of-sequence
    stop; HF's reminders and warnings silenced."""
    from transformers.utils import logging  # noqa: PLC0415

    level = logging.get_verbosity()
    logging.set_verbosity_error()            # HF's "friendly reminder" about max_length, once per call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        logging.set_verbosity(level)


# ---- peak memory ---------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a block above its start: the process's resident set sampled every 2 ms on the
    CPU (freed heap returned with malloc_trim first), the allocator's peak on CUDA."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        _trim_heap()
        self._base = self._max = _rss_bytes() if os.path.exists("/proc/self/statm") else 0
        if self._base:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._max = max(self._max, _rss_bytes())

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        if self._base:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self._base
