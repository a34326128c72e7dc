"""Regression check against this machine's own floor (issue 16): runs with the tests, ~10 s.

A CI-sized model whose weights (4 layers of width 1024, ~200 MB in fp32) dwarf the last-level
cache, so that a decode step is bound by memory reads as the wt103 model's is. On one torch thread,
in one loop, alternated: the machine's read bandwidth (``x.sum()`` over a buffer of >= 4x the LLC) and a
cached greedy decode step at batch 1 with a full memory. The step must reach 50 % of its floor,
the bytes it must read (``analytic.decode_step_reads``) at the best measured bandwidth; both sides
are bests of the same number of alternated runs, so a loaded machine slows them alike. A slowed
step fails (tests/test_bench.py::test_floor_check_fails_a_slowed_step checks the check on synthetic
numbers).
"""
import time

import pytest
import torch

from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel
from txl_fast.bench import analytic
from txl_fast.bench.floor import check_fraction
from txl_fast.bench.machine import llc_bytes
from txl_fast.inference import choose_next

MINIMUM = 0.5
ROUNDS = 9
CONFIG = dict(vocab_size=2000, cutoffs=[500, 1000], d_model=1024, d_embed=1024, n_head=16, d_head=64, d_inner=4096,
              div_val=4, n_layer=4, mem_len=64, clamp_len=1000, same_length=True, dropout=0.0)


@pytest.fixture
def one_thread():
    """One torch thread for both sides: a thread that waits for a busy sibling at every op would
    measure the machine's load, not the step (two threads on a loaded 2-core machine: 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def decode_setup():
    torch.manual_seed(0)
    cfg = TransfoXLConfig(**CONFIG)
    model = TransfoXLLMHeadModel(cfg).eval()
    cache = model.new_cache(1, "zeros", step_hint=1)
    with torch.no_grad():
        model.transformer(torch.randint(0, cfg.vocab_size, (1, cfg.mem_len)), cache=cache)   # a memory of real tokens
    return model, cache


def test_decode_step_reaches_half_the_bandwidth_floor(benchmark, decode_setup, one_thread):
    model, cache = decode_setup
    cfg = model.config
    buffer = torch.ones(max(256 * 2**20, 4 * (llc_bytes() or 0)) // 4)
    token = torch.randint(0, cfg.vocab_size, (1, 1))
    reads, steps = [], []

    def timed(fn, into):
        start = time.perf_counter()
        fn()
        into.append(time.perf_counter() - start)

    def step():
        with torch.no_grad():
            hidden = model.transformer(token, cache=cache).last_hidden_state
            choose_next(model.crit, hidden[:, -1], False, 1.0, 0, 1.0, None)

    def pair():                                     # alternated: the machine, then our step
        timed(buffer.sum, reads)
        timed(step, steps)

    pair()                                          # warm-up
    reads.clear(), steps.clear()
    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    bandwidth = buffer.numel() * 4 / min(reads)
    need = sum(analytic.decode_step_reads(cfg, cfg.mem_len, batch=1, es=4).values())
    achieved = check_fraction("decode step, batch 1, full memory", need / bandwidth, steps, MINIMUM)
    benchmark.extra_info.update(read_gb_per_s=bandwidth / 1e9, step_ms=min(steps) * 1e3, bytes=need,
                                fraction_of_floor=achieved)
