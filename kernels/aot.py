"""Ahead-of-time compile of every kernel specialisation for sm_80 and sm_90, with a resource report.

No GPU is needed: ``triton.compile`` builds PTX and a cubin for a named target, and the ptxas
bundled in the triton wheel reports registers and spills. This is what proves, on a GPU-less
machine, that each kernel compiles for both architectures, fits in shared memory, does not
spill, and maps its tl.dot onto tensor cores (``mma`` on sm_80, ``wgmma`` or ``mma`` on sm_90).
It says nothing about speed or GPU numerics.

Protocol: each kernel module in ``kernels/`` exposes ``aot_specs() -> list[AotSpec]``. This module
imports the modules in ``MODULES`` (a module
that does not exist yet is skipped, and the report says so) and compiles every spec for each
architecture, in parallel over the machine's cores.

Must run without ``TRITON_INTERPRET=1`` (an interpreted kernel cannot be compiled): run it in its
own process, ``python -m txl_fast.kernels.aot``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from typing import Any, Optional

MODULES = ("txl_fast.kernels.rel_attention", "txl_fast.kernels.adaptive_softmax", "txl_fast.kernels.adaptive_topk")
ARCHS = (80, 90)
SMEM_LIMIT = {80: 166912, 90: 232448}      # bytes of shared memory per block (opt-in maximum)


@dataclasses.dataclass
class AotSpec:
    """One specialisation to compile: the jit function, its full signature (every argument,
    constexprs as "constexpr"), the constexpr values, and the launch options."""
    name: str                                   # e.g. "rel_attention.fwd"
    fn: Any                                     # the @triton.jit function
    signature: dict                             # {"Q": "*fp16", "n": "i32", "BLOCK": "constexpr", ...}
    constexprs: dict                            # {"BLOCK": 64, ...}
    num_warps: int = 4
    num_stages: int = 1
    label: str = ""                             # human-readable specialisation; default from constexprs
    uses_dot: bool = True                       # whether tensor-core instructions are expected

    def describe(self) -> str:
        if self.label:
            return self.label
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{consts} w{self.num_warps} s{self.num_stages}"


def ptxas_path() -> str:
    import triton  # noqa: PLC0415

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas not found in the triton wheel at {path}")
    return path


def _ptxas(ptx: str, arch: int) -> tuple[Optional[int], Optional[int]]:
    """(registers, spill bytes = stores + loads) from ptxas -v."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
        name = f.name
    try:
        res = subprocess.run([ptxas_path(), f"--gpu-name={gpu}", "-v", name, "-o", os.devnull],
                             capture_output=True, text=True, check=False)
    finally:
        os.unlink(name)
    text = res.stdout + res.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    return (int(regs[-1]) if regs else None), (max(spills) if spills else None)


def load_specs(modules=MODULES) -> tuple[list[tuple[str, int, AotSpec]], list[str]]:
    """[(module, index, spec)] for every module that exists, and notes on the ones skipped."""
    specs, notes = [], []
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                notes.append(f"{mod_name}: module not present yet, skipped")
                continue
            raise
        if not hasattr(mod, "aot_specs"):
            notes.append(f"{mod_name}: no aot_specs(), skipped")
            continue
        specs += [(mod_name, i, s) for i, s in enumerate(mod.aot_specs())]
    return specs, notes


def compile_one(spec: AotSpec, arch: int) -> dict:
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    row = dict(kernel=spec.name, specialisation=spec.describe(), arch=f"sm_{arch}", ok=False,
               registers=None, spill_bytes=None, shared=None, smem_limit=SMEM_LIMIT[arch],
               smem_ok=False, tensor_cores=False, uses_dot=spec.uses_dot, seconds=0.0, error="")
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ptx = k.asm["ptx"]
        row["registers"], row["spill_bytes"] = _ptxas(ptx, arch)
        row["shared"] = int(k.metadata.shared)
        row["smem_ok"] = row["shared"] <= SMEM_LIMIT[arch]
        row["tensor_cores"] = bool(re.search(r"\bwgmma\.|\bmma\.sync", ptx))
        row["ok"] = True
    except Exception as e:  # noqa: BLE001 (reported per row)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _worker(job: tuple[str, int, int]) -> dict:
    mod_name, index, arch = job
    spec = importlib.import_module(mod_name).aot_specs()[index]
    return compile_one(spec, arch)


def report(workers: Optional[int] = None, modules=MODULES) -> list[dict]:
    """Compile every spec of every present module for every arch; one row each (see compile_one).
    Every row's ``notes`` key lists the skipped modules."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the AOT report cannot run with TRITON_INTERPRET=1; run it in a separate process")
    specs, notes = load_specs(modules)
    jobs = [(mod, i, arch) for mod, i, _ in specs for arch in ARCHS]
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            rows = list(pool.map(_worker, jobs, chunksize=4))
    else:
        rows = [compile_one(s, arch) for _, _, s in specs for arch in ARCHS]
    for row in rows:
        row["notes"] = notes
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [("kernel", "kernel"), ("specialisation", "specialisation"), ("arch", "arch"),
            ("registers", "regs"), ("spill_bytes", "spill B"), ("shared", "smem B"),
            ("smem_limit", "limit B"), ("tensor_cores", "mma"), ("seconds", "s"), ("error", "error")]
    cells = [[h for _, h in cols]]
    for r in rows:
        tc = ("yes" if r["tensor_cores"] else "NO") if r["uses_dot"] else "-"
        vals = {**r, "tensor_cores": tc}
        cells.append(["" if vals[k] is None else str(vals[k]) for k, _ in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = rows[0]["notes"] if rows else []
    bad = [r for r in rows if not (r["ok"] and r["smem_ok"])]
    lines.append(f"{len(rows)} compiles, {len(bad)} failed or over the shared-memory limit")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main(argv=None) -> None:
    import sys  # noqa: PLC0415

    argv = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    rows = report(modules=tuple(argv) or MODULES)
    print(format_table(rows))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
