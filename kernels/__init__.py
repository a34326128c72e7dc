"""Triton kernels and their launchers, shipped as ``txl_fast.kernels``. Importing this needs triton."""
