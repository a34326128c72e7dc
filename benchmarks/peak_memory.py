"""Peak resident memory of evaluation, ours vs HF transformers 4.35, each side in a fresh process.

    python benchmarks/peak_memory.py [--batch 1 4] [--segments 4] [--config wt103]

One set of random weights (HF model -> save_pretrained; txl_fast loads the same files). Each child
process loads its model, resets the kernel's high-water mark (``/proc/self/clear_refs``: 5), runs the
paper's evaluation protocol (tgt_len 128, mem_len 1600, clamp_len 1000, same_length, zero initial
memory, NLL of every token) for ``--segments`` segments and reports VmHWM - the resident set after
loading: the memory the evaluation itself needs (weights excluded, identical on both sides). Linux only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings

import torch

from txl_fast.bench.harness import hf_nll, write_hf_checkpoint

warnings.filterwarnings("ignore")


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(side: str, model_dir: str, batch: int, segments: int) -> dict:
    torch.manual_seed(1)
    if side == "hf":
        import transformers  # noqa: PLC0415

        model = transformers.TransfoXLLMHeadModel.from_pretrained(model_dir).eval()
    else:
        import txl_fast  # noqa: PLC0415

        model = txl_fast.TransfoXLLMHeadModel.from_pretrained(model_dir).eval()
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (batch, 128 * segments + 1))
    loaded = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                       # VmHWM := VmRSS
    with torch.no_grad():
        if side == "hf":
            hf_nll(model, data, 128)
        else:
            import txl_fast  # noqa: PLC0415

            txl_fast.evaluate(model, data.reshape(-1)[: batch * (128 * segments + 1)], tgt_len=128, mem_len=1600,
                              clamp_len=1000, same_length=True, batch_size=batch, init_mems="zeros", progress=False)
    return {"side": side, "batch": batch, "loaded_mib": loaded / 1024, "peak_mib": _status_kib("VmHWM") / 1024,
            "eval_mib": (_status_kib("VmHWM") - loaded) / 1024}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--child", nargs=4, metavar=("SIDE", "DIR", "BATCH", "SEGMENTS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        side, model_dir, batch, segments = args.child
        print(json.dumps(child(side, model_dir, int(batch), int(segments))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_checkpoint({}, tmp)
        print("| batch | txl_fast eval MiB | HF eval MiB | ratio |\n|---:|---:|---:|---:|")
        for batch in args.batch:
            res = {}
            for side in ("ours", "hf"):
                out = subprocess.run([sys.executable, __file__, "--child", side, tmp, str(batch), str(args.segments)],
                                     capture_output=True, text=True, check=True)
                res[side] = json.loads(out.stdout.strip().splitlines()[-1])
            o, h = res["ours"]["eval_mib"], res["hf"]["eval_mib"]
            print(f"| {batch} | {o:.0f} | {h:.0f} | {o / h:.2f} |", flush=True)


if __name__ == "__main__":
    main()
