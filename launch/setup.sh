#!/usr/bin/env bash
# Creates (or reuses) .venv and installs the project into it with the tested constraints.
# Sourced by launch/test.sh and launch/demo.sh; sets REIDFORGE_PY to the environment's python.
# REIDFORGE_FAISS=gpu installs faiss-gpu instead of faiss-cpu (CUDA machines).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REIDFORGE_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
# Reinstall only when the dependency declarations changed since the last successful install.
stamp="$venv/.reidforge-installed"
want="$( (cat "$root/pyproject.toml" "$root/launch/constraints.txt"; echo "${REIDFORGE_FAISS:-cpu}") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing reidforge and its pinned dependencies (a few minutes the first time)"
  log="$venv/install.log"
  if [ "${REIDFORGE_FAISS:-cpu}" = gpu ]; then  # both builds install the same module
    "$venv/bin/python" -m pip uninstall -y -q faiss-cpu > /dev/null 2>&1 || true
  fi
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check -c "$root/launch/constraints.txt" \
      -e "$root[${REIDFORGE_FAISS:-cpu},test]" > "$log" 2>&1; then
    tail -n 40 "$log"
    echo "[setup] pip install failed; full log: $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
REIDFORGE_PY="$venv/bin/python"
export REIDFORGE_PY
