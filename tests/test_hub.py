"""Models named on the Hugging Face hub ("org/name"), offline: each test lays out a hub cache on disk
as huggingface_hub does (``models--org--name/blobs/<sha>``, ``refs/<branch>`` holding a commit,
``snapshots/<commit>/<file>`` symlinks to the blobs) from files transformers 4.35 writes, and the real
huggingface_hub resolves it. In this process huggingface_hub is held offline (its
``constants.HF_HUB_OFFLINE``); the environment variables it reads at import (HF_HUB_CACHE, HF_HOME,
HF_HUB_OFFLINE) are tested through the command line in a subprocess.

The repositories also hold what loading must never touch: ``corpus.bin`` and a ``pytorch_model.bin``
beside a safetensors file are crafted pickles that would create a marker file if unpickled, and
``tf_model.h5`` is junk; the marker must never appear and ``hf_hub_download`` must never be asked for them.
"""
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import config_kwargs, hf_model
from txl_fast import TransfoXLLMHeadModel, TransfoXLTokenizer, hub
from txl_fast.cli import main

huggingface_hub = pytest.importorskip("huggingface_hub")
transformers = pytest.importorskip("transformers")

KWARGS = config_kwargs("default")
SYMBOLS = ["<eos>", "<unk>", "<formula>"] + [f"w{i}" for i in range(KWARGS["vocab_size"] - 3)]
TEXT = "w1 w2 w3 w4 w5 w6 .\nw7 w8 w9 w10 w11 w12\n" * 10


class _Marker:
    """Unpickled, it creates the file at ``path``: what a malicious pickle could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def lay_out(cache: Path, repo_id: str, files: dict, ref: str = "main") -> str:
    """Put ``files`` ({name: bytes}) into ``cache`` as one commit of ``repo_id`` that ``refs/<ref>`` points to,
    as huggingface_hub lays out what it downloads; the commit's hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                          + ref.encode()).hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)                 # no line end, as huggingface_hub writes it
    return commit


def _files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers 4.35's own files: for seeds 0 and 1, a directory with config.json, pytorch_model.bin
    and vocab.pkl (the layout of transfo-xl/transfo-xl-wt103), its safetensors and sharded twins, and an
    evil marker path for the crafted pickles."""
    root = tmp_path_factory.mktemp("hf")
    (root / "vocab.txt").write_text("\n".join(SYMBOLS) + "\n")
    out = {"marker": root / "MARKER"}
    for seed in (0, 1):
        model = hf_model(transformers.TransfoXLLMHeadModel, KWARGS, seed=seed)
        d = root / f"bin{seed}"
        model.save_pretrained(d, safe_serialization=False)
        transformers.TransfoXLTokenizer(vocab_file=str(root / "vocab.txt")).save_vocabulary(str(d))
        (d / "generation_config.json").unlink()
        model.save_pretrained(root / f"safe{seed}", safe_serialization=True)
        model.save_pretrained(root / f"sharded{seed}", safe_serialization=True, max_shard_size="40KB")
        out[seed] = d
    out["safe"], out["sharded"] = root / "safe1", root / "sharded0"
    return out


@pytest.fixture(scope="module")
def evil(hf):
    """Pickles that would create the marker file if anything unpickled them unrestricted."""
    marker = hf["marker"]
    bin_path = marker.parent / "evil.bin"
    torch.save({"transformer.word_emb.emb_layers.0.weight": _Marker(marker)}, bin_path)
    return {"corpus.bin": pickle.dumps({"train": _Marker(marker)}), "tf_model.h5": b"\x89HDF\r\n\x1a\njunk",
            "pytorch_model.bin": bin_path.read_bytes(), "vocab.pkl": pickle.dumps({"idx2sym": _Marker(marker)})}


@pytest.fixture(scope="module")
def cache(hf, evil, tmp_path_factory):
    """org/name: main = seed 0 as on the hub (pytorch_model.bin, vocab.pkl, HF's own vocab.json, corpus.bin,
    tf_model.h5); branch v2 = seed 1 with model.safetensors (beside an evil pytorch_model.bin) and our
    vocab.json. org/sharded: an index and its shards. org/evil: crafted pytorch_model.bin and vocab.pkl.
    org/noweights: a config alone."""
    cache = tmp_path_factory.mktemp("hub") / "hub"
    foreign_vocab = json.dumps({s: i for i, s in enumerate(SYMBOLS)}).encode()       # not txl_fast's format
    junk = {"corpus.bin": evil["corpus.bin"], "tf_model.h5": evil["tf_model.h5"]}
    commits = {"main": lay_out(cache, "org/name", {**_files(hf[0]), "vocab.json": foreign_vocab, **junk})}
    ours = TransfoXLTokenizer.from_pretrained(hf[1]).save_vocabulary(hf["marker"].parent)
    commits["v2"] = lay_out(cache, "org/name", {**_files(hf["safe"]), "vocab.json": Path(ours).read_bytes(),
                                                "pytorch_model.bin": evil["pytorch_model.bin"], **junk}, ref="v2")
    lay_out(cache, "org/sharded", {**_files(hf["sharded"]), "vocab.pkl": (hf[0] / "vocab.pkl").read_bytes()})
    lay_out(cache, "org/evil", {"config.json": (hf[0] / "config.json").read_bytes(),
                                "pytorch_model.bin": evil["pytorch_model.bin"], "vocab.pkl": evil["vocab.pkl"]})
    lay_out(cache, "org/noweights", {"config.json": (hf[0] / "config.json").read_bytes()})
    return cache, commits


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """huggingface_hub in this process never goes online (HF_HUB_OFFLINE, as it reads it at each call)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def fetched(monkeypatch):
    """The file names ``hf_hub_download`` is asked for, in order."""
    names, real = [], huggingface_hub.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        names.append(filename)
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    return names


