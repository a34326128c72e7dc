"""txl_fast.bench: the analytic FLOP/byte model (hand counts, the issue's wt103 figures, torch's own
FLOP counter), the machine measurement, and a tiny smoke run of ``txl-fast bench`` (table, JSON,
RESULTS.md section, plot when matplotlib is installed). Timings are not checked: only that they exist."""
import importlib.util
import json

import pytest
import torch

from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel
from txl_fast.bench import analytic
from txl_fast.bench.analytic import Breakdown, Cost, Device

WT103 = TransfoXLConfig()      # HF's default configuration is the wt103 model
TOL = 0.05                     # the figures are rounded; 5 % relative


def close(value, expected, tol=TOL):
    return abs(value - expected) <= tol * expected


# ---- hand counts on small shapes -----------------------------------------------------------------
def test_linear_hand_count():
    c = analytic.linear(3, 4, 5, es=4)
    assert c.flops == 2 * 3 * 4 * 5
    assert c.bytes == 4 * (3 * 4 + 4 * 5 + 3 * 5)           # x read, W read, y written
    cb = analytic.linear(3, 4, 5, es=2, bias=True)
    assert cb.flops == 120 + 15 and cb.bytes == 2 * (12 + 20 + 15 + 5)


def test_rel_attention_hand_count():
    B, H, Lq, Lk, D = 1, 2, 3, 5, 4
    scores = B * H * Lq * Lk                                  # 30
    fused = analytic.rel_attention(B, H, Lq, Lk, D, es=4, path="fused")
    assert fused.flops == 3 * 2 * scores * D + 5 * scores     # QKᵀ, Q·Rᵀ, PV + softmax
    io = 4 * (B * Lq * H * D * 2 + B * Lk * H * D * 2 + Lk * H * D)   # q, out, k, v, r
    assert fused.bytes == io + 4 * B * H * Lq                 # + fp32 log-sum-exp
    hf = analytic.rel_attention(B, H, Lq, Lk, D, es=4, path="hf")
    # AC, BD, shifted BD, score, prob (Lq x Lk) and the padded BD (Lq x (Lk + 1)), each written and read
    assert hf.bytes == io + 2 * 4 * (5 * scores + B * H * Lq * (Lk + 1))
    torch_path = analytic.rel_attention(B, H, Lq, Lk, D, es=4, path="torch")
    # raw position scores (Lq x Lk) and the position mask (Lq x (Lk + Lq - 1)), each written and read
    assert torch_path.bytes == io + 2 * 4 * (scores + B * H * Lq * (Lk + Lq - 1))
    assert hf.flops == torch_path.flops == fused.flops
    clamped = analytic.rel_attention(B, H, Lq, Lk, D, es=4, path="torch", position_rows=2)   # Lr 2 of 5
    assert clamped.flops == fused.flops - 2 * B * H * Lq * (Lk - 2) * D
    assert clamped.bytes == torch_path.bytes - 4 * (3 * H * D + 2 * B * H * Lq * 3)
    assert analytic.rel_attention(B, H, Lq, Lk, D, es=4, path="fused", position_rows=2) == fused
    with pytest.raises(ValueError, match="path"):
        analytic.rel_attention(B, H, Lq, Lk, D, path="flash")


def test_adaptive_softmax_hand_count():
    cfg = TransfoXLConfig(vocab_size=10, cutoffs=[4], d_model=8, d_embed=8, div_val=2, n_head=2, d_head=4,
                          d_inner=16, n_layer=1)
    # clusters: head 4 words + 1 cluster logit at width 8 (projected 8 -> 8), tail 6 words at width 4
    nll = analytic.adaptive_softmax(2, cfg, es=4, labels=True)              # both targets in the head
    head_logits = 2 * 8 * 5
    assert nll.flops == 2 * 2 * 8 * 8 + 2 * head_logits + 2 * 5 + 4 * 2 * 5
    assert nll.bytes == 4 * (8 * 8 + 5 * 8 + 5 + 2 * 8) + 2 * 4            # proj, W, b, hidden; NLL out
    full = analytic.adaptive_softmax(2, cfg, es=4, labels=False)
    tail = 2 * 2 * 8 * 4 + 2 * 2 * 4 * 6 + 2 * 6 + 4 * 2 * 6
    assert full.flops == nll.flops + tail
    assert full.bytes == nll.bytes - 2 * 4 + 4 * (8 * 4 + 6 * 4 + 6) + 4 * 2 * 10
    mixed = analytic.adaptive_softmax(2, cfg, es=4, labels=True, share=[0.5, 0.5])
    assert nll.flops < mixed.flops < full.flops
    assert analytic.uniform_share(cfg) == [0.4, 0.6]
    with pytest.raises(ValueError, match="share"):
        analytic.adaptive_softmax(2, cfg, share=[1.0])


