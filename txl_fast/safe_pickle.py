"""A restricted unpickler for legacy vocabulary files (HF `vocab.pkl` / `vocab.bin`).

Unpickling runs code: every global a pickle names is imported and may be called (REDUCE,
NEWOBJ, INST, OBJ). `RestrictedUnpickler.find_class` therefore resolves only

* allowed globals: builtin containers and scalars, the `collections` containers such files
  hold (OrderedDict, Counter, defaultdict, deque), and `_codecs.encode` restricted to latin-1
  (how protocols 0-2 spell `bytes`);
* inert globals: classes HF's `TransfoXLTokenizer.save_vocabulary` pickles along with the
  vocabulary because it dumps the whole `self.__dict__` (sacremoses' Moses* objects,
  transformers' `Trie`, tokenizers' `AddedToken`, `re._compile`). They are replaced by
  `InertObject` subclasses that take any arguments or state and do nothing: the vocabulary
  does not need them and no code of theirs runs.

Any other global raises `UnsafePickleError` naming it, before anything is called. Persistent
ids (how torch stores tensors) are refused too: tensors are never rebuilt here. Truncated or
corrupt input raises `ValueError`. What HF 4.35's vocab.pkl references, found by building one
with `save_vocabulary`: collections.Counter, collections.OrderedDict, re._compile,
sacremoses.normalize.MosesPunctNormalizer, sacremoses.tokenize.MosesTokenizer,
sacremoses.tokenize.MosesDetokenizer, transformers.tokenization_utils.Trie, tokenizers.AddedToken.

`load_legacy_pickle` also reads torch.save files without torch: the legacy format (a run of
pickles: magic number, protocol, sys info, object) and the zip format (`*/data.pkl`).
"""
from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import os
import pickle
import zipfile
from typing import Any, Union

__all__ = ["InertObject", "RestrictedUnpickler", "UnsafePickleError", "load_legacy_pickle"]

# first pickle of a legacy (pre-zip) torch.save file
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafePickleError(ValueError):
    """A pickle referenced a global (or a persistent id) outside the allow-list."""


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode`, as protocols 0-2 use it for bytes: `_codecs.encode(str, 'latin1')`."""
    if not isinstance(obj, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}: only latin-1 is allowed")
    return obj.encode("latin-1")


_ALLOWED = {
    **{("builtins", n): getattr(builtins, n)
       for n in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes",
                 "str", "int", "float", "complex", "bool")},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("collections", "defaultdict"): collections.defaultdict,
    ("collections", "deque"): collections.deque,
    ("_codecs", "encode"): _latin1_encode,
}

# globals in HF tokenizer pickles whose objects the vocabulary does not need
_INERT = {
    ("sacremoses.normalize", "MosesPunctNormalizer"),
    ("sacremoses.tokenize", "MosesTokenizer"),
    ("sacremoses.tokenize", "MosesDetokenizer"),
    ("sacremoses", "MosesPunctNormalizer"),
    ("sacremoses", "MosesTokenizer"),
    ("sacremoses", "MosesDetokenizer"),
    ("transformers.tokenization_utils", "Trie"),
    ("tokenizers", "AddedToken"),
    ("transformers.tokenization_utils_base", "AddedToken"),
    ("re", "_compile"),
}



class InertObject:
    """Stand-in for a skipped object: accepts any constructor arguments and state, keeps none.

    `qualname` on the class (and so on every instance) names the global it replaced."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<inert {self.qualname}>"


_inert_classes: dict[tuple[str, str], type] = {}


def _inert_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _inert_classes:
        _inert_classes[key] = type(f"Inert_{name}", (InertObject,), {"qualname": f"{module}.{name}"})
    return _inert_classes[key]


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals listed in this module."""

    def find_class(self, module: str, name: str):
        # python 2 names, which protocols 0-2 write (builtins.int is "__builtin__ long"): as pickle maps them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) in _INERT:
            return _inert_class(module, name)
        if module == "torch" or module.startswith("torch."):
            raise UnsafePickleError(
                f"refused global '{module}.{name}': the file holds torch objects (tensors?), which are not "
                f"rebuilt from vocabulary files"
            )
        raise UnsafePickleError(
            f"refused global '{module}.{name}': legacy vocabulary files may only contain builtin and "
            f"collections containers; this file would import (and could run) other code"
        )

    def persistent_load(self, pid):
        kind = pid[0] if isinstance(pid, tuple) and pid else pid
        raise UnsafePickleError(
            f"refused persistent id {kind!r}: the file holds torch tensors/storages, which are not "
            f"rebuilt from vocabulary files"
        )


def _load_one(stream: io.BytesIO) -> Any:
    try:
        return RestrictedUnpickler(stream).load()
    except UnsafePickleError:
        raise
    except RecursionError:
        raise ValueError("pickle nests too deeply") from None
    except Exception as e:  # the unpickler raises many types on bad input: EOFError, KeyError, ...
        raise ValueError(f"truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def _load_torch_zip(data: bytes) -> Any:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(names) != 1:
                raise ValueError(f"zip file is not a torch.save archive (found {len(names)} data.pkl entries)")
            payload = zf.read(names[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"truncated or corrupt zip archive: {e}") from None
    return _load_one(io.BytesIO(payload))


def load_legacy_pickle(path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> Any:
    """Unpickle a legacy vocabulary file with the restricted unpickler.

    Takes a path or the file's bytes. Plain pickles (any protocol), legacy torch.save files and
    zip torch.save files are read; the object is returned. Raises `UnsafePickleError` (a
    `ValueError`) for a global outside the allow-list or a tensor, `ValueError` for a truncated
    or corrupt file. Nothing named by a refused global is imported or called."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        where = "<bytes>"
    else:
        where = os.fspath(path_or_bytes)
        with open(where, "rb") as f:
            data = f.read()
    if not data:
        raise ValueError(f"{where}: empty file, not a pickle")
    if data[:4] == b"PK\x03\x04":
        return _load_torch_zip(data)
    stream = io.BytesIO(data)
    obj = _load_one(stream)
    if isinstance(obj, int) and not isinstance(obj, bool) and obj == _TORCH_MAGIC:
        # legacy torch.save: magic, protocol version, sys info, then the object itself
        _load_one(stream)
        _load_one(stream)
        obj = _load_one(stream)
    return obj
