#!/usr/bin/env bash
# The whole system end to end on an embedded synthetic dataset:
# synthetic identities -> shards -> AttFC training -> IJB-C-style evaluation -> report.
# Rerunning reuses what is already built. DEMO_OUT picks the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${DEMO_OUT:-demo_output}
py=.venv/bin/python
mkdir -p "$out"

[ -f "$out/shards/manifest.json" ] || $py -m data_engine.shard --src synthetic \
    --identities 2000 --images-per-identity 12 --seed 0 --out "$out/shards"
echo "demo: shards in $out/shards"
