"""Benchmarks setup. Without a GPU the Triton kernels can only run in the interpreter, which must be
switched on before triton is first imported; on a CUDA machine they run compiled."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
