# shellcheck shell=bash
# Shared by the toy report scripts (eval/toy_dpo_report.sh, eval/toy_sdpo_report.sh); sourced, not run.
# Needs OUT (the report folder) and SFT (an SFT export, or empty: trained into OUT/sft first); BIN (the
# folder holding levo-train) defaults to the one on PATH.
#
# train RUN_NAME overrides...: `levo-train run_dir=OUT/RUN_NAME resume=true overrides...`, skipped when
# OUT/RUN_NAME already holds its export (model.pt, or reward.pt for a reward model); a run interrupted
# mid-way continues from its checkpoints. Its wall time is appended to OUT/timings.tsv.
train() {
  local run=$1; shift
  if [ -f "$OUT/$run/export/model.pt" ] || [ -f "$OUT/$run/export/reward.pt" ]; then return 0; fi
  local t0=$SECONDS
  "$BIN/levo-train" run_dir="$OUT/$run" resume=true "$@"
  printf '%s\t%s s\t%s\n' "$run" "$((SECONDS - t0))" "$*" >> "$OUT/timings.tsv"
}

BIN=${BIN:-$(dirname "$(command -v levo-train)")}
mkdir -p "$OUT"
if [ -z "${SFT:-}" ]; then
  train sft recipe=sft
  SFT="$OUT/sft/export"
fi
