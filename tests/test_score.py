"""txl_fast.score: per-token log-probabilities of documents (``txl-fast score``).

Every number against the peer, HF 4.35, run one document at a time with its memory carried from
segment to segment; many documents batched (rows refilled, the batch shrinking at the end)
against each alone in float64; hidden states against HF's; the text conventions; one model shared
by threads; bad input refused before any compute.
"""
import math
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


def test_empty_input_and_empty_documents():
    model = our_model("default")
    assert score(model, [], context_id=CONTEXT) == []
    got = score(model, [[], [5]], context_id=CONTEXT, layers=[1])
    assert got[0].logprobs.shape == (0,) and got[0].hidden_states[1].shape == (0, 32)
    assert got[1].logprobs.shape == (1,) and torch.isfinite(got[1].logprobs).all()
