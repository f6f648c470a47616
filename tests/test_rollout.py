"""The rollout primitive (sample_and_score), the toy oracle scorer and the method registry."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from levo_train.rollout import Prompt, Sampling, best_vs_worst, group_by_prompt, sample_and_score, song_seed
from levo_train.toy.scorer import ToyOracleScorer
from levo_train.toy.world import ToyWorld, style_text


@pytest.fixture
def tiny_model():
    """The conftest tiny model with room for toy-world lyrics (up to 35 tokens; the toy model holds 40):
    a longer lyric is refused, not cut."""
    import torch
    from conftest import tiny_config

    from levo_infer.model import LeLM

    torch.manual_seed(0)
    m = LeLM(tiny_config(lyric_max_len=40))
    m.init_weights(std=0.2)
    return m.eval()


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
    from levo_train.methods import METHODS, get_method
    from levo_train.settings import UsageError

    assert {"lm", "dpo"} <= set(METHODS)
    with pytest.raises(UsageError) as e:
        get_method("nope")
    assert "known: " in e.value.msg and "lm" in e.value.msg


ANTI_SCORER = '''
from levo_train.toy.scorer import ToyOracleScorer


class Anti:
    """Prefers what the hidden oracle dislikes: a deliberately wrong scorer."""

    name, overall, dimensions = "anti", "overall", ("lyrics",)

    def __init__(self, world_seed=0):
        self.oracle = ToyOracleScorer(world_seed)

    def score(self, songs):
        return [{"overall": -s["quality"], "lyrics": -s["lyrics"]} for s in self.oracle.score(songs)]


def make(world_seed=0):
    return Anti(world_seed)
'''


def test_toy_pairs_ranked_by_another_scorer(tmp_path, monkeypatch, toy_sft_export):
    """data.toy_pairs.scorer: the same sampled candidates, ranked by the given scorer (here one that
    inverts the oracle), with the hidden scores kept beside; the cache key follows the scorer."""
    from levo_train.data.datamodule import PairDataModule
    from levo_train.scorers import load_scorer
    from levo_train.toy.pairs import ToyPairSpec, toy_pairs_name, write_toy_pairs

    (tmp_path / "anti_scorer_mod.py").write_text(ANTI_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ToyPairSpec(n_train=16, n_val=0, n_candidates=3, max_frames=40, min_margin=0.0,
                       scorer="callable:anti_scorer_mod:make")
    stats = write_toy_pairs(tmp_path / "p", spec, model=toy_sft_export, device="cpu",
                            make_scorer=lambda device: load_scorer(spec.scorer, device=device))
    assert stats["train"]["pairs"] >= 8 and stats["train"]["scorer"] == "anti"
    assert stats["train"]["mean_score"] == pytest.approx(-stats["train"]["mean_quality"], abs=1e-6)
    dm = PairDataModule(train=str(tmp_path / "p" / "train"), val=None, batch_size=64, val_batch_size=64,
                        num_workers=0, seed=0, code_size=64, shuffle_buffer=1, skip_bad=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for m in batch["meta"]:  # ranked by the scorer, the oracle's view kept beside: it disagrees
        assert m["scores"]["chosen"]["overall"] >= m["scores"]["rejected"]["overall"]
        assert m["hidden"]["chosen"]["quality"] <= m["hidden"]["rejected"]["quality"]
        assert m["scores"]["chosen"]["overall"] == pytest.approx(-m["hidden"]["chosen"]["quality"])
    default = ToyPairSpec(n_train=16, n_val=0, n_candidates=3, max_frames=40, min_margin=0.0)
    assert toy_pairs_name(spec, 0, "fp") != toy_pairs_name(default, 0, "fp")
    with pytest.raises(ValueError, match="needs source=model"):
        ToyPairSpec(source="world", scorer="rm:x")


def test_sample_and_score_batches_each_kind_of_audio_prompt_apart(tiny_model):
    """Prompts with and without an audio prompt in one call: generated in separate batches (one kind
    each), returned in prompt order, each song as if its kind had been sampled alone."""
    rng = np.random.default_rng(0)
    base = _prompts(4)
    mixed = [Prompt(p.lyric, p.style, rng.integers(0, 16, (3, 2)) if i % 2 else None) for i, p in enumerate(base)]
    scorer, sampling = ToyOracleScorer(0), Sampling(max_frames=8, batch_size=128)
    got = sample_and_score(tiny_model, mixed, scorer, sampling, per_prompt=2, seed=5)
    assert [(c.prompt_index, c.sample_index) for c in got] == [(i, j) for i in range(4) for j in range(2)]
    for kind in (0, 1):
        alone = sample_and_score(tiny_model, mixed, scorer, sampling, per_prompt=2, seed=5,
                                 prompt_indices=[i for i in range(4) if i % 2 == kind])
        for c in alone:
            twin = got[2 * c.prompt_index + c.sample_index]
            assert np.array_equal(twin.song.tokens, c.song.tokens) and twin.scores == c.scores
