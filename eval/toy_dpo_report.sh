#!/usr/bin/env bash
# Toy-world DPO report: the default `recipe=dpo` against its SFT init, with the variants reported
# beside it (DPO + SFT term, off-policy world-rendered pairs), at the top tier (as released
# inference prompts) and without a tier tag. Writes OUT/report.md and the compare JSONs.
#
#   bash eval/toy_dpo_report.sh OUT [SFT_EXPORT [dpo overrides...]]   (SFT_EXPORT "" or none: runs recipe=sft first)
#   N=512 SEED=1 VARIANTS=1 bash eval/toy_dpo_report.sh ...
set -euo pipefail
OUT=${1:?usage: bash eval/toy_dpo_report.sh OUT [SFT_EXPORT]}
SFT=${2:-}
N=${N:-512}
SEED=${SEED:-1}
VARIANTS=${VARIANTS:-1}
BIN=${BIN:-$(dirname "$(command -v levo-train)")}
mkdir -p "$OUT"
train() {  # train RUN_NAME overrides...: skipped when OUT/RUN_NAME already holds its export
  local run=$1; shift
  [ -f "$OUT/$run/export/model.pt" ] || "$BIN/levo-train" run_dir="$OUT/$run" "$@"
}
if [ -z "$SFT" ]; then
  train sft recipe=sft
  SFT="$OUT/sft/export"
fi
train dpo recipe=dpo model.init="$SFT" "${@:3}"
CKPTS=("$OUT/dpo/export")
if [ "$VARIANTS" = 1 ]; then
  train dpo_sft_term recipe=dpo model.init="$SFT" 'dpo.loss_type=[sigmoid,sft]' 'dpo.loss_weights=[1.0,1.0]' "${@:3}"
  train dpo_world_pairs recipe=dpo model.init="$SFT" data.toy_pairs.source=world "${@:3}"
  CKPTS+=("$OUT/dpo_sft_term/export" "$OUT/dpo_world_pairs/export")
fi
{
  for tier in top none; do
    "$BIN/levo-eval" compare --base "$SFT" --ckpt "${CKPTS[@]}" --n "$N" --seed "$SEED" --tier "$tier" \
      > "$OUT/compare_$tier.json"
    "$BIN/python" - "$OUT/compare_$tier.json" <<'PY'
import json, sys
from levo_eval.cli import markdown_table
print(markdown_table(json.load(open(sys.argv[1]))), end="\n\n")
PY
  done
  echo "held-out pairs (implicit reward) at the end of each DPO run:"
  echo
  echo "| run | pair accuracy | margin | rewards chosen / rejected | drift (per token) |"
  echo "|---|---|---|---|---|"
  for c in "${CKPTS[@]}"; do
    "$BIN/python" - "$(dirname "$c")/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); v = s["val_metrics"]
print(f"| {s['run_dir']} | {v['val/rewards/accuracies']:.3f} | {v['val/rewards/margins']:.3f} | "
      f"{v['val/rewards/chosen']:.3f} / {v['val/rewards/rejected']:.3f} | {v['val/drift']:.3f} |")
PY
  done
} | tee "$OUT/report.md"
