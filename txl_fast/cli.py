"""The ``txl-fast`` command line: argument parsing and printing only; the work is done elsewhere.

    txl-fast eval [--model DIR] [FILE|-]        perplexity of a text (default: the model's held-out text, scored
                                                with the protocol stored with the model)
                                                (--model: a directory, or a Hugging Face hub name "org/name"
                                                with --revision REV and --local-files-only, on eval, generate,
                                                info; convert takes them for its SRC)
    txl-fast generate [PROMPT]                  continue a prompt, detokenised text printed line by line
    txl-fast train --out DIR [--text FILE]      train a model (default corpus: Python's documentation topics)
    txl-fast info [--model DIR]                 parameters, configuration, memory
    txl-fast convert SRC DST                    HF directory or hub name (pickled .bin + vocab.pkl) -> safetensors
                                                + vocab.json
    txl-fast kernels                            ahead-of-time compile report of the Triton kernels (sm_80, sm_90)
    txl-fast bench [--full] [--json P] [--plot P] the benchmark suite vs HF (txl_fast.bench.runner)

Every command takes --threads (default: the physical cores). Errors are one line on stderr
starting "txl-fast: error:", exit code 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import resource
import sys
from pathlib import Path

from txl_fast.checks import int_at_least, is_int
from txl_fast.hub import is_hub_name

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
METRICS = "metrics.json"            # a trained model's numbers and the protocol they were measured with
HELDOUT = "heldout.txt"             # the text held out of its training
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
UNK_WARN_SHARE = 0.05


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once): distinct (package, core)
    pairs of /proc/cpuinfo among the allowed CPUs; the allowed CPUs where that is unknown."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu = set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in list(f) + [""]:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("processor", "physical id", "core id"):
                    cpu[key] = value.strip()
                elif not key and cpu:
                    if "core id" in cpu and int(cpu["processor"]) in allowed:
                        cores.add((cpu.get("physical id"), cpu["core id"]))
                    cpu = {}
    except (OSError, ValueError):
        cores = set()
    return len(cores) or len(allowed)


def _check_device(name: str):
    from txl_fast.dtypes import check_device  # noqa: PLC0415

    return check_device(name)


def _model(args) -> tuple[Path | str, dict]:
    """What --model names, for every command that takes it (with --revision and --local-files-only):
    (a local directory, the embedded model's without --model; {}) or (a Hugging Face hub name, left
    to from_pretrained to fetch; the keywords it fetches with)."""
    name = args.model
    if name is not None and not name.strip():
        raise ValueError("--model is empty: give the model's directory, or leave --model out for the embedded one")
    if is_hub_name(name):
        return name, {"revision": args.revision, "local_files_only": args.local_files_only}
    model_dir = Path(name) if name is not None else DEFAULT_MODEL
    if args.revision is not None:
        raise ValueError(f"--revision picks a revision of a model on the Hugging Face hub (--model org/name); "
                         f"{model_dir} is a local directory")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist" if not model_dir.exists()
                                else f"--model {model_dir} is a file: give the model's directory")
    return model_dir, {}


def _load(model_ref: Path | str, fetch: dict, dtype: str, device: str):
    """Model and tokenizer of a local directory or a hub name (``fetch``: its from_pretrained keywords)."""
    from txl_fast import TransfoXLLMHeadModel  # noqa: PLC0415
    from txl_fast.dtypes import check_dtype  # noqa: PLC0415
    from txl_fast.tokenizer import TransfoXLTokenizer  # noqa: PLC0415

    device = _check_device(device)
    dtype = check_dtype(dtype, device)
    tok = TransfoXLTokenizer.from_pretrained(model_ref, **fetch)       # first: a hub model's weights may be GB
    model = TransfoXLLMHeadModel.from_pretrained(model_ref, dtype=dtype, device=device, **fetch)
    if len(tok) != model.config.vocab_size:
        raise ValueError(f"the vocabulary in {model_ref} has {len(tok):,} symbols but the model "
                         f"{model.config.vocab_size:,}: they do not belong together")
    return model, tok


def stored_protocol(model_ref: Path | str) -> dict:
    """The evaluation protocol a trained model was validated with (metrics.json), or {} (a hub model's
    metrics.json is not fetched)."""
    metrics = model_ref / METRICS if isinstance(model_ref, Path) else None
    if metrics is None or not metrics.is_file():
        return {}
    try:
        data = json.loads(metrics.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{metrics} is not valid JSON: {e}") from None
    protocol = data.get("eval_protocol", {}) if isinstance(data, dict) else None
    if not isinstance(protocol, dict):
        raise ValueError(f"{metrics}: eval_protocol must be a JSON object")
    for key, ok, what in (("tgt_len", lambda v: is_int(v) and v > 0, "a positive integer"),
                          ("batch_size", lambda v: is_int(v) and v > 0, "a positive integer"),
                          ("mem_len", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
                          ("clamp_len", is_int, "an integer"),
                          ("same_length", lambda v: isinstance(v, bool), "true or false"),
                          ("init_mems", lambda v: v in ("empty", "zeros"), '"empty" or "zeros"')):
        if key in protocol and not ok(protocol[key]):      # "same_length": "no" would be truthy
            raise ValueError(f"{metrics}: eval_protocol.{key} must be {what}, got {protocol[key]!r}")
    return protocol


def _strict_json(obj) -> str:
    """JSON that strict parsers read: NaN and inf (a diverged model's NLL) written as null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def _protocol(args, model_ref: Path | str, config) -> tuple[dict, str]:
    """The evaluation protocol and where it came from: the one stored with the model (else the
    model's config with tgt_len 128), then --preset, then explicit flags."""
    protocol = {"tgt_len": 128, "mem_len": config.mem_len, "clamp_len": config.clamp_len,
                "same_length": config.same_length, "batch_size": 1, "init_mems": "empty"}
    stored = stored_protocol(model_ref)
    protocol.update({k: v for k, v in stored.items() if k in protocol})
    source = f"the model's training protocol ({METRICS})" if stored else "the model's config, tgt_len 128"
    if args.preset:
        from txl_fast.inference import PRESETS  # noqa: PLC0415

        protocol.update(PRESETS[args.preset])
        source = f"the paper's {args.preset} protocol"
    flags = {k: getattr(args, k) for k in ("tgt_len", "mem_len", "clamp_len", "batch_size", "init_mems")
             if getattr(args, k) is not None}
    if args.same_length is not None:
        flags["same_length"] = args.same_length == "on"
    protocol.update(flags)
    protocol["clamp_len"] = max(protocol["clamp_len"], 0)              # < 0 (HF, the original code): no clamp
    if protocol["mem_len"] == 0 and args.same_length is None:
        protocol["same_length"] = False                 # HF's same_length mask needs a memory
    if flags:
        source += ", flags " + ", ".join(sorted(flags))
    return protocol, source


def _read_stdin_text() -> str:
    if sys.stdin is None:
        raise ValueError("stdin is closed: give a text FILE, or pipe the text in with -")
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"standard input is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _encode_text(tok, text_file: str):
    """The id stream of a text file, or of stdin for "-" (through a private temporary directory,
    removed whatever happens)."""
    import tempfile  # noqa: PLC0415

    if text_file == "-":
        text = _read_stdin_text()
        with tempfile.TemporaryDirectory(prefix="txl-fast-") as tmp:
            path = Path(tmp) / "stdin.txt"
            path.write_text(text, encoding="utf-8")
            return tok.encode_file(path, ordered=True, add_eos=True)
    path = Path(text_file)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give a text file (or - for stdin)")
    if not path.exists():
        raise FileNotFoundError(f"text file {path} does not exist")
    try:
        return tok.encode_file(path, ordered=True, add_eos=True)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte at offset {e.start})") from None