def test_roofline_is_max_per_op_summed():
    dev = Device("toy", flops=1e12, bandwidth=1e11)
    compute, memory = Cost(2e12, 1e9), Cost(1e9, 3e11)
    assert compute.time_on(dev) == 2.0 and memory.time_on(dev) == 3.0
    both = Breakdown({"a": compute, "b": memory})
    assert both.time_on(dev) == 5.0                            # per op, summed
    assert both.total.time_on(dev) < both.time_on(dev)       # not max of the sums
    assert analytic.predict_tokens_per_s(both, 10, dev) == 2.0


# ---- the wt103 figures -------------------------------------------------------------------
def test_wt103_eval_segment_flops():
    hf = analytic.eval_segment(WT103, batch=1, tgt_len=128, mem_len=1600, cached=False, path="hf")
    cached = analytic.eval_segment(WT103, batch=1, tgt_len=128, mem_len=1600, cached=True)
    assert close(hf.flops / 1e9, 335), hf.flops
    assert close(cached.flops / 1e9, 88), cached.flops
    # the clamp (1000) changes which sinusoid rows are used, not the work; batch scales it linearly
    # except the batch-independent r_net
    four = analytic.eval_segment(WT103, batch=4, cached=False, path="hf")
    r_net = hf.ops["r_net"].flops
    assert four.flops == pytest.approx(4 * (hf.flops - r_net) + r_net, rel=1e-9)


def test_wt103_generated_token():
    hf = analytic.generated_token(WT103, mem_len=1600, cached=False, path="hf")
    cached = analytic.generated_token(WT103, mem_len=1600, cached=True)
    assert close(hf.flops / 1e9, 246), hf.flops
    assert cached.flops < 1e9
    reads = analytic.decode_reads(WT103, mem_len=1600)
    assert close(reads["weights"] / 1e9, 1.05), reads
    assert close(reads["kv"] / 1e9, 0.24), reads
    # the step's byte count is those reads plus small activations
    assert cached.bytes == pytest.approx(sum(reads.values()), rel=0.02)
    # one token: memory bound on any accelerator (intensity < 1 FLOP/byte)
    assert cached.total.intensity < 1.0


def test_wt103_parameters_match_the_model():
    counts = analytic.parameter_count(WT103)
    stored = sum(counts.values()) - counts["r_net"]
    # HF reports ~285M with the first output projection (not tied) counted apart
    assert close(stored / 1e6, 284.2, 0.01)


def test_fused_path_moves_fewer_bytes_than_hf():
    for batch in (1, 16):
        fused = analytic.rel_attention(batch, 16, 128, 1728, 64, es=2, path="fused")
        hf = analytic.rel_attention(batch, 16, 128, 1728, 64, es=2, path="hf")
        assert hf.bytes > 5 * fused.bytes                     # six score-sized passes vs none
    h100 = analytic.predict_tokens_per_s(analytic.eval_segment(WT103, 16, cached=True, es=2), 16 * 128, analytic.H100)
    a100_hf = analytic.predict_tokens_per_s(analytic.eval_segment(WT103, 16, cached=False, path="hf", es=2),
                                            16 * 128, analytic.A100)
    assert h100 > a100_hf > 30783        # NVIDIA's measured A100 figure is under its own roofline


