"""The toy world's hidden scores as a :class:`~levo_train.rollout.Scorer` (the reward oracle)."""

from __future__ import annotations

from collections.abc import Sequence

from levo_train.data.shards import Song
from levo_train.toy.world import DIMENSIONS, ToyWorld


class ToyOracleScorer:
    """Hidden per-dimension scores (lyrics, structure, harmony, mix) and their mean, ``quality``,
    of the toy world of seed ``world_seed``: the ground truth a reward model is judged against."""

    overall = "quality"
    dimensions: tuple[str, ...] = DIMENSIONS

    def __init__(self, world_seed: int = 0, world: ToyWorld | None = None) -> None:
        self.world = world if world is not None else ToyWorld(world_seed)
        self.name = f"toy-oracle(world {self.world.seed})"

    def score(self, songs: Sequence[Song]) -> list[dict[str, float]]:
        return self.world.score_many([(s.tokens, s.lyric, s.style) for s in songs])


__all__ = ["ToyOracleScorer"]
