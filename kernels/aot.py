"""Ahead-of-time compile of every kernel specialisation for sm_80 and sm_90, with a resource report.

No GPU is needed: ``triton.compile`` builds PTX and a cubin for a named target, and the ptxas
bundled in the triton wheel reports registers and spills. This is what proves, on a GPU-less
machine, that each kernel compiles for both architectures, fits in shared memory, does not
spill, and maps its tl.dot onto tensor cores (``mma`` on sm_80, ``wgmma`` or ``mma`` on sm_90).
It says nothing about speed or GPU numerics.

Protocol: for each kernel module in ``MODULES`` this file holds a spec builder (``SPEC_BUILDERS``:
``attention_specs``, ``softmax_specs``, ``topk_specs``; a module that does not exist yet is
skipped, and the report says so) and compiles every spec for each architecture, in parallel over
the machine's cores. The kernel files hold kernels and launchers only.

Compile what will really run: a builder calls the module's launchers on meta tensors of the real
shapes with ``launch=LaunchRecorder()`` (nothing runs; each launch's
kernel, arguments and options are recorded, an autotuned kernel expands to every candidate
config) and ``specs_from_launches`` derives each launch's signature, constexprs and attributes
with triton's own binder (``create_function_from_signature`` + ``JITFunction._pack_args``, the
code ``JITFunction.run`` uses): pointers aligned to 16 bytes and ints divisible by 16 get
``tt.divisibility`` 16, ints equal to 1 become constants, ``do_not_specialize`` is honoured. So
the table describes the binaries the JIT builds for those shapes (meta tensors have address 0
plus the view's offset: a view's alignment is the one a GPU allocation, 256-byte aligned, gives).
Identical specialisations are compiled once (``dedupe``).

Must run without ``TRITON_INTERPRET=1`` (an interpreted kernel cannot be compiled): run it in its
own process, ``python -m txl_fast.kernels.aot``. ``python -m txl_fast.kernels.aot --loops PATTERN``
prints instead the PTX instruction count of each kernel matching PATTERN and of its loop bodies
(``ptx_loops``; ``--full-tiles``: with the attention's loops split, ``rel_attention.FULL_TILES``;
docs/kernels.md has the before/after table); ``--only PATTERN`` compiles only the matching specs
(``--only parakeet``: Parakeet's, ``PARAKEET``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
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
    attrs: Optional[dict] = None                # {(arg index,): [["tt.divisibility", 16]], ...} as the JIT derives
    spill_budget: int = 0                       # spill bytes accepted (a known spill the module declares)

    def describe(self) -> str:
        if self.label:
            return self.label
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{consts} w{self.num_warps} s{self.num_stages}"


class LaunchRecorder:
    """A launchers' ``launch`` argument that records instead of launching:
    ``launch(kernel)[grid](*args, **kwargs)`` appends (kernel, args, kwargs) to ``launches``."""

    def __init__(self):
        self.launches: list[tuple[Any, tuple, dict]] = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((kernel, args, dict(kwargs)))

        return _Grid()


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _expand_autotuned(kernel, kwargs: dict) -> list[tuple[Any, dict]]:
    """[(jit function, kwargs)] per candidate config of an autotuned kernel; the kernel itself else."""
    from triton.runtime.autotuner import Autotuner  # noqa: PLC0415

    if not isinstance(kernel, Autotuner):
        return [(kernel, kwargs)]
    return [(kernel.fn, {**kwargs, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            for cfg in kernel.configs]


def jit_specialisation(fn, args: tuple, kwargs: dict, arch: int = 90):
    """What ``JITFunction.run`` derives for launching ``fn(*args, **kwargs)`` on ``arch``:
    (signature {name: type or "constexpr"}, constexprs {(index,): value}, attrs {(index,): [...]},
    the JIT's cache key of the specialisation (a str), launch options {name: value})."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import make_backend  # noqa: PLC0415
    from triton.runtime import jit as triton_jit  # noqa: PLC0415

    options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = triton_jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*args, **kwargs, **options)
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound, specialization, opts)
    key = str(specialization) + str(sorted(options.items()))          # as compute_cache_key builds it
    return signature, constexprs, attrs, key, options


