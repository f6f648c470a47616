"""The rollout primitive (sample_and_score), the toy oracle scorer and the method registry."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from levo_train.rollout import Prompt, Sampling, best_vs_worst, group_by_prompt, sample_and_score, song_seed
from levo_train.toy.scorer import ToyOracleScorer
from levo_train.toy.world import ToyWorld, style_text


def _prompts(n: int) -> list[Prompt]:
    rng = np.random.default_rng(3)
    world = ToyWorld(0)
    return [Prompt(c.lyric, style_text(c.style_base, "top" if i % 2 else "none"))
            for i, c in enumerate(world.sample_condition(rng) for _ in range(n))]


def test_sample_and_score_is_batch_and_shard_independent(tiny_model):
    """A song depends on its (seed, prompt, sample) only: not on the batch size nor the rank split;
    every candidate carries the oracle's scores of exactly its own tokens."""
    model = tiny_model.eval()
    prompts, scorer = _prompts(5), ToyOracleScorer(0)
    full = sample_and_score(model, prompts, scorer, Sampling(max_frames=12, batch_size=128), per_prompt=3, seed=7)
    small = sample_and_score(model, prompts, scorer, Sampling(max_frames=12, batch_size=4), per_prompt=3, seed=7)
    ranks = [c for r in range(2) for c in sample_and_score(model, prompts, scorer, Sampling(max_frames=12, batch_size=5),
                                                           per_prompt=3, seed=7, shard=(r, 2))]
    key = lambda c: (c.prompt_index, c.sample_index)  # noqa: E731
    assert [c.song.key for c in full] == [f"s{i:07d}-{j}" for i in range(5) for j in range(3)]
    for other in (small, sorted(ranks, key=key)):
        assert [key(c) for c in other] == [key(c) for c in full]
        for a, b in zip(full, other):
            assert np.array_equal(a.song.tokens, b.song.tokens) and a.scores == b.scores
    assert {c.seed for c in full} == {song_seed(7, i, j, 3) for i in range(5) for j in range(3)}
    world = ToyWorld(0)
    for c in full:
        assert c.scores == world.score(c.song.tokens, c.song.lyric, c.song.style) == c.song.meta["scores"]
    assert len({c.song.tokens.tobytes() for c in full}) > 1  # sampling, not one song repeated
    assert model.training is False


def test_best_vs_worst_respects_margin():
    from levo_train.data.shards import Song
    from levo_train.rollout import Candidate

    def cand(j: int, q: float) -> Candidate:
        return Candidate(0, j, j, Song(f"k{j}", np.zeros((3, 1), np.int64), "l", "s", None, {}), {"quality": q})

    cs = [cand(0, 0.5), cand(1, 0.9), cand(2, 0.2)]
    best, worst = best_vs_worst(cs, "quality", 0.05)
    assert (best.sample_index, worst.sample_index) == (1, 2)
    assert best_vs_worst(cs, "quality", 0.8) is None
    assert list(group_by_prompt(cs)) == [0]


def test_cli_does_not_branch_on_method_names():
    """Methods live in the registry (levo_train/methods.py), not in the CLI."""
    src = (Path(__file__).parents[1] / "levo_train" / "cli.py").read_text()
    assert not re.search(r"method\s*==|method\s*!=|method\s+in\s", src)
    from levo_train.cli import UsageError
    from levo_train.methods import METHODS, get_method

    assert {"lm", "dpo"} <= set(METHODS)
    with pytest.raises(UsageError) as e:
        get_method("nope")
    assert "known: " in e.value.msg and "lm" in e.value.msg
