"""Fréchet distance between toy exports' samples with `levo-eval tokens` (not a test).

Samples the same held-out toy prompts from each export (levo-infer's file layout), scores them with
the toy world's hidden oracle, and runs ``levo-eval tokens --ref FIRST --gen EACH --rm RM`` so the
distance of each set to the first can be read beside its toy quality. Name the first export twice
to see the finite-sample distance between two samples of one model.

    OMP_NUM_THREADS=1 python eval/toy_frechet_report.py --rm runs/rm/export \
        sft=runs/sft/export sft_again=runs/sft/export dpo=runs/dpo/export sft150=runs/sft150/export
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", help="NAME=EXPORT_DIR; the first is the reference set")
    ap.add_argument("--rm", required=True, help="reward-model export (its pooled features)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-frames", type=int, default=300)
    a = ap.parse_args()
    import numpy as np
    from test_token_metrics import _write_levo_infer

    from levo_train.rollout import Sampling, sample_and_score
    from levo_train.toy.pairs import heldout_prompts, load_toy_model
    from levo_train.toy.scorer import ToyOracleScorer

    oracle = ToyOracleScorer(0)
    prompts = heldout_prompts(oracle.world, a.prompts, seed=3)
    named = [e.split("=", 1) for e in a.exports]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, ex) in enumerate(named):
            pol = load_toy_model(ex, "cpu")
            songs = [c.song for c in sample_and_score(pol, prompts, None, Sampling(max_frames=a.max_frames),
                                                      seed=10 + i)]
            q = float(np.mean([s["quality"] for s in oracle.score(songs)]))
            _write_levo_infer(Path(tmp) / name, songs, a.max_frames)
            rows.append((name, q))
        ref = Path(tmp) / named[0][0] / "tokens"
        print("| set | toy quality | Fréchet to the first (RM features) |\n|---|---|---|")
        for name, q in rows:
            out = subprocess.run([sys.executable, "-m", "levo_eval.cli", "tokens", "--ref", str(ref),
                                  "--gen", str(Path(tmp) / name / "tokens"), "--rm", a.rm],
                                 capture_output=True, text=True, check=True)
            fd = json.loads(out.stdout.strip().splitlines()[-1])["frechet"]["rm"]
            print(f"| {name} | {q:.3f} | {fd:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