def specs_from_launches(name_of: dict, launches, label: str, uses_dot=None) -> list["AotSpec"]:
    """One AotSpec per recorded launch (per candidate config of an autotuned kernel), named
    ``name_of[jit function name]``; ``uses_dot(name) -> bool`` (default: every kernel)."""
    specs = []
    for kernel, args, kwargs in launches:
        for fn, kw in _expand_autotuned(kernel, kwargs):
            signature, constexprs, attrs, _, options = jit_specialisation(fn, args, dict(kw))
            name = name_of[fn.__name__]
            tiles = " ".join(f"{k.split('_')[1]}{v}" for k, v in kw.items() if k.startswith("BLOCK_"))
            specs.append(AotSpec(
                name=name, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs,
                num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3),
                label=f"{label} {tiles} w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}",
                uses_dot=True if uses_dot is None else uses_dot(name)))
    return specs


def dedupe(specs: list["AotSpec"]) -> list["AotSpec"]:
    """Identical specialisations (function, signature, constants, attributes, options) once, the
    first one's label followed by ``+N`` for the N launches that share it."""
    seen: dict = {}
    for s in specs:
        key = (s.fn.__name__, repr(sorted(s.signature.items())), repr(sorted(s.constexprs.items(), key=str)),
               repr(sorted((s.attrs or {}).items())), s.num_warps, s.num_stages)
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [s, 0]
    out = []
    for s, extra in seen.values():
        out.append(dataclasses.replace(s, label=s.describe() + (f" (+{extra})" if extra else "")))
    return out


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


@functools.lru_cache(maxsize=None)
def module_specs(mod_name: str) -> list[AotSpec]:
    """The module's specs (``SPEC_BUILDERS``), deduplicated, computed once per process (the pool's
    forked workers inherit it)."""
    importlib.import_module(mod_name)
    return dedupe(SPEC_BUILDERS[mod_name]())


def load_specs(modules=MODULES) -> tuple[list[tuple[str, int, AotSpec]], list[str]]:
    """[(module, index, spec)] for every module that exists, and notes on the ones skipped."""
    specs, notes = [], []
    for mod_name in modules:
        try:
            importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                notes.append(f"{mod_name}: module not present yet, skipped")
                continue
            raise
        if mod_name not in SPEC_BUILDERS:
            notes.append(f"{mod_name}: no spec builder in SPEC_BUILDERS, skipped")
            continue
        specs += [(mod_name, i, s) for i, s in enumerate(module_specs(mod_name))]
    return specs, notes


def compile_one(spec: AotSpec, arch: int) -> dict:
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    row = dict(kernel=spec.name, specialisation=spec.describe(), arch=f"sm_{arch}", ok=False,
               registers=None, spill_bytes=None, spill_budget=spec.spill_budget, shared=None, smem_limit=SMEM_LIMIT[arch],
               smem_ok=False, tensor_cores=False, uses_dot=spec.uses_dot, seconds=0.0, error="")
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
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
    spec = module_specs(mod_name)[index]
    return compile_one(spec, arch)


