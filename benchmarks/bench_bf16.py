"""bfloat16 against float32 on the embedded default model: perplexity and next-token agreement.

    python benchmarks/bench_bf16.py [--prompts 8] [--new-tokens 32]

Perplexity of the held-out text with the protocol stored with the model (what `txl-fast eval`
reports), in float32 and in bfloat16 (`from_pretrained(dtype=...)`: weights and activations bf16,
the loss reduced in float32); the top-1 agreement of the two on every position of that text (the
same memory, teacher forcing: does bf16 pick fp32's most likely next word?); and greedy
continuations of ``--prompts`` prompts (the first 16 tokens of evenly spaced held-out lines) by
``--new-tokens`` tokens: identical tokens, and how long the identical prefix lasts (once a greedy
run takes another word, the two continue different texts).
"""
from __future__ import annotations

import argparse

import torch

import txl_fast
from txl_fast import TransfoXLLMHeadModel, TransfoXLTokenizer
from txl_fast.bench.machine import cpu_name, time_call
from txl_fast.inference import stored_protocol

DTYPES = ("float32", "bfloat16")


def top1(model, ids: torch.Tensor, tgt_len: int) -> torch.Tensor:
    """The argmax next token at every position of ``ids`` (T,), memory carried (the stored protocol's)."""
    cache, picks = model.new_cache(1, "empty", step_hint=tgt_len), []
    with torch.no_grad():
        for i in range(0, ids.numel(), tgt_len):
            picks.append(model(ids[None, i : i + tgt_len], cache=cache).prediction_scores[0].argmax(-1))
    return torch.cat(picks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    path = txl_fast.default_model_path()
    tok = TransfoXLTokenizer.from_pretrained(path)
    ids = tok.encode_file(path / "heldout.txt", ordered=True, add_eos=True)
    protocol = stored_protocol(path)
    lines = [line for line in (path / "heldout.txt").read_text(encoding="utf-8").splitlines() if len(line.split()) > 16]
    prompts = [torch.tensor([tok.encode(lines[i * len(lines) // args.prompts])[:16]]) for i in range(args.prompts)]
    result = {}
    for name in DTYPES:
        model = TransfoXLLMHeadModel.from_pretrained(path, dtype=name)
        seconds, r = time_call(lambda: txl_fast.evaluate(model, ids, progress=False, **protocol))
        result[name] = dict(ppl=r.perplexity, seconds=seconds, tokens=r.tokens,
                            top1=top1(model, ids[:-1], protocol["tgt_len"]),
                            greedy=[model.generate(q, args.new_tokens, init_mems="empty")[0, 16:] for q in prompts])
    fp32, bf16 = result["float32"], result["bfloat16"]
    same_top1 = (fp32["top1"] == bf16["top1"]).double().mean().item()
    same = sum(int((a == b).sum()) for a, b in zip(fp32["greedy"], bf16["greedy"]))
    prefix = [int((a != b).nonzero()[0]) if bool((a != b).any()) else len(a)      # identical tokens before the first
              for a, b in zip(fp32["greedy"], bf16["greedy"])]                       # difference
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; embedded default model, "
          f"held-out text ({fp32['tokens']:,} predicted tokens), protocol {protocol}")
    print("| dtype | perplexity | eval s |")
    print("|---|---:|---:|")
    for name in DTYPES:
        print(f"| {name} | {result[name]['ppl']:.3f} | {result[name]['seconds']:.1f} |")
    print(f"\nbf16 perplexity {bf16['ppl'] / fp32['ppl'] - 1:+.3%} relative to fp32; top-1 next-token agreement on the "
          f"held-out positions {same_top1:.2%}; greedy continuations ({args.prompts} prompts x {args.new_tokens} "
          f"tokens): {same}/{args.prompts * args.new_tokens} tokens identical, identical prefix {min(prefix)}-"
          f"{max(prefix)} tokens (mean {sum(prefix) / len(prefix):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