def _is_char_vocabulary(tok) -> bool:
    special = set(tok.all_special_tokens)
    return all(len(sym) == 1 for sym in tok.idx2sym if sym not in special)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_eval(args) -> int:
    import torch  # noqa: PLC0415

    from txl_fast import evaluate, use_backend  # noqa: PLC0415

    model_ref, fetch = _model(args)
    local = isinstance(model_ref, Path)
    text_file = args.file or (str(model_ref / HELDOUT) if local and (model_ref / HELDOUT).is_file() else None)
    if text_file is None:
        lacks = f"{model_ref} holds no {HELDOUT}" if local else \
            f"{model_ref} is a hub model (only its config, weights and vocabulary are fetched, no {HELDOUT})"
        raise ValueError(f"{lacks}: give a text FILE (or - for stdin) to evaluate")
    model, tok = _load(model_ref, fetch, args.dtype, args.device)
    if args.char_level and not _is_char_vocabulary(tok):
        raise ValueError("--char-level reports bits per character, but this model's vocabulary is of words: "
                         "its perplexity is per word")
    protocol, source = _protocol(args, model_ref, model.config)
    ids = _encode_text(tok, text_file)
    unk = tok.unk_token_id
    unk_share = float((ids == unk).double().mean()) if unk is not None and ids.numel() else 0.0
    with use_backend(args.backend), torch.no_grad():
        result = evaluate(model, ids, char_level=args.char_level, progress=None if not args.json else False,
                          **protocol)
    if unk_share > UNK_WARN_SHARE:
        print(f"txl-fast: warning: {unk_share:.1%} of the tokens are <unk> (words outside the vocabulary): "
              "predicting <unk> is easy, so this perplexity flatters the model", file=sys.stderr)
    text_name = "standard input" if text_file == "-" else text_file
    report = {"model": str(model_ref), "text": text_name, "tokens": result.tokens, "unk_share": unk_share,
              "nll": result.nll, "perplexity": result.perplexity, "bpc": result.bpc,
              "tokens_per_s": result.tokens_per_s, "seconds": result.seconds, "peak_rss_mb": _peak_rss_mb(),
              "backend": args.backend, "dtype": args.dtype, "threads": args.threads, "protocol_source": source,
              **protocol}
    if args.json:
        print(_strict_json(report))
    else:
        measure = f"bits per character {result.bpc:.4f}" if result.bpc is not None else \
            f"perplexity {result.perplexity:.2f}"
        print(f"{measure} = exp(mean NLL) over {result.tokens:,} predicted tokens of {text_name} "
              f"({unk_share:.1%} <unk>); protocol from {source}: segments of tgt_len {protocol['tgt_len']}, "
              f"memory mem_len {protocol['mem_len']} carried across them, clamp_len {protocol['clamp_len']}, "
              f"same_length {'on' if protocol['same_length'] else 'off'}, {protocol['init_mems']} start, "
              f"batch {protocol['batch_size']}; {result.tokens_per_s:,.0f} tokens/s, "
              f"peak memory {report['peak_rss_mb']:.0f} MB, backend {args.backend}")
    return 0