def report(workers: Optional[int] = None, modules=MODULES, only: str = "") -> list[dict]:
    """Compile every spec of every present module (those whose "kernel specialisation" matches the
    regex ``only``) for every arch; one row each (see compile_one). Every row's ``notes`` key lists
    the skipped modules."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the AOT report cannot run with TRITON_INTERPRET=1; run it in a separate process")
    specs, notes = load_specs(modules)
    specs = [(mod, i, s) for mod, i, s in specs if re.search(only, f"{s.name} {s.describe()}")]
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


def problems(row: dict) -> list[str]:
    """What is wrong with one report row: a failed compile, shared memory over the arch's limit,
    spills over the spec's budget (0 unless the module declares a known spill), a tl.dot not on
    tensor cores. Empty when the row is fine."""
    if not row["ok"]:
        return [f"compile failed: {row['error']}"]
    out = []
    if row["shared"] > row["smem_limit"]:
        out.append(f"shared memory {row['shared']} B > {row['smem_limit']} B")
    if row["spill_bytes"] is None or row["spill_bytes"] > row.get("spill_budget", 0):
        out.append(f"spills {row['spill_bytes']} B > {row.get('spill_budget', 0)} B allowed")
    if row["uses_dot"] and not row["tensor_cores"]:
        out.append("tl.dot not on tensor cores")
    return out


def format_table(rows: list[dict]) -> str:
    cols = [("kernel", "kernel"), ("specialisation", "specialisation"), ("arch", "arch"),
            ("registers", "regs"), ("spill_bytes", "spill B"), ("spill_budget", "allowed B"), ("shared", "smem B"),
            ("smem_limit", "limit B"), ("tensor_cores", "mma"), ("seconds", "s"), ("error", "error")]
    cells = [[h for _, h in cols]]
    for r in rows:
        tc = ("yes" if r["tensor_cores"] else "NO") if r["uses_dot"] else "-"
        vals = {**r, "tensor_cores": tc, "spill_budget": r.get("spill_budget", 0)}
        cells.append(["" if vals[k] is None else str(vals[k]) for k, _ in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = rows[0]["notes"] if rows else []
    bad = [r for r in rows if problems(r)]
    lines.append(f"{len(rows)} compiles, {len(bad)} with problems (failed, shared memory over the limit, "
                 "spills over the allowance, no tensor cores)")
    lines += [f"problem: {r['kernel']} {r['specialisation']} {r['arch']}: {'; '.join(problems(r))}" for r in bad]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the specialisations: each kernel module's launchers called at the shapes a GPU run meets
# ---------------------------------------------------------------------------------------------

DTYPES = (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16"))

# relative attention: the wt103 model (n_head 16, d_head 64, eval tgt_len 128 / mem_len 1600,
# same_length: window = mem_len); the head size sweep keeps d_model = H * D = 1024
ATTN_D_MODEL, ATTN_TGT, ATTN_MEM = 1024, 128, 1600
ATTN_BATCHES = (1, 32)
ATTN_DECODE_LQ = (1, 5)          # greedy decode, and a few-token step (Lq 1 is a JIT constant; 5 at D 64 only)
# a Conformer encoder layer (d 256, 4 heads of 64, batch 8, 400 frames, padded): the bidirectional
# mode with key lengths and zero empty rows, over all distances and with a limited context; and a
# streaming FastConformer run offline: chunks of 4 frames, 8 to the left (NeMo's chunked_limited
# [32, 3]), padded queries and HF's uniform rows, and scores capped (Gemma's audio encoders)
ATTN_CONFORMER = dict(B=8, L=400, H=4, D=64, contexts=(None, (16, 4)), chunks=(4, 8, 0))


def attention_launches(dtype, D: int, launch) -> None:
    """Call the attention launchers as a GPU run would, on meta tensors, with ``launch`` (a
    recorder): eval forward + backward (memory full, window on) and decode steps, at every batch
    size (the batch only changes strides divisible by 16: the batches share their binaries); at
    D 64 also a Conformer layer's bidirectional forward + backward (``ATTN_CONFORMER``)."""
    import torch  # noqa: PLC0415

    from txl_fast.kernels import rel_attention as ra  # noqa: PLC0415

    H = ATTN_D_MODEL // D
    meta = dict(dtype=dtype, device="meta")
    for B in ATTN_BATCHES:
        for Lq, window in [(ATTN_TGT, ATTN_MEM)] + [(lq, ATTN_MEM) for lq in ATTN_DECODE_LQ if D == 64 or lq == 1]:
            Lk = ATTN_MEM + Lq
            q = torch.empty(B, Lq, H, D, **meta)
            # keys/values as the cache hands them over: a time window of a head-major buffer
            kv_buf = torch.empty(B, H, Lk + 7, D, **meta)
            k = kv_buf[:, :, 3:3 + Lk].transpose(1, 2)
            v = torch.empty_like(kv_buf)[:, :, 3:3 + Lk].transpose(1, 2)
            r, cb, pb = torch.empty(Lk, H, D, **meta), torch.empty(H, D, **meta), torch.empty(H, D, **meta)
            out, m, l = ra.forward(q, k, v, r, cb, pb, D ** -0.5, window, launch=launch)
            if Lq > ra.DECODE_MAX_LQ:
                ra.backward(torch.empty_like(out), q, k, v, r, cb, pb, out, m, l, D ** -0.5, window, launch=launch)
    if D == ATTN_CONFORMER["D"]:
        B, L, H = ATTN_CONFORMER["B"], ATTN_CONFORMER["L"], ATTN_CONFORMER["H"]
        q, k, v = (torch.empty(B, L, H, D, **meta) for _ in range(3))
        r, cb, pb = torch.empty(2 * L - 1, H, D, **meta), torch.empty(H, D, **meta), torch.empty(H, D, **meta)
        lengths = torch.empty(B, dtype=torch.int32, device="meta")
        modes = [dict(causal=False, context=context, key_lengths=lengths, empty_rows="zero")
                 for context in ATTN_CONFORMER["contexts"]]
        modes.append(dict(causal=False, chunk_context=ATTN_CONFORMER["chunks"], key_lengths=lengths,
                          query_lengths=lengths, empty_rows="uniform", softcap=50.0))
        for mode in modes:
            out, m, l = ra.forward(q, k, v, r, cb, pb, D ** -0.5, None, launch=launch, **mode)
            ra.backward(torch.empty_like(out), q, k, v, r, cb, pb, out, m, l, D ** -0.5, None, launch=launch, **mode)


