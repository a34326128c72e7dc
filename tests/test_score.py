"""txl_fast.score: per-token log-probabilities of documents (``txl-fast score``).

Every number against the peer, HF 4.35, run one document at a time with its memory carried from
segment to segment; many documents batched (rows refilled, the batch shrinking at the end)
against each alone in float64; hidden states against HF's; the text conventions; one model shared
by threads; bad input refused before any compute.
"""
import math
import re
import threading
import warnings

import pytest
import torch

from tests.helpers import config_kwargs, hf_model, our_model
from txl_fast import TransfoXLLMHeadModel, evaluate
from txl_fast.score import read_documents, score

warnings.filterwarnings("ignore", message=".*TransfoXL.*")
CONTEXT = 3                                         # any id: the token read before each document


def _documents(lengths, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_alone(hf, doc, tgt_len, init_mems, n_layer, d_model):
    """HF's log-probabilities of each token of ``doc`` after CONTEXT, memory carried, and its hidden
    states (n_layer + 1) at each token."""
    x = torch.tensor([[CONTEXT] + doc])
    mems = [torch.zeros(0, 1, d_model) for _ in range(n_layer)] if init_mems == "empty" else None
    scores, states = [], []
    with torch.no_grad():
        for i in range(0, x.shape[1], tgt_len):
            out = hf(x[:, i : i + tgt_len], mems=mems, output_hidden_states=True)
            mems = out.mems
            scores.append(out.prediction_scores[0])
            states.append(torch.stack(out.hidden_states)[:, 0])                 # (n_layer + 1, L, d)
    logprobs = torch.cat(scores)[: len(doc)].gather(1, torch.tensor(doc)[:, None])[:, 0]
    return logprobs, torch.cat(states, dim=1)[:, 1:]                             # state at token t: input t + 1


@pytest.mark.parametrize("name", ["default", "no_same_length", "long_mem_clamp", "pre_lnorm", "div_val_1",
                                  "clamp_negative", "untie_r_false"])
@pytest.mark.parametrize("init_mems", ["empty", "zeros"])
def test_every_token_equals_hf_with_the_same_memory(tmp_path, name, init_mems):
    transformers = pytest.importorskip("transformers")
    kwargs = config_kwargs(name)
    hf = hf_model(transformers.TransfoXLLMHeadModel, kwargs)
    hf.save_pretrained(tmp_path)
    ours = TransfoXLLMHeadModel.from_pretrained(tmp_path)
    docs = _documents([17, 2, 9, 1, 25, 5])
    tgt_len = 4
    got = score(ours, docs, tgt_len=tgt_len, batch_size=3, init_mems=init_mems, context_id=CONTEXT,
                layers=[0, 1, 2])
    for doc, result in zip(docs, got):
        ref, states = _hf_alone(hf, doc, tgt_len, init_mems, kwargs["n_layer"], kwargs["d_model"])
        assert (result.logprobs - ref).abs().max() <= 1e-5, name
        for layer in (0, 1, 2):
            assert (result.hidden_states[layer] - states[layer]).abs().max() <= 1e-5, (name, layer)


@pytest.mark.parametrize("init_mems", ["empty", "zeros"])
@pytest.mark.parametrize("tgt_len", [3, 8, 64])
def test_batched_documents_equal_each_alone(init_mems, tgt_len):
    """Rows that end early take the next document (its memory hidden, or HF's zeros written again),
    the batch shrinks when none is left; each document's numbers are those it gets alone."""
    model = our_model("long_mem_clamp", dtype=torch.float64)
    docs = _documents([13, 3, 30, 1, 0, 7, 22, 2, 11], seed=1)
    batched = score(model, docs, tgt_len=tgt_len, batch_size=3, init_mems=init_mems, context_id=CONTEXT,
                    layers=[-1])
    for doc, result in zip(docs, batched):
        alone = score(model, [doc], tgt_len=tgt_len, batch_size=1, init_mems=init_mems, context_id=CONTEXT,
                      layers=[2])[0]
        assert result.logprobs.shape == (len(doc),) and torch.isfinite(result.logprobs).all()
        assert torch.allclose(result.logprobs, alone.logprobs, rtol=0, atol=1e-10)
        assert torch.allclose(result.hidden_states[2], alone.hidden_states[2], rtol=0, atol=1e-10)
        assert torch.allclose(result.surprisal, -result.logprobs / math.log(2))


def test_one_long_document_equals_evaluate():
    """A document is read as evaluate reads a stream: its mean NLL after the first token is evaluate's."""
    model = our_model("default")
    doc = _documents([50], seed=2)[0]
    got = score(model, [doc], tgt_len=8, mem_len=12, clamp_len=3, same_length=True, context_id=CONTEXT)[0]
    ref = evaluate(model, torch.tensor([CONTEXT] + doc), tgt_len=8, mem_len=12, clamp_len=3, same_length=True,
                   progress=False)
    assert math.isclose(-got.logprobs.double().mean().item(), ref.nll, rel_tol=1e-5)


def test_the_model_is_not_changed_and_threads_share_it():
    """evaluate, generate and score from 4 threads at once, each with its own protocol, on one
    model: each gets what it gets alone, and the model's protocol is untouched."""
    model = our_model("default")
    stream = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(4))
    docs = _documents([20, 9, 14], seed=5)
    prompt = stream[:8].view(2, 4)
    jobs = {
        "evaluate": lambda: evaluate(model, stream, tgt_len=8, mem_len=48, clamp_len=3, progress=False).nll,
        "evaluate_nocache": lambda: evaluate(model, stream, tgt_len=5, mem_len=9, same_length=False, clamp_len=0,
                                             progress=False, use_cache=False).nll,
        "generate": lambda: model.generate(prompt, 12),
        "generate_protocol": lambda: model.generate(prompt, 12, mem_len=3, clamp_len=2, same_length=False),
        "score": lambda: torch.cat([s.logprobs for s in score(model, docs, tgt_len=4, mem_len=20, batch_size=2,
                                                                context_id=CONTEXT)]),
    }
    alone = {name: job() for name, job in jobs.items()}
    results, errors = {}, []

    def run(name, job):
        try:
            for _ in range(5):
                results.setdefault(name, []).append(job())
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"{name}: {e!r}")

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, values in results.items():
        for value in values:
            if isinstance(value, float):
                assert math.isclose(value, alone[name], rel_tol=1e-6), name
            else:
                assert value.shape == alone[name].shape and (value.double() - alone[name].double()).abs().max() <= 1e-5
    t = model.transformer
    assert (t.mem_len, t.clamp_len, t.same_length) == (6, 5, True)


