"""The txl-fast command line: every subcommand, the embedded default model, train/resume, convert."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from txl_fast.cli import DEFAULT_MODEL, build_parser, main

SUBCOMMANDS = ["eval", "generate", "score", "train", "info", "convert", "kernels", "bench"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: txl-fast " + command in capsys.readouterr().out


def test_every_subcommand_is_listed():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


def test_eval_default_model_prints_the_documented_perplexity(capsys):
    metrics = json.loads((DEFAULT_MODEL / "metrics.json").read_text())
    assert main(["eval", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == metrics["heldout_tokens"]
    assert report["perplexity"] == pytest.approx(metrics["heldout_ppl"], rel=1e-4)
    readme = (DEFAULT_MODEL.parents[1] / "README.md").read_text()
    assert f"{metrics['heldout_ppl']:.2f}" in readme, "README must state the default model's perplexity"


def test_eval_from_stdin_and_flags(capsys, monkeypatch, tmp_path):
    import io

    text = (DEFAULT_MODEL / "heldout.txt").read_text().splitlines()[:20]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(text) + "\n"))
    assert main(["eval", "-", "--model", str(DEFAULT_MODEL), "--tgt-len", "16", "--mem-len", "32",
                 "--same-length", "off", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tgt_len"] == 16 and report["mem_len"] == 32 and report["same_length"] is False
    assert report["perplexity"] > 1


def test_generate_is_deterministic_with_a_seed(capsys):
    assert main(["generate", "The", "--max-new-tokens", "8", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "The", "--max-new-tokens", "8", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("The") and 2 <= len(first.split()) <= 9     # <eos> prints a newline, not a word


def test_generate_compile_gives_the_same_text(capsys, monkeypatch):
    """--compile: the decode attention compiled for the CPU, the same greedy continuation; refused
    with one line (exit 2) without a C++ compiler and off the CPU."""
    args = ["generate", "The", "--max-new-tokens", "12", "--greedy"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main(args + ["--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert main(args + ["--compile", "--device", "cuda"]) == 2        # no CUDA here, or CUDA: not compiled
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("CUDA is not available" in err or "compiles the decode step for the CPU" in err)
    from torch._inductor import cpp_builder

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: (_ for _ in ()).throw(RuntimeError("no g++")))
    assert main(args + ["--compile"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a C++ compiler" in err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "vocab_size" in out


def test_errors_are_one_line_and_nonzero(capsys, tmp_path):
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("txl-fast: error:") and "\n" not in err


TOY = "the cat sat on the mat .\nthe dog sat on the log .\n" * 60


def test_train_smoke_resume_and_loss_decreases(tmp_path, capsys):
    text = tmp_path / "toy.txt"
    text.write_text(TOY)
    out = tmp_path / "run"
    common = ["train", "--out", str(out), "--text", str(text), "--d-model", "32", "--n-head", "2",
              "--n-layer", "1", "--tgt-len", "8", "--mem-len", "8", "--batch-size", "4", "--checkpoint-every", "5",
              "--warmup", "2", "--lr", "3e-3"]
    assert main(common + ["--steps", "5"]) == 0
    early = json.loads(capsys.readouterr().out)
    state = json.loads((out / "training_state.json").read_text())
    assert state["step"] == 5 and (out / "model.safetensors").exists() and (out / "vocab.json").exists()
    assert main(common + ["--steps", "60", "--resume"]) == 0            # continues from step 5
    late = json.loads(capsys.readouterr().out)
    assert late["steps"] == 60 and json.loads((out / "training_state.json").read_text())["step"] == 60
    assert late["valid_ppl"] < early["valid_ppl"] / 2
    from txl_fast import TransfoXLLMHeadModel, evaluate
    from txl_fast.tokenizer import TransfoXLTokenizer

    model = TransfoXLLMHeadModel.from_pretrained(out)
    tok = TransfoXLTokenizer.from_pretrained(out)
    ids = torch.tensor(tok.encode(TOY.replace("\n", " <eos> ")))
    assert evaluate(model, ids, tgt_len=8, mem_len=8, progress=False).perplexity < len(tok) / 2


def test_convert_hf_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Hello world , this is 1,000.5 tokens .\nAnother line of text here .\n" * 3)
    hf_tok = transformers.TransfoXLTokenizer(special=["<unk>", "<eos>"], lower_case=False)
    hf_tok.count_file(str(corpus), add_eos=True)
    hf_tok.build_vocab()
    src = tmp_path / "hf"
    src.mkdir()
    hf_tok.save_vocabulary(str(src))
    from tests.helpers import config_kwargs
    from tests.helpers import hf_model

    hf = hf_model(transformers.TransfoXLLMHeadModel, config_kwargs("default", vocab_size=len(hf_tok), cutoffs=[5, 10]))
    hf.save_pretrained(src, safe_serialization=False)
    assert (src / "pytorch_model.bin").exists() and (src / "vocab.pkl").exists()
    dst = tmp_path / "ours"
    assert main(["convert", str(src), str(dst)]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    from txl_fast import TransfoXLLMHeadModel
    from txl_fast.tokenizer import TransfoXLTokenizer

    ids = torch.tensor([TransfoXLTokenizer.from_pretrained(dst).encode("Hello world , another line")])
    assert ids.tolist() == [hf_tok.encode("Hello world , another line")]
    ours = TransfoXLLMHeadModel.from_pretrained(dst)
    assert (ours(ids).prediction_scores - hf(ids).prediction_scores).abs().max() <= 1e-5


def test_convert_refuses_malicious_and_truncated_files(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"vocab_size": 10, "cutoffs": [], "d_model": 8, "d_embed": 8,
                                                 "n_head": 2, "d_head": 4, "d_inner": 8, "div_val": 1,
                                                 "n_layer": 1}))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"w": Evil()}, src / "pytorch_model.bin")
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
    from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel

    model = TransfoXLLMHeadModel(TransfoXLConfig.from_json_file(src / "config.json"))
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    (src / "vocab.pkl").write_bytes(pickle.dumps({"idx2sym": ["a"], "x": Evil()}))
    assert main(["convert", str(src), str(tmp_path / "dst2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("txl-fast: error:") and "\n" not in err and not (tmp_path / "pwned").exists()
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    assert main(["convert", str(src), str(tmp_path / "dst3")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the newcomer's path


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of an in-process call; argparse's errors exit (SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    err = err.strip()
    assert err.startswith("txl-fast: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("\n".join((DEFAULT_MODEL / "heldout.txt").read_text().splitlines()[:12]) + "\n")
    return path


def tiny_train_args(out, text, *extra):
    return ["train", "--out", str(out), "--text", str(text), "--d-model", "16", "--n-head", "2", "--n-layer", "1",
            "--tgt-len", "8", "--batch-size", "4", "--warmup", "1", "--checkpoint-every", "2", "--heldout", "0.2",
            "--threads", "1", *extra]


def test_train_without_memory_saves_validates_and_eval_reuses_its_protocol(tmp_path, capsys):
    text = tmp_path / "toy.txt"
    text.write_text(TOY)
    out = tmp_path / "run"
    code, stdout, err = run_cli(tiny_train_args(out, text, "--mem-len", "0", "--steps", "3"), capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(stdout) and metrics["steps"] == 3 and metrics["valid_ppl"] > 1
    assert metrics["eval_protocol"] == {"tgt_len": 8, "mem_len": 0, "clamp_len": 0, "same_length": False,
                                        "batch_size": 1, "init_mems": "empty"}
    assert (out / "heldout.txt").read_text() == "\n".join(TOY.splitlines()[int(len(TOY.splitlines()) * 0.8):]) + "\n"
    # eval --model DIR: the stored protocol on the stored held-out text, the number train printed
    code, stdout, err = run_cli(["eval", "--model", str(out), "--json", "--threads", "1"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["tgt_len"] == 8 and report["mem_len"] == 0 and report["text"] == str(out / "heldout.txt")
    assert report["perplexity"] == pytest.approx(metrics["valid_ppl"], rel=1e-6)
    assert report["tokens"] == metrics["valid_tokens"]
    # explicit flags override it; --mem-len 0 on a model trained with memory works too
    code, stdout, err = run_cli(["eval", "--model", str(out), "--json", "--tgt-len", "5", "--mem-len", "0"], capsys)
    assert code == 0 and json.loads(stdout)["tgt_len"] == 5


def test_eval_protocol_is_the_same_whichever_way_the_model_is_named(short_text, capsys):
    reports = []
    for argv in (["eval", str(short_text), "--json"], ["eval", str(short_text), "--json", "--model", str(DEFAULT_MODEL)]):
        code, stdout, err = run_cli(argv, capsys)
        assert code == 0, err
        reports.append(json.loads(stdout))
    stored = json.loads((DEFAULT_MODEL / "metrics.json").read_text())["eval_protocol"]
    for report in reports:
        assert {k: report[k] for k in stored} == stored
    assert reports[0]["perplexity"] == reports[1]["perplexity"]


def test_eval_explains_its_numbers_in_one_line(short_text, capsys):
    code, stdout, err = run_cli(["eval", str(short_text)], capsys)
    assert code == 0, err
    line = stdout.strip()
    assert "\n" not in line and line.startswith("perplexity ")
    for part in ("exp(mean NLL)", "predicted tokens of", "<unk>", "training protocol", "tgt_len 64", "mem_len 64"):
        assert part in line, line


def test_train_refuses_to_replace_a_model(tmp_path, capsys):
    text = tmp_path / "toy.txt"
    text.write_text(TOY)
    out = tmp_path / "run"
    assert run_cli(tiny_train_args(out, text, "--steps", "2"), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(*run_cli(tiny_train_args(out, text, "--steps", "2"), capsys)[::2],
                          "already holds a model", "--resume", "--overwrite")
    assert_one_line_error(*run_cli(tiny_train_args(out, text, "--steps", "1", "--resume"), capsys)[::2],
                          "already trained 2 steps")
    assert_one_line_error(*run_cli(tiny_train_args(out, text, "--steps", "4", "--resume", "--overwrite"),
                                   capsys)[::2], "choose one")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before          # nothing touched
    # --overwrite and --resume with inputs that cannot train: refused before the old model is touched
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for extra, needle in ((["--overwrite", "--lr", "nan"], "argument --lr"),
                          (["--overwrite", "--lr", "inf"], "argument --lr"),
                          (["--overwrite", "--heldout", "0.999"], "too few"),
                          (["--resume", "--steps", "3"], "too few")):
        source = text if "--heldout" in extra else empty
        args = tiny_train_args(out, source, "--steps", "2") + extra
        assert_one_line_error(*run_cli(args, capsys)[::2], needle)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, extra
    code, _, err = run_cli(tiny_train_args(out, text, "--steps", "3", "--overwrite", "--seed", "1"), capsys)
    assert code == 0, err
    assert json.loads((out / "training_state.json").read_text())["step"] == 3


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--steps", "-1"], "argument --steps: -1 must be at least 1"),
        (["--steps", "2", "--d-model", "18", "--n-head", "4"], "not divisible by --n-head 4"),
        (["--steps", "2", "--mem-len", "-3"], "argument --mem-len: -3 must be at least 0"),
        (["--steps", "2", "--heldout", "1.5"], "argument --heldout"),
    ],
)
def test_train_bad_numbers(tmp_path, capsys, extra, needle):
    text = tmp_path / "toy.txt"
    text.write_text(TOY)
    assert_one_line_error(*run_cli(tiny_train_args(tmp_path / "run", text, *extra), capsys)[::2], needle)
    assert not (tmp_path / "run").exists()


def test_train_and_convert_name_what_is_wrong_with_their_inputs(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "latin1.txt").write_bytes(b"\xd3\xff abc\n")
    assert_one_line_error(*run_cli(tiny_train_args(tmp_path / "o", tmp_path / "adir"), capsys)[::2],
                          "is a directory")
    assert_one_line_error(*run_cli(tiny_train_args(tmp_path / "o", tmp_path / "latin1.txt"), capsys)[::2],
                          "is not UTF-8 text (byte 0xd3 at offset 0)")
    assert_one_line_error(*run_cli(["convert", str(tmp_path / "latin1.txt"), str(tmp_path / "c")], capsys)[::2],
                          "is a file: give the HF model's directory")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_resume_refuses_a_damaged_training_state_before_writing(tmp_path, capsys):
    text = tmp_path / "toy.txt"
    text.write_text(TOY)
    out = tmp_path / "run"
    assert run_cli(tiny_train_args(out, text, "--steps", "2"), capsys)[0] == 0
    state = out / "training_state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])                       # truncated
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(*run_cli(tiny_train_args(out, text, "--steps", "3", "--resume"), capsys)[::2],
                          "training_state.safetensors is damaged")
    meta = json.loads((out / "training_state.json").read_text())
    (out / "training_state.json").write_text(json.dumps({**meta, "step": -5}))
    assert_one_line_error(*run_cli(tiny_train_args(out, text, "--steps", "3", "--resume"), capsys)[::2],
                          "step -5 is not a step count")
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {k: v for k, v in after.items() if k != "training_state.json"} == \
        {k: v for k, v in before.items() if k != "training_state.json"}


def test_empty_out_threads_beyond_the_cpus_and_closed_streams_are_one_line_errors(tmp_path, capsys, monkeypatch):
    text = tmp_path / "toy.txt"
    text.write_text(TOY)
    assert_one_line_error(*run_cli(tiny_train_args("", text, "--steps", "2"), capsys)[::2], "--out is empty")
    assert_one_line_error(*run_cli(["info", "--threads", str(10 * (os.cpu_count() or 1))], capsys)[::2],
                          "CPUs")                                   # thousands of threads crash OpenMP
    monkeypatch.setattr("sys.stdin", None)
    assert_one_line_error(*run_cli(["eval", "-"], capsys)[::2], "stdin is closed")


def test_generate_sampling_numbers_refused_before_the_model_loads(capsys, monkeypatch):
    import txl_fast.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model loaded before the check"))
    for flag, value, needle in (("--temperature", "inf", "temperature must be a finite"),
                                ("--temperature", "nan", "temperature must be a finite"),
                                ("--top-p", "2", "top_p must be"), ("--top-p", "nan", "top_p must be")):
        code, out, err = run_cli(["generate", flag, value], capsys)
        assert_one_line_error(code, err, needle)
        assert out == ""                                            # the prompt is not printed either


def test_train_and_convert_refuse_an_existing_file_as_directory(tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    text = tmp_path / "toy.txt"
    text.write_text(TOY)
    assert_one_line_error(*run_cli(tiny_train_args(target, text, "--steps", "2"), capsys)[::2], "existing file")
    src = tmp_path / "src"
    src.mkdir()
    assert_one_line_error(*run_cli(["convert", str(src), str(target)], capsys)[::2], "existing file")
    assert target.read_text() == "keep me"
    assert_one_line_error(*run_cli(["convert", str(src), str(target / "sub")], capsys)[::2],
                          "is not a directory")


@pytest.mark.parametrize("key,value", [("same_length", "no"), ("tgt_len", "64"), ("mem_len", -1),
                                       ("init_mems", "full"), ("batch_size", True)])
def test_a_stored_protocol_of_the_wrong_type_is_refused_not_misread(tmp_path, capsys, key, value):
    model = _copy_default_model(tmp_path)
    metrics = json.loads((model / "metrics.json").read_text())
    metrics["eval_protocol"][key] = value
    (model / "metrics.json").write_text(json.dumps(metrics))
    assert_one_line_error(*run_cli(["eval", "--model", str(model)], capsys)[::2],
                          "metrics.json: eval_protocol." + key)


def teststrict_json_writes_non_finite_numbers_as_null():
    from txl_fast.cli import strict_json

    text = strict_json({"nll": float("nan"), "rows": [float("inf"), 1.5], "n": 3})
    assert json.loads(text) == {"nll": None, "rows": [None, 1.5], "n": 3} and "NaN" not in text


def _copy_default_model(tmp_path):
    import shutil

    return Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "model"))


def test_model_directory_problems(tmp_path, capsys):
    model = _copy_default_model(tmp_path)
    (model / "config.json").write_text("{}")
    assert_one_line_error(*run_cli(["info", "--model", str(model)], capsys)[::2], "lacks required fields")
    model = _copy_default_model(tmp_path / "b")
    from txl_fast.tokenizer import TransfoXLTokenizer

    small = TransfoXLTokenizer(special=["<unk>", "<eos>"])
    small.count_sents([[f"w{i}" for i in range(100)]])
    small.build_vocab()
    small.save_vocabulary(model)
    assert_one_line_error(*run_cli(["eval", "--model", str(model)], capsys)[::2],
                          f"{len(small)} symbols but the model 2,770")
    assert_one_line_error(*run_cli(["info", "--model", str(model / "config.json")], capsys)[::2], "is a file")


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["eval", "DIR"], ["is a directory"]),
        (["eval", "--device", "banana"], ["unknown device 'banana'"]),
        (["eval", "--model", ""], ["--model is empty"]),
        (["generate", "--compile", "--device", "banana"], ["unknown device 'banana'"]),
        (["eval", "--device", "cuda"], ["CUDA is not available"]),
        (["eval", "TEXT", "--mem-len", "100000000", "--init-mems", "zeros"], ["mem_len 100000000 needs", "GiB"]),
        (["eval", "TEXT", "--mem-len", "0", "--same-length", "on"], ["same_length needs a memory"]),
        (["eval", "TEXT", "--char-level"], ["--char-level", "vocabulary is of words"]),
        (["eval", "--tgt-len", "0"], ["argument --tgt-len: 0 must be at least 1"]),
        (["generate", "--greedy", "--top-p", "0.5"], ["cannot be combined with --top-p"]),
        (["generate", "--greedy", "--temperature", "0.5", "--top-k", "3"], ["--temperature, --top-k"]),
    ],
)
def test_bad_input_is_one_line(argv, needles, tmp_path, short_text, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = [{"DIR": str(tmp_path), "TEXT": str(short_text)}.get(a, a) for a in argv]
    assert_one_line_error(*run_cli(argv, capsys)[::2], *needles)


def test_eval_mem_len_beyond_the_text_needs_no_memory_for_it(short_text, capsys):
    reports = []
    for mem_len in ("100000000", "100000"):
        code, stdout, err = run_cli(["eval", str(short_text), "--json", "--mem-len", mem_len], capsys)
        assert code == 0, err
        reports.append(json.loads(stdout))
    assert reports[0]["perplexity"] == reports[1]["perplexity"]


def test_eval_stdin_not_utf8_and_no_temporary_file_left(monkeypatch, tmp_path, capsys):
    import io
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"fine line\n\xff\xfe broken\n")))
    assert_one_line_error(*run_cli(["eval", "-"], capsys)[::2], "standard input is not UTF-8", "0xff")
    text = "\n".join((DEFAULT_MODEL / "heldout.txt").read_text().splitlines()[:5]) + "\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    code, stdout, err = run_cli(["eval", "-", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["text"] == "standard input"
    assert list(scratch.iterdir()) == []


def test_eval_reports_and_warns_about_unknown_words(tmp_path, capsys):
    import base64
    import random

    rng = random.Random(0)
    noise = tmp_path / "noise.txt"
    noise.write_text("\n".join(" ".join(base64.b64encode(rng.randbytes(6)).decode() for _ in range(8))
                               for _ in range(20)) + "\n")
    code, stdout, err = run_cli(["eval", str(noise), "--json"], capsys)
    assert code == 0
    assert json.loads(stdout)["unk_share"] > 0.5
    assert err.startswith("txl-fast: warning:") and err.count("\n") == 1 and "<unk>" in err


def test_generate_prints_detokenised_text(capsys):
    from txl_fast import TransfoXLLMHeadModel
    from txl_fast.tokenizer import TransfoXLTokenizer

    code, stdout, err = run_cli(["generate", "It is", "--greedy", "--max-new-tokens", "25"], capsys)
    assert code == 0, err
    model = TransfoXLLMHeadModel.from_pretrained(DEFAULT_MODEL)
    tok = TransfoXLTokenizer.from_pretrained(DEFAULT_MODEL)
    prompt = tok.encode("It is")
    new = model.generate(torch.tensor([prompt]), max_new_tokens=25, init_mems="empty")[0, len(prompt):].tolist()
    lines, line = [], []
    for i in new:
        if i == tok.eos_token_id:
            lines.append(line)
            line = []
        else:
            line.append(i)
    lines.append(line)
    first = tok.decode(prompt + lines[0])
    expected = "It is" + first[len(tok.decode(prompt)):] + "\n" + "".join(tok.decode(x) + "\n" for x in lines[1:])
    assert stdout == expected
    assert "<eos>" not in stdout and "@" not in stdout


@pytest.mark.parametrize("command", [c for c in SUBCOMMANDS if c != "bench"])
def test_threads_on_every_command(command, capsys):
    from txl_fast.cli import physical_cores

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--threads" in out and f"here {physical_cores()}" in out
    args = build_parser().parse_args([command, "--threads", "1"] + {"train": ["--out", "x"],
                                                                   "convert": ["a", "b"],
                                                                   "score": ["f"]}.get(command, []))
    assert args.threads == 1 and build_parser().parse_args(["info"]).threads == physical_cores() >= 1


def test_threads_are_set(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["info", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_sampling_defaults_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--temperature TEMPERATURE sampling temperature (default: 0.8)", "(default: 40)", "(default: 0.95)"):
        assert flag in out


@pytest.mark.parametrize("argv", [["info"], ["eval", "TEXT", "--json"]])
def test_closed_pipe_ends_quietly(argv, short_text):
    import subprocess
    import sys

    argv = [str(short_text) if a == "TEXT" else a for a in argv]
    code = "import sys; from txl_fast.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv, "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=DEFAULT_MODEL.parents[1],
                            env={**os.environ, "PYTHONPATH": str(DEFAULT_MODEL.parents[1])})
    proc.stdout.close()                                  # the reader leaves before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1 and err == ""
