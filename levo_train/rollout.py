"""Generate, then score: the one rollout primitive of levo-train.

Everything that samples songs from a policy and judges them goes through :func:`sample_and_score`:
the toy DPO pairs (:mod:`levo_train.toy.pairs`), ``levo-eval toy|compare|reward``, ``levo-data
sample``, the reward model's toy data set and every round of semi-online DPO.

* A :class:`Prompt` is what a song is generated for: lyric, style and optional audio-prompt tokens.
* :class:`Sampling` holds the sampling rules (see :func:`levo_infer.generate.generate`).
* A :class:`Scorer` maps songs to named scores: its ``dimensions`` plus one overall score under
  the key ``scorer.overall`` (``quality`` for the toy world's hidden oracle, ``overall`` for a
  reward model). Implementations: :class:`levo_train.toy.scorer.ToyOracleScorer`, the reward
  model, weighted combinations and audio-domain adapters (:mod:`levo_train.scorers`).

Seeds are per song: candidate ``j`` of prompt ``i`` is sampled with ``seed * 1_000_003 + i *
per_prompt + j``, so a song does not depend on the batch it shares, nor on how prompts are split
across ranks (``shard=(rank, world_size)`` keeps prompts ``i % world_size == rank``, with all of
their candidates, so best-vs-worst selection needs no communication).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from levo_infer.engine import QUEUE_PER_SLOT
from levo_infer.generate import generate
from levo_train.data.batch import ENDED_KEY
from levo_train.data.shards import Song

#: the seed stride between prompts' seed blocks (a prime, so blocks of different base seeds rarely meet)
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Prompt:
    """What one song is generated for."""

    lyric: str
    style: str | None
    prompt: np.ndarray | None = None  # audio-prompt tokens [K, P]
    key: str = ""
    max_frames: int | None = None  # this song's frame budget (None: the rollout's ``Sampling.max_frames``)


@dataclass(frozen=True)
class Sampling:
    """Sampling rules of a rollout (``cfg_coef=None``: the model config's inference coefficient;
    ``max_frames``: the frame budget of prompts without their own :attr:`Prompt.max_frames`)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    cfg_coef: float | None = None
    max_frames: int = 96
    compat: bool = False
    batch_size: int = 128  # songs generating at once: the engine's slots
    kv_bits: int | None = None  # 8: 8-bit KV cache

    def generate_kwargs(self) -> dict[str, Any]:
        return {"max_frames": self.max_frames, "cfg_coef": self.cfg_coef, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "compat": self.compat, "slots": self.batch_size,
                "kv_bits": self.kv_bits}


@runtime_checkable
class Scorer(Protocol):
    """Judges songs: ``score(songs)`` returns one ``{name: value}`` per song holding every name in
    ``dimensions`` and the overall score under ``overall``. Higher is better."""

    name: str
    overall: str
    dimensions: tuple[str, ...]

    def score(self, songs: Sequence[Song]) -> list[dict[str, float]]: ...


@dataclass
class Candidate:
    """One sampled song with its scores; ``song.meta["scores"]`` holds the same dict."""

    prompt_index: int
    sample_index: int
    seed: int
    song: Song
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return int(self.song.tokens.shape[-1])


def song_seed(seed: int, prompt_index: int, sample_index: int, per_prompt: int) -> int:
    """The sampling seed of candidate ``sample_index`` of prompt ``prompt_index``."""
    return seed * SEED_STRIDE + prompt_index * per_prompt + sample_index


class ScoreError(ValueError):
    """A scorer's output cannot be used: wrong count, a missing overall key, a non-finite score."""


def check_scores(scorer: Scorer, scores: Sequence[dict[str, float]], n: int,
                 songs: Sequence[Song] | None = None) -> None:
    """A scorer's output must have one dict per song holding its overall key, every score a finite
    number (a NaN would rank and pair like any value, and a margin of NaN passes every threshold);
    clear error otherwise, naming the scorer, the song (its key when ``songs`` are given) and the score."""
    if len(scores) != n:
        raise ScoreError(f"scorer {scorer.name!r} returned {len(scores)} score dicts for {n} songs")
    for i, s in enumerate(scores):
        song = f"song {songs[i].key!r}" if songs is not None else f"song {i}"
        if scorer.overall not in s:
            raise ScoreError(f"scorer {scorer.name!r}: {song} has no {scorer.overall!r} score "
                             f"(got {sorted(s)[:8]})")
        for k, v in s.items():
            try:
                ok = math.isfinite(float(v))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ScoreError(f"scorer {scorer.name!r}: {song}: score {k!r} is {v!r}, not a finite number; "
                                 "refusing to rank or pair songs on it (fix the scorer, or drop the song)")


def _prompt_tensor(prompts: Sequence[Prompt]) -> Any:
    """Audio prompts of a generation batch as one [B, K, P] tensor (None when no song has one)."""
    have = [p.prompt is not None for p in prompts]
    if not any(have):
        return None
    if not all(have) or len({p.prompt.shape for p in prompts}) != 1:  # type: ignore[union-attr]
        raise ValueError("a generation batch mixes songs with and without audio prompts (or prompts of different "
                         "lengths); give every prompt the same kind of audio prompt")
    return torch.as_tensor(np.stack([p.prompt for p in prompts]), dtype=torch.long)  # type: ignore[misc]


