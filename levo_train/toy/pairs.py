"""Toy-world preference pairs, scored by the world's hidden scores, from one of two sources.

* ``source="model"`` (the ``recipe=dpo`` default): the DPO init model samples ``n_candidates``
  songs per toy training prompt (styles with the top tier tag, as released inference asks, and
  untagged ones, alternating); the world scores them; best vs worst with a minimum margin. These are *on-policy* pairs, how LeVo builds its DPO
  data (its own generations ranked by reward models). Both songs of a pair are ones the model
  itself finds likely, so DPO moves probability between plausible songs.
* ``source="world"``: the world renders the candidates itself with random corruptions. These
  *off-policy* pairs are easy (a corrupted rendering holds tokens the model already gives ~0
  probability) and with plain sigmoid DPO the push-down of those tokens dominates the gradient:
  the chosen songs' likelihood falls with the rejected ones and samples degrade (measured in the
  README's DPO section). Kept for comparison and for minimal pairs on one dimension.

:func:`ensure_toy_pairs` builds a pair set once into a cache folder keyed by every setting and, for
``source="model"``, by the model's fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levo_infer import load_model
from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.sampling import SAMPLER_VERSION
from levo_train.data.cache import build_once
from levo_train.data.pairs import build_pairs
from levo_train.data.shards import Song
from levo_train.fingerprint import file_digest, model_fingerprint
from levo_train.rollout import Prompt, Sampling, Scorer, sample_and_score
from levo_train.toy.scorer import ToyOracleScorer
from levo_train.toy.world import (
    CORRUPTION,
    DIMENSIONS,
    TOY_CODE_SIZE,
    TOY_WORLD_VERSION,
    ToyWorld,
    style_text,
)

log = logging.getLogger(__name__)

SOURCES = ("model", "world")


@dataclass(frozen=True)
class ToyPairSpec:
    """What a toy pair set is built from (all of it keys the cache)."""

    source: str = "model"          # model: samples of the DPO init | world: corrupted renderings
    n_train: int = 3000            # training prompts (one pair each when the margin allows)
    n_val: int = 128               # held-out prompts
    n_candidates: int = 4          # songs per prompt; best vs worst on `dimension`
    dimension: str = "quality"     # quality or one hidden dimension (lyrics|structure|harmony|mix)
    min_margin: float = 0.05       # minimum score gap between chosen and rejected
    tier: Any = ("top", "none")    # style tier tag(s), cycled over the prompts: top (as released inference
                                   # asks) and none (no tag)
    seed: int = 0
    # sampling (source=model)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    cfg_coef: float | None = None  # None: the model config's inference coef
    max_frames: int = 96
    scorer: str = "toy"            # who ranks the candidates (source=model): toy = the hidden oracle, or a
                                   # levo_train.scorers spec such as rm:EXPORT (a reward model)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"toy pair source {self.source!r}: expected one of {SOURCES}")
        if self.dimension != "quality" and self.dimension not in DIMENSIONS:
            raise ValueError(f"toy pair dimension {self.dimension!r}: expected quality or one of {DIMENSIONS}")
        if isinstance(self.tier, (list, tuple)):
            if not self.tier:
                raise ValueError("toy pair tier list is empty")
            object.__setattr__(self, "tier", tuple(self.tier))
        if self.scorer != "toy" and self.source != "model":
            raise ValueError(f"toy pair scorer {self.scorer!r} needs source=model (world renderings are ranked by "
                             "the hidden oracle)")
        if self.scorer != "toy" and self.dimension != "quality":
            raise ValueError(f"toy pair scorer {self.scorer!r} ranks by its overall score: dimension must be quality")
        if self.n_train < 1 or self.n_val < 0 or self.n_candidates < 2:
            raise ValueError(f"toy pairs need n_train >= 1, n_val >= 0, n_candidates >= 2; got {self}")


def tier_of_prompt(tier: Any, i: int) -> str | None:
    """The tier tag of prompt ``i``: ``tier`` itself, or ``tier[i % len(tier)]`` for a list;
    ``"none"`` means no tag."""
    t = tier[i % len(tier)] if isinstance(tier, (list, tuple)) else tier
    return None if t in (None, "none") else str(t)


def toy_candidates(world: Any, n_prompts: int, n_candidates: int, *, seed: int, tier: Any = "top",
                   key_prefix: str = "c", dimension: str = "quality") -> list[Song]:
    """``n_candidates`` world renderings per toy condition, scored by the world's hidden quality.

    ``dimension="quality"``: each candidate gets a random corruption as in the toy data set.
    A single dimension (e.g. ``lyrics``): candidates are clean except for that dimension, which is
    corrupted at rates from 0 (the first candidate) up to the data set's range — minimal pairs that
    differ only in what the preference is about.
    """
    rng = np.random.default_rng([seed, 90210])
    out: list[Song] = []
    for i in range(n_prompts):
        cond = world.sample_condition(rng)
        style = style_text(cond.style_base, tier_of_prompt(tier, i))
        for j in range(n_candidates):
            if dimension == "quality":
                corruption = world.sample_corruption(rng)
            else:
                _, lo, hi = CORRUPTION[dimension]
                corruption = {dimension: float(rng.uniform(lo, hi))} if j > 0 else {}
            toks = world.render(cond, corruption, rng)
            out.append(_scored_song(world, f"{key_prefix}{i:07d}-{j}", toks, cond.lyric, style))
    return out


def _scored_song(world: Any, key: str, tokens: np.ndarray, lyric: str, style: str,
                 scores: dict[str, float] | None = None, ranked: dict[str, float] | None = None) -> Song:
    """A candidate with its hidden scores: ``meta["quality"]`` and ``meta["scores"]`` (the oracle's)
    or, when another scorer ranked it (``ranked``), ``meta["scores"]`` = that scorer's and the
    oracle's under ``meta["hidden"]`` (so pairs are chosen by the scorer, judged by the oracle)."""
    sc = scores if scores is not None else world.score(tokens, lyric, style)
    if ranked is not None:
        meta: dict[str, Any] = {"scores": dict(ranked), "hidden": dict(sc)}
    else:
        meta = {"scores": {k: v for k, v in sc.items() if k != "quality"}, "quality": sc["quality"]}
    return Song(key, np.asarray(tokens, dtype=np.int64), lyric, style, None, meta)


def toy_prompts(world: Any, n_prompts: int, *, seed: int, tier: Any = "top") -> list[Prompt]:
    """``n_prompts`` toy training conditions as rollout prompts, the style tier cycled over ``tier``."""
    rng = np.random.default_rng([seed, 0x5A3])
    conds = [world.sample_condition(rng) for _ in range(n_prompts)]
    return [Prompt(c.lyric, style_text(c.style_base, tier_of_prompt(tier, i))) for i, c in enumerate(conds)]


def heldout_prompts(world: Any, n: int, *, seed: int, tier: Any = "top") -> list[Prompt]:
    """``n`` held-out toy conditions (``world.heldout_conditions(n, seed)``) as rollout prompts, the
    style tier cycled over ``tier``: what evaluations sample."""
    return [Prompt(c.lyric, style_text(c.style_base, tier_of_prompt(tier, i)))
            for i, c in enumerate(world.heldout_conditions(n, seed))]


def sample_candidates(model: Any, world: Any, n_prompts: int, n_candidates: int, *, seed: int,
                      tier: Any = "top", temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                      cfg_coef: float | None = None, max_frames: int = 96, batch_size: int = 128,
                      key_prefix: str = "s", scorer: Any = None) -> tuple[list[Song], int]:
    """``n_candidates`` songs sampled from ``model`` (a LeLM) for each of ``n_prompts`` toy training
    conditions, scored by the world's hidden scores (:func:`levo_train.rollout.sample_and_score`)
    and, when ``scorer`` is given, ranked by it (see :func:`_scored_song`). Returns (songs, number
    of empty samples dropped)."""
    prompts = toy_prompts(world, n_prompts, seed=seed, tier=tier)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg_coef, max_frames=max_frames,
                        batch_size=batch_size)
    oracle = ToyOracleScorer(world=world)
    cands = sample_and_score(model, prompts, oracle if scorer is None else scorer, sampling, per_prompt=n_candidates,
                             seed=seed, key_prefix=key_prefix)
    hidden = [c.scores for c in cands] if scorer is None else oracle.score([c.song for c in cands])
    songs = [_scored_song(world, c.song.key, c.song.tokens, c.song.lyric, c.song.style, h,
                          None if scorer is None else c.scores)
             for c, h in zip(cands, hidden) if c.frames >= 1]
    return songs, len(cands) - len(songs)


