"""Test-wide setup. Triton kernels run in the interpreter on the CPU: the variable must be set
before triton is first imported, so it is set here, before any test module imports anything."""
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")
# transformers 4.35 warns about deprecated torch APIs and its own deprecated TransfoXL on import
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
