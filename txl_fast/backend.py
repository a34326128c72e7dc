"""Which implementation the ops run: ``naive``, ``torch``, ``triton`` or ``auto``.

The choice is a context variable, so ``use_backend`` nests and is safe across threads.
``auto`` (the default) takes ``triton`` for CUDA tensors when triton imports, ``torch`` otherwise.

``sync_free(tensor)`` says whether ops on such tensors must avoid host synchronisation (data-dependent
shapes, ``.item()``): on CUDA, so that a decode step can be captured in a CUDA graph and queues
its launches without waiting; elsewhere only inside ``force_sync_free()`` (the tests use it to
run the CUDA formulation on the CPU), since a CPU "sync" costs nothing there.

Triton on CPU tensors runs only under the interpreter (``TRITON_INTERPRET=1`` set before
triton is imported); without it an explicit ``triton`` choice on CPU tensors is an error,
raised here, before any launch.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("naive", "torch", "triton", "auto")

_backend: contextvars.ContextVar[str] = contextvars.ContextVar("txl_fast_backend", default="auto")
_force_sync_free: contextvars.ContextVar[bool] = contextvars.ContextVar("txl_fast_sync_free", default=False)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Set the backend for this thread/context: one of ``naive``, ``torch``, ``triton``, ``auto``."""
    _backend.set(_check_name(name))


def get_backend() -> str:
    return _backend.get()


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("naive"): ...`` runs the block on that backend and restores the previous one."""
    token = _backend.set(_check_name(name))
    try:
        yield
    finally:
        _backend.reset(token)


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None     # looked up, not imported


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(tensor: torch.Tensor, name: Optional[str] = None) -> str:
    """The concrete backend (``naive``, ``torch`` or ``triton``) for an op whose inputs live like
    ``tensor``, resolving ``name`` (default: the active backend)."""
    name = _backend.get() if name is None else _check_name(name)
    if name == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was requested but triton is not installed")
        if not tensor.is_cuda and not triton_interpreter():
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (got {tensor.device}); on the CPU set "
                "TRITON_INTERPRET=1 before importing triton, or use the 'torch' backend"
            )
    return name


def sync_free(tensor: torch.Tensor) -> bool:
    """Whether ops on tensors like ``tensor`` take their formulations without host syncs (see above)."""
    return tensor.is_cuda or _force_sync_free.get()


@contextlib.contextmanager
def force_sync_free():
    """Run the block's ops in their sync-free (CUDA) formulations on any device."""
    token = _force_sync_free.set(True)
    try:
        yield
    finally:
        _force_sync_free.reset(token)