def split_seeds(spec: ToyPairSpec, world_seed: int) -> dict[str, int]:
    """Prompt seeds of the train and val splits of a toy pair set."""
    if spec.source == "world":
        base = world_seed * 1000 + 2 * spec.seed
    else:
        base = 2 * spec.seed
    return {"train": base + 1, "val": base + 2}


def write_toy_pairs(out_dir: str | os.PathLike, spec: ToyPairSpec = ToyPairSpec(), *, world_seed: int = 0,
                    model: str | os.PathLike | None = None, device: str | None = None,
                    batch_size: int = 128, make_scorer: Callable[[str], Scorer] | None = None) -> dict[str, Any]:
    """Write toy pair shards ``out_dir/train`` and ``out_dir/val`` (none when ``n_val`` is 0);
    ``model`` (an export folder of a toy-sized model) is required for ``source="model"``, and
    ``make_scorer(device)`` when ``spec.scorer`` is not ``toy``: the scorer that spec names (e.g.
    through :func:`levo_train.scorers.load_scorer`) on the device the model samples on.
    Returns per-split stats (pairs, prompts, and for sampled candidates their mean quality)."""
    world = ToyWorld(world_seed)
    lelm = None
    if spec.source == "model":
        if model is None:
            raise ValueError("toy pairs from source=model need the model to sample from (an export folder)")
        lelm = load_toy_model(model, device)
    scorer, dimension = None, spec.dimension
    if spec.scorer != "toy":
        if make_scorer is None:
            raise ValueError(f"toy pairs ranked by scorer {spec.scorer!r}: pass make_scorer, which loads it (e.g. "
                             "with levo_train.scorers.load_scorer)")
        scorer = make_scorer(str(lelm.device) if lelm is not None else "cpu")
        dimension = scorer.overall
    t0 = time.time()
    seeds = split_seeds(spec, world_seed)
    stats: dict[str, Any] = {"source": spec.source, "world_seed": world_seed}
    for split, n in (("train", spec.n_train), ("val", spec.n_val)):
        if n <= 0:
            continue
        empty = 0
        if lelm is None:
            cands = toy_candidates(world, n, spec.n_candidates, seed=seeds[split], tier=spec.tier, key_prefix=split,
                                   dimension=spec.dimension)
        else:
            cands, empty = sample_candidates(lelm, world, n, spec.n_candidates, seed=seeds[split], tier=spec.tier,
                                             temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                                             cfg_coef=spec.cfg_coef, max_frames=spec.max_frames,
                                             batch_size=batch_size, key_prefix=split, scorer=scorer)
        st = build_pairs(cands, Path(out_dir) / split, dimensions=[dimension], min_margin=spec.min_margin,
                         code_size=TOY_CODE_SIZE, origin="model-samples" if lelm is not None else "toy-world")
        qs = [float(c.meta["hidden"]["quality"] if scorer is not None else c.meta["quality"]) for c in cands]
        stats[split] = {"pairs": st["pairs"], "prompts": n, "candidates": len(cands), "empty_samples": empty,
                        "mean_quality": round(float(np.mean(qs)), 6) if qs else None}
        if scorer is not None:
            stats[split]["scorer"] = scorer.name
            stats[split]["mean_score"] = round(float(np.mean([c.meta["scores"][dimension] for c in cands])), 6)
    stats["seconds"] = round(time.time() - t0, 2)
    return stats


