#!/usr/bin/env bash
# Set up the environment (launch/setup.sh) and run the default test suite. Extra arguments go to pytest,
# e.g. `bash launch/test.sh -m slow` for the long tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/setup.sh"
cd "$root"
# pytest's own script, not `python -m pytest`, which would put the repository root on sys.path and make
# `data`, `shared`, ... importable as top-level packages: the suite sees only what an install gives.
exec "$(dirname "$REIDFORGE_PY")/pytest" "$@"