# ---- against torch's FLOP counter on a real forward ----------------------------------------------
@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_flops_match_torch_flop_counter(cached):
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    cfg = TransfoXLConfig(vocab_size=1000, cutoffs=[200, 500], d_model=64, d_embed=64, n_head=4, d_head=16,
                          d_inner=256, div_val=2, n_layer=2, mem_len=24, clamp_len=20, dropout=0.0)
    torch.manual_seed(0)
    model = TransfoXLLMHeadModel(cfg).eval()
    B, L = 2, 8
    ids = torch.randint(0, 200, (B, L))                       # every token in the head cluster
    # torch's counter has no formula for the CPU flash attention kernel the torch path runs: sdpa's
    cpu_flash = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *args, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}
    counter = FlopCounterMode(display=False, custom_mapping=cpu_flash)
    with torch.no_grad():
        if cached:
            cache = model.new_cache(B, "zeros")
            for _ in range(4):                                # position keys made once; the zero memory
                model(ids, cache=cache)                       # pushed out (its rows cost less)
            with counter:
                model(ids, cache=cache)                       # full log-probs of every position
            expected = analytic.segment(cfg, B, L, 24, cached=True, labels=False, path="torch")
        else:
            with counter:
                model(ids, labels=ids)                        # zero memory of mem_len; NLL of L - 1 positions
            expected = analytic.segment(cfg, B, L, 24, cached=False, labels=True, path="hf",
                                        logits_rows=B * (L - 1))
    # the counter sees matrix products only: take out the analytic model's per-element terms (layer
    # norms; 5 FLOPs per attention score and per softmax logit, the logits of every row scored)
    scores = B * cfg.n_head * L * (L + 24) * cfg.n_layer
    logit_rows = B * L if cached else B * (L - 1)
    scored_width = 1000 + 2 if cached else 200 + 2          # every cluster (log-probs) / the head only (NLL)
    elementwise = expected.ops["layer_norm"].flops + 5 * scores + 5 * logit_rows * scored_width
    measured = counter.get_total_flops()
    assert expected.flops - elementwise == pytest.approx(measured, rel=0.01)


# ---- machine and runner --------------------------------------------------------------------------
def test_machine_measure_is_quick_and_positive():
    from txl_fast.bench.machine import Machine, measure, versions

    m = measure("cpu", reps=2, square=128, read_bytes=8 * 2**20, shapes=((16, 64, 32),))
    assert m.device == "cpu" and set(m.matmul) == {"float32", "bfloat16"}
    for dtype, shapes in m.matmul.items():
        assert set(shapes) == {"128x128x128", "16x64x32"}
        for r in shapes.values():
            assert r["best"] >= r["median"] > 0
        assert m.matmul_rate(dtype) == max(r["best"] for r in shapes.values())
    assert m.read["large"]["bytes"] == 8 * 2**20 and m.read_rate == m.read["large"]["best"] > 0
    assert m.read["layer"]["best"] > 0 and m.copy["best"] >= m.copy["median"] > 0
    assert set(m.flags) == {"avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16"}
    line = m.summary()
    assert "GFLOP/s" in line and "float32" in line and "bfloat16" in line and "read" in line and m.name in line
    assert Machine.from_dict(json.loads(json.dumps(m.as_dict()))) == m          # the JSON carries it whole
    assert versions()["torch"] == torch.__version__


def test_machine_rates_are_best_and_median_of_alternated_rounds():
    from txl_fast.bench.machine import alternated_times, rate

    calls = []
    times = alternated_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3)
    assert calls == ["a", "b"] * 4                       # a warm-up round, then 3 rounds, alternated
    assert len(times["a"]) == len(times["b"]) == 3
    assert rate(10.0, [1.0, 2.0, 5.0]) == {"best": 10.0, "median": 5.0}


def test_machine_layer_buffer_is_one_wt103_layer():
    from txl_fast.bench.machine import wt103_layer_bytes

    # qkv 1024 x 3072, o_net 1024 x 1024, r_w/r_r biases 2 x 1024, two layer norms 2 x 2 x 1024,
    # FF 1024 x 4096 + 4096 and 4096 x 1024 + 1024: 12,594,176 parameters (r_net left out)
    assert wt103_layer_bytes(4) == 4 * 12_594_176 and wt103_layer_bytes(2) == 2 * 12_594_176


