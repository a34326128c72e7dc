"""tests_tf5/: the tests that need transformers 5.x, run by scripts/test_tf5.sh in its own venv
(the main suite's peer is transformers==4.35.0; pyproject's testpaths leave this folder out).
Run anywhere else, they stop with an error, never a skip."""
import os
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")          # as tests/conftest.py: kernels in the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the shared helpers.py
warnings.filterwarnings("ignore", category=FutureWarning)

import transformers  # noqa: E402

from txl_fast import patch_speech  # noqa: E402

if int(transformers.__version__.split(".")[0]) < 5:
    pytest.exit(f"tests_tf5 needs transformers 5.x, found {transformers.__version__}: run scripts/test_tf5.sh",
                returncode=4)


@pytest.fixture(autouse=True)
def no_silent_fallback(request, monkeypatch):
    """A fallback would agree with HF by construction: outside the test of the fallbacks it is an error."""
    if "fallback" not in request.node.name:
        def refuse(module, reason):
            raise AssertionError(f"unexpected fallback: {reason}")
        monkeypatch.setattr(patch_speech, "fallback", refuse)