def test_generate_takes_its_protocol_per_call():
    """generate(mem_len=, clamp_len=, same_length=) equals a model configured so, cached or not."""
    model, other = our_model("default"), our_model("default", mem_len=3, clamp_len=2, same_length=False)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(8))
    for use_cache in (True, False):
        got = model.generate(prompt, 9, mem_len=3, clamp_len=2, same_length=False, use_cache=use_cache)
        assert torch.equal(got, other.generate(prompt, 9, use_cache=use_cache))
    assert (model.transformer.mem_len, model.transformer.clamp_len) == (6, 5)
    with pytest.raises(ValueError, match="same_length needs a memory"):
        model.generate(prompt, 3, mem_len=0, same_length=True)


def test_read_documents_conventions():
    class Tok:                                      # whitespace tokenizer, lower-casing like wt103's does not
        lower_case = True

        def tokenize(self, line, add_eos=False):
            return line.split() + ["<eos>"] * add_eos

    text = "First line here.\n  \nSecond line\n\n\n\nNew Doc\n\t\n"
    docs = read_documents(text, Tok())
    assert docs == [[["First", "line", "here.", "<eos>"]], [["Second", "line", "<eos>"]], [["New", "Doc", "<eos>"]]]
    assert read_documents("One doc\nTwo lines\n", Tok(), pretokenized=True) == \
        [[["one", "doc", "<eos>"], ["two", "lines", "<eos>"]]]
    assert read_documents("\n \n", Tok()) == []


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(documents="abc"), ValueError, "documents must be a list"),
    (dict(documents=[[1, 2], [1.5]]), ValueError, "document 1"),
    (dict(documents=[[1, 200]]), ValueError, r"token ids must be in \[0, 97\)"),
    (dict(documents=[torch.ones(2, 2, dtype=torch.long)]), ValueError, "1-D tensor"),
    (dict(context_id=97), ValueError, "context_id"),
    (dict(context_id=True), ValueError, "context_id"),
    (dict(layers=[5]), ValueError, r"layers must lie in \[0, 2\]"),
    (dict(layers="0"), ValueError, "layers must be a list"),
    (dict(tgt_len=0), ValueError, "tgt_len must be a positive"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(same_length="yes"), ValueError, "same_length must be True or False"),
    (dict(mem_len=0, same_length=True), ValueError, "same_length needs a memory"),
    (dict(init_mems="random"), ValueError, "init_mems"),
    (dict(model=torch.nn.Linear(2, 2)), TypeError, "TransfoXLLMHeadModel"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    args = dict(model=our_model("default"), documents=[[1, 2, 3]], context_id=CONTEXT)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        score(args.pop("model"), args.pop("documents"), **args)


def test_documents_as_lists_tuples_tensors_and_numpy_arrays():
    import numpy as np

    model = our_model("default")
    doc = [5, 9, 2, 40]
    ref = score(model, [doc], context_id=CONTEXT)[0].logprobs
    for kind in (tuple(doc), torch.tensor(doc, dtype=torch.int32), np.array(doc)):
        assert torch.equal(score(model, [kind], context_id=CONTEXT)[0].logprobs, ref)
    with pytest.raises(ValueError, match="document 0"):
        score(model, [np.array([1.0, 2.0])], context_id=CONTEXT)


def test_a_bfloat16_model_scores_within_the_bf16_tolerance():
    model = our_model("default")
    docs = _documents([30, 12], seed=7)
    ref = torch.cat([s.logprobs for s in score(model.double(), docs, tgt_len=8, context_id=CONTEXT)])
    got = torch.cat([s.logprobs for s in score(model.to(torch.bfloat16), docs, tgt_len=8, context_id=CONTEXT)])
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).norm() / ref.norm() <= 1e-2