# ---- the floor -----------------------------------------------------------------------------------
def test_decode_step_reads_hand_count_wt103():
    reads = analytic.decode_step_reads(WT103, mem_len=1600, batch=1, es=4)
    assert reads["layers"] == 4 * 18 * 12_594_176                     # 906.8 MB
    assert reads["embedding"] == 4 * (1024 * 1024 + 1024)              # the head's projection, one row
    assert reads["head"] == 4 * (1024 * 1024 + 20000 * 1025 + 3 * 1025)   # projection, words + biases, clusters
    assert reads["kv"] == 4 * 18 * 2 * 1601 * 1024                     # 236.1 MB
    assert reads["positions"] == 4 * 18 * 1001 * 1024                  # clamp_len + 1 distinct distances
    assert close(sum(reads.values()) / 1e9, 1.307, 0.001)
    eight = analytic.decode_step_reads(WT103, mem_len=1600, batch=8, es=2)
    assert eight["kv"] == 8 * reads["kv"] // 2 and eight["layers"] == reads["layers"] // 2
    assert analytic.decode_step_reads(WT103, real_rows=127)["kv"] == 4 * 18 * 2 * 128 * 1024


def test_floor_flops_and_seconds():
    share = analytic.uniform_share(WT103)
    steady = analytic.eval_floor_flops(WT103, 1, 128, 1600, 2, share=share)
    one = analytic.eval_segment(WT103, 1, 128, 1600, cached=True, path="torch", share=share).flops
    assert steady == pytest.approx(2 * one) and close(one / 1e9, 86.8, 0.01)
    assert analytic.eval_floor_flops(WT103, 1, 128, 1600, 2, first_real=0, share=share) < steady
    rate, bw = 1e11, 2e10
    prompt = analytic.segment(WT103, 1, 128, 0, cached=True, labels=False, path="torch", logits_rows=1).flops
    steps = sum(sum(analytic.decode_step_reads(WT103, 1600, 1, 4, 128 + i).values()) for i in range(3))
    floor = analytic.generate_floor_seconds(WT103, 1, 128, 4, 1600, rate, bw)
    assert floor == pytest.approx(prompt / rate + steps / bw)


def test_floor_check_fails_a_slowed_step():
    from txl_fast.bench.floor import check_fraction, fraction

    floor_s, fast = 0.010, [0.020, 0.018, 0.019]          # best 18 ms: 56 % of a 10 ms floor
    assert check_fraction("step", floor_s, fast, 0.5) == pytest.approx(10 / 18)
    slowed = [t * 1.5 for t in fast]                        # the same step made 1.5x slower: 37 %
    with pytest.raises(AssertionError, match=r"step: best of 3 runs 27.00 ms against a floor of 10.00 ms is 37%"):
        check_fraction("step", floor_s, slowed, 0.5)
    assert fraction(1.0, 4.0) == 0.25
    with pytest.raises(ValueError, match="positive"):
        fraction(0.0, 1.0)


def test_runner_refuses_an_unsupported_dtype(capsys):
    from txl_fast.bench.runner import main

    for dtype in ("int8", "bfloat61", "float64") + (() if torch.cuda.is_available() else ("float16",)):
        with pytest.raises(SystemExit) as exit_info:
            main(["--tiny", "--dtype", dtype])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("txl-fast: error: --dtype " + dtype) and "float32" in err[0], err


@pytest.mark.parametrize("compiled", [False, True])
def test_bench_engine_tiny_smoke(tmp_path, capsys, compiled):
    """benchmarks/bench_engine.py: the machine line first, every row with HF's time in the same dtype,
    the ratio, the floor and our fraction of it, a decode-step row per --decode-batch; the JSON carries
    the machine. --compile: our decode steps compiled (use_cpu_compile), said in the header."""
    pytest.importorskip("transformers", reason="the comparison needs the peer transformers==4.35.0")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_engine", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py")
    bench_engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_engine)
    out_json = tmp_path / "engine.json"
    threads = torch.get_num_threads()
    try:
        assert bench_engine.main(["--tiny", "--segments", "1", "--new-tokens", "3", "--batch", "1", "--decode-batch",
                                  "1", "2", "--rounds", "1", "--dtype", "bfloat16", "--json", str(out_json)]
                                 + ["--compile"] * compiled) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ") and "bfloat16" in printed.splitlines()[0]
    assert ("our decode steps compiled" in printed.splitlines()[1]) == compiled
    assert "| workload | txl_fast ms | HF 4.35 ms (same dtype) | ratio | floor ms | ours of floor |" in printed
    report = json.loads(out_json.read_text())
    assert report["dtype"] == "bfloat16" and report["machine"]["read"]["large"]["best"] > 0
    names = [r["workload"] for r in report["rows"]]
    assert [n for n in names if n.startswith("greedy decode step")] == [
        "greedy decode step, memory full (16 real tokens), batch 1",
        "greedy decode step, memory full (16 real tokens), batch 2"]
    for r in report["rows"]:
        assert r["ours_s"] > 0 and r["hf_s"] > 0 and r["floor_s"] > 0
        assert r["fraction_of_floor"] == pytest.approx(r["floor_s"] / r["ours_s"])
        assert r["ratio"] == pytest.approx(r["hf_s"] / r["ours_s"])


