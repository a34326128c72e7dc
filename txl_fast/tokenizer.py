"""Word-level Transformer-XL tokenizer: the ids of HF 4.35's `TransfoXLTokenizer`, without HF.

Pipeline for one line (as HF): split out the special tokens (`<eos>`, `<unk>`, `<formula>`);
each other chunk is stripped, lower-cased if `lower_case`, then Moses punctuation-normalised,
Moses-tokenised (`aggressive_dash_splits=True`, no escaping, special tokens protected), and
commas/dots between digits are split off as `@,@` / `@.@` ("1,000.5" -> `1 @,@ 000 @.@ 5`;
"well-known" -> `well @-@ known` comes from Moses). `decode` inverts this: Moses
detokenisation (which also joins `@-@`), `@,@`/`@.@` joined back, then HF's
`clean_up_tokenization`.

Vocabulary files:
    vocab.json   ours: the ordered symbol list and the settings that reproduce tokenisation
    vocab.pkl    HF `save_vocabulary` (a pickled `__dict__`), read with `txl_fast.safe_pickle`
    vocab.bin    the same dict written by `torch.save`, read with `txl_fast.safe_pickle`
    vocab.txt    the original kimiyoung format: the first whitespace field of each line

HF 4.35 behaviour found while pinning parity (tests/test_tokenizer.py), and what we do:

* `tokenize(text, add_eos=True)` drops `add_eos` / `add_double_eos` (PreTrainedTokenizer.tokenize
  only logs "Keyword arguments ... not recognized" and calls `_tokenize` without them), so HF's
  `encode_file(..., add_eos=True)` returns no `<eos>` at all. We append `<eos>` to every line as
  the original code does; `encode_file(add_eos=False)` equals HF's output.
* HF gives the special tokens their ids once, in the constructor. A tokenizer that builds its
  vocabulary afterwards (`count_file` + `build_vocab`) keeps `<eos>`, `<unk>`, `<formula>` at
  ids 0, 1, 2 of its added-tokens table whatever the vocabulary says: literal special tokens in
  text encode to those ids and ids 0-2 decode to those strings. We recompute the table whenever
  the vocabulary changes, which is what HF does for a tokenizer built from a finished
  vocabulary (`vocab_file=`); the pickled HF state repeats the stale table and we ignore it.
* `TransfoXLTokenizer(pretrained_vocab_file="vocab.pkl")` copies only pickled keys the
  constructor has not set, plus `sym2idx`: `idx2sym` stays empty, `vocab_size` is 0 and
  `decode` raises IndexError. We read both and check that they agree.
* Special tokens absent from the vocabulary get ids after it (`vocab_size`, `vocab_size + 1`,
  ... in the order eos, unk, additional), so `len(tok) > tok.vocab_size` and a literal
  `<formula>` in text can encode to an id outside the model's embedding table.
* Unknown words map to `<unk>`, else `<UNK>` (a `vocab.txt` prefers `<UNK>`); with neither in
  the vocabulary they raise ValueError, even though `<unk>` has an added-token id.
* sacremoses matches protected patterns case-insensitively: `<EOS>` stays one token.
* `delimiter` other than "" is ignored (Moses is always used); `delimiter=""` splits into
  characters (HF's `_tokenize` returns the string itself, and raises TypeError with add_eos).
* `decode` applies `clean_up_tokenization` (" ." -> ".", " 's" -> "'s", " ' " -> "'", ...),
  and detokenises additional special tokens outside the vocabulary apart, joined by spaces.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from txl_fast import hub
from txl_fast.checks import is_int
from txl_fast.safe_pickle import load_legacy_pickle

VOCAB_JSON = "vocab.json"
VOCAB_PKL = "vocab.pkl"
VOCAB_BIN = "vocab.bin"
VOCAB_TXT = "vocab.txt"
_FORMAT = "txl_fast.vocab"

_NUMBER_SEP = re.compile(r"(?<=\d)[,.](?=\d)")
_NUMBER_UNSEP = ((re.compile(r" @,@ "), ","), (re.compile(r" @\.@ "), "."))
# HF's PreTrainedTokenizerBase.clean_up_tokenization, in its order
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
             (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

# settings saved in vocab.json: everything that changes how text becomes ids
_SETTINGS = ("special", "min_freq", "max_size", "lower_case", "delimiter", "never_split",
             "unk_token", "eos_token", "additional_special_tokens", "language")


def _sacremoses():
    """The sacremoses module, imported at the first tokenisation (about half a second)."""
    try:
        import sacremoses  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"tokenizing text needs sacremoses (pip install sacremoses): {e}") from e
    return sacremoses


def tokenize_numbers(tokens: Iterable[str]) -> list[str]:
    """Split commas and dots between digits: ["$", "5,000", "1.73"] -> ["$", "5", "@,@", "000", "1", "@.@", "73"]."""
    out = []
    for tok in tokens:
        out.extend(_NUMBER_SEP.sub(r" @\g<0>@ ", tok).split())
    return out


def detokenize_numbers(text: str) -> str:
    """Inverse of `tokenize_numbers` on a detokenised string: "5 @,@ 000" -> "5,000"."""
    for pattern, repl in _NUMBER_UNSEP:
        text = pattern.sub(repl, text)
    return text


def clean_up_tokenization(text: str) -> str:
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def _is_str_list(x) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(s, str) for s in x)


class TransfoXLTokenizer:
    """Word-level tokenizer with the constructor, vocabulary and ids of HF 4.35's TransfoXLTokenizer.

    Build a vocabulary with `count_file` / `count_sents` then `build_vocab`, or load one with
    `from_pretrained(dir)` (vocab.json, vocab.pkl, vocab.bin or vocab.txt). Ids below
    `vocab_size` are the vocabulary's; special tokens missing from it come after (see module
    docstring)."""

    def __init__(
        self,
        special: Optional[Sequence[str]] = None,
        min_freq: int = 0,
        max_size: Optional[int] = None,
        lower_case: bool = False,
        delimiter: Optional[str] = None,
        vocab_file: Optional[str] = None,
        pretrained_vocab_file: Optional[str] = None,
        never_split: Optional[Sequence[str]] = None,
        unk_token: str = "<unk>",
        eos_token: str = "<eos>",
        additional_special_tokens: Sequence[str] = ("<formula>",),
        language: str = "en",
    ):
        self.special = list(special) if special is not None else []
        self.min_freq = min_freq
        self.max_size = max_size
        self.lower_case = lower_case
        self.delimiter = delimiter
        self.vocab_file = vocab_file
        self.unk_token = unk_token
        self.eos_token = eos_token
        self.additional_special_tokens = list(additional_special_tokens or [])
        self.language = language
        self.never_split = list(never_split) if never_split is not None else self.all_special_tokens

        # special tokens are cut out of the text before Moses sees it; longest first, as HF's trie
        specials = sorted(set(self.all_special_tokens), key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

        self.counter: Counter = Counter()
        self.idx2sym: list[str] = []
        self.sym2idx: dict[str, int] = {}
        self.unk_idx: Optional[int] = None
        self.added_tokens: dict[str, int] = {}  # special tokens outside the vocabulary -> ids after it

        if pretrained_vocab_file is not None:
            _, idx2sym, unk_idx = _read_vocab(Path(pretrained_vocab_file))
            self._set_vocab(idx2sym, unk_idx)
        elif vocab_file is not None:
            self.build_vocab()
        else:
            self._set_vocab([], None)

    # ---------------------------------------------------------------- special tokens

    @property
    def all_special_tokens(self) -> list[str]:
        """eos, unk, then the additional special tokens (HF's order), without repeats."""
        toks = [t for t in (self.eos_token, self.unk_token) if t is not None] + self.additional_special_tokens
        return list(dict.fromkeys(toks))

    @property
    def eos_token_id(self) -> Optional[int]:
        return None if self.eos_token is None else self.convert_tokens_to_ids(self.eos_token)

    @property
    def unk_token_id(self) -> Optional[int]:
        return None if self.unk_token is None else self.convert_tokens_to_ids(self.unk_token)

    # ---------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary proper, without added special tokens."""
        return len(self.idx2sym)

    def __len__(self) -> int:
        return len(self.idx2sym) + len(self.added_tokens)

    def get_vocab(self) -> dict[str, int]:
        return {**self.sym2idx, **self.added_tokens}

    def _set_vocab(self, idx2sym: list[str], unk_idx: Optional[int]) -> None:
        """Install a vocabulary and derive everything that depends on it."""
        self.idx2sym = list(idx2sym)
        self.sym2idx = {s: i for i, s in enumerate(self.idx2sym)}
        if len(self.sym2idx) != len(self.idx2sym):
            dup = next(s for s in self.idx2sym if self.idx2sym.count(s) > 1)
            raise ValueError(f"vocabulary lists symbol {dup!r} twice")
        if unk_idx is None:
            unk_idx = self.sym2idx.get("<unk>", self.sym2idx.get("<UNK>"))
        elif not 0 <= unk_idx < len(self.idx2sym):
            raise ValueError(f"unk index {unk_idx} outside the vocabulary of {len(self.idx2sym)} symbols")
        self.unk_idx = unk_idx
        missing = [t for t in self.all_special_tokens if t not in self.sym2idx]
        self.added_tokens = {t: len(self.idx2sym) + k for k, t in enumerate(missing)}

    def count_file(self, path: Union[str, os.PathLike], add_eos: bool = False) -> list[list[str]]:
        """Tokenise every line of a UTF-8 file, add the symbols to the counts, return the lines' symbols."""
        sents = []
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                symbols = self.tokenize(line, add_eos=add_eos)
                self.counter.update(symbols)
                sents.append(symbols)
        return sents

    def count_sents(self, sents: Iterable[Sequence[str]]) -> None:
        """Add already tokenised sentences (lists of symbols) to the counts."""
        for symbols in sents:
            self.counter.update(symbols)

    def build_vocab(self) -> None:
        """From `vocab_file` if set; otherwise `special` first, then counted symbols by frequency
        (ties in first-seen order), at most `max_size` of them, stopping below `min_freq`."""
        if self.vocab_file:
            idx2sym = _read_vocab_txt(Path(self.vocab_file))
            unk = "<UNK>" if "<UNK>" in idx2sym else "<unk>" if "<unk>" in idx2sym else None
            if unk is None:
                raise ValueError(f"{self.vocab_file}: the vocabulary has neither <unk> nor <UNK>")
            self._set_vocab(idx2sym, idx2sym.index(unk))
            return
        idx2sym = list(dict.fromkeys(self.special))
        seen = set(idx2sym)
        # max_size limits the counted symbols, not the specials; a counted special still uses a slot
        for sym, cnt in self.counter.most_common(self.max_size):
            if cnt < self.min_freq:
                break
            if sym not in seen:
                seen.add(sym)
                idx2sym.append(sym)
        self._set_vocab(idx2sym, None)

    # ---------------------------------------------------------------- text -> symbols -> ids

    # Moses is built at first use: loading a vocabulary (`from_pretrained`, `len`, `txl-fast info`)
    # needs no sacremoses
    @functools.cached_property
    def moses_punct_normalizer(self):
        return _sacremoses().MosesPunctNormalizer(self.language)

    @functools.cached_property
    def moses_tokenizer(self):
        return _sacremoses().MosesTokenizer(self.language)

    @functools.cached_property
    def moses_detokenizer(self):
        return _sacremoses().MosesDetokenizer(self.language)

    def moses_pipeline(self, text: str) -> list[str]:
        text = self.moses_punct_normalizer.normalize(text)
        tokens = self.moses_tokenizer.tokenize(
            text, aggressive_dash_splits=True, return_str=False, escape=False, protected_patterns=self.never_split
        )
        return tokenize_numbers(tokens)

    def _tokenize_chunk(self, chunk: str) -> list[str]:
        chunk = chunk.strip()
        if self.lower_case:
            chunk = chunk.lower()
        if self.delimiter == "":
            return list(chunk)
        return self.moses_pipeline(chunk)

    def tokenize(self, text: str, add_eos: bool = False, add_double_eos: bool = False) -> list[str]:
        """Symbols of one line of text. `add_eos` appends `<eos>`; `add_double_eos` (lm1b) wraps in `<S>`."""
        pieces = self._special_split.split(text) if self._special_split else [text]
        if self.lower_case:
            # HF lower-cases around the special tokens first, then splits again: "X<EOS>" -> "x", "<eos>"
            text = "".join(p if i % 2 else p.lower() for i, p in enumerate(pieces))
            pieces = self._special_split.split(text) if self._special_split else [text]
        symbols = []
        for i, piece in enumerate(pieces):
            if i % 2:  # a special token, kept verbatim
                symbols.append(piece)
            elif piece:
                symbols.extend(self._tokenize_chunk(piece))
        if add_double_eos:
            return ["<S>"] + symbols + ["<S>"]
        if add_eos:
            return symbols + ["<eos>"]
        return symbols

    def _token_to_id(self, sym: str) -> int:
        idx = self.sym2idx.get(sym)
        if idx is None:
            idx = self.added_tokens.get(sym, self.unk_idx)
        if idx is None:
            raise ValueError(f"symbol {sym!r} is not in the vocabulary, which has no <unk> or <UNK> to replace it")
        return idx

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[int, list[int]]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def encode(self, text: str, add_eos: bool = False, add_double_eos: bool = False) -> list[int]:
        return self.convert_tokens_to_ids(self.tokenize(text, add_eos=add_eos, add_double_eos=add_double_eos))

    def encode_lines(
        self, lines: Iterable[str], ordered: bool = True, add_eos: bool = True, add_double_eos: bool = False
    ) -> Union[torch.Tensor, list[torch.Tensor]]:
        """Encode text line by line, as `txl-fast eval` does a file: each line (its line end, if any,
        dropped) tokenised on its own, `<eos>` appended to each (`add_eos`). One LongTensor
        (`ordered`) or a list, one per line. `encode_file` and `txl-fast eval` go through here.
        For a whole text: `encode_lines(text.splitlines())`."""
        if isinstance(lines, str):
            raise TypeError("encode_lines takes an iterable of lines, not one string; "
                            "for a text use encode_lines(text.splitlines())")
        encoded = []
        for n, line in enumerate(lines, 1):
            if not isinstance(line, str):
                raise TypeError(f"line {n} is a {type(line).__name__}, not a str")
            line = line.rstrip("\r\n")
            if "\n" in line or "\r" in line:
                raise ValueError(f"line {n} holds a line break inside it; split the text into lines first")
            ids = self.encode(line, add_eos=add_eos, add_double_eos=add_double_eos)
            encoded.append(torch.tensor(ids, dtype=torch.long))
        if ordered:
            return torch.cat(encoded) if encoded else torch.empty(0, dtype=torch.long)
        return encoded

    def encode_file(
        self, path: Union[str, os.PathLike], ordered: bool = True, add_eos: bool = True, add_double_eos: bool = False
    ) -> Union[torch.Tensor, list[torch.Tensor]]:
        """Encode a UTF-8 corpus line by line (`encode_lines`): the id stream `txl-fast eval` scores."""
        with open(path, "r", encoding="utf-8") as f:
            return self.encode_lines(f, ordered=ordered, add_eos=add_eos, add_double_eos=add_double_eos)

    # ---------------------------------------------------------------- ids -> text

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """Symbols of ids; a single int gives a single symbol. Ids outside [0, len(self)) raise ValueError."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if is_int(ids):
            return self._id_to_token(ids)
        if isinstance(ids, (str, bytes)) or not all(is_int(i) for i in ids):   # 1.5 is not id 1, "3" not id 3
            raise TypeError(f"token ids must be integers, got {ids!r}")
        skip = set(self.convert_tokens_to_ids(self.all_special_tokens)) if skip_special_tokens else ()
        return [self._id_to_token(i) for i in ids if i not in skip]

    def _id_to_token(self, idx: int) -> str:
        if not 0 <= idx < len(self):
            raise ValueError(f"id {idx} out of range: this tokenizer has ids 0..{len(self) - 1}")
        if idx < len(self.idx2sym):
            return self.idx2sym[idx]
        return next(t for t, i in self.added_tokens.items() if i == idx)

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Moses detokenisation, then `@,@`/`@.@` joined back."""
        return detokenize_numbers(self.moses_detokenizer.detokenize(list(tokens))).strip()

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = True) -> str:
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        if isinstance(tokens, str):
            tokens = [tokens]
        # HF detokenises additional special tokens that are not in the vocabulary on their own
        apart = {t for t in self.additional_special_tokens if t in self.added_tokens}
        texts, run = [], []
        for tok in tokens:
            if tok in apart:
                if run:
                    s = self.convert_tokens_to_string(run)
                    if s:
                        texts.append(s)
                    run = []
                texts.append(tok)
            else:
                run.append(tok)
        if run:
            texts.append(self.convert_tokens_to_string(run))
        text = " ".join(texts)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ---------------------------------------------------------------- files

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in _SETTINGS}

    def save_vocabulary(self, save_directory: Union[str, os.PathLike], filename_prefix: Optional[str] = None) -> str:
        """Write `vocab.json` (symbols in id order, settings, unk index) into a directory; return its path."""
        path = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_JSON)
        payload = {"format": _FORMAT, "version": 1, "settings": self.settings(),
                   "unk_idx": self.unk_idx, "idx2sym": self.idx2sym}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False, indent=0)
        return str(path)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> tuple[str]:
        """Write `vocab.json` into `save_directory` (created if missing), the file `from_pretrained`
        and `txl-fast --model DIR` read; return its path as a 1-tuple, as HF does."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        return (self.save_vocabulary(directory),)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, revision: Optional[str] = None,
                        local_files_only: bool = False, cache_dir=None, **kwargs) -> "TransfoXLTokenizer":
        """Load from a directory holding vocab.json / vocab.pkl / vocab.bin / vocab.txt (first found
        wins), from one such file, or from a Hugging Face hub name ("org/name", `revision`,
        `local_files_only`, `cache_dir`: `txl_fast.hub`), which fetches one file: vocab.json if it is
        ours, else the first of vocab.pkl, vocab.bin, vocab.txt. Settings stored in the file apply
        unless given in `kwargs`."""
        repo = hub.repo_for(path, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
        path = _fetch_vocab(repo) if repo is not None else Path(path)
        if path.is_dir():
            for name in (VOCAB_JSON, VOCAB_PKL, VOCAB_BIN, VOCAB_TXT):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"{path} holds none of {VOCAB_JSON}, {VOCAB_PKL}, {VOCAB_BIN}, {VOCAB_TXT}")
        if path.suffix == ".txt":
            return cls(vocab_file=str(path), **kwargs)
        settings, idx2sym, unk_idx = _read_vocab(path)
        tok = cls(**{**settings, **kwargs})
        tok._set_vocab(idx2sym, unk_idx)
        return tok


# -------------------------------------------------------------------- readers


def _fetch_vocab(repo: hub.HubRepo) -> Path:
    """The vocabulary file of a hub model, fetched: vocab.json when it is txl_fast's (HF's repositories
    may hold another format under that name), else the first of vocab.pkl, vocab.bin, vocab.txt."""
    ours = repo.fetch(VOCAB_JSON)
    if ours is not None and _is_ours(ours):
        return ours
    legacy = (VOCAB_PKL, VOCAB_BIN, VOCAB_TXT)
    for name in legacy:
        path = repo.fetch(name)
        if path is not None:
            return path
    raise repo.missing(legacy if ours is not None else (VOCAB_JSON, *legacy))


def _is_ours(path: Path) -> bool:
    """Whether a vocab.json says it is txl_fast's format (then read, and refused if damaged)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            payload = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and payload.get("format") == _FORMAT


