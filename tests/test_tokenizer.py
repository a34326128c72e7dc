"""txl_fast.tokenizer against HF 4.35's TransfoXLTokenizer, built from the same small corpus.

HF builds the vocabulary (count_file + build_vocab) and we build it; the symbol lists must be
equal. Ids are compared with an HF tokenizer constructed from that finished vocabulary
(`vocab_file=`), the state in which HF's special-token ids are coherent, and with the HF
tokenizer that built it, on text without literal special tokens (where its stale special ids
don't matter; see the module docstring of txl_fast.tokenizer). Also: encode_file, decode,
vocab.json / vocab.pkl / vocab.bin / vocab.txt loading, unknown and out-of-range handling.
Not tested: languages other than English; HF's lm1b corpus pipeline.
"""
import json
import pickle
import re

import pytest
import torch

import txl_fast
from txl_fast.tokenizer import TransfoXLTokenizer

DEFAULT_VOCAB = txl_fast.default_model_path() / "vocab.json"

CORPUS = """\
The company earned $1,000.5 million in 2019 , up from 23,000 last year.
A well-known state-of-the-art model -- "quoted" text and 'single quotes'.
Café – naïve résumé; the café was naïve.

He said: "It's 3.14 and 1,234,567 people don't know!"
The <formula> appears here <unk> and <eos> too.
Hyphen-ated words, e-mail, and re-enter; x-ray at 10:30 p.m.
Numbers like 1.5.6 and 12,34 and .5 and 5. end
The the the company company café
   
We're sure you'll see they've (maybe) [not] {ever} 50% & more... ok?!
"""

SENTENCES = [
    "The company earned $1,000.5 million in 2019.",
    "A well-known model, 1,000.5 café – naïve <formula> x",
    'He said: "It\'s 3.14 and don\'t!" <unk> zz <eos>',
    "",
    "   ",
    "\tTabs\tand   spaces\n",
    "<EOS> <Unk> x<formula>y X<EOS>Y THE <eos><eos>",
    "1 , 000 @,@ well @-@ a",
    "THE Company's 1.5.6 -- dash—em 'q' «x» „y“ … ½ $5 ﬁ",
    "x-ray e-mail re-enter 10:30 p.m. U.S.A. 3-4 -5 5- 1,2,3 0.0.0",
    "We're sure you'll see they've (maybe) [not] {ever} 50% & more... ok?!",
    "unknownword anotherone café's naïveté",
]

CONFIGS = {
    "wt103-like": dict(special=["<eos>"]),
    "lower": dict(special=["<eos>", "<unk>"], lower_case=True),
    "min_freq": dict(special=["<eos>", "<unk>"], min_freq=2),
    "max_size": dict(special=["<unk>", "<eos>"], max_size=20),
}


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # 4.35 logs "Keyword arguments {'add_eos': ...} not recognized" per line
    yield transformers.TransfoXLTokenizer
    logging.set_verbosity(level)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def build_both(hf, corpus, tmp_path, **kw):
    """(HF that built the vocab, HF loaded from that vocab as vocab.txt, ours built the same way)."""
    h = hf(**kw)
    h.count_file(str(corpus))
    h.build_vocab()
    ours = TransfoXLTokenizer(**kw)
    ours.count_file(corpus)
    ours.build_vocab()
    vocab_txt = tmp_path / "vocab.txt"
    vocab_txt.write_text("".join(s + "\n" for s in h.idx2sym), encoding="utf-8")
    settings = {k: v for k, v in kw.items() if k in ("lower_case", "delimiter")}
    return h, hf(vocab_file=str(vocab_txt), **settings), ours


def hf_encode(tok, text):
    return tok.convert_tokens_to_ids(tok.tokenize(text))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_vocab_and_ids_match_hf(hf, corpus, tmp_path, config):
    built, ref, ours = build_both(hf, corpus, tmp_path, **CONFIGS[config])
    assert ours.idx2sym == built.idx2sym
    assert ours.counter == built.counter
    assert (ours.vocab_size, len(ours)) == (ref.vocab_size, len(ref))
    assert ours.added_tokens == {t: i for t, i in ref.added_tokens_encoder.items() if i >= ref.vocab_size}
    for text in SENTENCES:
        ids = ours.encode(text)
        assert ours.tokenize(text) == ref.tokenize(text), text
        assert ids == hf_encode(ref, text), text
        assert ours.decode(ids) == ref.decode(ids), text
        if "<" not in text:
            assert ids == hf_encode(built, text), text


