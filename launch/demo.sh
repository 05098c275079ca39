#!/usr/bin/env bash
# Set up the environment (launch/setup.sh), then run the demo on the embedded synthetic world
# (launch/demo.py): render it, CFS-score the pool, SpCL-pretrain DM-OSNet, fine-tune it from that backbone
# and from scratch, train the tiny FNC and LKA-ReID on vehicles, evaluate, export to ONNX and write
# runs/demo/report.md. A second run skips what the first finished. Extra arguments are demo settings,
# e.g. `bash launch/demo.sh out=runs/demo_seed1 seed=1` (see launch/configs/demo.yaml).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/setup.sh"
cd "$root"
exec "$REIDFORGE_PY" launch/demo.py "$@"
