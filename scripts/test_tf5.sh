#!/usr/bin/env bash
# The tests that need transformers 5.x (tests_tf5/: txl_fast.patch on Parakeet's attention; NeMo's), which
# cannot share an environment with the peer transformers==4.35.0 of the main suite.
#
#   scripts/test_tf5.sh [pytest arguments]        (the README's test command runs it after the main suite)
#
# Makes (once) the venv .venv-tf5 beside the checkout that sees the system's packages (torch, pytest,
# txl_fast's dependencies) and shadows transformers with TF5_VERSION (and huggingface_hub, tokenizers
# with the versions it needs), adds NeMo (tests_tf5/requirements-nemo.txt, --no-deps: nothing there
# replaces torch or transformers), then runs tests_tf5/ in it on this checkout's txl_fast. Idempotent:
# a venv that already has TF5_VERSION and every pinned NeMo requirement installs nothing.
set -euo pipefail

TF5_VERSION=5.23.0
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv-tf5"

if [ ! -x "$VENV/bin/python" ]; then
    python -m venv --system-site-packages "$VENV"
    # when `python` is itself a venv, --system-site-packages reaches its base interpreter, not it:
    # its site-packages go in by a .pth file, after the new venv's own (whose transformers wins)
    python -c 'import sysconfig; p = sysconfig.get_paths(); print("\n".join(dict.fromkeys([p["purelib"], p["platlib"]])))' \
        > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_outer_env.pth"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('transformers') != '$TF5_VERSION')" 2>/dev/null; then
    "$VENV/bin/pip" install -q "transformers==$TF5_VERSION"
fi
NEMO_REQUIREMENTS="$ROOT/tests_tf5/requirements-nemo.txt"
if ! "$VENV/bin/python" - "$NEMO_REQUIREMENTS" <<'EOF'
import importlib.metadata as m, sys
for line in open(sys.argv[1]):
    pin = line.split("#")[0].strip()
    if pin:
        name, version = pin.split("==")
        try:
            assert m.version(name) == version
        except (AssertionError, m.PackageNotFoundError):
            sys.exit(1)
EOF
then
    "$VENV/bin/pip" install -q --no-deps -r "$NEMO_REQUIREMENTS"
fi

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"    # this checkout's txl_fast, whatever is installed
exec "$VENV/bin/python" -m pytest -q tests_tf5 "$@"