def test_char_level_delimiter_matches_hf(hf, corpus, tmp_path):
    # a character vocabulary holds " ", which vocab.txt cannot: compare with the HF that built it
    built = hf(special=["<eos>"], delimiter="")
    built.count_file(str(corpus))
    built.build_vocab()
    ours = TransfoXLTokenizer(special=["<eos>"], delimiter="")
    ours.count_file(corpus)
    ours.build_vocab()
    assert ours.idx2sym == built.idx2sym
    for text in SENTENCES:
        if "<" not in text:
            assert ours.encode(text) == hf_encode(built, text), text


def test_encode_file_matches_hf(hf, corpus, tmp_path):
    built, ref, ours = build_both(hf, corpus, tmp_path, special=["<eos>"])
    lines = CORPUS.splitlines(keepends=True)
    eos = ours.convert_tokens_to_ids("<eos>")
    # HF 4.35 drops add_eos inside tokenize(): its encode_file never emits <eos>
    hf_ids = ref.encode_file(str(corpus), ordered=True, add_eos=True)
    assert hf_ids.tolist() == [i for line in lines for i in hf_encode(ref, line)]
    assert torch.equal(ours.encode_file(corpus, add_eos=False), hf_ids)

    got = ours.encode_file(corpus)  # ordered=True, add_eos=True
    assert got.dtype == torch.long
    expected = [i for line in lines for i in hf_encode(ref, line) + [eos]]
    assert got.tolist() == expected
    per_line = ours.encode_file(corpus, ordered=False)
    assert [t.tolist() for t in per_line] == [hf_encode(ref, line) + [eos] for line in lines]
    assert per_line[3].tolist() == [eos]  # an empty line is just <eos>
    double = ours.encode_file(corpus, ordered=False, add_double_eos=True)
    unk = ours.convert_tokens_to_ids("<unk>")
    assert [t.tolist() for t in double] == [[unk] + hf_encode(ref, line) + [unk] for line in lines]

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert ours.encode_file(empty).shape == (0,)


def test_tokenize_details(hf, corpus, tmp_path):
    _, ref, ours = build_both(hf, corpus, tmp_path, special=["<eos>"])
    assert ours.tokenize("23,000 people are 1.80m tall") == [
        "23", "@,@", "000", "people", "are", "1", "@.@", "80m", "tall"]
    assert ours.tokenize("well-known") == ["well", "@-@", "known"]
    assert ours.tokenize("Café – naïve") == ["Café", "-", "naïve"]
    assert ours.tokenize("a b", add_eos=True) == ["a", "b", "<eos>"]
    assert ours.tokenize("a", add_double_eos=True) == ["<S>", "a", "<S>"]
    assert ours.tokenize("", add_eos=True) == ["<eos>"]
    assert ref._tokenize("a b", add_eos=True) == ["a", "b", "<eos>"]  # HF's own per-chunk step agrees


def test_decode_round_trip(hf, corpus, tmp_path):
    _, ref, ours = build_both(hf, corpus, tmp_path, special=["<eos>"])
    for text in ["The company earned $1,000.5 million in 2019", "A well-known state-of-the-art model",
                 "Café – naïve", "1,234,567 people don't know!", "10:30 p.m."]:
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.encode(ours.decode(ids)) == ids
    assert ours.decode(ours.encode("The company earned $1,000.5 million")) == "The company earned $1,000.5 million"
    assert ours.decode(ours.encode("A well-known state-of-the-art model")) == "A well-known state-of-the-art model"
    ids = ours.encode("the café <eos> the")
    assert ours.decode(torch.tensor(ids)) == ours.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True) == "the café the"
    assert ours.convert_ids_to_tokens(ids[1]) == "café"