SCORE_COLUMNS = ("document", "sentence", "token", "text", "id", "unk", "logprob", "surprisal")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices") from None


def _new_output(path: str, overwrite: bool, what: str) -> Path:
    """A path to write ``what`` to: its directory exists, and it is no directory, nor an existing
    file unless ``overwrite``."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{what} {out} is a directory: give a file name")
    if out.exists() and not overwrite:
        raise ValueError(f"{what} {out} exists: pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"{what} {out}: the directory {out.parent} does not exist")
    return out


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` a temporary file beside ``path``, renamed over it once complete: an error
    leaves no half-written file and the old one in place."""
    import tempfile  # noqa: PLC0415

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_lines(lines):
    def write(path: Path) -> None:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.writelines(lines)

    return write


def _score_lines(rows, fmt: str):
    if fmt == "tsv":
        yield "\t".join(SCORE_COLUMNS) + "\n"
    for r in rows:
        values = (r.document, r.sentence, r.token, r.text, r.id, int(r.unk), f"{r.logprob:.6f}", f"{r.surprisal:.6f}")
        if fmt == "tsv":
            yield "\t".join(map(str, values)) + "\n"
        else:
            yield json.dumps(dict(zip(SCORE_COLUMNS, (*values[:5], r.unk, round(r.logprob, 6),
                                                      round(r.surprisal, 6)))), ensure_ascii=False) + "\n"


