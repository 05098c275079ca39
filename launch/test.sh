#!/usr/bin/env bash
# Set up the environment (launch/setup.sh) and run the default test suite. Extra arguments go to pytest,
# e.g. `bash launch/test.sh -m slow` for the long tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/setup.sh"
cd "$root"
exec "$REIDFORGE_PY" -m pytest "$@"