def test_out_of_range_ids(hf, corpus, tmp_path):
    _, _, ours = build_both(hf, corpus, tmp_path, special=["<eos>"])
    for bad in (-1, len(ours), len(ours) + 10**6):
        with pytest.raises(ValueError, match="out of range"):
            ours.decode([0, bad])
        with pytest.raises(ValueError, match="out of range"):
            ours.convert_ids_to_tokens(bad)


def test_unknown_words(hf, corpus, tmp_path):
    # corpus has a literal <unk>: unknown words map to it, as in HF
    built, ref, ours = build_both(hf, corpus, tmp_path, special=["<eos>"])
    unk = ours.sym2idx["<unk>"]
    assert ours.encode("zzz qqq") == [unk, unk] == hf_encode(built, "zzz qqq")
    # no <unk> and no <UNK>: both refuse
    h = hf(special=["<eos>"])
    h.count_sents([["a", "b"]])
    h.build_vocab()
    o = TransfoXLTokenizer(special=["<eos>"])
    o.count_sents([["a", "b"]])
    o.build_vocab()
    with pytest.raises(ValueError, match="no <unk>"):
        hf_encode(h, "zzz")
    with pytest.raises(ValueError, match="no <unk>"):
        o.encode("zzz")
    assert o.encode("a b") == hf_encode(h, "a b") == [1, 2]
    # specials outside the vocabulary get ids after it, as in HF (HF built this one before its vocab,
    # so compare with the numbers HF gives a tokenizer constructed from a finished vocabulary)
    assert o.added_tokens == {"<unk>": 3, "<formula>": 4} and len(o) == 5 and o.vocab_size == 3
    assert o.encode("a <formula> <unk>") == [1, 4, 3]
    assert o.decode([1, 4, 2]) == "a <formula> b"


def test_vocab_txt(hf, tmp_path):
    # kimiyoung's format: first field of each line; <UNK> is preferred over <unk> (as HF)
    path = tmp_path / "vocab.txt"
    path.write_text("<eos> 0\nthe 10\n<unk> 0\ncompany 5 extra\n<UNK>\ncafé 2\nthe 1\n", encoding="utf-8")
    ref = hf(vocab_file=str(path))
    for tok in (TransfoXLTokenizer(vocab_file=str(path)), TransfoXLTokenizer.from_pretrained(tmp_path),
                TransfoXLTokenizer.from_pretrained(path)):
        assert tok.idx2sym == ref.idx2sym == ["<eos>", "the", "<unk>", "company", "<UNK>", "café"]
        for text in SENTENCES:
            assert tok.encode(text) == hf_encode(ref, text), text
        assert tok.encode("zzz") == [4]
    path.write_text("the\n\ncafé\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty line"):
        TransfoXLTokenizer(vocab_file=str(path))
    path.write_text("the\ncafé\n", encoding="utf-8")
    with pytest.raises(ValueError, match="neither <unk> nor <UNK>"):
        TransfoXLTokenizer(vocab_file=str(path))


def test_vocab_json_round_trip(hf, corpus, tmp_path):
    _, ref, ours = build_both(hf, corpus, tmp_path, special=["<eos>", "<unk>"], lower_case=True, max_size=30)
    out = tmp_path / "saved"
    out.mkdir()
    path = ours.save_vocabulary(out)
    assert path == str(out / "vocab.json")
    payload = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert payload["idx2sym"] == ours.idx2sym and payload["settings"]["lower_case"] is True
    loaded = TransfoXLTokenizer.from_pretrained(out)
    assert loaded.idx2sym == ours.idx2sym and loaded.settings() == ours.settings()
    assert loaded.unk_idx == ours.unk_idx and len(loaded) == len(ours)
    for text in SENTENCES:
        assert loaded.encode(text) == ours.encode(text) == hf_encode(ref, text), text
    assert TransfoXLTokenizer.from_pretrained(out, lower_case=False).lower_case is False
    assert TransfoXLTokenizer(pretrained_vocab_file=path).idx2sym == ours.idx2sym
    (out / "vocab.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a txl_fast vocabulary"):
        TransfoXLTokenizer.from_pretrained(out)
    with pytest.raises(FileNotFoundError):
        TransfoXLTokenizer.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["settings"].update(lower_case="no"), "settings of the wrong type: lower_case='no'"),
    (lambda d: d["settings"].update(special=5), "settings of the wrong type: special=5"),
    (lambda d: d["settings"].update(unk_token=5), "settings of the wrong type: unk_token=5"),
    (lambda d: d.update(settings=None), "\"settings\" must be an object"),
    (lambda d: d.update(unk_idx=True), "unk_idx an int or null"),
    (lambda d: d.update(version=99), "format version 99"),
])
def test_vocab_json_values_of_the_wrong_type_are_refused_not_misread(tmp_path, edit, needle):
    """A hand-edited vocab.json: "lower_case": "no" is truthy and would lower-case every text."""
    payload = json.loads((DEFAULT_VOCAB).read_text(encoding="utf-8"))
    edit(payload)
    (tmp_path / "vocab.json").write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(needle)):
        TransfoXLTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("fmt", ["pkl", "bin-zip", "bin-legacy"])
