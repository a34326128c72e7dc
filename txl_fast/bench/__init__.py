"""Benchmarks that ship with the package: ``txl-fast bench`` (runner: measures; report: tables, plot,
RESULTS.md), the analytic FLOP/byte model (analytic), this machine's measured rates and the one
clock (machine), the ours-vs-HF harness (harness: the pair of models, each side's NLL, peak memory),
the floor (floor), and the GPU check's stages (gpu/, driven by scripts/gpu_check.py). The
pytest-benchmark cases and the stand-alone scripts that use them live in the repository's
``benchmarks/``."""
from txl_fast.bench import analytic

__all__ = ["analytic"]
