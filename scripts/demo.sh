#!/usr/bin/env bash
# The whole system end to end on an embedded synthetic dataset, on CPU or GPU:
#   synthetic identities -> shards -> AttFC training (validated on unseen people)
#   -> IJB-C-style evaluation on other unseen people -> RUN/report.md with plots.
# Rerunning reuses what is already built (an interrupted training run is resumed).
# DEMO_OUT picks the output folder; DEMO_IDENTITIES the number of training identities.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${DEMO_OUT:-demo_output}
identities=${DEMO_IDENTITIES:-2000}
py=.venv/bin/python
run="$out/run"
say() { printf '\ndemo: %s\n' "$*" >&2; }

if .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    # A GPU: the paper's R50 at a demo-sized batch.
    model_flags=(--network r50 --batch-size 128 --epochs 4)
else
    # CPU: a slim MobileFaceNet (1 block per stage, 128-d) so one epoch takes minutes.
    # gamma 0.99: with a few hundred steps the class encoder must follow faster than 0.999.
    model_flags=(--network mbf --network-args '{"blocks": [1, 1, 1, 1], "scale": 1}'
                 --embedding-size 128 --batch-size 32 --epochs 1 --gamma 0.99)
fi

say "1/5 synthetic dataset -> shards ($identities identities)"
$py -m data_engine.shard --src synthetic --identities "$identities" --images-per-identity 5 \
    --seed 0 --shard-size 16M --out "$out/shards"

say "2/5 held-out IJB-C-style benchmark (people never seen in training)"
[ -f "$out/ijbc/meta/ijbc_template_pair_label.txt" ] || $py -m evaluate synth-ijb \
    --out "$out/ijbc" --identities 60 --first-identity 200000 --seed 0

say "3/5 AttFC training (validation on a held-out synthetic .bin)"
if [ -f "$run/model.pt" ]; then
    echo "demo: $run/model.pt exists, skipping training" >&2
elif compgen -G "$run/checkpoints/*.pt" >/dev/null; then
    $py -m train --output "$run" --resume
else
    $py -m train --shards "$out/shards" --output "$run" --head attfc "${model_flags[@]}" \
        --log-every 10 --val-every 150
fi

say "4/5 IJB-C 1:1 and 1:N on the held-out benchmark"
$py -m evaluate ijbc --root "$out/ijbc" --model "$run/model.pt" --out "$run/eval/ijbc.json" \
    --plot "$run/eval/ijbc_roc.png"

say "5/5 report"
$py -m evaluate report "$run"
cat <<MSG

demo: done. Everything is in $out/:
  shards:   $out/shards (manifest.json, shard-*.tar, rejected.tsv)
  run:      $run (model.pt, metrics.jsonl, checkpoints/, tensorboard/)
  results:  $run/eval/ijbc.json, $run/report.md (plots in $run/report/)
MSG