def attention_spill_budget(kernel: str, dt: str, D: int, bidirectional: bool = False) -> int:
    """Spill bytes (ptxas -v, either arch) the report accepts for an attention kernel: the known
    spills, declared with a bound so that growth still fails. Measured with the JIT's
    specialisations under triton 3.8 and 3.6: none in fp16/bf16 at D <= 64 (the wt103 path) except
    dkdv's 108-144 B on sm_80; fp32 backward (tf32x3 splits every dot operand in three) 48 B-4.6 KB
    at every D (35.8 KB for dkdv D 64 on sm_80 under 3.6), the fp32 forward / split at D 128
    ~1 KB; 16-bit backward at D 128 36-1104 B. The bidirectional dkdv at D 64 in fp16/bf16 (triton
    3.8, the Conformer layer): 340 B on sm_80 without a context, 108 B with one, 0-8 B on sm_90;
    the chunked launch (query lengths, softcap: the per-row-range path) 356 B on sm_80, 0 on sm_90,
    inside the same bound (the launches without these features compile as before them: each one is
    a constexpr of the kernels).
    All with the 32 x 32 tiles, chosen before a GPU could time smaller ones: fp32 is the validation
    dtype, not the fast path."""
    if dt == "fp32" and (kernel in ("dq", "dkdv") or D == 128):
        return 40960
    if D == 128 and kernel in ("dq", "dkdv"):
        return 2048
    if kernel == "dkdv" and D == 64:
        return 512 if bidirectional else 256
    return 0


def attention_specs() -> list[AotSpec]:
    """Every attention specialisation a GPU run picks at the wt103 shapes and a Conformer layer's
    (``attention_launches``): dtype (fp32, fp16, bf16) x d_head (16, 32, 64, 128) x each kernel's
    candidate configurations."""
    import torch  # noqa: PLC0415

    from txl_fast.kernels import rel_attention as ra  # noqa: PLC0415

    names = {"_fwd_kernel": "fwd", "_fwd_combine_kernel": "combine", "_bwd_delta_kernel": "delta",
             "_bwd_dq_kernel": "dq", "_bwd_dkdv_kernel": "dkdv"}
    specs = []
    for dt, dtype_name in DTYPES:
        for D in (16, 32, 64, 128):
            rec = LaunchRecorder()
            attention_launches(getattr(torch, dtype_name), D, rec)
            for kernel, args, kwargs in rec.launches:
                fn = getattr(kernel, "fn", kernel)
                name = names[fn.__name__]
                if name == "fwd" and kwargs.get("SPLIT_K"):
                    name = "decode" if kwargs["Lq"] <= ra.DECODE_MAX_LQ else "split"
                bidirectional = kwargs.get("dmin", 0) < 0            # causal launches have dmin 0
                mode = "".join(f" {tag}" for flag, tag in (("HAS_LENGTHS", "lengths"), ("ROW_BOUNDS", "rows"),
                                                           ("CHUNKED", "chunks"),
                                                           ("SOFTCAP", "softcap"), ("ZERO_EMPTY", "zero"))
                               if kwargs.get(flag))
                if bidirectional:
                    mode = " bidi" + (" context" if kwargs["UPPER"] else "") + mode
                new = specs_from_launches(
                    {fn.__name__: f"rel_attention.{name}"}, [(kernel, args, kwargs)],
                    f"{dt} D{D} Lq{kwargs['Lq']}{mode}",
                    uses_dot=lambda n: n not in ("rel_attention.delta", "rel_attention.combine"))
                for spec in new:
                    spec.spill_budget = attention_spill_budget(name, dt, D, bidirectional)
                specs += new
    return specs