def test_legacy_hf_vocab_loads_safely(hf, corpus, tmp_path, fmt):
    built, ref, ours = build_both(hf, corpus, tmp_path, special=["<eos>"], lower_case=True)
    out = tmp_path / "hf"
    out.mkdir()
    if fmt == "pkl":
        (path,) = built.save_vocabulary(str(out))  # pickles HF's whole __dict__: sacremoses objects, Trie, ...
        assert path.endswith("vocab.pkl")
    else:
        path = str(out / "vocab.bin")
        torch.save(built.__dict__, path, _use_new_zipfile_serialization=(fmt == "bin-zip"))
    loaded = TransfoXLTokenizer.from_pretrained(out)
    assert loaded.idx2sym == built.idx2sym
    assert loaded.lower_case is True  # settings come from the pickled state
    hf_loaded = hf(pretrained_vocab_file=path, lower_case=True) if fmt == "pkl" else None
    for text in SENTENCES:
        ids = loaded.encode(text)
        assert ids == hf_encode(ref, text), text
        if hf_loaded is not None and "<" not in text:
            assert ids == hf_encode(hf_loaded, text), text
    if hf_loaded is not None:
        assert hf_loaded.vocab_size == 0  # HF leaves idx2sym empty when loading its own pickle


def test_legacy_vocab_validated(tmp_path):
    path = tmp_path / "vocab.pkl"
    for state, msg in [([1, 2], "expected a pickled dict"), ({"idx2sym": ["a", 1]}, "list of strings"),
                       ({"idx2sym": ["a", "b"], "sym2idx": {"a": 1, "b": 0}}, "disagree"), ({}, "no vocabulary")]:
        path.write_bytes(pickle.dumps(state))
        with pytest.raises(ValueError, match=msg):
            TransfoXLTokenizer.from_pretrained(path)
    path.write_bytes(pickle.dumps({"sym2idx": {"<unk>": 1, "a": 0}, "unk_idx": 1, "lower_case": "yes"}))
    tok = TransfoXLTokenizer.from_pretrained(path)
    assert tok.idx2sym == ["a", "<unk>"] and tok.lower_case is False and tok.encode("a zz") == [0, 1]


@pytest.mark.parametrize("ids", [[1.5], [True], ["3"], "3"])
def test_decode_refuses_ids_that_are_not_integers(ids):
    """1.5 is not id 1 and "3" not id 3: refused, not decoded as something."""
    tok = TransfoXLTokenizer.from_pretrained(txl_fast.default_model_path())
    with pytest.raises(TypeError, match="token ids must be integers"):
        tok.decode(ids)
    assert tok.decode(torch.tensor([3, 4])) == tok.decode([3, 4])


def test_a_string_split_as_a_file_gives_the_files_ids(tmp_path):
    """docs/semantics.md: io.StringIO(text, newline=None) splits as a file; str.splitlines also
    breaks at form feeds, \\x85, U+2028 (where a file and HF do not)."""
    import io

    tok = TransfoXLTokenizer.from_pretrained(txl_fast.default_model_path())
    text = "The cat\x0csat\r\non the\x85mat\u2028today\rnow\n"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    from_file = tok.encode_file(path)
    assert torch.equal(tok.encode_lines(io.StringIO(text, newline=None)), from_file)
    assert not torch.equal(tok.encode_lines(text.splitlines()), from_file)

