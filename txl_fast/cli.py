"""The ``txl-fast`` command line: argument parsing and printing only; the work is done elsewhere.

    txl-fast eval [--model DIR] [FILE|-]        perplexity of a text (default: the embedded model on its held-out text)
    txl-fast generate [PROMPT]                  continue a prompt, tokens printed as they come
    txl-fast train --out DIR [--text FILE]      train a model (default corpus: Python's documentation topics)
    txl-fast info [--model DIR]                 parameters, configuration, memory
    txl-fast convert SRC DST                    HF directory (pickled .bin + vocab.pkl) -> safetensors + vocab.json
    txl-fast kernels                            ahead-of-time compile report of the Triton kernels (sm_80, sm_90)
    txl-fast bench [--full] [--json P] [--plot P] the benchmark suite vs HF (txl_fast.bench.runner)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64"}


def _load(model_dir: Path, dtype: str, device: str):
    import torch  # noqa: PLC0415

    from txl_fast import TransfoXLLMHeadModel  # noqa: PLC0415
    from txl_fast.tokenizer import TransfoXLTokenizer  # noqa: PLC0415

    model = TransfoXLLMHeadModel.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    return model, TransfoXLTokenizer.from_pretrained(model_dir)


def _default_protocol(model_dir: Path) -> dict:
    metrics = model_dir / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text()).get("eval_protocol", {})
    return {}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_eval(args) -> int:
    import torch  # noqa: PLC0415

    from txl_fast import PRESETS, evaluate, use_backend  # noqa: PLC0415

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    model, tok = _load(model_dir, args.dtype, args.device)
    protocol = {"tgt_len": 128, "mem_len": model.config.mem_len, "clamp_len": model.config.clamp_len,
                "same_length": model.config.same_length, "batch_size": 1, "init_mems": "empty"}
    if args.preset:
        protocol.update(PRESETS[args.preset])
    elif not args.model:
        protocol.update(_default_protocol(model_dir))
    for key in ("tgt_len", "mem_len", "clamp_len", "batch_size", "init_mems"):
        if getattr(args, key) is not None:
            protocol[key] = getattr(args, key)
    if args.same_length is not None:
        protocol["same_length"] = args.same_length == "on"
    text_file = args.file or (str(model_dir / "heldout.txt") if not args.model else None)
    if text_file is None:
        raise ValueError("give a text FILE (or - for stdin) to evaluate this model on")
    if text_file == "-":
        import tempfile  # noqa: PLC0415

        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(sys.stdin.read())
        text_file = f.name
    ids = tok.encode_file(text_file, ordered=True, add_eos=True)
    with use_backend(args.backend), torch.no_grad():
        result = evaluate(model, ids, char_level=args.char_level, progress=None if not args.json else False,
                          **protocol)
    report = {"model": str(model_dir), "text": text_file, "tokens": result.tokens, "nll": result.nll,
              "perplexity": result.perplexity, "bpc": result.bpc, "tokens_per_s": result.tokens_per_s,
              "seconds": result.seconds, "peak_rss_mb": _peak_rss_mb(), "backend": args.backend,
              "dtype": args.dtype, **protocol}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        extra = f"  bpc {result.bpc:.4f}" if result.bpc is not None else ""
        print(f"perplexity {result.perplexity:.3f}{extra}  ({result.tokens} tokens, {result.tokens_per_s:.0f} tokens/s, "
              f"peak memory {report['peak_rss_mb']:.0f} MB; tgt_len {protocol['tgt_len']}, mem_len {protocol['mem_len']}, "
              f"clamp_len {protocol['clamp_len']}, same_length {protocol['same_length']}, backend {args.backend})")
    return 0


def cmd_generate(args) -> int:
    import torch  # noqa: PLC0415

    from txl_fast import use_backend  # noqa: PLC0415

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    model, tok = _load(model_dir, args.dtype, args.device)
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenisation")
    generator = torch.Generator().manual_seed(args.seed)
    print(args.prompt, end="", flush=True)

    eos = tok.eos_token_id

    def stream(token):                              # print each token as it is produced
        token_id = int(token[0])
        print("\n" if token_id == eos else " " + tok.decode([token_id]), end="", flush=True)

    with use_backend(args.backend):
        model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                       init_mems="empty", streamer=stream)
    print()
    return 0


def cmd_train(args) -> int:
    import tempfile  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel  # noqa: PLC0415
    from txl_fast.tokenizer import TransfoXLTokenizer  # noqa: PLC0415
    from txl_fast.train import TrainConfig, default_corpus, train  # noqa: PLC0415

    out = Path(args.out)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else default_corpus()
    lines = text.splitlines()
    split = int(len(lines) * (1 - args.heldout))
    with tempfile.TemporaryDirectory() as tmp:
        train_file, valid_file = Path(tmp) / "train.txt", Path(tmp) / "valid.txt"
        train_file.write_text("\n".join(lines[:split]) + "\n")
        valid_file.write_text("\n".join(lines[split:]) + "\n")
        if args.resume:
            tok = TransfoXLTokenizer.from_pretrained(out)
        else:
            tok = TransfoXLTokenizer(special=["<unk>", "<eos>"], min_freq=args.min_freq)
            tok.count_file(train_file, add_eos=True)
            tok.build_vocab()
        train_ids = tok.encode_file(train_file, ordered=True, add_eos=True)
        valid_ids = tok.encode_file(valid_file, ordered=True, add_eos=True) if split < len(lines) else None
    vocab = len(tok)
    cutoffs = [c for c in (vocab // 4, vocab // 2) if 0 < c < vocab] if vocab >= 8 else []
    config = TransfoXLConfig(vocab_size=vocab, cutoffs=sorted(set(cutoffs)), d_model=args.d_model,
                             d_embed=args.d_model, n_head=args.n_head, d_head=args.d_model // args.n_head,
                             d_inner=4 * args.d_model, div_val=2 if cutoffs else 1, n_layer=args.n_layer,
                             mem_len=args.mem_len, clamp_len=4 * args.mem_len, same_length=True,
                             dropout=args.dropout)
    torch.manual_seed(args.seed)
    model = TransfoXLLMHeadModel(config)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_vocabulary(out)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, tgt_len=args.tgt_len, lr=args.lr,
                      warmup=min(args.warmup, args.steps), seed=args.seed, checkpoint_every=args.checkpoint_every)
    metrics = train(model, train_ids, valid_ids, cfg, out_dir=str(out), resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_info(args) -> int:
    import dataclasses  # noqa: PLC0415

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    model, tok = _load(model_dir, "float32", "cpu")
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = dataclasses.asdict(model.config)
    cfg.pop("extra")
    print(f"model:       {model_dir}")
    print(f"parameters:  {n_params:,} ({n_bytes / 2**20:.1f} MiB as stored)")
    print(f"vocabulary:  {len(tok):,} symbols")
    mem_bytes = model.config.n_layer * model.config.mem_len * model.config.d_model * 4
    print(f"memory:      {mem_bytes / 2**20:.2f} MiB of mems per sequence in the batch (fp32)")
    for key, value in cfg.items():
        print(f"  {key:26s} {value}")
    return 0


def cmd_convert(args) -> int:
    from txl_fast.convert import convert  # noqa: PLC0415

    written = convert(args.src, args.dst)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_kernels(args) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        from txl_fast.kernels import aot  # noqa: PLC0415
    except ImportError as e:
        raise ValueError(f"the kernel report needs triton: {e}") from None
    rows = aot.report()
    bad = [r for r in rows if not r["ok"] or r["shared"] > r["smem_limit"]]
    if args.json:
        print(json.dumps(rows))
    else:
        print(aot.format_table(rows))
        print(f"{len(rows)} compiles, {len(bad)} failed or over the shared-memory limit")
    return 1 if bad else 0


def cmd_bench(args) -> int:
    from txl_fast.bench.runner import main as bench_main  # noqa: PLC0415

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txl-fast", description="Transformer-XL runtime with custom kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", help="checkpoint directory (config.json, model.safetensors, vocab.json); "
                                       "default: the embedded model")
        p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "naive"])
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        p.add_argument("--device", default="cpu")

    p = sub.add_parser("eval", help="perplexity of a text file or stdin")
    p.add_argument("file", nargs="?", help="text file, or - for stdin (default: the embedded model's held-out text)")
    model_args(p)
    p.add_argument("--preset", choices=["wt103", "enwik8", "text8"], help="the paper's evaluation protocol")
    p.add_argument("--tgt-len", dest="tgt_len", type=int)
    p.add_argument("--mem-len", dest="mem_len", type=int)
    p.add_argument("--clamp-len", dest="clamp_len", type=int)
    p.add_argument("--same-length", dest="same_length", choices=["on", "off"])
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--init-mems", dest="init_mems", choices=["empty", "zeros"])
    p.add_argument("--char-level", action="store_true", help="report bits per character")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("prompt", nargs="?", default="The")
    model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train a small model")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--text", help="training text (default: Python's documentation topics)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of lines held out")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--mem-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-freq", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="model summary")
    p.add_argument("--model")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="HF TransfoXL directory -> config.json + model.safetensors + vocab.json")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("kernels", help="ahead-of-time compile report of the Triton kernels for sm_80 / sm_90")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_kernels)

    # its options belong to txl_fast.bench.runner (`txl-fast bench --help`); main() hands them over untouched
    p = sub.add_parser("bench", help="the benchmark suite: ours vs HF, table, JSON and plot", add_help=False)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"txl-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
