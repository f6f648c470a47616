"""Scored songs: the training data of the reward model (``recipe=reward`` with ``data.train``).

A training song is an ordinary song record (:mod:`levo_train.data.shards`) whose json carries
``scores``: one value per dimension, and the overall score as ``scores["overall"]`` or, for toy
world songs, the top-level ``quality``. :class:`RewardDataModule` is the song datamodule (same
deterministic, exactly resumable stream) whose batches add ``targets`` [B, D + 1] (dimensions in
order, then overall); a song without them is a :class:`ShardError` naming its shard and key.
Scores on another scale than [0, 1] (1-5 or 1-10 ratings) are mapped to [0, 1] by the
``score_range`` ``(lo, hi)`` the data were rated on (``reward.score_range``): target =
(s - lo) / (hi - lo), since the RM's loss and its ranking margin assume [0, 1]; a score outside the
range is a :class:`ShardError` naming the setting, the shard and the song.
The toy default (no ``data.train``) is built by :mod:`levo_train.toy.scored`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from levo_train.data.datamodule import SongDataModule, _SongStream
from levo_train.data.shards import OVERALL, ShardError, Song, iter_songs, resolve_shards

#: where the stream leaves each song's targets between decoding and collation
_TARGETS = "__reward_targets__"
#: the scale the reward model's loss assumes (``reward.score_range``'s default)
UNIT_RANGE: tuple[float, float] = (0.0, 1.0)


def check_score_range(score_range: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` as floats; ValueError unless two finite numbers with lo < hi."""
    lo, hi = (float(v) for v in score_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"reward.score_range=[{lo}, {hi}]: expected [lo, hi], two finite numbers with lo < hi "
                         "(the scale the scores were rated on, e.g. [1, 5])")
    return lo, hi


def song_targets(song: Song, dimensions: Sequence[str], score_range: Sequence[float] = UNIT_RANGE) -> list[float]:
    """The targets of one song: ``scores[d]`` for each dimension, then the overall score
    (``scores["overall"]``, else the toy world's ``quality``), each mapped from ``score_range``
    ``(lo, hi)`` to [0, 1]. :class:`ShardError` when missing or outside the range."""
    scores = song.meta.get("scores")
    if not isinstance(scores, dict):
        raise ShardError("its json has no `scores` object: reward-model training needs per-dimension scores "
                         f"({', '.join(dimensions)}) and an overall score (scores.overall or quality)",
                         shard=song.shard or None, key=song.key)
    out = []
    for d in dimensions:
        v = scores.get(d)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ShardError(f"scores.{d} is {v!r}: reward.dimensions asks for {list(dimensions)}, the song's scores "
                             f"hold {sorted(scores)}", shard=song.shard or None, key=song.key)
        out.append(float(v))
    overall = scores.get(OVERALL, song.meta.get("quality"))
    if not isinstance(overall, (int, float)) or isinstance(overall, bool):
        raise ShardError("no overall score: expected scores.overall or a top-level quality in its json",
                         shard=song.shard or None, key=song.key)
    out.append(float(overall))
    if not np.all(np.isfinite(out)):
        raise ShardError(f"non-finite score in {dict(zip([*dimensions, OVERALL], out))}", shard=song.shard or None,
                         key=song.key)
    lo, hi = check_score_range(score_range)
    bad = {n: v for n, v in zip([*dimensions, OVERALL], out) if not lo <= v <= hi}
    if bad:
        raise ShardError(f"scores {bad} lie outside reward.score_range=[{lo}, {hi}]: set reward.score_range to the "
                         "scale the data were rated on (e.g. [1, 5] or [1, 10])", shard=song.shard or None,
                         key=song.key)
    return [(v - lo) / (hi - lo) for v in out]


class RewardStream(_SongStream):
    """The song stream whose batches also hold ``targets`` [B, D + 1] float32."""

    def __init__(self, *, dimensions: Sequence[str], score_range: Sequence[float] = UNIT_RANGE, **kw: Any) -> None:
        super().__init__(**kw)
        self.dimensions = tuple(dimensions)
        self.score_range = check_score_range(score_range)

    def _decode(self, raw: dict, position: int) -> Song | None:
        song = super()._decode(raw, position)
        if song is None:
            return None
        try:
            song.meta[_TARGETS] = song_targets(song, self.dimensions, self.score_range)
        except ShardError as e:
            self._skip_bad(e)
            return None
        return song

    def _batch(self, raws: list[tuple[int, dict]]) -> dict[str, Any] | None:
        batch = super()._batch(raws)
        if batch is not None:
            batch["targets"] = torch.tensor([m.pop(_TARGETS) for m in batch["meta"]], dtype=torch.float32)
        return batch


class RewardDataModule(SongDataModule):
    """:class:`SongDataModule` whose batches carry ``targets`` for ``dimensions`` + overall, mapped
    from ``score_range`` to [0, 1]."""

    stream_cls = RewardStream

    def __init__(self, *args: Any, dimensions: Sequence[str], score_range: Sequence[float] = UNIT_RANGE,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.dimensions = tuple(dimensions)
        self.score_range = check_score_range(score_range)

    def stream_kwargs(self, train: bool) -> dict[str, Any]:
        return {"dimensions": self.dimensions, "score_range": self.score_range}


def data_dimensions(spec: Any, code_size: int) -> tuple[str, ...]:
    """The dimensions the first song of a shard set is scored on (its ``scores`` keys but
    ``overall``), for ``reward.dimensions: null``; :class:`ShardError` when it has none."""
    shards = resolve_shards(spec)
    if not shards:
        raise ShardError(f"no shards found for {spec}")
    for song in iter_songs(shards[0], code_size=code_size):
        scores = song.meta.get("scores")
        dims = tuple(k for k in scores if k != OVERALL) if isinstance(scores, dict) else ()
        if not dims:
            raise ShardError("its json has no per-dimension `scores`: reward-model training needs them (or set "
                             "reward.dimensions)", shard=song.shard or shards[0], key=song.key)
        return dims
    raise ShardError("holds no songs", shard=shards[0])


__all__ = ["OVERALL", "UNIT_RANGE", "RewardDataModule", "RewardStream", "check_score_range", "data_dimensions",
           "song_targets"]
