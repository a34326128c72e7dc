"""txl_fast: a custom-kernel accelerated runtime for Transformer-XL."""
from txl_fast.backend import get_backend, set_backend, use_backend

__all__ = ["get_backend", "set_backend", "use_backend"]
__version__ = "0.1.0"
