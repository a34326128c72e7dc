"""Long-form speech: a Parakeet encoder (transformers 5.x) on one utterance of 30 s to 60 min, the
library's own code vs ``txl_fast.patch``, on the CPU.

    .venv-tf5/bin/python benchmarks/bench_longform.py [--threads 2] [--layers 2] [--minutes 0.5 2 ...]
                                                      [--max-gb 10] [--json PATH]

The model: ParakeetEncoderConfig's defaults (the 0.6B shape: hidden 1024, 8 heads of 128, feed-forward
4096, convolution kernel 9, 8x subsampling by three stride-2 convolutions of 256 channels over 80 mel
bins, 10 ms mel frames -> 80 ms frames), random weights, eval, no autograd, with FEW layers: ``--layers``
(2) up to 20 min, one layer at 60 min. One utterance (batch 1) with its attention mask (all ones, as
the processor gives). Every measurement runs in a fresh subprocess (clean peaks): its wall time
(``machine.time_call``; a warm-up call first below 5 min of audio; 2 calls at 30 s, else 1) and the peak of its resident set
above the start of the call (``harness.PeakMemory``, sampled every 2 ms). Library and patched
processes alternate (who goes first changes from row to row); best and median over the calls. The library runs only where
its predicted need fits ``--max-gb`` and the memory available now; beyond, its need is given as the
number ``library_need_bytes`` computes (labelled predicted), not measured.

Each time also as the fraction of the machine's floor: the FLOPs the maths needs (``encoder_flops``:
the convolutions, projections, feed-forward, and each (query, key) pair's content, position and value
products once) over the matmul rate of that dtype, measured in the same run (``machine.measure``).
Writes the JSON (default benchmarks/bench_longform_cpu.json) and, with matplotlib, the plot of peak
memory against audio length beside it (.png).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from txl_fast.bench import machine  # noqa: E402
from txl_fast.bench.harness import PeakMemory  # noqa: E402

MEL_PER_SECOND = 100                      # 10 ms mel frames
# (minutes, dtypes, timed calls per process, layers or None for --layers): the plan of a run
PLAN = [(0.5, ("float32", "bfloat16"), 2, None), (2, ("float32", "bfloat16"), 1, None), (10, ("float32",), 1, None),
        (20, ("float32",), 1, None), (60, ("float32",), 1, 1)]
WARMUP_BELOW_MIN = 5


def config(layers: int):
    from transformers import ParakeetEncoderConfig  # noqa: PLC0415

    cfg = ParakeetEncoderConfig(num_hidden_layers=layers, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                layerdrop=0.0)
    cfg._attn_implementation = "sdpa"
    return cfg


def _conv(n: int, cfg) -> int:
    """Length after one of the subsampling's stride-2 convolutions (kernel k, padding (k - 1) // 2)."""
    k = cfg.subsampling_conv_kernel_size
    return (n + 2 * ((k - 1) // 2) - k) // cfg.subsampling_conv_stride + 1


def _convs(cfg) -> int:
    return cfg.subsampling_factor.bit_length() - 1


def subsampled(frames: int, cfg) -> int:
    for _ in range(_convs(cfg)):
        frames = _conv(frames, cfg)
    return frames


def encoder_flops(mel: int, cfg, layers: int) -> float:
    """FLOPs the maths needs for ``mel`` mel frames (multiply-adds counted 2)."""
    E, C, k = cfg.hidden_size, cfg.subsampling_conv_channels, cfg.subsampling_conv_kernel_size
    flops, frames, width = 0.0, mel, cfg.num_mel_bins
    for i in range(_convs(cfg)):
        frames, width = _conv(frames, cfg), _conv(width, cfg)
        flops += 2 * frames * width * C * k * k                 # the first convolution (1 channel in) or a depthwise one
        if i:
            flops += 2 * frames * width * C * C                 # the pointwise one
    T = frames
    flops += 2 * T * C * width * E                              # the linear after the convolutions
    per_layer = (2 * 4 * T * E * E                             # q, k, v, o
                 + 2 * (2 * T - 1) * E * E                     # relative_k_proj of every distance
                 + 2 * 2 * (2 * T * E * cfg.intermediate_size)  # two feed-forwards
                 + 2 * T * E * 3 * E + 2 * T * E * cfg.conv_kernel_size   # convolution module
                 + 3 * 2 * T * T * E)                          # content, position, value products
    return flops + layers * per_layer


def library_need_bytes(mel: int, cfg, itemsize: int) -> float:
    """A lower bound of the library's peak for one utterance: its position scores (1, H, T, 2T - 1) and
    the padded copy its _rel_shift makes (H, T, 2T), alive together, plus the (1, T, T) bool mask."""
    T, H = subsampled(mel, cfg), cfg.num_attention_heads
    return H * T * (2 * T - 1) * itemsize + H * T * 2 * T * itemsize + T * T


def available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


# ---- one measurement, in its own process ----------------------------------------------------------


def child(side: str, dtype: str, minutes: float, layers: int, threads: int, reps: int) -> dict:
    import transformers  # noqa: PLC0415

    import txl_fast  # noqa: PLC0415

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = config(layers)
    model = transformers.ParakeetEncoder(cfg).eval().to(getattr(torch, dtype))
    if side == "ours":
        txl_fast.patch(model)
    mel = int(minutes * 60 * MEL_PER_SECOND)
    x = torch.randn(1, mel, cfg.num_mel_bins, dtype=model.dtype)
    mask = torch.ones(1, mel, dtype=torch.long)

    def call():
        with torch.no_grad():
            return model(x, attention_mask=mask).last_hidden_state

    if minutes < WARMUP_BELOW_MIN:
        call()
    seconds, peaks = [], []
    for _ in range(reps):
        with PeakMemory("cpu") as peak:
            took, out = machine.time_call(call)
        assert torch.isfinite(out).all()
        seconds.append(took)
        peaks.append(peak.peak)
    return {"seconds": seconds, "peak_bytes": max(peaks), "frames": out.shape[1]}


def run_child(side, dtype, minutes, layers, threads, reps) -> dict:
    cmd = [sys.executable, __file__, "--child", side, dtype, str(minutes), str(layers), str(reps),
           "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{side} {dtype} {minutes} min failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the run -------------------------------------------------------------------------------------


def measure_plan(args, rates, done) -> list[dict]:
    """Every row of PLAN; ``done(rows)`` after each (the JSON written as it goes)."""
    rows = []
    for minutes, dtypes, reps, layers in (p for p in PLAN if args.minutes is None or p[0] in args.minutes):
        layers = layers or args.layers
        cfg = config(layers)
        mel = int(minutes * 60 * MEL_PER_SECOND)
        for n, dtype in enumerate(dtypes):
            itemsize = torch.finfo(getattr(torch, dtype)).bits // 8
            need = library_need_bytes(mel, cfg, itemsize)
            sides = ["library", "ours"]
            if need > args.max_gb * 1e9 or need + 2e9 > available_bytes():
                sides = ["ours"]
            runs = {}
            for side in (sides if (len(rows) + n) % 2 == 0 else sides[::-1]):          # who goes first alternates
                runs[side] = run_child(side, dtype, minutes, layers, args.threads, reps)
                print(f"{minutes:5g} min {dtype:8s} {side:7s} {min(runs[side]['seconds']):8.2f} s "
                      f"{runs[side]['peak_bytes'] / 1e9:6.2f} GB", flush=True)
            flops = encoder_flops(mel, cfg, layers)
            row = dict(minutes=minutes, dtype=dtype, layers=layers, mel_frames=mel, frames=runs["ours"]["frames"],
                       flops=flops, floor_seconds=flops / rates[dtype], library_need_bytes_predicted=need)
            for side, got in runs.items():
                times = got["seconds"]
                row[side] = dict(best=min(times), median=statistics.median(times), calls=len(times),
                                 peak_bytes=got["peak_bytes"], floor_fraction=flops / rates[dtype] / min(times))
            rows.append(row)
            done(rows)
    return rows


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for dtype, style in (("float32", "-"), ("bfloat16", ":")):
        sel = [r for r in rows if r["dtype"] == dtype]
        ours = [(r["minutes"], r["ours"]["peak_bytes"] / 1e9) for r in sel]
        library = [(r["minutes"], r["library"]["peak_bytes"] / 1e9) for r in sel if "library" in r]
        need = [(r["minutes"], r["library_need_bytes_predicted"] / 1e9) for r in sel]
        ax.plot(*zip(*ours), "o" + style, color="C0", label=f"txl_fast.patch {dtype}")
        if library:
            ax.plot(*zip(*library), "s" + style, color="C1", label=f"library {dtype} (measured)")
        ax.plot(*zip(*need), "x--", color="C1", alpha=0.5, label=f"library {dtype} (predicted lower bound)")
    ax.set(xscale="log", yscale="log", xlabel="audio (minutes, one utterance)", ylabel="peak memory (GB)",
           title="Parakeet encoder (0.6B shape, few layers), CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown(report: dict) -> str:
    """The RESULTS.md table of a run's JSON."""
    head = ("| audio | frames | dtype | layers | library s | ours s | library / ours | library peak GB | ours peak GB "
            "| library need GB (predicted lower bound) | floor s | ours of floor |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in report["rows"]:
        lib, ours = r.get("library"), r["ours"]
        audio = f"{r['minutes'] * 60:g} s" if r["minutes"] < 1 else f"{r['minutes']:g} min"
        lines.append(f"| {audio} | {r['frames']} | {r['dtype']} | {r['layers']} | "
                     + (f"{lib['best']:.2f}" if lib else "not run") + f" | {ours['best']:.2f} | "
                     + (f"{lib['best'] / ours['best']:.2f}×" if lib else "") + " | "
                     + (f"{lib['peak_bytes'] / 1e9:.2f}" if lib else "") + f" | {ours['peak_bytes'] / 1e9:.2f} | "
                     + f"{r['library_need_bytes_predicted'] / 1e9:.2f} | {r['floor_seconds']:.2f} | "
                     + f"{ours['floor_fraction']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--minutes", type=float, nargs="+", help="only these lengths of PLAN")
    parser.add_argument("--max-gb", type=float, default=10.0, help="run the library only where it needs less")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "bench_longform_cpu.json")
    parser.add_argument("--table", type=Path, help="print the markdown table of this JSON and stop")
    parser.add_argument("--child", nargs=5, metavar=("SIDE", "DTYPE", "MINUTES", "LAYERS", "REPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    import transformers  # noqa: PLC0415

    if int(transformers.__version__.split(".")[0]) < 5:
        sys.exit(f"needs transformers 5.x (found {transformers.__version__}): run it with .venv-tf5/bin/python "
                 "(scripts/test_tf5.sh makes the venv)")
    if args.child:
        side, dtype, minutes, layers, reps = args.child
        print(json.dumps(child(side, dtype, float(minutes), int(layers), args.threads, int(reps))))
        return
    torch.set_num_threads(args.threads)
    found = machine.measure("cpu", reps=3)
    rates = {dt: found.matmul_rate(dt) for dt in ("float32", "bfloat16")}
    print(found.summary(), flush=True)
    load = [os.getloadavg()]

    def write(rows):
        load.append(os.getloadavg())
        args.json.write_text(json.dumps(dict(machine=found.as_dict(), versions=machine.versions(), threads=args.threads,
                                             load_average_1_5_15=load, rows=rows), indent=1))

    rows = measure_plan(args, rates, write)
    print(markdown(dict(rows=rows)))
    print(f"wrote {args.json}")
    png = args.json.with_suffix(".png")
    print(f"wrote {png}" if plot(rows, png) else "no plot: matplotlib is not installed")


if __name__ == "__main__":
    main()
