"""Checkpoints in HF's directory layout, read without executing pickles.

    config.json                       TransfoXLConfig
    model.safetensors                 preferred; tied tensors stored once
    model.safetensors.index.json      sharded safetensors
    pytorch_model.bin                 legacy torch.save file: read with torch.load(weights_only=True) only

A hub name ("org/name", see txl_fast.hub) fetches config.json and the first of these weights the
revision has (an index with its shards), nothing else, and reads them from huggingface_hub's cache.

Loading checks every key and shape against the model before copying anything: missing keys
(other than tied copies), unexpected keys, shape mismatches and NaN/inf values are a ValueError
naming them. A .bin that torch's weights-only loader refuses is named for what it holds (the
pickle globals outside torch, read with ``pickletools`` and never run), not for torch's advice to
load it unrestricted.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from txl_fast import hub
from txl_fast.config import TransfoXLConfig
from txl_fast.dtypes import check_device, check_dtype

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
CONFIG = "config.json"
METRICS = "metrics.json"            # a trained model's numbers and the protocol they were measured with
HELDOUT = "heldout.txt"             # the text held out of its training


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


# globals a tensors-only torch.save file may name besides torch's own
_TENSOR_FILE_GLOBALS = {"collections.OrderedDict", "_codecs.encode"}
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}


def _pickle_globals(raw: bytes) -> list[str]:
    """Every global ("module.name") the pickles of a torch.save file name (zip or legacy format),
    found by reading the opcodes with ``pickletools.genops``: nothing is imported or run."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            blobs = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    except zipfile.BadZipFile:
        blobs = [raw]                         # legacy format: a run of pickles, then raw storages
    names = []
    for blob in blobs:
        stream = io.BytesIO(blob)
        while stream.tell() < len(blob):
            strings, memo, last = [], {}, None          # string pushes, memo index -> string, last string pushed
            try:
                for op, arg, _ in pickletools.genops(stream):
                    if op.name in ("GLOBAL", "INST"):
                        names.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL":
                        names.append(".".join(strings[-2:]))
                    if op.name in _STRING_OPS:
                        last = arg
                        strings.append(arg)
                        continue
                    if op.name == "MEMOIZE" and last is not None:
                        memo[len(memo)] = last
                    elif op.name.endswith("PUT") and last is not None:
                        memo[arg] = last
                    elif op.name.endswith("GET") and arg in memo:
                        strings.append(memo[arg])
                        continue
                    last = None
            except (ValueError, EOFError, UnicodeDecodeError):
                break                                   # past the pickles (storage bytes) or corrupt
    return names


