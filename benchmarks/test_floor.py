"""Regression check against this machine's own floor (issue 16): runs with the tests, ~6 s.

A CI-sized model whose weights (4 layers of width 1024, ~200 MB in fp32) dwarf the last-level
cache, so that a decode step is bound by memory reads as the wt103 model's is. In one loop,
alternated: the machine's read bandwidth on the step's own pages (a reduction over each of the
model's weights) and a cached greedy decode step at batch 1 with a full memory. The step must
reach 50 % of its floor, the bytes it must read (``analytic.decode_step_reads``) at the best
measured bandwidth; both sides are bests of the same number of alternated runs, so a loaded
machine slows them alike. Up to 4 attempts of 25 pairs each, on one thread and on two: a burst of
load spoils one, a slowed step fails all (tests/test_bench.py::test_floor_check_fails_a_slowed_step
checks the check on synthetic numbers).

Why the weights and not a separate buffer: here a 256 MiB buffer read 20-40 % faster or slower than
the weights from one process to the next (page placement), which moved the step's fraction between
50 % and 71 % with the step unchanged. Measured here (AMD EPYC, 2026-11-30, 5 processes): 60-72 %
on one thread, 52-70 % on two; the one-row products read at ~75 % of a reduction's rate and bound
it (issue 16's target is 85 %). The same for an evaluation segment (128 tokens over a full memory,
NLL of every token) against its matmul floor, its FLOPs (``analytic.eval_floor_flops``) at the best
rate of a 1024^3 float32 matmul alternated with it: 71-81 % of it here.
"""
import pytest
import torch

from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel, ops
from txl_fast.bench import analytic
from txl_fast.bench.floor import check_fraction, fraction
from txl_fast.bench.machine import alternated_times
from txl_fast.inference import choose_next

MINIMUM = 0.5
ROUNDS = 25                     # alternated pairs: decode steps of ~15 ms
# Independent measurements of the decode step, on one thread and on all the machine's (up to 2): a
# burst of load spoils one, a slowed step fails every one; one thread holds up better under load.
ATTEMPT_THREADS = (1, min(2, torch.get_num_threads()), 1, min(2, torch.get_num_threads()))
EVAL_ROUNDS = 4                 # evaluation segments of ~0.25 s
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
    """Attempts on one thread and on all (at most ``ATTEMPT_THREADS``), until one reaches the minimum."""
    model, cache = decode_setup
    cfg = model.config
    # the read bandwidth on the step's own bytes: every weight, each read once by a reduction (the same
    # pages as the step's; a separate buffer read 20-40 % faster or slower from one process to the next)
    weights = [p.detach() for p in model.parameters() if p.numel() * p.element_size() >= 2**20]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)

    def read_weights():
        for w in weights:
            w.sum()

    token = torch.randint(0, cfg.vocab_size, (1, 1))

    def step():
        with torch.no_grad():
            hidden = model.transformer(token, cache=cache).last_hidden_state
            choose_next(model.crit, hidden[:, -1], False, 1.0, 0, 1.0, None)

    need = sum(analytic.decode_step_reads(cfg, cfg.mem_len, batch=1, es=4).values())
    attempts = []                                   # (floor seconds, step times) of each attempt

    def attempt(threads):
        torch.set_num_threads(threads)              # both sides of the attempt on the same threads
        # alternated: the machine, then our step; a warm-up round first (the packed weights follow the threads)
        times = alternated_times({"read": read_weights, "step": step}, reps=ROUNDS)
        attempts.append((threads, need * min(times["read"]) / weight_bytes, times["step"]))
        return fraction(attempts[-1][1], min(times["step"])) >= MINIMUM

    # the attempts run inside one benchmarked call, so that --benchmark-disable (one call) checks as many
    benchmark.pedantic(lambda: any(attempt(threads) for threads in ATTEMPT_THREADS), rounds=1, iterations=1)
    threads, floor_seconds, times = max(attempts, key=lambda a: fraction(a[1], min(a[2])))
    achieved = check_fraction(f"decode step, batch 1, full memory ({threads} thread(s), best of {len(attempts)} "
                              "attempts)", floor_seconds, times, MINIMUM)
    benchmark.extra_info.update(read_gb_per_s=need / floor_seconds / 1e9, step_ms=min(times) * 1e3, bytes=need,
                                fraction_of_floor=achieved, threads=threads,
                                attempts=[(a[0], round(fraction(a[1], min(a[2])), 3)) for a in attempts])


def test_eval_segment_reaches_half_the_matmul_floor(benchmark, decode_setup, one_thread):
    model, _ = decode_setup
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (1, 129), generator=g)
    cache = model.new_cache(1, "zeros", step_hint=128)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)

    def segment():
        with torch.no_grad():
            hidden = model.transformer(data[:, :128], cache=cache).last_hidden_state[0]       # (128, d)
            ops.adaptive_nll(hidden, data[0, 1:], *model.crit.clusters())

    # alternated: the machine, then our segment; after the warm-up round the memory holds 128 real rows >= mem_len
    times = {}
    benchmark.pedantic(lambda: times.update(alternated_times({"product": lambda: a @ b, "segment": segment},
                                                             reps=EVAL_ROUNDS)), rounds=1, iterations=1)
    products, segments = times["product"], times["segment"]
    rate = 2.0 * 1024**3 / min(products)
    flops = analytic.eval_floor_flops(cfg, 1, 128, cfg.mem_len, 1, share=analytic.uniform_share(cfg))
    achieved = check_fraction("eval segment, batch 1, full memory", flops / rate, segments, MINIMUM)
    benchmark.extra_info.update(matmul_gflop_per_s=rate / 1e9, segment_ms=min(segments) * 1e3, flops=flops,
                                fraction_of_floor=achieved)