def test_empty_input_and_empty_documents():
    model = our_model("default")
    assert score(model, [], context_id=CONTEXT) == []
    got = score(model, [[], [5]], context_id=CONTEXT, layers=[1])
    assert got[0].logprobs.shape == (0,) and got[0].hidden_states[1].shape == (0, 32)
    assert got[1].logprobs.shape == (1,) and torch.isfinite(got[1].logprobs).all()


# ---- the command line ------------------------------------------------------------------------------
TEXT = ("The list is a sequence.\nIt holds items.\n\n\nA dictionary maps keys to zzqx values.\n  \n"
        "Another document here.\nWith two lines, and numbers 3,000.\n\nShort.\n")


def _cli(*argv):
    from txl_fast.cli import main

    return main([*argv, "--threads", "1"])


def _read_tsv(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    return header, rows


def test_cli_score_tsv_and_json_lines_agree_with_the_api(tmp_path, capsys):
    import json

    import txl_fast
    from txl_fast import TransfoXLTokenizer
    from txl_fast.score import score_text

    text = tmp_path / "docs.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert _cli("score", str(text), "--output", str(tmp_path / "out.tsv"), "--tgt-len", "4") == 0
    header, rows = _read_tsv(tmp_path / "out.tsv")
    assert header == ["document", "sentence", "token", "text", "id", "unk", "logprob", "surprisal"]
    assert _cli("score", str(text), "--format", "jsonl", "--tgt-len", "4") == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    path = txl_fast.default_model_path()
    model, tok = TransfoXLLMHeadModel.from_pretrained(path), TransfoXLTokenizer.from_pretrained(path)
    expected, _ = score_text(model, tok, TEXT, tgt_len=4, mem_len=model.config.mem_len)
    assert len(rows) == len(records) == len(expected) > 30
    assert {r[0] for r in rows} == {"0", "1", "2", "3"}                   # four documents
    for row, record, want in zip(rows, records, expected):
        assert row[:6] == [str(want.document), str(want.sentence), str(want.token), want.text, str(want.id),
                           str(int(want.unk))]
        assert record["text"] == want.text and record["unk"] == want.unk
        assert abs(float(row[6]) - want.logprob) <= 2e-6 and abs(record["surprisal"] - want.surprisal) <= 2e-6
        assert math.isclose(float(row[7]), -float(row[6]) / math.log(2), abs_tol=2e-6)
    unk = [r for r in rows if r[5] == "1"]
    assert "zzqx" in [r[3] for r in unk] and all(r[4] == str(tok.unk_token_id) for r in unk)
    assert all(r[5] == "0" for r in rows if r[3] in ("list", "dictionary", "<eos>"))
    sentence_ends = [r for r in rows if r[3] == "<eos>"]
    assert len(sentence_ends) == 6                                        # one per non-blank line


def test_cli_score_hidden_states_align_with_the_rows(tmp_path):
    from safetensors.torch import load_file

    text = tmp_path / "docs.txt"
    text.write_text(TEXT, encoding="utf-8")
    out, states = tmp_path / "out.tsv", tmp_path / "states.safetensors"
    assert _cli("score", str(text), "--output", str(out), "--layers", "0,-1", "--states", str(states)) == 0
    _, rows = _read_tsv(out)
    tensors = load_file(str(states))
    assert sorted(tensors) == ["layer0", "layer4"]
    assert all(t.shape == (len(rows), 256) and torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("argv,match", [
    (["--layers", "1"], "--layers needs --states"),
    (["--states", "S"], "--states needs --layers"),
    (["--layers", "9", "--states", "S"], r"layers must lie in \[0, 4\]"),
    (["--output", "EXISTING"], "exists: pass --overwrite"),
    (["--output", "DIR"], "is a directory"),
    (["--output", "NODIR/out.tsv"], "does not exist"),
    (["--mem-len", "0", "--same-length", "on"], "same_length needs a memory"),
])
def test_cli_score_refusals_are_one_line_and_touch_nothing(tmp_path, capsys, argv, match):
    text = tmp_path / "docs.txt"
    text.write_text(TEXT, encoding="utf-8")
    existing = tmp_path / "existing.tsv"
    existing.write_text("keep me", encoding="utf-8")
    names = {"EXISTING": str(existing), "DIR": str(tmp_path), "S": str(tmp_path / "s.safetensors"),
             "NODIR/out.tsv": str(tmp_path / "nodir" / "out.tsv")}
    assert _cli("score", str(text), *[names.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("txl-fast: error:") and len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert existing.read_text(encoding="utf-8") == "keep me"
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.slow
def test_cli_score_under_torchrun_equals_one_process(tmp_path):
    """Two gloo processes: the documents are dealt to the ranks and rank 0 writes every row, in input order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = tmp_path / "docs.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    one, two = tmp_path / "one.tsv", tmp_path / "two.tsv"
    base = ["score", str(text), "--tgt-len", "8", "--batch-size", "2", "--threads", "1"]
    proc = subprocess.run([sys.executable, "-m", "txl_fast.cli", *base, "--output", str(one)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "txl_fast.cli",
           *base, "--output", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _, single = _read_tsv(one)
    _, sharded = _read_tsv(two)
    assert len(single) == len(sharded) > 100
    for a, b in zip(single, sharded):
        assert a[:6] == b[:6] and abs(float(a[6]) - float(b[6])) <= 1e-5