def cmd_score(args) -> int:
    import torch  # noqa: PLC0415

    from txl_fast import use_backend  # noqa: PLC0415
    from txl_fast.score import score_text  # noqa: PLC0415

    if args.layers and not args.states:
        raise ValueError("--layers needs --states FILE.safetensors: the hidden states are written there")
    if args.states and not args.layers:
        raise ValueError("--states needs --layers: which hidden states to write")
    out = _new_output(args.output, args.overwrite, "--output") if args.output else None
    states = _new_output(args.states, args.overwrite, "--states") if args.states else None
    if out is not None and states is not None and out.resolve() == states.resolve():
        raise ValueError("--output and --states name the same file")
    model_ref, fetch = _model(args)
    if args.file != "-" and Path(args.file).is_dir():
        raise ValueError(f"{args.file} is a directory: give a text file (or - for stdin)")
    if args.file != "-" and not Path(args.file).is_file():
        raise FileNotFoundError(f"text file {args.file} does not exist")
    model, tok = _load(model_ref, fetch, args.dtype, args.device)
    protocol, _ = _protocol(args, model_ref, model.config)
    protocol["batch_size"] = args.batch_size or 8
    if args.file == "-":
        text = _read_stdin_text()
    else:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.file} is not UTF-8 text (byte at offset {e.start})") from None
    distributed = _start_process_group(args.device)
    try:
        with use_backend(args.backend), torch.no_grad():
            rows, scores = score_text(model, tok, text, pretokenized=args.pretokenized, layers=args.layers, **protocol)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0                                     # under torchrun rank 0 writes everything, in input order
    if states is not None:
        from safetensors.torch import save_file  # noqa: PLC0415

        n_states = model.config.n_layer + 1
        layers = dict.fromkeys(x % n_states for x in args.layers)                   # as score() indexes them
        tensors = {f"layer{layer}": torch.cat([s.hidden_states[layer] for s in scores]
                                              or [torch.empty(0, model.config.d_model)]).contiguous()
                   for layer in layers}
        _write_atomically(states, lambda tmp: save_file(tensors, str(tmp), metadata={"rows": "one per output row"}))
    if out is None:
        sys.stdout.writelines(_score_lines(rows, args.format))
    else:
        _write_atomically(out, _write_lines(_score_lines(rows, args.format)))
    return 0


