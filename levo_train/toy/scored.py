"""The toy reward data: what ``recipe=reward`` trains on when no ``data.train`` is given.

:func:`ensure_toy_reward_data` samples songs from ``model.init`` with
:func:`levo_train.rollout.sample_and_score` at several temperatures for toy training conditions
(styles with the top tier tag and untagged, alternating), adds the world's own corrupted renderings
(a wide spread of quality, including near-perfect songs), scores everything with the hidden oracle
(:class:`~levo_train.toy.scorer.ToyOracleScorer`) and holds out songs sampled for held-out
conditions (``world.heldout_conditions``) as the validation split: scored song shards in the format
of :mod:`levo_train.data.scored`. Built once and cached, keyed by every setting, the init's
fingerprint and the world version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.sampling import SAMPLER_VERSION
from levo_train.data.cache import build_once
from levo_train.data.shards import ShardWriter, Song
from levo_train.rollout import Sampling, sample_and_score
from levo_train.toy.pairs import heldout_prompts, load_toy_model, toy_candidates, toy_prompts
from levo_train.toy.scorer import ToyOracleScorer
from levo_train.toy.world import DIMENSIONS, TOY_CODE_SIZE, TOY_WORLD_VERSION, ToyWorld

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyRewardSpec:
    """What the toy reward data set is built from (all of it keys the cache)."""

    n_train_prompts: int = 1500          # toy training conditions sampled from the init
    per_prompt: int = 2                  # songs per condition and temperature
    temperatures: tuple[float, ...] = (0.7, 1.0, 1.3)
    world_renderings: int = 2000         # the world's corrupted renderings added to the training split
    n_val: int = 384                     # held-out conditions, one song each (val_temperature)
    val_temperature: float = 1.0
    tier: tuple[str, ...] = ("top", "none")
    seed: int = 0
    max_frames: int = 96

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        object.__setattr__(self, "tier", tuple(self.tier) if isinstance(self.tier, (list, tuple)) else (self.tier,))
        if self.n_train_prompts < 0 or self.per_prompt < 1 or self.world_renderings < 0 or self.n_val < 0:
            raise ValueError(f"need n_train_prompts >= 0, per_prompt >= 1, world_renderings >= 0, n_val >= 0; got {self}")
        if self.n_train_prompts * len(self.temperatures) + self.world_renderings < 1:
            raise ValueError("the training split would be empty (no prompts/temperatures and no world renderings)")


def toy_reward_key(spec: ToyRewardSpec, world_seed: int, fingerprint: str) -> dict[str, Any]:
    return {"spec": dataclasses.asdict(spec), "world_seed": world_seed, "world_version": TOY_WORLD_VERSION,
            "model": fingerprint, "format": 1, "sampler": SAMPLER_VERSION}


def _write_split(out: Path, songs: Sequence[Song]) -> dict[str, Any]:
    with ShardWriter(out, code_size=TOY_CODE_SIZE) as w:
        for s in songs:
            w.write_song(s.key, s.tokens, s.lyric, s.style, s.meta)
    qs = np.array([s.meta["quality"] for s in songs]) if songs else np.zeros(0)
    return {"songs": len(songs), "mean_quality": round(float(qs.mean()), 6) if len(qs) else None,
            "std_quality": round(float(qs.std()), 6) if len(qs) else None}


def _song_of(key: str, song: Song, scores: dict[str, float], **extra: Any) -> Song:
    meta = {"scores": {d: round(float(scores[d]), 6) for d in DIMENSIONS}, "quality": round(float(scores["quality"]), 6),
            "language": "toy", **extra}
    return Song(key, np.ascontiguousarray(song.tokens, dtype=np.int64), song.lyric, song.style, None, meta)


def write_toy_reward_data(out_dir: str | os.PathLike, spec: ToyRewardSpec, *, model: str | os.PathLike,
                          world_seed: int = 0, device: str | None = None) -> dict[str, Any]:
    """Write ``out_dir/train`` and ``out_dir/val`` song shards (see the module docstring)."""
    t0 = time.time()
    world = ToyWorld(world_seed)
    oracle = ToyOracleScorer(world=world)
    lelm = load_toy_model(model, device)
    train: list[Song] = []
    empty = 0
    prompts = toy_prompts(world, spec.n_train_prompts, seed=2 * spec.seed + 11, tier=spec.tier)
    for ti, temp in enumerate(spec.temperatures):
        if not prompts:
            break
        cands = sample_and_score(lelm, prompts, oracle, Sampling(temperature=temp, max_frames=spec.max_frames),
                                 per_prompt=spec.per_prompt, seed=spec.seed * 100 + ti, key_prefix=f"t{ti}-")
        for c in cands:
            if c.frames < 1:
                empty += 1
                continue
            train.append(_song_of(c.song.key, c.song, c.scores, source="model-samples", temperature=temp))
    if spec.world_renderings:
        for s in toy_candidates(world, spec.world_renderings, 1, seed=2 * spec.seed + 12, tier=spec.tier,
                                key_prefix="w"):
            train.append(_song_of(s.key, s, {**s.meta["scores"], "quality": s.meta["quality"]}, source="toy-world"))
    vprompts = heldout_prompts(world, spec.n_val, seed=7919 + spec.seed, tier=spec.tier)
    val: list[Song] = []
    if vprompts:
        for c in sample_and_score(lelm, vprompts, oracle, Sampling(temperature=spec.val_temperature,
                                                                   max_frames=spec.max_frames),
                                  per_prompt=1, seed=spec.seed * 100 + 99, key_prefix="v"):
            if c.frames >= 1:
                val.append(_song_of(c.song.key, c.song, c.scores, source="model-samples",
                                    temperature=spec.val_temperature))
            else:
                empty += 1
    stats = {"train": _write_split(Path(out_dir) / "train", train), "empty_samples_dropped": empty}
    if val:
        stats["val"] = _write_split(Path(out_dir) / "val", val)
    stats["seconds"] = round(time.time() - t0, 2)
    return stats


def ensure_toy_reward_data(root: str | os.PathLike, spec: ToyRewardSpec, *, model: str | os.PathLike,
                           fingerprint: str, world_seed: int = 0, device: str | None = None) -> Path:
    """The toy reward data (``train/``, ``val/``) built once under ``root``; ``done.json`` holds the
    spec and build stats, ``derived_from.json`` the inputs (checked on every reuse)."""
    key = toy_reward_key(spec, world_seed, fingerprint)
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"reward-s{world_seed}-n{spec.n_train_prompts}x{spec.per_prompt}x{len(spec.temperatures)}-{h}"

    def build(tmp: Path) -> None:
        log.info("building toy reward data %s from %s", name, model)
        stats = write_toy_reward_data(tmp, spec, model=model, world_seed=world_seed, device=device)
        (tmp / "done.json").write_text(strict_dumps({"spec": dataclasses.asdict(spec), "model": str(model),
                                                   "model_fingerprint": fingerprint, **stats}, indent=1))

    return build_once(root, name, "done.json", build, derived_from=key)


__all__ = ["ToyRewardSpec", "ensure_toy_reward_data", "toy_reward_key", "write_toy_reward_data"]