def score_candidates(cands: Sequence[Candidate], scorer: Scorer) -> None:
    """Score candidates in place: ``cand.scores`` and ``cand.song.meta["scores"]`` get ``scorer``'s
    dict for the song (checked: one per song, each with the overall key)."""
    scores = scorer.score([c.song for c in cands]) if cands else []
    check_scores(scorer, scores, len(cands), [c.song for c in cands])
    for c, sc in zip(cands, scores):
        c.scores = dict(sc)
        c.song.meta["scores"] = dict(sc)


def sample_and_score(
    model: Any,
    prompts: Sequence[Prompt],
    scorer: Scorer | None,
    sampling: Sampling = Sampling(),
    *,
    per_prompt: int = 1,
    seed: int = 0,
    key_prefix: str = "s",
    shard: tuple[int, int] = (0, 1),
    prompt_indices: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """``per_prompt`` songs sampled from ``model`` (a LeLM, KV-cached generation under ``no_grad``)
    for each prompt of this rank's ``shard``, each scored by ``scorer`` (``None``: unscored).

    Candidates come back in (prompt, sample) order with keys ``{key_prefix}{i:07d}-{j}``. Songs of
    zero frames are kept (scorers judge them; callers may drop them). A song that reached its frame
    budget (:attr:`Prompt.max_frames`, else ``sampling.max_frames``) without EOS has
    ``song.meta["ended_with_eos"] = False`` (true otherwise): it is scored and trained on without an
    appended EOS. Prompts are batched by budget as well as by audio-prompt kind. ``progress(done, total)`` is
    called after every generation batch. ``prompt_indices``: sample only these prompts (instead of
    ``shard``'s), e.g. one resumable chunk of a large run; seeds and keys still use each prompt's
    index in ``prompts``, so a song does not depend on the chunking. Prompts with audio prompts of
    different lengths (or none) are generated in separate batches (a batch holds one kind).
    """
    rank, world = shard
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    mine = range(rank, len(prompts), world) if prompt_indices is None else prompt_indices
    budget = [sampling.max_frames if p.max_frames is None else int(p.max_frames) for p in prompts]
    kinds: dict[Any, list[int]] = {}  # one generation batch: one kind of audio prompt, one frame budget
    for i in mine:
        p = prompts[int(i)].prompt
        kinds.setdefault((None if p is None else tuple(p.shape), budget[int(i)]), []).append(int(i))
    group = sampling.batch_size * QUEUE_PER_SLOT  # one engine call: batch_size slots refilled from its queue
    batches = [jobs[k:k + group]
               for jobs in ([(i, j) for i in idx for j in range(per_prompt)] for idx in kinds.values())
               for k in range(0, len(jobs), group)]
    total, done = sum(len(b) for b in batches), 0
    out: list[Candidate] = []
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        for chunk in batches:
            ps = [prompts[i] for i, _ in chunk]
            seeds = [song_seed(seed, i, j, per_prompt) for i, j in chunk]
            frames = budget[chunk[0][0]]
            g = generate(model, [p.lyric for p in ps], [p.style for p in ps], _prompt_tensor(ps), seed=seeds,
                         **{**sampling.generate_kwargs(), "max_frames": frames})
            codes, lengths = g.codes.cpu().numpy(), g.lengths.cpu().tolist()
            songs = [Song(f"{key_prefix}{i:07d}-{j}", np.ascontiguousarray(codes[b, :, :lengths[b]], dtype=np.int64),
                          p.lyric, p.style or "", p.prompt, {ENDED_KEY: lengths[b] < frames})
                     for b, ((i, j), p) in enumerate(zip(chunk, ps))]
            cands = [Candidate(i, j, sd, song) for (i, j), sd, song in zip(chunk, seeds, songs)]
            if scorer is not None:
                score_candidates(cands, scorer)
            out += cands
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    finally:
        model.train(was_training)
    out.sort(key=lambda c: (c.prompt_index, c.sample_index))
    return out


def group_by_prompt(cands: Sequence[Candidate]) -> dict[int, list[Candidate]]:
    """Candidates keyed by prompt index, in sample order."""
    groups: dict[int, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(c.prompt_index, []).append(c)
    return groups


def best_vs_worst(cands: Sequence[Candidate], key: str, min_margin: float) -> tuple[Candidate, Candidate] | None:
    """The best and worst candidate of one prompt on score ``key`` when they differ by at least
    ``min_margin`` (and by more than 0); ties broken by sample index (first best, last worst)."""
    if len(cands) < 2:
        return None
    ranked = sorted(cands, key=lambda c: (c.scores[key], -c.sample_index))
    best, worst = ranked[-1], ranked[0]
    margin = best.scores[key] - worst.scores[key]
    if margin < min_margin or margin <= 0:
        return None
    return best, worst


__all__ = ["SEED_STRIDE", "Candidate", "Prompt", "Sampling", "ScoreError", "Scorer", "best_vs_worst", "check_scores",
           "group_by_prompt", "sample_and_score", "score_candidates", "song_seed"]
