"""The txl-fast command line: every subcommand, the embedded default model, train/resume, convert."""
import json
import os
import pickle

import pytest
import torch

from txl_fast.cli import DEFAULT_MODEL, build_parser, main

SUBCOMMANDS = ["eval", "generate", "train", "info", "convert", "kernels", "bench"]


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