def by_name(cls, name, cache, **kwargs):
    return cls.from_pretrained(name, cache_dir=cache[0], local_files_only=True, **kwargs)


def assert_same_model(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    ids = torch.arange(24).reshape(2, 12) % KWARGS["vocab_size"]
    with torch.no_grad():
        assert torch.equal(a(ids).prediction_scores, b(ids).prediction_scores)


# ---- what a name loads, and what is fetched for it ------------------------------------------


def test_a_name_loads_what_its_directory_does_and_fetches_only_what_loading_needs(hf, cache, fetched):
    model = by_name(TransfoXLLMHeadModel, "org/name", cache)
    assert fetched == ["config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
    assert_same_model(model, TransfoXLLMHeadModel.from_pretrained(hf[0]))
    with torch.no_grad():               # and the peer's own numbers
        ids = torch.arange(12).reshape(1, 12)
        ref = hf_model(transformers.TransfoXLLMHeadModel, KWARGS, seed=0)(ids).prediction_scores
        assert torch.allclose(model(ids).prediction_scores, ref, atol=1e-5)

    fetched.clear()
    tok = by_name(TransfoXLTokenizer, "org/name", cache)
    assert fetched == ["vocab.json", "vocab.pkl"]            # HF's vocab.json is not ours: vocab.pkl, restricted
    assert tok.idx2sym == SYMBOLS == TransfoXLTokenizer.from_pretrained(hf[0]).idx2sym
    assert len(tok) == model.config.vocab_size
    assert not hf["marker"].exists()


def test_safetensors_is_preferred_and_revisions_by_branch_and_commit(hf, cache, fetched):
    _, commits = cache
    v2 = by_name(TransfoXLLMHeadModel, "org/name", cache, revision="v2")
    assert fetched == ["config.json", "model.safetensors"]           # the evil pytorch_model.bin beside it: untouched
    assert_same_model(v2, TransfoXLLMHeadModel.from_pretrained(hf[1]))
    assert_same_model(by_name(TransfoXLLMHeadModel, "org/name", cache, revision=commits["v2"]), v2)
    assert_same_model(by_name(TransfoXLLMHeadModel, "org/name", cache, revision=commits["main"]),
                      TransfoXLLMHeadModel.from_pretrained(hf[0]))
    fetched.clear()
    tok = by_name(TransfoXLTokenizer, "org/name", cache, revision="v2")
    assert fetched == ["vocab.json"] and tok.idx2sym == SYMBOLS       # our vocab.json: read, nothing else fetched
    assert not hf["marker"].exists()


def test_a_sharded_checkpoint_fetches_its_index_and_shards(hf, cache, fetched):
    model = by_name(TransfoXLLMHeadModel, "org/sharded", cache)
    index = json.loads((hf["sharded"] / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and fetched == ["config.json", "model.safetensors", "model.safetensors.index.json", *shards]
    assert_same_model(model, TransfoXLLMHeadModel.from_pretrained(hf[0]))


def test_dtype_and_device_apply_to_a_hub_model(cache):
    model = by_name(TransfoXLLMHeadModel, "org/name", cache, dtype="float64", device="cpu")
    assert next(model.parameters()).dtype == torch.float64


# ---- what is refused ------------------------------------------------------------------------


def test_crafted_pickles_in_the_cache_are_refused_and_never_run(hf, cache):
    with pytest.raises(ValueError, match=r"refused unread: .*\b(io|builtins)\.open") as e:
        by_name(TransfoXLLMHeadModel, "org/evil", cache)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"refused global '(io|builtins)\.open'") as e:
        by_name(TransfoXLTokenizer, "org/evil", cache)
    assert "\n" not in str(e.value)
    assert not hf["marker"].exists()


def test_missing_files_are_told_from_files_not_cached(cache, monkeypatch):
    cases = [("org/noweights", {}, "org/noweights (revision main): model.safetensors or model.safetensors.index.json "
                                    "or pytorch_model.bin is not in the local cache and local_files_only is set"),
             ("org/absent", {}, "org/absent (revision main): config.json is not in the local cache"),
             ("org/name", {"revision": "nope"}, "org/name (revision nope): config.json is not in the local cache")]
    for name, kwargs, message in cases:
        with pytest.raises(FileNotFoundError) as e:
            by_name(TransfoXLLMHeadModel, name, cache, **kwargs)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(FileNotFoundError, match=r"vocab.json or vocab.pkl or vocab.bin or vocab.txt is not in the "
                                                r"local cache and HF_HUB_OFFLINE is set$"):
        TransfoXLTokenizer.from_pretrained("org/noweights", cache_dir=cache[0])

    # online, the hub answers: the file or the repository is not there (huggingface_hub's errors, raised here)
    errors, real = huggingface_hub.utils, huggingface_hub.hf_hub_download

    def answer(error):
        def download(repo_id, filename, **kwargs):
            if filename == "config.json":
                return real(repo_id, filename, **kwargs)
            err = error.__new__(error)              # without the HTTP response their constructors want
            Exception.__init__(err, "404 Client Error\nfor url ...")
            raise err
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)

    for error, message in [(errors.EntryNotFoundError, "org/name (revision main) holds no model.safetensors or "
                                                       "model.safetensors.index.json or pytorch_model.bin"),
                           (errors.RevisionNotFoundError, "org/name has no revision 'main' on the Hugging Face hub"),
                           (errors.RepositoryNotFoundError, "org/name is neither a local directory nor a model "
                                                            "repository on the Hugging Face hub"),
                           (errors.HfHubHTTPError, "org/name (revision main): model.safetensors could not be "
                                                   "downloaded: 404 Client Error")]:
        answer(error)
        with pytest.raises(FileNotFoundError) as e:
            by_name(TransfoXLLMHeadModel, "org/name", cache)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"revision": 3}, TypeError, "revision must be a str"),
    ({"revision": " "}, ValueError, "revision is empty"),
    ({"local_files_only": "yes"}, TypeError, "local_files_only must be True or False"),
    ({"cache_dir": 3}, TypeError, "cache_dir must be a path"),
])
def test_bad_hub_arguments_are_refused_before_anything_is_fetched(kwargs, error, needle, fetched):
    for cls in (TransfoXLLMHeadModel, TransfoXLTokenizer):
        with pytest.raises(error, match=needle):
            cls.from_pretrained("org/name", **kwargs)
    assert fetched == []


