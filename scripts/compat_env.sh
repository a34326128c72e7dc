#!/usr/bin/env bash
# Version skew check: the kernels under triton 3.6.0 (the GPU machine's triton) on this CPU machine.
#
#   scripts/compat_env.sh [VENV_DIR]        (default: /work/venv36)
#
# Makes (once) a side venv that sees the system's packages (our CPU torch, pytest) and shadows
# triton with 3.6.0, then, in one go:
#   1. the interpreter tests of the attention, adaptive-softmax and top-k kernels (TRITON_INTERPRET=1);
#   2. the ahead-of-time compile of every kernel for sm_80 and sm_90 (python -m txl_fast.kernels.aot,
#      without the interpreter), which exits non-zero on a failed compile, a spill where none is
#      allowed, or shared memory over the limit.
# Exit status: non-zero if either part fails.
#
# numpy is pinned below 2.4 in the side venv: triton 3.6's interpreter converts one-element arrays
# to Python ints (deprecated since numpy 1.25, an error from 2.4), which breaks every runtime `for`
# loop under TRITON_INTERPRET=1. Only the interpreter does this; compiled kernels never pass through
# numpy, so the GPU machine (triton 3.6 + torch 2.11, compiled) is not affected.
set -euo pipefail

VENV="${1:-/work/venv36}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/pip" install -q "triton==3.6.0" "numpy<2.4" 2>&1 | grep -v "dependency conflicts\|requires triton==\|dependency resolver" || true
"$VENV/bin/python" - <<'EOF'
import numpy, torch, triton
assert triton.__version__ == "3.6.0", f"side venv has triton {triton.__version__}, wanted 3.6.0"
print(f"side venv: triton {triton.__version__}, torch {torch.__version__}, numpy {numpy.__version__}")
EOF

cd "$ROOT"
export PYTHONPATH="$ROOT"
# txl_fast.kernels must be this checkout's kernels/ (an editable install elsewhere could shadow it)
"$VENV/bin/python" -c "
import os, sys, txl_fast.kernels as k
here, want = os.path.realpath(k.__path__[0]), os.path.realpath('$ROOT/kernels')
sys.exit(0 if here == want else f'compat_env: txl_fast.kernels resolves to {here}, not {want}')"
status=0
echo "== interpreter tests under triton 3.6.0"
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/test_ops_rel_attention.py tests/test_ops_adaptive_softmax.py tests/test_ops_adaptive_topk.py || status=1
echo "== ahead-of-time compile, sm_80 and sm_90, under triton 3.6.0"
env -u TRITON_INTERPRET "$VENV/bin/python" -m txl_fast.kernels.aot || status=1
echo "compat_env: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