def _read_vocab_txt(path: Path) -> list[str]:
    """kimiyoung's format: the first whitespace-separated field of each line ("symbol [count]")."""
    idx2sym = []
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                raise ValueError(f"{path}:{n}: empty line in vocabulary file")
            if fields[0] not in idx2sym:
                idx2sym.append(fields[0])
    return idx2sym


def _read_vocab(path: Path) -> tuple[dict, list[str], Optional[int]]:
    """(settings, idx2sym, unk_idx) from vocab.json or a legacy HF pickle / torch.save file."""
    if path.suffix == ".json":
        try:
            with open(path, "r", encoding="utf-8") as f:
                payload = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a txl_fast vocabulary (expected \"format\": \"{_FORMAT}\")")
        if payload.get("version") != 1:
            raise ValueError(f"{path}: vocabulary format version {payload.get('version')!r}; this txl_fast reads 1")
        settings = payload.get("settings", {})
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: \"settings\" must be an object, got {type(settings).__name__}")
        unknown = set(settings) - set(_SETTINGS)
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        mistyped = sorted(k for k, v in settings.items() if k in _SETTING_TYPES and not _SETTING_TYPES[k](v))
        if mistyped:            # "lower_case": "no" would be truthy: refused, not misread
            raise ValueError(f"{path}: settings of the wrong type: "
                             + ", ".join(f"{k}={settings[k]!r}" for k in mistyped))
        idx2sym, unk_idx = payload.get("idx2sym"), payload.get("unk_idx")
        if not _is_str_list(idx2sym) or not (unk_idx is None or is_int(unk_idx)):
            raise ValueError(f"{path}: idx2sym must be a list of strings and unk_idx an int or null")
        return settings, idx2sym, unk_idx
    return _from_legacy_dict(load_legacy_pickle(path), path)


