#!/usr/bin/env bash
# Set up the environment (launch/setup.sh) and run the main job on the embedded synthetic world:
# render it into shards under runs/demo/shards (skipping shards a previous run finished) and print
# their summary. Extra arguments are config overrides, e.g. `bash launch/demo.sh pool_images=5000`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/setup.sh"
cd "$root"
mkdir -p runs/demo
"$REIDFORGE_PY" data/build_shards.py synthetic --out runs/demo/shards --config launch/configs/synthetic.yaml \
  --workers "$(nproc)" "$@"
