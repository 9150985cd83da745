#!/usr/bin/env bash
# Re-run the deployment stages (debias, evaluate_after, merge_and_rescore) of finished `biasedit demo` runs under the
# current code, keeping their trained editors and protocol stages: each SRC/seed-N is copied (editor and stage
# records only) to DST/seed-N, the three stage records are dropped, and `biasedit demo --resume` finishes the copy.
# The demo refuses the resume unless the settings match the stored ones, so pass the same demo flags.
#
#   bash scripts/rerun_deployment_stages.sh SRC DST "0 1 2" [DEMO FLAGS ...]
#   e.g. bash scripts/rerun_deployment_stages.sh runs/v11/smollm2-recipe runs/v12/recipe-guard "0 1 2" --model smollm2-135m
# Then: python scripts/seed_spread.py --out DST --seeds 0,1,2 --no-run
set -euo pipefail
src=$1 dst=$2 seeds=$3
shift 3
for seed in $seeds; do
  out=$dst/seed-$seed
  if [ -e "$out" ]; then echo "$out exists; not touched" >&2; continue; fi
  mkdir -p "$out"
  cp -r "$src/seed-$seed/editor" "$src/seed-$seed/stages" "$out/"
  rm -f "$out"/stages/{debias,evaluate_after,merge_and_rescore}.json
  biasedit demo "$@" --seed "$seed" --out "$out" --resume --quiet
done