def test_a_revision_for_a_local_directory_is_refused(hf):
    for cls in (TransfoXLLMHeadModel, TransfoXLTokenizer):
        with pytest.raises(ValueError, match="revision='v2' picks a revision of a Hugging Face hub model; .* local"):
            cls.from_pretrained(hf[0], revision="v2")


def test_what_is_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    for name in ("org/name", "transfo-xl/transfo-xl-wt103", "gpt2", "a.b/c_d-1"):
        assert hub.is_hub_name(name), name
    for name in ("here", "/abs/path", "./x", "a/b/c", "org--x/y", "a..b", "-x", "x/", "", Path("org/name"), 3):
        assert not hub.is_hub_name(name), name


def test_without_huggingface_hub_a_name_says_which_extra_and_a_directory_loads(hf, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    for cls in (TransfoXLLMHeadModel, TransfoXLTokenizer):
        with pytest.raises(ValueError, match=r'org/name is no local directory; .* pip install "txl_fast\[hub\]"$'):
            cls.from_pretrained("org/name")
    assert_same_model(TransfoXLLMHeadModel.from_pretrained(hf[0]), TransfoXLLMHeadModel.from_pretrained(str(hf[0])))
    assert main(["info", "--model", "org/name"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith('pip install "txl_fast[hub]"') and "\n" not in err


def test_import_and_local_directories_do_not_import_huggingface_hub(hf):
    code = (f"import sys, txl_fast; txl_fast.TransfoXLLMHeadModel.from_pretrained({str(hf[0])!r}); "
            f"txl_fast.TransfoXLTokenizer.from_pretrained({str(hf[0])!r}); print('huggingface_hub' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


# ---- the command line -------------------------------------------------------------------------


def txl_fast_cli(args, env):
    """``txl-fast ARGS`` in a fresh interpreter whose environment holds ``env`` and no other HF variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return subprocess.run([sys.executable, "-m", "txl_fast.cli", *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env={**base, **env})


def assert_one_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("txl-fast: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_info_and_eval_by_name_with_the_cache_from_the_environment(cache, hf, tmp_path):
    env = {"HF_HUB_CACHE": str(cache[0]), "HF_HUB_OFFLINE": "1"}
    proc = txl_fast_cli(["info", "--model", "org/name"], env)
    assert proc.returncode == 0, proc.stderr
    assert "model:       org/name" in proc.stdout and f"vocabulary:  {len(SYMBOLS)} symbols" in proc.stdout
    # HF_HOME: the cache is its hub/ folder
    proc = txl_fast_cli(["info", "--model", "org/name", "--revision", "v2"], {"HF_HOME": str(cache[0].parent),
                                                                             "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and "revision v2" in proc.stdout, proc.stderr

    assert_one_line(txl_fast_cli(["eval", "--model", "org/name"], env),
                    "org/name is a hub model", "no heldout.txt", "give a text FILE")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    proc = txl_fast_cli(["eval", str(text), "--model", "org/name", "--json", "--tgt-len", "8"], env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == "org/name" and report["tokens"] > 0 and report["perplexity"] > 1
    assert_one_line(txl_fast_cli(["info", "--model", "org/absent"], env),      # the vocabulary is fetched first
                    "org/absent (revision main): vocab.json or vocab.pkl or vocab.bin or vocab.txt is not in the "
                    "local cache and HF_HUB_OFFLINE is set")
    assert not hf["marker"].exists()


def test_cli_hub_flags_in_process(cache, hf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache[0]))      # read by txl_fast.hub at each call
    assert main(["info", "--model", "org/name", "--local-files-only", "--revision", "v2"]) == 0
    assert "org/name (Hugging Face hub, revision v2)" in capsys.readouterr().out
    assert main(["generate", "w1 w2", "--model", "org/name", "--max-new-tokens", "3", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("w1 w2")
    assert main(["info", "--revision", "v2"]) == 2                  # the embedded model is a local directory
    err = capsys.readouterr().err.strip()
    assert "--revision picks a revision of a model on the Hugging Face hub" in err and "\n" not in err


def test_convert_from_a_name_writes_the_safe_directory(cache, hf, tmp_path, monkeypatch, capsys, fetched):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache[0]))
    out = tmp_path / "converted"
    assert main(["convert", "org/name", str(out), "--local-files-only"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    assert set(fetched) == {"config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                            "vocab.json", "vocab.pkl"}
    assert_same_model(TransfoXLLMHeadModel.from_pretrained(out), TransfoXLLMHeadModel.from_pretrained(hf[0]))
    assert TransfoXLTokenizer.from_pretrained(out).idx2sym == SYMBOLS
    assert main(["convert", "org/name", str(tmp_path / "v2"), "--revision", "v2"]) == 0
    assert_same_model(TransfoXLLMHeadModel.from_pretrained(tmp_path / "v2"),
                      TransfoXLLMHeadModel.from_pretrained(hf[1]))
    capsys.readouterr()
    assert main(["convert", "org/evil", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused unread" in err and "\n" not in err and not (tmp_path / "bad").exists()
    assert not hf["marker"].exists()
