#!/usr/bin/env bash
# Toy-world DPO report: the default `recipe=dpo` against its SFT init, with the variants reported
# beside it (DPO + SFT term, off-policy world-rendered pairs), at the top tier (as released
# inference prompts) and without a tier tag. Writes OUT/report.md and the compare JSONs.
#
#   bash eval/toy_dpo_report.sh OUT [SFT_EXPORT [dpo overrides...]]   (SFT_EXPORT "" or none: runs recipe=sft first)
#   N=512 SEED=1 VARIANTS=1 DIMS=0 SWEEP=0 bash eval/toy_dpo_report.sh ...
#   DIMS=1: also per-preference DPO on each hidden dimension (data.toy_pairs.dimension=lyrics, structure,
#           harmony, mix) and `levo-data merge` of the lyrics and structure runs at 0.5 / 0.5: top tier,
#           untagged, and top tier without CFG (--cfg-coef 1.0, the base sampled the same way)
#   SWEEP=1: also the runs behind the defaults: beta 0.1 / 0.25 / 0.5 at 200 and 400 steps (top tier),
#           top-tier-only pairs at beta 0.25 and 0.5 (judged untagged), lr 3e-5 at beta 0.1 for 200 steps
# Wall time of every run it trains is appended to OUT/timings.tsv.
set -euo pipefail
OUT=${1:?usage: bash eval/toy_dpo_report.sh OUT [SFT_EXPORT]}
SFT=${2:-}
N=${N:-512}
SEED=${SEED:-1}
VARIANTS=${VARIANTS:-1}
DIMS=${DIMS:-0}
SWEEP=${SWEEP:-0}
# shellcheck source=eval/report_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/report_lib.sh"  # BIN, OUT/sft when SFT is empty, train RUN overrides...
train dpo recipe=dpo model.init="$SFT" "${@:3}"
CKPTS=("$OUT/dpo/export")
if [ "$VARIANTS" = 1 ]; then
  train dpo_sft_term recipe=dpo model.init="$SFT" 'dpo.loss_type=[sigmoid,sft]' 'dpo.loss_weights=[1.0,1.0]' "${@:3}"
  train dpo_world_pairs recipe=dpo model.init="$SFT" data.toy_pairs.source=world "${@:3}"
  CKPTS+=("$OUT/dpo_sft_term/export" "$OUT/dpo_world_pairs/export")
fi
DIM_CKPTS=()
if [ "$DIMS" = 1 ]; then
  for d in lyrics structure harmony mix; do
    train "dpo_$d" recipe=dpo model.init="$SFT" data.toy_pairs.dimension=$d "${@:3}"
    DIM_CKPTS+=("$OUT/dpo_$d/export")
  done
  [ -f "$OUT/merge_lyrics_structure/model.pt" ] || "$BIN/levo-data" merge "$OUT/dpo_lyrics/export" \
    "$OUT/dpo_structure/export" --weights 0.5,0.5 --out "$OUT/merge_lyrics_structure"
  DIM_CKPTS+=("$OUT/merge_lyrics_structure")
fi
SWEEP_TOP=() SWEEP_NONE=()
if [ "$SWEEP" = 1 ]; then
  for beta in 0.1 0.25 0.5; do
    for steps in 200 400; do
      train "sweep_b${beta}_s${steps}" recipe=dpo model.init="$SFT" dpo.beta=$beta trainer.max_steps=$steps "${@:3}"
      SWEEP_TOP+=("$OUT/sweep_b${beta}_s${steps}/export")
    done
  done
  train sweep_lr3e-5 recipe=dpo model.init="$SFT" dpo.beta=0.1 trainer.max_steps=200 optim.lr=3e-5 "${@:3}"
  SWEEP_TOP+=("$OUT/sweep_lr3e-5/export")
  SWEEP_NONE+=("$OUT/dpo/export")
  for beta in 0.25 0.5; do
    train "sweep_toponly_b$beta" recipe=dpo model.init="$SFT" data.toy_pairs.tier=top dpo.beta=$beta "${@:3}"
    SWEEP_NONE+=("$OUT/sweep_toponly_b$beta/export")
  done
fi
table() {  # table TIER FILE CKPT...: levo-eval compare against the SFT export, as JSON and a markdown table
  # (CFG=X: sample with --cfg-coef X); FILE is reused only for the same exports and settings and when
  # no export is newer than it
  local tier=$1 file=$2; shift 2
  local cfg=()
  [ -z "${CFG:-}" ] || cfg=(--cfg-coef "$CFG")
  local key="$SFT $* n=$N seed=$SEED tier=$tier${CFG:+ cfg=$CFG}"
  if [ ! -s "$file" ] || [ "$(cat "$file.key" 2>/dev/null)" != "$key" ] ||
     [ -n "$(find "$SFT" "$@" -name model.pt -newer "$file")" ]; then
    "$BIN/levo-eval" compare --base "$SFT" --ckpt "$@" --n "$N" --seed "$SEED" --tier "$tier" "${cfg[@]}" > "$file"
    echo "$key" > "$file.key"
  fi
  "$BIN/python" - "$file" <<'PY'
import json, sys
from levo_eval.cli import markdown_table
print(markdown_table(json.load(open(sys.argv[1]))), end="\n\n")
PY
}
{
  for tier in top none; do
    table "$tier" "$OUT/compare_$tier.json" "${CKPTS[@]}"
  done
  if [ ${#DIM_CKPTS[@]} -gt 0 ]; then
    echo "per-preference DPO (one hidden dimension each) and the lyrics + structure merge:"
    echo
    table top "$OUT/compare_dims_top.json" "${DIM_CKPTS[@]}"
    table none "$OUT/compare_dims_none.json" "${DIM_CKPTS[@]}"
    echo "the same at the top tier without classifier-free guidance (cfg coef 1.0, base too):"
    echo
    CFG=1.0 table top "$OUT/compare_dims_top_cfg1.json" "${DIM_CKPTS[@]}"
  fi
  if [ ${#SWEEP_TOP[@]} -gt 0 ]; then
    echo "beta x steps, and lr 3e-5 (beta 0.1, 200 steps):"
    echo
    table top "$OUT/compare_sweep_top.json" "${SWEEP_TOP[@]}"
    echo "untagged prompts: default pairs (half untagged) vs top-tier-only pairs at beta 0.25 / 0.5:"
    echo
    table none "$OUT/compare_sweep_none.json" "${SWEEP_NONE[@]}"
  fi
  echo "held-out pairs (implicit reward) at the end of each DPO run:"
  echo
  echo "| run | pair accuracy | margin | rewards chosen / rejected | drift (per token) |"
  echo "|---|---|---|---|---|"
  for c in "${CKPTS[@]}" "${DIM_CKPTS[@]:0:4}"; do
    "$BIN/python" - "$(dirname "$c")/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); v = s["val_metrics"]
f = {k: f"{v[k]:.3f}" if v.get(k) is not None else "n/a" for k in
     ("val/rewards/accuracies", "val/rewards/margins", "val/rewards/chosen", "val/rewards/rejected", "val/drift")}
print(f"| {s['run_dir']} | {f['val/rewards/accuracies']} | {f['val/rewards/margins']} | "
      f"{f['val/rewards/chosen']} / {f['val/rewards/rejected']} | {f['val/drift']} |")
PY
  done
} | tee "$OUT/report.md"
