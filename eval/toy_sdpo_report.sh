#!/usr/bin/env bash
# Toy-world alignment report: reward model, offline DPO and semi-online DPO, each ranked by the reward
# model and by the hidden oracle, from one SFT export, with default commands. Writes OUT/report.md.
#
#   bash eval/toy_sdpo_report.sh OUT [SFT_EXPORT [overrides for all four DPO runs...]]
#   N=512 SEED=1 bash eval/toy_sdpo_report.sh ...            (SFT_EXPORT "" or none: runs recipe=sft first)
#
# Arms (same init, 300 optimizer steps at batch 32, beta 0.5, lr 5e-6; 12000 training candidates each:
# offline 3000 prompts x 4 once, semi-online 10 rounds x 300 prompts x 4 from the current policy):
#   dpo_rm       levo-train recipe=dpo  data.toy_pairs.scorer=rm:OUT/rm/export
#   sdpo_rm      levo-train recipe=sdpo reward.ckpt=OUT/rm/export
#   dpo_oracle   levo-train recipe=dpo                        (the default: pairs ranked by the hidden quality)
#   sdpo_oracle  levo-train recipe=sdpo reward.scorer=toy
# then levo-eval compare (both tiers) and each semi-online run's rounds (scorer vs hidden quality).
# Wall time of every run is appended to OUT/timings.tsv; an interrupted run continues (resume=true).
set -euo pipefail
OUT=${1:?usage: bash eval/toy_sdpo_report.sh OUT [SFT_EXPORT]}
SFT=${2:-}
N=${N:-512}
SEED=${SEED:-1}
# shellcheck source=eval/report_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/report_lib.sh"  # BIN, OUT/sft when SFT is empty, train RUN overrides...
train rm recipe=reward model.init="$SFT"
[ -s "$OUT/rm_eval.json" ] || "$BIN/levo-eval" reward --rm "$OUT/rm/export" --policy "$SFT" --n "$N" --seed "$SEED" \
  | tail -n 1 > "$OUT/rm_eval.json"
train dpo_rm recipe=dpo model.init="$SFT" data.toy_pairs.scorer=rm:"$OUT/rm/export" "${@:3}"
train sdpo_rm recipe=sdpo model.init="$SFT" reward.ckpt="$OUT/rm/export" "${@:3}"
train dpo_oracle recipe=dpo model.init="$SFT" "${@:3}"
train sdpo_oracle recipe=sdpo model.init="$SFT" reward.scorer=toy "${@:3}"
CKPTS=("$OUT/dpo_rm/export" "$OUT/sdpo_rm/export" "$OUT/dpo_oracle/export" "$OUT/sdpo_oracle/export")
for tier in top none; do
  f="$OUT/compare_$tier.json"
  [ -s "$f" ] && [ -z "$(find "$SFT" "${CKPTS[@]}" -name model.pt -newer "$f")" ] ||
    "$BIN/levo-eval" compare --base "$SFT" --ckpt "${CKPTS[@]}" --n "$N" --seed "$SEED" --tier "$tier" > "$f"
done
for arm in rm oracle; do  # semi-online against offline with the same reward, paired over the same conditions
  for tier in top none; do
    f="$OUT/sdpo_vs_dpo_${arm}_$tier.json"
    [ -s "$f" ] && [ -z "$(find "$OUT/dpo_$arm" "$OUT/sdpo_$arm" -name model.pt -newer "$f")" ] ||
      "$BIN/levo-eval" compare --base "$OUT/dpo_$arm/export" --ckpt "$OUT/sdpo_$arm/export" --n "$N" --seed "$SEED" \
        --tier "$tier" > "$f"
  done
done
"$BIN/python" - "$OUT" <<'PY' | tee "$OUT/report.md"
import json, sys
from pathlib import Path
from levo_eval.cli import markdown_table
out = Path(sys.argv[1])
rm = json.loads((out / "rm_eval.json").read_text())
print("reward model vs hidden scores (levo-eval reward):\n\n| output | LCC | SRCC | KTAU | pair acc |\n|---|---|---|---|---|")
for k, v in rm.items():
    print(f"| {k} | {v['lcc']:.3f} | {v['srcc']:.3f} | {v['ktau']:.3f} | {v['pair_acc']:.3f} |")
print()
for tier in ("top", "none"):
    print(markdown_table(json.loads((out / f"compare_{tier}.json").read_text())), end="\n\n")
print("semi-online vs offline DPO, same reward (delta of quality; z as independent means / paired):\n")
print("| reward | tier | offline | semi-online | delta | z | paired z |\n|---|---|---|---|---|---|---|")
for arm in ("rm", "oracle"):
    for tier in ("top", "none"):
        d = json.loads((out / f"sdpo_vs_dpo_{arm}_{tier}.json").read_text())
        v = d["ckpts"][0]["vs_base"]["quality"]
        print(f"| {arm} | {tier} | {d['base']['quality']:.3f} | {d['ckpts'][0]['quality']:.3f} | {v['delta']:+.3f} | "
              f"{v['z']:.1f} | {v['delta'] / v['paired_se']:.1f} |")
print()
from levo_train.data.shards import iter_raw, resolve_shards
print("offline training pairs: how often the hidden oracle agrees with the ranking, mean hidden margin:\n")
print("| run | pairs | oracle agrees | hidden margin |\n|---|---|---|---|")
for run in ("dpo_rm", "dpo_oracle"):
    train = json.loads((out / run / "summary.json").read_text())["data"]["train"]
    n = agree = 0
    margin = 0.0
    for sh in resolve_shards(train):
        for raw in iter_raw(sh):
            m = json.loads(raw["json"])
            h = m.get("hidden")
            d = h["chosen"]["quality"] - h["rejected"]["quality"] if h else m["margin"]  # oracle pairs: its own
            n, agree, margin = n + 1, agree + (d > 0), margin + d
    print(f"| {run} | {n} | {agree / n:.3f} | {margin / n:.3f} |")
print()
for run in ("sdpo_rm", "sdpo_oracle"):
    rows = [json.loads(x) for x in (out / run / "sdpo" / "rounds.jsonl").read_text().splitlines()]
    print(f"{run}: per round (scorer mean / hidden quality of the same candidates / pairs / oracle agrees "
          "with the pair / generation s)\n")
    print("| round | scorer mean | hidden quality | pairs | agreement | gen s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['score_mean']:.3f} | {r.get('hidden_mean', float('nan')):.3f} | {r['pairs']} | "
              f"{r.get('pair_agreement', float('nan')):.3f} | {r['gen_seconds']:.1f} |")
    print()
PY
