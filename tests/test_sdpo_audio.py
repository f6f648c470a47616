"""An aesthetic scorer on audio inside semi-online DPO: ``reward.scorer=audio:MOD:FN`` with
``reward.codec=CODEC_DIR`` (the native decoder, batched) ranks the candidates (issue #21 item 5)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from codec_fixtures import tiny_flow, write_tiny_codec
from test_sdpo import sdpo_args

from levo_infer.codec import output_samples
from levo_train.cli import main

LAB = '''
import json, os
import numpy as np

def score(waveforms, sample_rate, songs):
    """A batched audio scorer: sees every song's waveform, records what it saw."""
    with open(os.environ["LAB_AUDIO_LOG"], "a") as f:
        for w, s in zip(waveforms, songs):
            f.write(json.dumps({"key": s.key, "frames": s.frames, "samples": int(w.shape[-1]),
                                "channels": int(w.shape[0]), "sr": sample_rate}) + "\\n")
    return [{"loud": float(np.abs(w).mean())} for w in waveforms]

score.batched = True
'''


def test_sdpo_ranks_candidates_with_an_audio_scorer_and_the_native_codec(tmp_path, monkeypatch, toy_cache_dir,
                                                                         toy_sft_export, capsys):
    (tmp_path / "lab_sdpo_audio.py").write_text(LAB)
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "seen.jsonl"
    monkeypatch.setenv("LAB_AUDIO_LOG", str(log))
    codec = write_tiny_codec(tmp_path / "codec", flow=tiny_flow(0, layers=1))
    rd = tmp_path / "run"
    small = ["sdpo.prompts_per_round=4", "sdpo.per_prompt=2", "trainer.max_steps=2", "sdpo.save_candidates=true"]
    # without a codec: refused, naming the setting to add (it used to say "pass --codec")
    assert main(sdpo_args(toy_cache_dir, tmp_path / "no", toy_sft_export, *small,
                          "reward.scorer=audio:lab_sdpo_audio:score")) == 2
    assert "reward.codec=CODEC_DIR" in capsys.readouterr().err
    assert main(sdpo_args(toy_cache_dir, rd, toy_sft_export, *small, "reward.scorer=audio:lab_sdpo_audio:score",
                          f"reward.codec={codec}")) == 0
    seen = [json.loads(x) for x in log.read_text().splitlines()]
    cands = [json.loads(x) for x in (rd / "sdpo" / "candidates" / "round0000.jsonl").read_text().splitlines()]
    assert len(seen) == len(cands) >= 6
    by_key = {s["key"]: s for s in seen}
    for c in cands:  # the scorer saw each candidate's waveform at the codec's length, and its score ranks it
        s = by_key[c["key"]]
        frames = len(c["tokens"][0])
        assert s["frames"] == frames >= 1 and s["samples"] == output_samples(frames) and s["channels"] == 2
        assert s["sr"] == 48000 and c["scores"]["loud"] == c["scores"]["overall"]
    rounds = [json.loads(x) for x in (rd / "sdpo" / "rounds.jsonl").read_text().splitlines()]
    # the pairs are best vs worst on the audio score: the logged margin is the mean of those per prompt
    per_prompt: dict[int, list[float]] = {}
    for c in cands:
        per_prompt.setdefault(c["prompt_index"], []).append(c["scores"]["overall"])
    margins = [max(v) - min(v) for v in per_prompt.values() if len(v) == 2 and max(v) > min(v)]
    assert rounds[0]["pairs"] == len(margins) and rounds[0]["pair_margin"] == pytest.approx(np.mean(margins))
    assert "lab_sdpo_audio" in sys.modules
