"""Host synchronisations, seen at the dispatcher: ``SyncCounter`` counts (or refuses) the ATen ops
that make the host wait for the device's results.

    with SyncCounter() as syncs:          # SyncCounter(fail=True) raises at the first one
        step()
    syncs.total, syncs.ops                # e.g. 7, Counter({'nonzero': 5, '_local_scalar_dense': 2})

What it sees: ops whose result on the host needs the device's values (``.item()``, ``bool(t)``,
``int(t)``: ``_local_scalar_dense``; ``nonzero``, ``unique``, ``masked_select``, boolean-mask
indexing: output shapes known only from the data; ``equal``, ``is_nonzero``), and copies from
a CUDA tensor to the CPU. On CPU tensors these ops are cheap, but the same Python code issues them
on CUDA, so a count on the CPU is the count a CUDA run makes through the same code path (it does
not see a path the code takes only on CUDA, nor work outside ATen: Triton launches, explicit
``torch.cuda.synchronize``).
"""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops (overload packets) whose result waits for the device's values
SYNCING = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "allclose",
})


def _syncing(name: str, args, kwargs) -> bool:
    if name in SYNCING:
        return True
    if name == "repeat_interleave":                               # tensor repeats: the output length is their sum
        return isinstance(args[0 if len(args) == 1 else 1], torch.Tensor) and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_"):              # a boolean mask as an index: nonzero inside
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if name == "_to_copy":                                        # device -> host
        device = kwargs.get("device")
        return args[0].is_cuda and device is not None and torch.device(device).type == "cpu"
    if name == "copy_":
        return args[1].is_cuda and not args[0].is_cuda
    return False


class SyncCounter(TorchDispatchMode):
    """Counts syncing ATen ops by name (``ops``, ``total``); ``fail=True`` raises RuntimeError at the first."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail
        self.ops: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if _syncing(name, args, kwargs or {}):
            if self.fail:
                raise RuntimeError(f"host synchronisation: aten.{name}")
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))