def _read_torch_bin(path: Path) -> dict:
    try:
        with warnings.catch_warnings():        # torch warns about pickle protocols above 2; the checks below speak
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, which would run the file's code: name what it holds
        foreign = sorted({g for g in _pickle_globals(path.read_bytes())
                          if not g.startswith("torch") and g not in _TENSOR_FILE_GLOBALS})
        if foreign:
            raise ValueError(
                f"{path} was refused unread: it holds code or objects that are not tensors (it names "
                f"{', '.join(foreign)}); only tensors-only checkpoints are loaded: ask for a safetensors copy"
            ) from None
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "weights_only" not in ln and not ln.startswith("Check the doc")
                      and not ln.startswith("Weights only load failed")), "unreadable pickle")
        raise ValueError(f"{path} was refused: not a tensors-only PyTorch checkpoint (corrupt, or it holds "
                         f"objects that are not tensors): {cause}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def _index_shards(index: Path) -> list[str]:
    """The shard files a safetensors index names, each a plain file name beside it."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ValueError(f"{index} names a shard outside the directory: {shard!r}")
    return shards


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory, safetensors first, never through an unrestricted unpickler."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    if (d / SAFETENSORS).is_file():
        return _read_safetensors(d / SAFETENSORS)
    if (d / SAFETENSORS_INDEX).is_file():
        state = {}
        for shard in _index_shards(d / SAFETENSORS_INDEX):
            if not (d / shard).is_file():
                raise FileNotFoundError(f"shard {shard} listed in {SAFETENSORS_INDEX} is missing from {d}")
            state.update(_read_safetensors(d / shard))
        return state
    if (d / TORCH_BIN).is_file():
        return _read_torch_bin(d / TORCH_BIN)
    raise FileNotFoundError(f"no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN} in {d}")


def _match_prefix(state: dict, model) -> dict:
    """Add or strip HF's base-model prefix ("transformer.") so a base checkpoint loads into a head model and back."""
    prefix = model.base_model_prefix + "."
    ours = model.state_dict().keys()
    wants_prefix = any(k.startswith(prefix) for k in ours)
    has_prefix = any(k.startswith(prefix) for k in state)
    if wants_prefix and not has_prefix:
        return {prefix + k: v for k, v in state.items()}
    if has_prefix and not wants_prefix:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


# the dtypes a checkpoint's float weights may come in (cast to the model's): float8 and others are refused
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def load_state_dict_into(model, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` after checking every key and shape; tied copies may be absent."""
    state = _match_prefix(state, model)
    expected = model.state_dict()
    tied = model.tied_parameter_names()
    missing = sorted(k for k in expected if k not in state and k not in tied)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state if k in expected and state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"mis-shaped keys: {'; '.join(wrong)}")
    if problems:
        raise ValueError("checkpoint does not match the model: " + " | ".join(problems))
    not_float = sorted(f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items()
                       if expected[k].is_floating_point() and v.dtype not in FLOAT_DTYPES)
    if not_float:       # an integer or bool weight would be cast and loaded as a wrong model
        raise ValueError(f"checkpoint holds float weights in dtypes they cannot take (float16, bfloat16, float32, "
                         f"float64): {', '.join(not_float)}")
    non_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise ValueError(f"checkpoint holds NaN or inf values in: {', '.join(non_finite)}")
    model.load_state_dict(state, strict=False)      # strictness checked above (tied copies may be absent)


def _fetch_checkpoint(repo: hub.HubRepo) -> Path:
    """The cache directory holding config.json and the weights of a hub model, fetched: the first of
    model.safetensors, model.safetensors.index.json (with its shards) and pytorch_model.bin."""
    config = repo.require(CONFIG)
    for name in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN):
        weights = repo.fetch(name)
        if weights is not None:
            break
    else:
        raise repo.missing((SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN))
    if name == SAFETENSORS_INDEX:
        for shard in _index_shards(weights):
            repo.require(shard)
    return config.parent                    # snapshots/<commit>/: every file fetched from that commit


def load_pretrained(cls, name_or_dir, *, dtype: Optional[torch.dtype] = None, device=None,
                    revision: Optional[str] = None, local_files_only: bool = False, cache_dir=None):
    """``cls`` built from a local directory, or from a hub name ("org/name": ``txl_fast.hub``, at
    ``revision``, from ``cache_dir``, the cache alone with ``local_files_only``), in ``dtype`` (a
    torch.dtype or its name, checked first: ``txl_fast.dtypes.check_dtype``) on ``device``."""
    if device is not None:
        device = check_device(device)
    if dtype is not None:
        dtype = check_dtype(dtype, device)
    if isinstance(name_or_dir, str) and not name_or_dir.strip():
        raise ValueError("from_pretrained: the checkpoint directory is empty (\"\"); give its path")
    repo = hub.repo_for(name_or_dir, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    d = _fetch_checkpoint(repo) if repo is not None else Path(name_or_dir)
    if not (d / CONFIG).is_file():
        raise FileNotFoundError(f"no {CONFIG} in {d}" if d.is_dir() else f"checkpoint directory {d} does not exist")
    config = TransfoXLConfig.from_json_file(d / CONFIG)
    state = read_state_dict(d)
    model = cls(config)
    load_state_dict_into(model, state)
    model.tie_weights()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def save_pretrained(model, directory) -> None:
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{d} exists and is not a directory")
    d.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(d / CONFIG)
    tied = model.tied_parameter_names()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(d / SAFETENSORS), metadata={"format": "pt"})
