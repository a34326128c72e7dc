"""Which implementation the ops run: ``naive``, ``torch``, ``triton`` or ``auto``.

The choice is a context variable, so ``use_backend`` nests and is safe across threads.
``auto`` (the default) takes ``triton`` for CUDA tensors when triton imports, ``torch`` otherwise.
triton is an optional dependency (``pip install "txl_fast[triton]"``); without it an explicit
``triton`` is a ValueError that says so, at ``set_backend`` / ``use_backend``.

``sync_free(tensor)`` says whether ops on such tensors must avoid host synchronisation (data-dependent
shapes, ``.item()``): on CUDA, so that a decode step can be captured in a CUDA graph and queues
its launches without waiting; elsewhere only inside ``force_sync_free()`` (the tests use it to
run the CUDA formulation on the CPU), since a CPU "sync" costs nothing there.

``use_cpu_compile()`` (also a context variable; off by default) lets the ops that have a compiled CPU
form run it: today a decode step's attention and its bf16 / fp16 one-row products
(``ops.compiled_decode``), compiled by torch.compile's
Inductor on first use, which needs a C++ compiler: turning it on without one is a ValueError.

Under ``torch.compile`` the settings are read when the caller is traced and kept as constants
(``trace_constant``: Dynamo cannot trace a ContextVar), so a compiled function keeps the backend
it was traced with.

Triton on CPU tensors runs only under the interpreter (``TRITON_INTERPRET=1`` set before
triton is imported); without it an explicit ``triton`` choice on CPU tensors is an error,
raised here, before any launch.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
from typing import Callable, Optional

import torch

BACKENDS = ("naive", "torch", "triton", "auto")

_backend: contextvars.ContextVar[str] = contextvars.ContextVar("txl_fast_backend", default="auto")
_cpu_compile: contextvars.ContextVar[bool] = contextvars.ContextVar("txl_fast_cpu_compile", default=False)
_force_sync_free: contextvars.ContextVar[bool] = contextvars.ContextVar("txl_fast_sync_free", default=False)


def trace_constant(fn: Callable) -> Callable:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does (Dynamo calls it when it traces
    the caller and keeps the result, without a guard), without importing ``torch._dynamo`` (well
    over a second) at ``import txl_fast``; tests/test_compile.py checks that the mark is torch's."""
    fn._dynamo_marked_constant = True
    return fn


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "triton":
        _require_triton()
    return name


def set_backend(name: str) -> None:
    """Set the backend for this thread/context: one of ``naive``, ``torch``, ``triton``, ``auto``.
    ``triton`` without triton installed is a ValueError saying how to install it."""
    _backend.set(_check_name(name))


@trace_constant
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


TRITON_MISSING = 'backend \'triton\' needs triton, which is not installed here: pip install "txl_fast[triton]"'


_triton_imports: Optional[bool] = None      # unknown until first needed


def triton_available() -> bool:
    """Whether triton imports. Tried once, when first needed (CUDA tensors on ``auto``, or an
    explicit ``triton``), so that ``import txl_fast`` and CPU-only use never import it."""
    global _triton_imports
    if _triton_imports is None:
        try:
            import triton  # noqa: F401, PLC0415
            _triton_imports = True
        except ImportError:
            _triton_imports = False
    return _triton_imports


def _require_triton() -> None:
    if not triton_available():
        raise ValueError(TRITON_MISSING)


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(tensor: torch.Tensor, name: Optional[str] = None) -> str:
    """The concrete backend (``naive``, ``torch`` or ``triton``) for an op whose inputs live like
    ``tensor``, resolving ``name`` (default: the active backend)."""
    name = get_backend() if name is None else _check_name(name)
    if name == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if name == "triton":
        _require_triton()
        if not tensor.is_cuda and not triton_interpreter():
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (got {tensor.device}); on the CPU set "
                "TRITON_INTERPRET=1 before importing triton, or use the 'torch' backend"
            )
    return name


def compile_disabled(reason: str) -> Callable:
    """``torch.compiler.disable(fn, reason=reason)``, without importing the compiler to get it:
    ``torch.compiler.disable`` imports ``torch._dynamo`` (well over a second), which only a caller
    of ``torch.compile`` needs. Until ``torch._dynamo`` is imported nothing can be compiling, and
    ``fn`` is called as it is; from then on through the disabled wrapper, built once. Under
    ``torch.compile`` the call breaks the graph and ``fn`` runs eagerly, as with the decorator."""
    def decorate(fn: Callable) -> Callable:
        disabled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal disabled
            if disabled is None:
                if "torch._dynamo" not in sys.modules:
                    return fn(*args, **kwargs)
                disabled = torch.compiler.disable(fn, reason=reason)
            return disabled(*args, **kwargs)

        return call

    return decorate


def _require_cpp_compiler() -> None:
    """Inductor's CPU code needs a C++ compiler ($CXX, else g++): a ValueError naming it when none runs."""
    try:
        from torch._inductor import cpp_builder  # noqa: PLC0415 (the compiler stack: only when asked)

        cpp_builder.get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 (InvalidCxxCompiler, a compiler that fails to run, no Inductor)
        raise ValueError("compiling the CPU decode step (torch.compile, Inductor) needs a C++ compiler: "
                         f"none runs here ({type(e).__name__}); install g++ or set CXX") from None


def _checked_cpu_compile(enabled) -> bool:
    if not isinstance(enabled, bool):
        raise TypeError(f"the CPU compile setting is True or False, not {enabled!r}")
    if enabled:
        _require_cpp_compiler()
    return enabled


def set_cpu_compile(enabled: bool) -> None:
    """Turn the compiled CPU forms of the ops on or off for this thread/context (see above)."""
    _cpu_compile.set(_checked_cpu_compile(enabled))


@trace_constant
def cpu_compile() -> bool:
    return _cpu_compile.get()


@contextlib.contextmanager
def use_cpu_compile(enabled: bool = True):
    """``with use_cpu_compile(): model.generate(...)`` runs the block's decode steps with the compiled
    CPU attention and one-row products (``ops.compiled_decode``) and restores the previous setting."""
    token = _cpu_compile.set(_checked_cpu_compile(enabled))
    try:
        yield
    finally:
        _cpu_compile.reset(token)


def sync_free(tensor: torch.Tensor) -> bool:
    """Whether ops on tensors like ``tensor`` take their formulations without host syncs (see above)."""
    return tensor.is_cuda or _forced_sync_free()


@trace_constant
def _forced_sync_free() -> bool:
    return _force_sync_free.get()


@contextlib.contextmanager
def force_sync_free():
    """Run the block's ops in their sync-free (CUDA) formulations on any device."""
    token = _force_sync_free.set(True)
    try:
        yield
    finally:
        _force_sync_free.reset(token)