def load_toy_model(export: str | os.PathLike, device: str | None = None) -> Any:
    """An export as an fp32 LeLM in eval mode, refused unless it speaks the toy world's codes."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(export, device=dev, dtype=torch.float32)
    if model.cfg.lm.code_size != TOY_CODE_SIZE:
        raise ValueError(f"{export}: the model has code_size={model.cfg.lm.code_size}, the toy world "
                         f"{TOY_CODE_SIZE}; sampling toy pairs from a model needs a toy-world model")
    return model.eval()


def toy_pairs_key(spec: ToyPairSpec, world_seed: int, fingerprint: str | None) -> dict[str, Any]:
    """Everything a toy pair set is derived from: the spec, the world (seed and rules version) and,
    for ``source="model"``, the content fingerprint of the model it was sampled from."""
    sd = dataclasses.asdict(spec)
    if spec.scorer == "toy":
        del sd["scorer"]  # the hidden oracle: keys as before the option existed
    else:
        sd["scorer"] = scorer_identity(spec.scorer)
    key = {"spec": sd, "world_seed": world_seed, "world_version": TOY_WORLD_VERSION,
           "model": fingerprint, "format": 4}
    if spec.source == "model":  # songs sampled from the model: other draws, other pairs
        key["sampler"] = SAMPLER_VERSION
    return key


def scorer_identity(spec: str) -> str:
    """A scorer spec with a reward-model export replaced by its content hash (``rm:sha256:...``), so
    a cache keyed by it follows the weights, not the path."""
    if spec.startswith("rm:"):
        folder = Path(spec[3:])
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if folder.is_dir() else []
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}:{file_digest(p)};".encode())
        return f"rm:sha256:{h.hexdigest()}"
    return spec


def toy_pairs_name(spec: ToyPairSpec, world_seed: int, fingerprint: str | None) -> str:
    """Cache folder name: readable head plus a hash of :func:`toy_pairs_key`."""
    key = toy_pairs_key(spec, world_seed, fingerprint)
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"pairs-{spec.source}-s{world_seed}-{spec.dimension}-n{spec.n_train}-{h}"


def ensure_toy_pairs(root: str | os.PathLike, spec: ToyPairSpec = ToyPairSpec(), *, world_seed: int = 0,
                     model: str | os.PathLike | None = None, device: str | None = None,
                     fingerprint: str | None = None, make_scorer: Callable[[str], Scorer] | None = None) -> Path:
    """Toy pair shards (``train/``, ``val/``) built once under ``root``; ``done.json`` holds the spec,
    the model's fingerprint and the build stats, ``derived_from.json`` the inputs and file digests,
    checked on every reuse (:func:`levo_train.data.cache.build_once`). Concurrent callers (DDP
    ranks) wait for one build. ``fingerprint``: ``model``'s, when the caller has it already.
    ``make_scorer``: as :func:`write_toy_pairs` takes it, called only when the pairs are built."""
    fp = None
    if spec.source == "model" and model is not None:
        fp = fingerprint or model_fingerprint(model)
    name = toy_pairs_name(spec, world_seed, fp)

    def build(tmp: Path) -> None:
        log.info("building toy pairs %s (source=%s%s)", name, spec.source, f", model {model}" if fp else "")
        stats = write_toy_pairs(tmp, spec, world_seed=world_seed, model=model, device=device,
                                make_scorer=make_scorer)
        info = {"spec": dataclasses.asdict(spec), "model": str(model) if fp else None, "model_fingerprint": fp,
                **stats}
        (tmp / "done.json").write_text(strict_dumps(info, indent=1))

    return build_once(root, name, "done.json", build, derived_from=toy_pairs_key(spec, world_seed, fp))


__all__ = ["SOURCES", "ToyPairSpec", "ensure_toy_pairs", "heldout_prompts", "load_toy_model", "sample_candidates", "split_seeds", "tier_of_prompt",
           "toy_candidates", "toy_pairs_key", "toy_prompts", "toy_pairs_name", "write_toy_pairs"]
