"""The package as a newcomer meets it: what ``import txl_fast`` costs and needs, the way from text
to the ids ``txl-fast eval`` scores, a directory written from Python that the CLI reads, and the
optional triton dependency.

Import checks run in a fresh interpreter (``subprocess``), since this test process has long since
imported everything. "Absent" packages are blocked there with ``sys.modules[name] = None``, which
makes ``import name`` raise ImportError as if the package were not installed.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import txl_fast
from txl_fast import backend
from txl_fast.cli import main

HELDOUT = txl_fast.default_model_path() / "heldout.txt"


def run_python(code: str, block: tuple = ()) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the packages in ``block`` cannot be imported."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in block)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    """The first 40 lines of the default model's held-out text (the model is an adaptive-input,
    adaptive-softmax one: its clustered paths run)."""
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text("".join(HELDOUT.read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    return path


# ---- import cost -----------------------------------------------------------------------------


def test_import_does_not_load_the_compiler_the_tokenizer_or_triton():
    proc = run_python("""
        import txl_fast
        heavy = [m for m in ("torch._dynamo", "sacremoses", "triton", "txl_fast.tokenizer") if m in sys.modules]
        print(heavy)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_eval_and_generate_do_not_load_the_compiler_or_triton(short_text):
    proc = run_python(f"""
        import contextlib, io
        from txl_fast.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["eval", {str(short_text)!r}, "--model", {str(txl_fast.default_model_path())!r}]) == 0
            assert main(["generate", "--max-new-tokens", "3"]) == 0
        print([m for m in ("torch._dynamo", "triton") if m in sys.modules])
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_import_the_torch_path_and_vocabularies_work_without_sacremoses_and_triton():
    proc = run_python("""
        import torch
        import txl_fast
        from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel
        cfg = TransfoXLConfig(vocab_size=50, cutoffs=[20], d_model=16, d_embed=16, n_head=2, d_head=8,
                              d_inner=32, n_layer=2, mem_len=4)
        model = TransfoXLLMHeadModel(cfg).eval()
        out = model(torch.randint(0, 50, (2, 5)), labels=torch.randint(0, 50, (2, 5)))
        assert torch.isfinite(out.losses).all()
        tok = txl_fast.TransfoXLTokenizer.from_pretrained(txl_fast.default_model_path())
        assert len(tok) == 2770 and tok.convert_ids_to_tokens(tok.eos_token_id) == "<eos>"
        try:
            tok.encode("needs Moses")
        except ImportError as e:
            print(e)
    """, block=("sacremoses", "triton"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("tokenizing text needs sacremoses (pip install sacremoses)")


def test_tokenizer_is_a_lazy_top_level_name():
    from txl_fast.tokenizer import TransfoXLTokenizer

    assert txl_fast.TransfoXLTokenizer is TransfoXLTokenizer
    assert "TransfoXLTokenizer" in txl_fast.__all__ and "TransfoXLTokenizer" in dir(txl_fast)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        txl_fast.NoSuchThing


def test_compile_disabled_runs_eagerly_under_torch_compile():
    seen = []

    @backend.compile_disabled("data-dependent rows")
    def positive_sum(x):
        seen.append(torch.compiler.is_compiling())
        return x[x > 0].sum()

    compiled = torch.compile(lambda x: positive_sum(x * 2) + 1, backend="eager")
    x = torch.randn(7)
    assert torch.equal(compiled(x), positive_sum(x * 2) + 1)
    assert seen and not any(seen)
    assert positive_sum.__name__ == "positive_sum"


# ---- text -> ids -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return txl_fast.TransfoXLTokenizer.from_pretrained(txl_fast.default_model_path())


def test_encode_file_and_encode_lines_give_the_ids_eval_scores(tok, monkeypatch, capsys):
    import txl_fast.inference

    scored = []

    def spy(model, token_ids, **kwargs):
        scored.append(token_ids.clone())
        return real(model, token_ids[:200], **kwargs)          # the ids are what counts; keep it quick

    real = txl_fast.inference.evaluate
    monkeypatch.setattr(txl_fast, "evaluate", spy)
    monkeypatch.setattr(txl_fast.inference, "evaluate", spy)
    assert main(["eval", "--json"]) == 0
    capsys.readouterr()
    assert len(scored) == 1
    text = HELDOUT.read_text(encoding="utf-8")
    assert torch.equal(tok.encode_file(HELDOUT, add_eos=True), scored[0])
    assert torch.equal(tok.encode_lines(text.splitlines(), add_eos=True), scored[0])
    assert int((scored[0] == tok.eos_token_id).sum()) == len(text.splitlines())   # one <eos> per line


def test_encode_lines_per_line_options_and_bad_input(tok):
    lines = ["The list type .", "", "A dict maps keys to values ."]
    per_line = tok.encode_lines(lines, ordered=False)
    assert [t.tolist() for t in per_line] == [tok.encode(line, add_eos=True) for line in lines]
    assert tok.encode_lines([line + "\n" for line in lines]).tolist() == sum((t.tolist() for t in per_line), [])
    assert tok.encode_lines(lines, add_eos=False).tolist() == tok.encode(" ".join(lines))
    assert tok.encode_lines([]).shape == (0,)
    with pytest.raises(TypeError, match="splitlines"):
        tok.encode_lines("one string, not lines")
    with pytest.raises(ValueError, match="line 2 holds a line break"):
        tok.encode_lines(["fine", "two\nlines"])
    with pytest.raises(TypeError, match="line 1 is a int"):
        tok.encode_lines([3])


# ---- a directory written from Python, read by the CLI ----------------------------------------


def test_save_pretrained_with_tokenizer_is_a_directory_the_cli_reads(tok, short_text, tmp_path, capsys):
    model = txl_fast.TransfoXLLMHeadModel.from_pretrained(txl_fast.default_model_path())
    model.save_pretrained(tmp_path / "mine", tokenizer=tok)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    protocol = ["--tgt-len", "64", "--mem-len", "64", "--json"]

    assert main(["eval", str(short_text), "--model", str(tmp_path / "mine"), *protocol]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert main(["eval", str(short_text), "--model", str(txl_fast.default_model_path()), *protocol]) == 0
    shipped = json.loads(capsys.readouterr().out)
    assert ours["tokens"] == shipped["tokens"] and ours["perplexity"] == pytest.approx(shipped["perplexity"], rel=1e-6)

    assert main(["generate", "The", "--model", str(tmp_path / "mine"), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("The")

    # the tokenizer alone, next to a model saved without one
    model.save_pretrained(tmp_path / "apart")
    assert tok.save_pretrained(tmp_path / "apart") == (str(tmp_path / "apart" / "vocab.json"),)
    assert txl_fast.TransfoXLTokenizer.from_pretrained(tmp_path / "apart").idx2sym == tok.idx2sym


def test_save_pretrained_refuses_a_tokenizer_larger_than_the_model(tok, tmp_path):
    cfg = txl_fast.TransfoXLConfig(vocab_size=50, cutoffs=[20], d_model=16, d_embed=16, n_head=2, d_head=8,
                                   d_inner=32, n_layer=2, mem_len=4)
    with pytest.raises(ValueError, match="do not belong together"):
        txl_fast.TransfoXLLMHeadModel(cfg).save_pretrained(tmp_path / "out", tokenizer=tok)
    assert not (tmp_path / "out").exists()


def test_tokenizer_save_pretrained_refuses_a_file(tok, tmp_path):
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(ValueError, match="not a directory"):
        tok.save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep me"


# ---- triton is optional ----------------------------------------------------------------------


def test_without_triton_auto_is_torch_and_asking_for_triton_says_how_to_get_it():
    proc = run_python("""
        import torch
        from txl_fast import backend, set_backend, use_backend
        x = torch.zeros(1)
        print(backend.resolve(x), backend.triton_available())
        for ask in (lambda: set_backend("triton"), lambda: use_backend("triton").__enter__()):
            try:
                ask()
            except ValueError as e:
                print(e)
        print(backend.get_backend())
    """, block=("triton",))
    assert proc.returncode == 0, proc.stderr
    first, *errors, last = proc.stdout.strip().splitlines()
    assert first == "torch False" and last == "auto"
    assert errors == [backend.TRITON_MISSING] * 2
    assert 'pip install "txl_fast[triton]"' in backend.TRITON_MISSING


def test_without_triton_the_cli_backend_triton_is_one_line():
    proc = run_python("""
        from txl_fast.cli import main
        sys.exit(main(["eval", "--backend", "triton", "--tgt-len", "16"]))
    """, block=("triton",))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "txl-fast: error: " + backend.TRITON_MISSING


def test_without_triton_the_kernel_report_is_one_line():
    proc = run_python("""
        from txl_fast.cli import main
        sys.exit(main(["kernels"]))
    """, block=("triton",))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("txl-fast: error: the kernel report needs triton") and \
        proc.stderr.count("\n") == 1, proc.stderr


def test_kernels_resolve_from_a_source_checkout_without_an_install(tmp_path):
    """``PYTHONPATH=<repo>`` alone (the GPU machine runs the repository that way): ``txl_fast.kernels``
    is the checkout's ``kernels/``. ``python -S`` skips site-packages' .pth files, so the editable
    install's own mapping is not there to help; site-packages is put on the path for torch."""
    import os
    import sysconfig
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(txl_fast.__file__).resolve().parents[1]
    if not (root / "kernels" / "aot.py").is_file():
        pytest.skip("not a source checkout")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), sysconfig.get_paths()["purelib"]])}
    res = subprocess.run([sys.executable, "-S", "-c", "import txl_fast.kernels.aot as a; print(a.__file__)"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()) == root / "kernels" / "aot.py"