def test_results_md_section_replaced_in_place(tmp_path):
    from txl_fast.bench.report import MARK_BEGIN, MARK_END, write_results_md

    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Someone else's section\n\nkeep me\n")
    write_results_md(str(md), f"{MARK_BEGIN}\nfirst\n{MARK_END}")
    write_results_md(str(md), f"{MARK_BEGIN}\nsecond\n{MARK_END}")
    text = md.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count(MARK_BEGIN) == 1 and text.count(MARK_END) == 1


def test_runner_tiny_smoke(tmp_path, capsys):
    pytest.importorskip("transformers", reason="the comparison needs the peer transformers==4.35.0")
    from txl_fast.bench.report import MARK_BEGIN
    from txl_fast.bench.runner import main

    out_json, out_png, out_md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "RESULTS.md"
    rc = main(["--tiny", "--rounds", "1", "--json", str(out_json), "--plot", str(out_png),
               "--results-md", str(out_md)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "| workload | batch | mem_len | ours tok/s | HF tok/s | ratio |" in printed
    assert "No GPU" in printed or torch.cuda.is_available()
    report = json.loads(out_json.read_text())
    assert report["machine"]["matmul"]["float32"] and report["machine"]["read"]["large"]["best"] > 0
    assert "| floor ms | ours of floor |" in printed
    kinds = {(r["kind"], r["batch"], r["mem_len"]) for r in report["results"]}
    assert ("eval", 1, 8) in kinds and ("generate", 2, 16) in kinds
    for r in report["results"]:
        assert r["agree"], r["check"]
        assert r["txl_fast"]["tokens_per_s"] > 0 and r["hf"]["tokens_per_s"] > 0
        assert r["txl_fast"]["flops"] > 0 and r["ratio"] > 0
        assert r["txl_fast"]["frac_floor"] == pytest.approx(r["floor_seconds"] / r["txl_fast"]["seconds"])
    assert [row["batch"] for row in report["prediction"]["rows"]] == [16, 32]
    section = out_md.read_text()
    assert MARK_BEGIN in section and "PREDICTION" in section and "read" in section and "bfloat16" in section
    if importlib.util.find_spec("matplotlib") is not None:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "install txl_fast[bench] for plots" in printed


@pytest.mark.parametrize("argv,needle", [
    (["--threads", "-1"], "argument --threads: -1 must be at least 1"),
    (["--rounds", "0"], "argument --rounds: 0 must be at least 1"),
    (["--threads", "100000"], "CPUs"),
    (["--json", "."], "--json .: not a file in an existing directory"),
    (["--plot", "/nonexistent/p.png"], "--plot /nonexistent/p.png: not a file in an existing directory"),
])
def test_bench_arguments_refused_before_measuring(argv, needle, capsys):
    """One line, exit 2, before minutes of measuring (a directory as --json used to fail at the end)."""
    from txl_fast.bench.runner import main as bench_main

    with pytest.raises(SystemExit) as e:
        bench_main(["--tiny", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("txl-fast: error:") and "\n" not in err and needle in err, err


def test_bench_results_md_not_utf8_refused_before_measuring(tmp_path, capsys):
    from txl_fast.bench.runner import main as bench_main

    md = tmp_path / "bad.md"
    md.write_bytes(b"\xff\xfe results")
    with pytest.raises(SystemExit) as e:
        bench_main(["--tiny", "--results-md", str(md)])
    assert e.value.code == 2 and "is not UTF-8 text" in capsys.readouterr().err
    assert md.read_bytes() == b"\xff\xfe results"