def _start_process_group(device: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1): start the process group (nccl on CUDA, gloo on the CPU)."""
    import torch.distributed as dist  # noqa: PLC0415

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def cmd_generate(args) -> int:
    from txl_fast import use_cpu_compile  # noqa: PLC0415
    from txl_fast.inference import _check_sampling  # noqa: PLC0415

    chosen = {k: getattr(args, k) for k in SAMPLING if getattr(args, k) is not None}
    if args.greedy and chosen:
        raise ValueError(f"--greedy takes the most likely token: it cannot be combined with "
                         f"{', '.join('--' + k.replace('_', '-') for k in chosen)}")
    sampling = {**SAMPLING, **chosen}
    _check_sampling(args.max_new_tokens, not args.greedy, **sampling)        # before the model loads
    if args.compile and _check_device(args.device).type != "cpu":
        raise ValueError(f"--compile compiles the decode step for the CPU; on {args.device} the Triton kernels run")
    with use_cpu_compile(args.compile):                 # no C++ compiler: refused here, before the model loads
        return _generate(args, sampling)


def _generate(args, sampling: dict) -> int:
    import torch  # noqa: PLC0415

    from txl_fast import use_backend  # noqa: PLC0415

    model, tok = _load(*_model(args), args.dtype, args.device)
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenisation")
    generator = torch.Generator().manual_seed(args.seed)
    eos = tok.eos_token_id
    print(args.prompt, end="", flush=True)
    line: list[int] = []                               # the ids of the line being generated

    def show(ids: list[int], first: bool) -> str:
        """Detokenised text of a line's ids; the first line continues the prompt (detokenised with
        it, so that "The" + [",", "a"] prints "The, a")."""
        if not first:
            return tok.decode(ids)
        prompt_text, text = tok.decode(prompt_ids), tok.decode(prompt_ids + ids)
        return text[len(prompt_text):] if text.startswith(prompt_text) else " " + tok.decode(ids)

    state = {"first": True}

    def stream(token):                               # a line is printed when its <eos> arrives
        token_id = int(token[0])
        if token_id != eos:
            line.append(token_id)
            return
        print(show(line, state["first"]), flush=True)
        line.clear()
        state["first"] = False

    with use_backend(args.backend):
        model.generate(torch.tensor([prompt_ids], device=next(model.parameters()).device),
                       max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, generator=generator,
                       init_mems="empty", streamer=stream, **sampling)
    print(show(line, state["first"]) if line else "")
    return 0


def _refuse_to_replace(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is an existing file: give a directory")


def cmd_train(args) -> int:
    import tempfile  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel  # noqa: PLC0415
    from txl_fast.checkpoint import CONFIG, SAFETENSORS  # noqa: PLC0415
    from txl_fast.tokenizer import VOCAB_JSON, TransfoXLTokenizer  # noqa: PLC0415
    from txl_fast.train import STATE_FILE, STATE_JSON, TrainConfig, default_corpus, train, train_rows  # noqa: PLC0415

    model_files = (CONFIG, SAFETENSORS, STATE_JSON, STATE_FILE, VOCAB_JSON, METRICS, HELDOUT)

    if not args.out.strip():
        raise ValueError("--out is empty: give the checkpoint directory")
    out = Path(args.out)
    _refuse_to_replace(out, "--out")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the model in --out, --overwrite replaces it: choose one")
    holds_model = out.is_dir() and any((out / name).exists() for name in model_files)
    if holds_model and not (args.resume or args.overwrite):
        raise ValueError(f"{out} already holds a model: --resume to continue its training, --overwrite to replace it")
    if args.resume:
        if not (out / STATE_JSON).is_file():
            raise FileNotFoundError(f"nothing to resume in {out}: no {STATE_JSON}")
        try:
            done = json.loads((out / STATE_JSON).read_text())["step"]
            if not is_int(done) or done < 0:
                raise ValueError(f"step {done!r} is not a step count")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{out / STATE_JSON} is damaged ({e}): cannot resume") from None
        if args.steps < done:
            raise ValueError(f"{out} has already trained {done} steps: --steps {args.steps} must be at least that")
        try:                                             # the optimizer state, read before a file is written
            from safetensors import safe_open  # noqa: PLC0415

            with safe_open(str(out / STATE_FILE), "pt"):
                pass
        except FileNotFoundError:
            raise FileNotFoundError(f"nothing to resume in {out}: no {STATE_FILE}") from None
        except Exception as e:  # noqa: BLE001 (safetensors' own error types)
            raise ValueError(f"{out / STATE_FILE} is damaged ({e}): cannot resume") from None
    if args.d_model % args.n_head:
        raise ValueError(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head} "
                         "(each head gets d_model / n_head dimensions)")
    if args.text and Path(args.text).is_dir():
        raise ValueError(f"--text {args.text} is a directory: give a text file")
    if args.text and not Path(args.text).is_file():
        raise FileNotFoundError(f"text file {args.text} does not exist")
    try:
        text = Path(args.text).read_text(encoding="utf-8") if args.text else default_corpus()
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {args.text} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") \
            from None
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
    if args.resume:
        config = TransfoXLConfig.from_json_file(out / CONFIG)          # the model being continued
    else:
        vocab = len(tok)
        cutoffs = [c for c in (vocab // 4, vocab // 2) if 0 < c < vocab] if vocab >= 8 else []
        config = TransfoXLConfig(vocab_size=vocab, cutoffs=sorted(set(cutoffs)), d_model=args.d_model,
                                 d_embed=args.d_model, n_head=args.n_head, d_head=args.d_model // args.n_head,
                                 d_inner=4 * args.d_model, div_val=2 if cutoffs else 1, n_layer=args.n_layer,
                                 mem_len=args.mem_len, clamp_len=4 * args.mem_len,
                                 same_length=args.mem_len > 0,         # HF's same_length mask needs a memory
                                 dropout=args.dropout)
    train_rows(train_ids, args.batch_size)            # too few tokens: refused before any file is touched
    torch.manual_seed(args.seed)
    model = TransfoXLLMHeadModel(config)
    if args.overwrite:                                 # the old model's files go, not only those rewritten
        for name in model_files:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_vocabulary(out)
    if valid_ids is not None:
        (out / HELDOUT).write_text("\n".join(lines[split:]) + "\n", encoding="utf-8")
    else:
        (out / HELDOUT).unlink(missing_ok=True)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, tgt_len=args.tgt_len, lr=args.lr,
                      warmup=min(args.warmup, args.steps), seed=args.seed, checkpoint_every=args.checkpoint_every)
    metrics = train(model, train_ids, valid_ids, cfg, out_dir=str(out), resume=args.resume)
    print(_strict_json(metrics))
    return 0


def cmd_info(args) -> int:
    import dataclasses  # noqa: PLC0415

    model_ref, fetch = _model(args)
    model, tok = _load(model_ref, fetch, "float32", "cpu")
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = dataclasses.asdict(model.config)
    cfg.pop("extra")
    print(f"model:       {model_ref}" + (f" (Hugging Face hub, revision {args.revision})" if args.revision else ""))
    print(f"parameters:  {n_params:,} ({n_bytes / 2**20:.1f} MiB as stored)")
    print(f"vocabulary:  {len(tok):,} symbols")
    mem_bytes = model.config.n_layer * model.config.mem_len * model.config.d_model * 4
    print(f"memory:      {mem_bytes / 2**20:.2f} MiB of mems per sequence in the batch (fp32)")
    print(f"cpu:         {_cpu_dtype_line()}")
    for key, value in cfg.items():
        print(f"  {key:26s} {value}")
    return 0


def _cpu_dtype_line() -> str:
    """This CPU, and whether it multiplies bf16 natively (then bf16 is worth trying; nothing switches by itself)."""
    from txl_fast import dtypes  # noqa: PLC0415
    from txl_fast.bench.machine import cpu_name  # noqa: PLC0415

    flags = dtypes.cpu_flags()
    native = [f.upper().replace("_", "-") for f in ("amx_bf16", "avx512_bf16") if flags[f]]
    if native:
        return (f"{cpu_name()}: native bf16 matmul ({', '.join(native)}); eval and generate run in float32 unless "
                f"asked: try --dtype bfloat16")
    return f"{cpu_name()}: no native bf16 matmul (neither AMX-BF16 nor AVX512-BF16): float32 is the fast dtype here"


def cmd_convert(args) -> int:
    from txl_fast.convert import convert  # noqa: PLC0415

    written = convert(args.src, args.dst, revision=args.revision, local_files_only=args.local_files_only)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_kernels(args) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    from txl_fast import backend  # noqa: PLC0415

    if not backend.triton_available():
        raise ValueError('the kernel report needs triton, which is not installed here: pip install "txl_fast[triton]"')
    from txl_fast.kernels import aot  # noqa: PLC0415
    rows = aot.report()
    bad = [r for r in rows if aot.problems(r)]
    if args.json:
        print(json.dumps(rows))
    else:
        print(aot.format_table(rows))
        for r in bad:
            print(f"problem: {r['kernel']} {r['specialisation']} sm_{r['arch']}: {'; '.join(aot.problems(r))}")
        print(f"{len(rows)} compiles, {len(bad)} with a problem (failed, shared memory over the limit, spills over "
              f"the allowance, tl.dot off tensor cores)")
    return 1 if bad else 0


def cmd_bench(args) -> int:
    from txl_fast.bench.runner import main as bench_main  # noqa: PLC0415

    return bench_main(args.bench_args)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, as every other error of the command."""

    def error(self, message):
        self.exit(2, f"txl-fast: error: {message} (see {self.prog} --help)\n")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


