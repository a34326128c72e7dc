"""The ``txl-fast`` command line: argument parsing and printing only."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    import torch

    from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel, use_backend

    torch.manual_seed(args.seed)
    config = TransfoXLConfig(vocab_size=1000, cutoffs=[200, 500], d_model=64, d_embed=64, n_head=4, d_head=16,
                             d_inner=128, div_val=2, n_layer=2, mem_len=32, clamp_len=24, dropout=0.0)
    model = TransfoXLLMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 3 * args.tgt_len))
    for backend in ("naive", "torch"):
        mems, total = model.empty_mems(2), 0.0
        with use_backend(backend), torch.no_grad():
            for seg in ids.split(args.tgt_len, dim=1):
                out = model(seg, mems=mems, labels=seg)
                mems, total = out.mems, total + out.losses.sum().item()
        print(f"{backend:>6}: mean NLL over 3 segments of a random model = {total / (2 * 3 * (args.tgt_len - 1)):.6f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txl-fast", description="Transformer-XL runtime with custom kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a small random model on the naive and torch backends")
    demo.add_argument("--tgt-len", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"txl-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