# adaptive softmax: the wt103 output layer, vocabulary 267,735, cutoffs 20000 / 40000 / 200000,
# div_val 4, d 1024
SOFTMAX_D_PROJ, SOFTMAX_CUTOFFS, SOFTMAX_VOCAB, SOFTMAX_DIV_VAL = 1024, (20000, 40000, 200000), 267735, 4
# known spills (ptxas, triton 3.8 and 3.6): the lse kernel's 8-40 B (fp32 on sm_90, d 256 in 16
# bit on sm_80); every other kernel: none
LSE_SPILL_BUDGET = 64
SOFTMAX_EVAL_ROWS = (128, 4096)        # tgt_len 128 at batch 1 and 32: loss forward and backward, log-probs
SOFTMAX_DECODE_ROWS = (1, 32)          # a decode step at batch 1 and 32: log-probs


def softmax_parameters(dtype):
    """(weights, biases, projs, cluster_weight, cluster_bias) of the wt103 layer, on the meta device."""
    import torch  # noqa: PLC0415

    meta = dict(dtype=dtype, device="meta")
    edges = (0,) + SOFTMAX_CUTOFFS + (SOFTMAX_VOCAB,)
    widths = [SOFTMAX_D_PROJ // SOFTMAX_DIV_VAL ** c for c in range(len(edges) - 1)]
    weights = [torch.empty(edges[c + 1] - edges[c], d, **meta) for c, d in enumerate(widths)]
    biases = [torch.empty(w.shape[0], **meta) for w in weights]
    projs = [torch.empty(SOFTMAX_D_PROJ, d, **meta) for d in widths]
    C = len(SOFTMAX_CUTOFFS)
    return weights, biases, projs, torch.empty(C, SOFTMAX_D_PROJ, **meta), torch.empty(C, **meta)


def softmax_launches(dtype, launch) -> None:
    """Call the adaptive softmax launchers as a GPU run would, on meta tensors, with ``launch`` (a
    recorder): the loss forward and backward (every gradient) at the eval row counts, the
    log-probs at every one."""
    import torch  # noqa: PLC0415

    from txl_fast.kernels import adaptive_softmax as asm  # noqa: PLC0415

    params = softmax_parameters(dtype)
    n_clusters = len(params[0])
    needs = dict(hidden=True, weights=[True] * n_clusters, biases=[True] * n_clusters,
                 projs=[True] * n_clusters, cluster=True)
    for n in SOFTMAX_EVAL_ROWS + SOFTMAX_DECODE_ROWS:
        hidden = torch.empty(n, SOFTMAX_D_PROJ, dtype=dtype, device="meta")
        if n in SOFTMAX_EVAL_ROWS:
            target = torch.empty(n, dtype=torch.long, device="meta")
            nll, lse = asm.nll_forward(hidden, target, *params, launch=launch)
            asm.nll_backward(torch.empty_like(nll), hidden, target, *params, lse, needs, launch=launch)
        asm.log_softmax(hidden, *params, launch=launch)


def softmax_specs() -> list[AotSpec]:
    """Every adaptive softmax specialisation a GPU run picks at the wt103 shapes
    (``softmax_launches``), for fp32, fp16 and bf16."""
    import torch  # noqa: PLC0415

    names = {"_lse_fwd_kernel": "adaptive_softmax.lse", "_bwd_dh_kernel": "adaptive_softmax.dh",
             "_bwd_dw_kernel": "adaptive_softmax.dw", "_logprob_kernel": "adaptive_softmax.logprob"}
    specs = []
    for dt, dtype_name in DTYPES:
        rec = LaunchRecorder()
        softmax_launches(getattr(torch, dtype_name), rec)
        for kernel, args, kwargs in rec.launches:
            (n, d), flags = args[0].shape, {k: int(v) for k, v in kwargs.items() if k.startswith("HAS_")}
            flag_txt = " ".join(f"{k}={v}" for k, v in flags.items())
            new = specs_from_launches(names, [(kernel, args, kwargs)], f"{dt} d{d} n{n} {flag_txt}".strip(),
                                      uses_dot=lambda name: dt != "fp32")
            for spec in new:
                spec.spill_budget = LSE_SPILL_BUDGET if spec.name == "adaptive_softmax.lse" else 0
            specs += new
    return specs


# top-k: a generation step on the wt103 output layer
TOPK_ROWS = (1, 32)                    # a generation step at batch 1 and 32
TOPK_KS = (1, 64)                      # greedy, and the largest K the kernel takes
TOP64_SPILL_BUDGET = 32                # known: top-64 at d 1024 spills 24 B on sm_90 under triton 3.6 (none in 3.8)


def topk_specs() -> list[AotSpec]:
    """Every top-k specialisation a generation step picks on the wt103 output layer
    (``softmax_parameters``): dtype (fp32, fp16, bf16) x cluster x rows x K."""
    import torch  # noqa: PLC0415

    from txl_fast.kernels import adaptive_topk  # noqa: PLC0415

    specs = []
    for dt, dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        weights, biases, *_ = softmax_parameters(dtype)
        for w, b in zip(weights, biases):
            for n in TOPK_ROWS:
                for k in TOPK_KS:
                    rec = LaunchRecorder()
                    adaptive_topk.cluster_topk(torch.empty(n, w.shape[1], dtype=dtype, device="meta"), w, b, k,
                                               launch=rec)
                    new = specs_from_launches({"_topk_fwd_kernel": "adaptive_topk.fwd"}, rec.launches,
                                              f"{dt} d{w.shape[1]} n{n} top{k}", uses_dot=lambda _: dt != "fp32")
                    for spec in new:
                        spec.spill_budget = TOP64_SPILL_BUDGET if k == 64 else 0
                    specs += new
    return specs


# the spec builder of each kernel module, by module name (``MODULES``)
SPEC_BUILDERS = {"txl_fast.kernels.rel_attention": attention_specs,
                 "txl_fast.kernels.adaptive_softmax": softmax_specs,
                 "txl_fast.kernels.adaptive_topk": topk_specs}


# ---- Parakeet / NeMo FastConformer (issue 23): d_model 1024, 8 heads of 128, bidirectional ----
# transformers 5's ParakeetEncoderAttention as ``patch_speech`` runs it: every distance, key lengths,
# zero empty rows; 80 ms frames: 375 = 30 s (batch 1 takes the split forward: 12 query tiles x 8
# heads underfill the GPU), 45,000 = an hour (the tiled forward; the backward has no split path)
PARAKEET = dict(H=8, D=128, frames=(375, 45000), batches=(1, 8))


def parakeet_launches(dtype, launch) -> None:
    """The attention launchers at Parakeet's shapes (``PARAKEET``) on meta tensors, forward and
    backward, recorded by ``launch``."""
    import torch  # noqa: PLC0415

    from txl_fast.kernels import rel_attention as ra  # noqa: PLC0415

    H, D = PARAKEET["H"], PARAKEET["D"]
    mode = dict(causal=False, context=None, empty_rows="zero")
    for B in PARAKEET["batches"]:
        for T in PARAKEET["frames"]:
            q, k, v = (torch.empty(B, T, H, D, dtype=dtype, device="meta") for _ in range(3))
            r = torch.empty(2 * T - 1, H, D, dtype=dtype, device="meta")               # distances T-1 … -(T-1)
            u, w = torch.empty(H, D, dtype=dtype, device="meta"), torch.empty(H, D, dtype=dtype, device="meta")
            lengths = torch.empty(B, dtype=torch.int32, device="meta")
            out, m, l = ra.forward(q, k, v, r, u, w, D ** -0.5, None, launch=launch, key_lengths=lengths, **mode)
            ra.backward(torch.empty_like(out), q, k, v, r, u, w, out, m, l, D ** -0.5, None, launch=launch,
                        key_lengths=lengths, **mode)


def parakeet_specs() -> list[AotSpec]:
    """The attention specialisations of ``parakeet_launches`` for fp32, fp16 and bf16, labelled
    "parakeet" (``python -m txl_fast.kernels.aot --only parakeet``), with the attention's spill
    allowances (``attention_spill_budget``, bidirectional)."""
    import torch  # noqa: PLC0415

    names = {"_fwd_kernel": "fwd", "_fwd_combine_kernel": "combine", "_bwd_delta_kernel": "delta",
             "_bwd_dq_kernel": "dq", "_bwd_dkdv_kernel": "dkdv"}
    specs = []
    for dt, dtype_name in DTYPES:
        rec = LaunchRecorder()
        parakeet_launches(getattr(torch, dtype_name), rec)
        for kernel, args, kwargs in rec.launches:
            fn = getattr(kernel, "fn", kernel)
            name = "split" if kwargs.get("SPLIT_K") else names[fn.__name__]
            new = specs_from_launches({fn.__name__: f"rel_attention.{name}"}, [(kernel, args, kwargs)],
                                      f"{dt} D{PARAKEET['D']} Lq{kwargs['Lq']} parakeet bidi lengths zero",
                                      uses_dot=lambda n: n not in ("rel_attention.delta", "rel_attention.combine"))
            for spec in new:
                spec.spill_budget = attention_spill_budget(name, dt, PARAKEET["D"], bidirectional=True)
            specs += new
    return specs


def rel_attention_specs() -> list[AotSpec]:
    """The attention module's specs: the wt103 and Conformer shapes, then Parakeet's."""
    return attention_specs() + parakeet_specs()


SPEC_BUILDERS["txl_fast.kernels.rel_attention"] = rel_attention_specs


_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def _is_instruction(line: str) -> bool:
    """A PTX instruction line: ends with ';' and is not a directive, a declaration or a comment."""
    line = line.strip()
    return line.endswith(";") and not line.startswith((".", "//", "{", "}"))


def ptx_loops(ptx: str) -> tuple[int, list[int]]:
    """(instructions of the whole PTX, [instructions of each loop body]): a loop body is the text
    from a label to the last branch back to it (a backward ``bra``), as ``ptxas`` sees the loop
    after triton's software pipelining (prologue and epilogue outside); bodies in PTX order."""
    lines = ptx.splitlines()
    where, last_back = {}, {}
    for n, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            where[m.group(1)] = n
        b = _BRANCH.search(line)
        if b and b.group(1) in where and where[b.group(1)] < n:
            last_back[b.group(1)] = n
    loops = [sum(_is_instruction(x) for x in lines[where[lab]:end + 1])
             for lab, end in sorted(last_back.items(), key=lambda kv: where[kv[0]])]
    return sum(_is_instruction(x) for x in lines), loops


def loop_report(pattern: str, modules=MODULES) -> list[dict]:
    """PTX instruction counts (``ptx_loops``) of every spec whose "kernel specialisation" matches
    the regex ``pattern``, for each arch: what ``python -m txl_fast.kernels.aot --loops PATTERN``
    prints. Compiled in this process, one at a time (triton's cache makes reruns fast)."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    rows = []
    for _, _, spec in load_specs(modules)[0]:
        if not re.search(pattern, f"{spec.name} {spec.describe()}"):
            continue
        for arch in ARCHS:
            src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
            total, loops = ptx_loops(k.asm["ptx"])
            rows.append(dict(kernel=spec.name, specialisation=spec.describe(), arch=f"sm_{arch}",
                             ptx_instructions=total, loop_bodies=loops))
    return rows


def main(argv=None) -> None:
    import sys  # noqa: PLC0415

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--loops"]:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise SystemExit("--loops cannot run with TRITON_INTERPRET=1")
        if "--full-tiles" in argv:           # the attention's loops split into full and edge tiles
            argv = [a for a in argv if a != "--full-tiles"]
            importlib.import_module("txl_fast.kernels.rel_attention").FULL_TILES = True
        pattern = argv[1] if len(argv) > 1 else ""
        for r in loop_report(pattern, modules=tuple(argv[2:]) or MODULES):
            print(f"{r['kernel']:24s} {r['arch']}  total {r['ptx_instructions']:6d}  loop bodies "
                  f"{' '.join(str(n) for n in r['loop_bodies']) or '-'}  {r['specialisation']}", flush=True)
        return
    only = ""
    if argv[:1] == ["--only"]:           # --only PATTERN: the specs whose "kernel specialisation" matches
        only, argv = argv[1], argv[2:]
    t0 = time.perf_counter()
    rows = report(modules=tuple(argv) or MODULES, only=only)
    print(format_table(rows))
    print(f"total {time.perf_counter() - t0:.1f} s")
    if any(problems(r) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