# the type each setting must have, in vocab.json (refused otherwise) and in a legacy pickle (ignored otherwise)
_SETTING_TYPES = {
    "special": _is_str_list,
    "never_split": lambda v: v is None or _is_str_list(v),
    "additional_special_tokens": _is_str_list,
    "min_freq": is_int,
    "max_size": lambda v: v is None or is_int(v),
    "lower_case": lambda v: isinstance(v, bool),
    "delimiter": lambda v: v is None or isinstance(v, str),
    "language": lambda v: isinstance(v, str),
    "unk_token": lambda v: isinstance(v, str),
    "eos_token": lambda v: isinstance(v, str),
}


def _from_legacy_dict(state, path: Path) -> tuple[dict, list[str], Optional[int]]:
    """Vocabulary and settings out of HF's pickled tokenizer `__dict__` (values type-checked)."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a pickled dict (HF tokenizer state), got {type(state).__name__}")
    idx2sym, sym2idx = state.get("idx2sym"), state.get("sym2idx")
    if sym2idx is not None and not (isinstance(sym2idx, dict) and all(
            isinstance(s, str) and isinstance(i, int) for s, i in sym2idx.items())):
        raise ValueError(f"{path}: sym2idx is not a mapping of str to int")
    if idx2sym is not None and not _is_str_list(idx2sym):
        raise ValueError(f"{path}: idx2sym is not a list of strings")
    if not idx2sym:
        if not sym2idx:
            raise ValueError(f"{path}: no vocabulary (neither idx2sym nor sym2idx)")
        if sorted(sym2idx.values()) != list(range(len(sym2idx))):
            raise ValueError(f"{path}: sym2idx ids are not 0..{len(sym2idx) - 1}")
        idx2sym = sorted(sym2idx, key=sym2idx.get)
    elif sym2idx and sym2idx != {s: i for i, s in enumerate(idx2sym)}:
        raise ValueError(f"{path}: idx2sym and sym2idx disagree")
    unk_idx = state.get("unk_idx")
    if not is_int(unk_idx):
        unk_idx = None

    # settings: HF's instance attributes, then its init_kwargs; a value of the wrong type is ignored
    init_kwargs = state.get("init_kwargs") if isinstance(state.get("init_kwargs"), dict) else {}
    settings = {}
    for key, ok in _SETTING_TYPES.items():
        value = state[key] if key in state else init_kwargs.get(key)
        if value is not None and ok(value):
            settings[key] = list(value) if isinstance(value, tuple) else value
    return settings, list(idx2sym), unk_idx
