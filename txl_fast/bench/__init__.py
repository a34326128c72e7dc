"""Benchmarks that ship with the package: ``txl-fast bench`` (runner), the analytic FLOP/byte
model (analytic) and this machine's measured rates (machine). The pytest-benchmark cases that use
them live in the repository's ``benchmarks/``."""
from txl_fast.bench import analytic

__all__ = ["analytic"]
