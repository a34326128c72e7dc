"""``python -m txl_fast.bench [ARGS]``: the same as ``txl-fast bench [ARGS]``."""
from txl_fast.bench.runner import main

raise SystemExit(main())