POSITIVE, NON_NEGATIVE = int_at_least(1), int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="txl-fast", description="Transformer-XL runtime with custom kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    threads = _Parser(add_help=False)
    threads.add_argument("--threads", type=POSITIVE, default=physical_cores(),
                         help="CPU threads for torch (default: the physical cores, here %(default)s); "
                              "another busy process on the machine slows every thread: use fewer then")

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, parents=[threads])

    def hub_args(p):
        p.add_argument("--revision", help="branch, tag or commit of a model named on the Hugging Face hub "
                                          "(default: main)")
        p.add_argument("--local-files-only", dest="local_files_only", action="store_true",
                       help="a hub model from the local cache only, nothing downloaded (as HF_HUB_OFFLINE=1)")

    def model_source_args(p):
        p.add_argument("--model", help="checkpoint directory (config.json, model.safetensors, vocab.json), or a "
                                       "Hugging Face hub name such as transfo-xl/transfo-xl-wt103; default: the "
                                       "embedded model")
        hub_args(p)

    def model_args(p):
        model_source_args(p)
        p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "naive"],
                       help="default: %(default)s")
        p.add_argument("--dtype", default="float32",
                       help="float32 (default), bfloat16 (fast where the CPU multiplies bf16 natively: see "
                            "`txl-fast info`), float64; float16 on CUDA or a CPU with native fp16 matmul")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")

    p = command("eval", "perplexity of a text file or stdin")
    p.add_argument("file", nargs="?", help=f"text file, or - for stdin (default: the model's {HELDOUT}, "
                                            "the text held out of its training)")
    model_args(p)
    p.add_argument("--preset", choices=["wt103", "enwik8", "text8"], help="the paper's evaluation protocol")
    protocol = "default: the protocol stored with the model (its training's), else its config and tgt_len 128"
    p.add_argument("--tgt-len", dest="tgt_len", type=POSITIVE, help=f"segment length ({protocol})")
    p.add_argument("--mem-len", dest="mem_len", type=NON_NEGATIVE, help="memory length, 0 for none")
    p.add_argument("--clamp-len", dest="clamp_len", type=NON_NEGATIVE, help="largest relative distance, 0: no clamp")
    p.add_argument("--same-length", dest="same_length", choices=["on", "off"],
                   help="every query sees as many keys (off by itself with --mem-len 0)")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE)
    p.add_argument("--init-mems", dest="init_mems", choices=["empty", "zeros"])
    p.add_argument("--char-level", action="store_true",
                   help="report bits per character (character vocabularies only)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=cmd_eval)

    p = command("score", "per-token log-probability and surprisal of documents (TSV or JSON lines)")
    p.add_argument("file", help="UTF-8 text, or - for stdin: documents separated by blank lines, a sentence per line")
    model_args(p)
    p.add_argument("--format", choices=["tsv", "jsonl"], default="tsv", help="default: %(default)s")
    p.add_argument("--output", help="write here instead of stdout (replaced only with --overwrite)")
    p.add_argument("--pretokenized", action="store_true",
                   help="the text is tokenised already: split at whitespace only")
    p.add_argument("--layers", type=_layer_list,
                   help="hidden states to write to --states, e.g. 0,6,18 (0: the embeddings, n_layer: the last)")
    p.add_argument("--states", help="safetensors file for --layers: a (tokens, d_model) tensor per layer, "
                                    "rows in the output's order")
    p.add_argument("--overwrite", action="store_true", help="replace existing --output / --states files")
    p.add_argument("--preset", choices=["wt103", "enwik8", "text8"], help="the paper's evaluation protocol")
    p.add_argument("--tgt-len", dest="tgt_len", type=POSITIVE, help=f"segment length ({protocol})")
    p.add_argument("--mem-len", dest="mem_len", type=NON_NEGATIVE, help="memory length, 0 for none")
    p.add_argument("--clamp-len", dest="clamp_len", type=NON_NEGATIVE, help="largest relative distance, 0: no clamp")
    p.add_argument("--same-length", dest="same_length", choices=["on", "off"],
                   help="every query sees as many keys (off by itself with --mem-len 0)")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE, help="documents read at once (default: 8)")
    p.add_argument("--init-mems", dest="init_mems", choices=["empty", "zeros"],
                   help="each document's start: empty memory (default) or HF's zero memory")
    p.set_defaults(func=cmd_score)

    p = command("generate", "continue a prompt")
    p.add_argument("prompt", nargs="?", default="The", help="default: %(default)s")
    model_args(p)
    p.add_argument("--max-new-tokens", type=NON_NEGATIVE, default=30, help="default: %(default)s")
    p.add_argument("--greedy", action="store_true",
                   help="the most likely token at each step, instead of sampling")
    p.add_argument("--temperature", type=float, help=f"sampling temperature (default: {SAMPLING['temperature']})")
    p.add_argument("--top-k", type=NON_NEGATIVE, help=f"sample among the k likeliest, 0: all "
                                                       f"(default: {SAMPLING['top_k']})")
    p.add_argument("--top-p", type=float, help=f"sample within the smallest set of this probability "
                                               f"(default: {SAMPLING['top_p']})")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step's attention (and bf16 one-row products) for the CPU (torch.compile, "
                        "Inductor: needs a C++ compiler, takes seconds once; then faster steps, bf16 scores "
                        "kept in float32)")
    p.set_defaults(func=cmd_generate)

    p = command("train", "train a small model")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--text", help="training text (default: Python's documentation topics)")
    p.add_argument("--heldout", type=_fraction, default=0.1,
                   help=f"fraction of lines held out, saved as {HELDOUT} (default: %(default)s)")
    p.add_argument("--steps", type=POSITIVE, default=1000, help="total steps, resumed ones included (default: %(default)s)")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="default: %(default)s")
    p.add_argument("--tgt-len", type=POSITIVE, default=64, help="default: %(default)s")
    p.add_argument("--mem-len", type=NON_NEGATIVE, default=64, help="0: no memory (default: %(default)s)")
    p.add_argument("--d-model", type=POSITIVE, default=128, help="default: %(default)s")
    p.add_argument("--n-head", type=POSITIVE, default=4, help="default: %(default)s")
    p.add_argument("--n-layer", type=POSITIVE, default=4, help="default: %(default)s")
    p.add_argument("--dropout", type=_fraction, default=0.1, help="default: %(default)s")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="default: %(default)s")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=100, help="default: %(default)s")
    p.add_argument("--min-freq", type=POSITIVE, default=2, help="default: %(default)s")
    p.add_argument("--checkpoint-every", type=POSITIVE, default=200, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (its configuration: the size flags are not used)")
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    p.set_defaults(func=cmd_train)

    p = command("info", "model summary")
    model_source_args(p)
    p.set_defaults(func=cmd_info)

    p = command("convert", "HF TransfoXL directory or hub name -> config.json + model.safetensors + vocab.json")
    p.add_argument("src", help="HF model directory, or a Hugging Face hub name such as transfo-xl/transfo-xl-wt103")
    p.add_argument("dst")
    hub_args(p)
    p.set_defaults(func=cmd_convert)

    p = command("kernels", "ahead-of-time compile report of the Triton kernels for sm_80 / sm_90")
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
        import torch  # noqa: PLC0415

        if args.threads > (os.cpu_count() or 1):     # thousands of threads: the OpenMP runtime crashes
            raise ValueError(f"--threads {args.threads}: this machine has {os.cpu_count()} CPUs")
        if sys.stdout is None:
            return 1                                     # started with stdout closed: nothing can be shown
        torch.set_num_threads(args.threads)
        code = args.func(args)
        sys.stdout.flush()                 # a closed pipe shows here, inside the handler below
        return code
    except (ValueError, FileNotFoundError) as e:
        print(f"txl-fast: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader left (`txl-fast info | head -1`): stop quietly, as Python's documentation advises,
        # pointing stdout at /dev/null so that the interpreter's last flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:                                 # e.g. stdout on a full disk: ENOSPC
        if e.errno not in (errno.ENOSPC, errno.EIO) or e.filename is not None or sys.stdout is None:
            raise
        print(f"txl-fast: error: cannot write the output: {e.strerror}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
