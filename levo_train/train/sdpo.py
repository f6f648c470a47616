"""Semi-online DPO: the policy generates its own pairs every ``sync_every`` optimizer steps.

A *round* starts at every optimizer step ``s`` with ``s % sync_every == 0``:

1. ``prompts_per_round`` prompts are taken from the prompt pool (a seeded permutation, walked in
   order, one epoch after another); each rank samples ``per_prompt`` candidates for its share of
   them with the **current** policy (:func:`levo_train.rollout.sample_and_score`: ``no_grad``,
   KV cache, per-song seeds from ``(seed, round)``), one generation batch (``gen_batch_size //
   per_prompt`` prompts) at a time, and the scorer (reward model or any
   :class:`~levo_train.rollout.Scorer`) scores each batch. A sharded (FSDP2) or LoRA policy, or one
   held in another dtype than ``sdpo.gen_dtype``, generates from a rank-local plain LeLM refreshed
   from it parameter by parameter (:mod:`levo_train.train.inference_copy`): no collective during
   generation, so ranks with fewer prompts (or none) never leave another waiting;
2. candidates are gathered on every rank; per prompt, best vs worst on the scorer's overall score
   when they differ by ``min_margin`` become pairs, which replace the oldest round in a buffer of
   the last ``buffer_rounds`` rounds;
3. DPO (:class:`~levo_train.train.dpo.DPOModule`'s loss, reference: ``model.init``, or the policy
   re-synced every ``ref_sync_every`` steps) trains on batches drawn from the buffer: a seeded
   permutation per round, each rank taking its own slice of every global batch.

Exact resume: the checkpoint holds the round index, the buffer (tokens and conditions of every
pair), the draw cursor and, when the reference is re-synced, the reference weights; generation
seeds depend on ``(seed, round)`` only. So N steps + resume to 2N equals 2N straight, under every
strategy (FSDP2: from the sharded checkpoint). It also holds the settings that shape rounds
(``settings``), which a resume must repeat (:meth:`levo_train.methods.sdpo.SDPOMethod.check_resume`).

Stop and requeue signals during a round: after every generation batch all ranks pass a safe point
(:meth:`levo_train.guard.StepGuard.agreed_signal`, one small all-reduce; every rank passes as many
as the rank with the most batches). A signal received meanwhile checkpoints there: the state of
the step's start plus the candidates every rank generated so far (``partial``); the resume
generates only the rest of that round, and the run ends as if never interrupted. A round is
never lost to a preemption longer than one generation batch plus the checkpoint write.

Per round (``run_dir/sdpo/rounds.jsonl``, the loggers, and ``rounds.png`` at the end): generation
and scoring time, the scorer's mean over the candidates, the pairs' score margins and, when an
``oracle`` scorer is given (the toy world's hidden quality), the oracle's scores **of the same
candidate objects** — its mean, the pairs' oracle margin and how often the oracle agrees with the
scorer's choice (the reward-hacking guard).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from levo_infer.config import ModelConfig
from levo_infer.jsonio import jsonl_text, write_text_atomic
from levo_infer.jsonl import jsonl_rows
from levo_infer.model import LeLM
from levo_train.data.batch import ENDED_KEY
from levo_train.data.pairs import Pair, collate_pairs
from levo_train.data.shards import Song
from levo_train.guard import StepGuard
from levo_train.rollout import (
    Candidate,
    Prompt,
    Sampling,
    ScoreError,
    Scorer,
    best_vs_worst,
    group_by_prompt,
    sample_and_score,
    score_candidates,
)

from .dpo import DPOModule
from .inference_copy import InferenceCopy, needs_copy
from .inference_copy import gen_dtype as resolve_gen_dtype

log = logging.getLogger(__name__)

ROUNDS_NAME = "rounds.jsonl"
PLOT_NAME = "rounds.png"


def _missing_if_nan(v: Any) -> Any:
    """A float that is NaN (how older checkpoints stored a mean over nothing) as None."""
    return None if isinstance(v, float) and not np.isfinite(v) else v


def check_sdpo_settings(*, sync_every: int, per_prompt: int, prompts_per_round: int, buffer_rounds: int,
                        ref_sync_every: int, min_margin: float) -> None:
    """Raise ``ValueError`` naming the ``sdpo.*`` setting that cannot work."""
    checks = [("sync_every", sync_every, sync_every >= 1, "an optimizer-step interval >= 1"),
              ("per_prompt", per_prompt, per_prompt >= 2, ">= 2 (best vs worst needs two candidates per prompt)"),
              ("prompts_per_round", prompts_per_round, prompts_per_round >= 1, ">= 1"),
              ("buffer_rounds", buffer_rounds, buffer_rounds >= 1, ">= 1"),
              ("ref_sync_every", ref_sync_every, ref_sync_every >= 0, ">= 0 (0: the reference stays model.init)"),
              ("min_margin", min_margin, min_margin >= 0, ">= 0")]
    for name, value, ok, want in checks:
        if not ok:
            raise ValueError(f"sdpo.{name}={value}: expected {want}")


def check_sdpo_reference(reference: str) -> None:
    """Raise ``ValueError`` unless the reference is a model (``dpo.reference=model``)."""
    if reference != "model":
        raise ValueError("semi-online DPO needs dpo.reference=model (its pairs are new every round, so there are "
                         "no precomputed reference log-probs)")


def _pair_record(best: Candidate, worst: Candidate, key: str, oracle: str | None) -> dict[str, Any]:
    """One buffer entry (plain tensors and strings: a checkpoint loads it with ``weights_only``)."""
    s = best.song
    rec: dict[str, Any] = {
        "chosen": torch.from_numpy(np.ascontiguousarray(s.tokens, dtype=np.int64)),
        "rejected": torch.from_numpy(np.ascontiguousarray(worst.song.tokens, dtype=np.int64)),
        "lyric": s.lyric, "style": s.style,
        "prompt": None if s.prompt is None else torch.from_numpy(np.asarray(s.prompt, dtype=np.int64)),
        "margin": float(best.scores[key] - worst.scores[key]),
        # False: cut at the frame budget without EOS (trained on its frames alone, no EOS appended)
        "chosen_eos": _ended(best), "rejected_eos": _ended(worst),
    }
    if oracle is not None:
        rec["oracle_margin"] = float(best.song.meta["oracle"][oracle] - worst.song.meta["oracle"][oracle])
    return rec


def _ended(c: Candidate) -> bool:
    return bool(c.song.meta.get(ENDED_KEY, True))


def candidate_record(c: Candidate) -> dict[str, Any]:
    """A scored candidate as plain tensors, strings and numbers (a checkpoint loads it ``weights_only``)."""
    s = c.song
    return {"prompt_index": c.prompt_index, "sample_index": c.sample_index, "seed": c.seed, "key": s.key,
            "tokens": torch.from_numpy(np.ascontiguousarray(s.tokens, dtype=np.int64)), "lyric": s.lyric,
            "style": s.style, "prompt": None if s.prompt is None else torch.from_numpy(np.asarray(s.prompt, dtype=np.int64)),
            "scores": {k: float(v) for k, v in c.scores.items()}, "eos": _ended(c),
            "oracle": None if "oracle" not in s.meta else {k: float(v) for k, v in s.meta["oracle"].items()}}


def candidate_from_record(d: dict[str, Any]) -> Candidate:
    """The :class:`Candidate` of :func:`candidate_record`."""
    meta: dict[str, Any] = {"scores": dict(d["scores"]), ENDED_KEY: bool(d.get("eos", True))}
    if d.get("oracle") is not None:
        meta["oracle"] = dict(d["oracle"])
    song = Song(str(d["key"]), d["tokens"].numpy(), d["lyric"], d["style"],
                None if d["prompt"] is None else d["prompt"].numpy(), meta)
    return Candidate(int(d["prompt_index"]), int(d["sample_index"]), int(d["seed"]), song, dict(d["scores"]))


def collate_buffer(records: Sequence[dict[str, Any]], code_size: int) -> dict[str, Any]:
    """Buffer entries -> the pair batch of :class:`~levo_train.data.pairs.PairDataModule` (its collate),
    with each song's EOS flag (``chosen_eos``/``rejected_eos``; entries of older checkpoints: true)."""
    batch = collate_pairs([Pair(f"b{i}", r["chosen"].numpy(), r["rejected"].numpy(), r["lyric"], r["style"],
                                None if r["prompt"] is None else r["prompt"].numpy()) for i, r in enumerate(records)],
                          code_size)
    for side in ("chosen_eos", "rejected_eos"):
        batch[side] = torch.tensor([bool(r.get(side, True)) for r in records], dtype=torch.bool)
    return batch


class SemiOnlineDPOModule(DPOModule):
    """DPO on pairs the policy itself generates every ``sync_every`` optimizer steps."""

    def __init__(
        self,
        model_config: ModelConfig,
        *,
        prompts: Sequence[Prompt] | None,
        scorer: Scorer,
        oracle: Scorer | None = None,
        sync_every: int = 30,
        per_prompt: int = 4,
        prompts_per_round: int = 300,
        min_margin: float = 0.05,
        buffer_rounds: int = 1,
        ref_sync_every: int = 0,
        sampling: Sampling | None = None,
        batch_size: int = 32,
        out_dir: str | None = None,
        save_candidates: bool = False,
        scorer_follows_policy: bool = True,
        gen_dtype: str = "auto",
        gen_batch_size: int | None = None,
        settings_identity: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        kw.setdefault("reference", "model")
        super().__init__(model_config, **kw)
        check_sdpo_reference(self.reference)
        check_sdpo_settings(sync_every=sync_every, per_prompt=per_prompt, prompts_per_round=prompts_per_round,
                            buffer_rounds=buffer_rounds, ref_sync_every=ref_sync_every, min_margin=min_margin)
        self.prompts: list[Prompt] = []
        if prompts is not None:
            self.set_prompts(prompts)
        self.scorer, self.oracle = scorer, oracle
        self.score_key = scorer.overall
        self.sync_every, self.per_prompt, self.prompts_per_round = sync_every, per_prompt, prompts_per_round
        self.min_margin, self.buffer_rounds, self.ref_sync_every = min_margin, buffer_rounds, ref_sync_every
        self.sampling, self.batch_size = sampling or Sampling(), batch_size
        self.out_dir = Path(out_dir) if out_dir else None
        self.save_candidates = save_candidates
        self.scorer_follows_policy = scorer_follows_policy
        resolve_gen_dtype(gen_dtype, "cpu")  # refused now, not at the first round
        self.gen_dtype = gen_dtype
        #: songs per chunk of a round (a safe point after each); the engine's slots are ``sampling.batch_size``
        self.gen_batch_size = gen_batch_size
        #: the settings that shape rounds, as the run was started with them (a resume must match)
        self.settings_identity = settings_identity
        self._copy: InferenceCopy | None = None  # the rank-local generation model (not a submodule: no state)
        # resumable state
        self.round = -1                          # last round generated
        self.buffer: list[list[dict[str, Any]]] = []  # pairs of the last buffer_rounds rounds
        self.cursor = 0                          # global pair draws in the current round
        self.ref_synced_at = 0
        self.history: list[dict[str, Any]] = []  # per-round stats (also in rounds.jsonl)
        #: a round interrupted at a safe point: {"round": r, "candidates": [candidate records of every rank]}
        self.partial: dict[str, Any] | None = None

    def set_prompts(self, prompts: Sequence[Prompt]) -> None:
        """The pool rounds draw their prompts from (read after the init is loaded: formatting may need it)."""
        if not prompts:
            raise ValueError("sdpo.prompts: the prompt pool is empty (give prompt shards or a JSONL, or use the toy world)")
        self.prompts = list(prompts)

    # -- state ------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kw: Any) -> dict[str, Any]:  # type: ignore[override]
        """A re-synced reference is state (it is no longer ``model.init``): kept in checkpoints."""
        if self.ref_sync_every > 0:
            return torch.nn.Module.state_dict(self, *args, **kw)
        return super().state_dict(*args, **kw)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["levo"]["sdpo"] = {"round": self.round, "buffer": self.buffer, "cursor": self.cursor,
                                      "ref_synced_at": self.ref_synced_at, "history": self.history,
                                      "partial": self.partial, "settings": self.settings_identity}
        # work done inside the next step: a resume prefers, at equal steps, the checkpoint that has it
        checkpoint["levo"]["partial_step"] = len(self.partial["candidates"]) if self.partial else 0

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        st = checkpoint["levo"].get("sdpo")
        if not isinstance(st, dict):
            raise ValueError("checkpoint has no `levo.sdpo` state: not a semi-online DPO checkpoint")
        self.round, self.buffer, self.cursor = int(st["round"]), list(st["buffer"]), int(st["cursor"])
        # rounds of older checkpoints stored NaN for values of empty rounds: None (null) now
        self.ref_synced_at = int(st["ref_synced_at"])
        self.history = [{k: _missing_if_nan(v) for k, v in h.items()} for h in st["history"]]
        partial = st.get("partial")
        self.partial = partial if isinstance(partial, dict) else None

    # -- distributed helpers --------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def _gather(self, obj: Any) -> list[Any]:
        rank, world = self._rank_world()
        if world == 1:
            return [obj]
        out: list[Any] = [None] * world
        torch.distributed.all_gather_object(out, obj)
        return out

    # -- rounds -----------------------------------------------------------------------
    def round_prompts(self, r: int) -> list[int]:
        """Indices into the prompt pool of round ``r``: a seeded permutation per pass over the pool."""
        n, k = len(self.prompts), self.prompts_per_round
        out: list[int] = []
        pos = r * k
        while len(out) < k:
            epoch, off = divmod(pos, n)
            perm = np.random.default_rng([self.seed, 0x5D0, epoch]).permutation(n)
            take = min(k - len(out), n - off)
            out.extend(int(i) for i in perm[off:off + take])
            pos += take
        return out

    def _guard(self) -> StepGuard | None:
        if self._trainer is None:
            return None
        return next((c for c in self.trainer.callbacks if isinstance(c, StepGuard)), None)  # type: ignore[attr-defined]

    def generation_model(self) -> LeLM:
        """The model a round samples from: the policy itself when it is one plain model in the
        generation dtype, else the rank-local :class:`InferenceCopy` refreshed from it (under FSDP2 a
        collective, called by every rank)."""
        dtype = resolve_gen_dtype(self.gen_dtype, self.device)
        if not needs_copy(self.model, dtype):
            return self.model
        if self._copy is None or self._copy.dtype != dtype:
            self._copy = InferenceCopy(self.model_config, dtype)
        return self._copy.refresh(self.model, self.device)

    def _chunks(self, n_prompts: int, done: set[int]) -> tuple[list[list[int]], int]:
        """This rank's prompts of a round (positions ``rank, rank + world, ...`` not yet ``done``) in
        chunks of one generation batch each, and the most chunks any rank has: every rank passes that
        many safe points, so the collectives match."""
        rank, world = self._rank_world()
        per_chunk = max(1, (self.gen_batch_size or self.sampling.batch_size) // self.per_prompt)
        shares = [[i for i in range(q, n_prompts, world) if i not in done] for q in range(world)]
        mine = shares[rank]
        return [mine[k:k + per_chunk] for k in range(0, len(mine), per_chunk)], \
            max(-(-len(share) // per_chunk) for share in shares)

    def run_round(self, r: int) -> dict[str, Any]:
        """Generate, score and pair round ``r``; the buffer then holds its pairs (and older rounds').

        Each rank generates its prompts one generation batch at a time; after each batch every rank
        passes a safe point (:meth:`levo_train.guard.StepGuard.agreed_signal`): a stop or requeue
        signal received meanwhile checkpoints there, with the candidates of every rank so far
        (``partial``), and a resume generates only the rest of the round (per-song seeds: the same
        songs as without the interruption)."""
        rank, world = self._rank_world()
        idx = self.round_prompts(r)
        prompts = [self.prompts[i] for i in idx]
        resumed = self.partial is not None and int(self.partial["round"]) == r
        restored = [candidate_from_record(c) for c in self.partial["candidates"]] if resumed else []  # type: ignore[index]
        # prompts generated before the interruption (also those whose songs were all empty, dropped)
        done_before = {c.prompt_index for c in restored} | set(self.partial.get("prompts", []) if resumed else [])  # type: ignore[union-attr]
        chunks, slots = self._chunks(len(prompts), done_before)
        if restored and rank == 0:
            log.info("round %d: resumed with %d of its %d prompts generated before the interruption", r,
                     len({c.prompt_index for c in restored}), len(prompts))
        guard = self._guard()
        if self.scorer_follows_policy and hasattr(self.scorer, "to"):
            self.scorer.to(self.device)  # a reward model runs where the policy runs (reward.device unset)
        cands: list[Candidate] = []
        t_gen = t_score = 0.0
        error = None
        my_empty = 0
        # zero-frame songs are dropped before scoring (as `levo-data sample` does) and counted
        empty = int(self.partial.get("empty", 0)) if resumed else 0  # type: ignore[union-attr]
        my_done: list[int] = []
        try:
            model = self.generation_model() if slots else None  # every rank or none (slots is global)
            for slot in range(slots):
                chunk = chunks[slot] if slot < len(chunks) and error is None else []
                if chunk:
                    t0 = time.perf_counter()
                    new = sample_and_score(model, prompts, None, self.sampling, per_prompt=self.per_prompt,
                                           seed=self.seed * 7919 + r, key_prefix=f"r{r:04d}-", prompt_indices=chunk)
                    t_gen += time.perf_counter() - t0
                    kept = [c for c in new if c.frames >= 1]
                    my_empty += len(new) - len(kept)
                    my_done += chunk
                    new = kept
                    t0 = time.perf_counter()
                    try:  # a scorer that fails (e.g. NaN scores) fails the round on every rank, not a hang
                        score_candidates(new, self.scorer)
                        if self.oracle is not None and new:  # the same Song objects the scorer just judged
                            for c, oc in zip(new, self.oracle.score([c.song for c in new])):
                                c.song.meta["oracle"] = dict(oc)
                        cands += new
                    except ValueError as e:
                        error = f"round {r}: {e}"
                    t_score += time.perf_counter() - t0
                    if rank == 0:
                        log.info("round %d: %d/%d prompts of rank 0 generated and scored (%.1f s)", r,
                                 sum(map(len, chunks[:slot + 1])), sum(map(len, chunks)), t_gen + t_score)
                signum = guard.agreed_signal(self.trainer) if guard is not None else None
                if signum is not None:  # a safe point: keep what every rank has, checkpoint, stop
                    got = self._gather(([candidate_record(c) for c in cands], my_empty, my_done))
                    done = [c for part, _, _ in got for c in part]
                    self.partial = {"round": r, "empty": empty + sum(n for _, n, _ in got),
                                    "prompts": sorted(done_before | {i for *_, d in got for i in d}),
                                    "candidates": sorted(
                        [*map(candidate_record, restored), *done], key=lambda c: (c["prompt_index"], c["sample_index"]))}
                    if self._copy is not None:
                        self._copy.release()
                    guard.checkpoint_and_stop(self.trainer, signum)  # type: ignore[union-attr]
        finally:
            if self._copy is not None:
                self._copy.release()
        # one collective: every rank's candidates, times and error
        parts = self._gather((cands, t_gen, t_score, error, my_empty))
        errors = [p[3] for p in parts if p[3] is not None]
        if errors:
            raise ScoreError(errors[0])
        gathered = sorted([*restored, *(c for part, *_ in parts for c in part)],
                          key=lambda c: (c.prompt_index, c.sample_index))
        self.partial = None
        okey = self.oracle.overall if self.oracle is not None else None
        pairs = []
        for _, group in sorted(group_by_prompt(gathered).items()):
            sel = best_vs_worst(group, self.score_key, self.min_margin)
            if sel is not None:
                pairs.append(_pair_record(sel[0], sel[1], self.score_key, okey))
        if pairs:
            self.buffer = (self.buffer + [pairs])[-self.buffer_rounds:]
        elif self.buffer:  # keep training on the last pairs rather than stop the run
            log.warning("round %d: no prompt's candidates differ by >= sdpo.min_margin=%s on %r; training goes on "
                        "with the previous round's pairs", r, self.min_margin, self.score_key)
        self.round, self.cursor = r, 0
        st: dict[str, Any] = {
            "round": r, "step": int(self.global_step) if self._trainer is not None else 0,
            "candidates": len(gathered), "pairs": len(pairs), "buffer_pairs": sum(len(b) for b in self.buffer),
            "gen_seconds": max(p[1] for p in parts), "score_seconds": max(p[2] for p in parts),
            # None (null in rounds.jsonl): a mean over no candidates / no pairs
            "score_mean": float(np.mean([c.scores[self.score_key] for c in gathered])) if gathered else None,
            "frames_mean": float(np.mean([c.frames for c in gathered])) if gathered else None,
            # songs of zero frames (dropped before scoring) and songs cut at their frame budget without
            # EOS (scored and paired on their frames, no EOS appended)
            "empty_dropped": empty + sum(p[4] for p in parts),
            "cut_at_budget": sum(not _ended(c) for c in gathered),
            "pair_margin": float(np.mean([p["margin"] for p in pairs])) if pairs else None,
        }
        if okey is not None and gathered:
            st["hidden_mean"] = float(np.mean([c.song.meta["oracle"][okey] for c in gathered]))
            st["pair_hidden_margin"] = float(np.mean([p["oracle_margin"] for p in pairs])) if pairs else None
            st["pair_agreement"] = float(np.mean([p["oracle_margin"] > 0 for p in pairs])) if pairs else None
        self.history.append(st)
        if rank == 0:
            self._write_round(st, gathered)
        return st

    def _write_round(self, st: dict[str, Any], cands: Sequence[Candidate]) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / ROUNDS_NAME, "a") as f:
            f.write(jsonl_text([st], what=str(self.out_dir / ROUNDS_NAME)))
        if self.save_candidates:
            d = self.out_dir / "candidates"
            d.mkdir(exist_ok=True)
            recs = [{"key": c.song.key, "prompt_index": c.prompt_index, "sample_index": c.sample_index,
                     "seed": c.seed, "tokens": c.song.tokens.tolist(), "lyric": c.song.lyric, "style": c.song.style,
                     "scores": c.scores, "oracle": c.song.meta.get("oracle")} for c in cands]
            path = d / f"round{st['round']:04d}.jsonl"
            write_text_atomic(path, jsonl_text(recs, what=str(path)))

    def draw_batch(self) -> dict[str, Any]:
        """This rank's share of the next global batch of buffer pairs (seeded permutation per round)."""
        rank, world = self._rank_world()
        pool = [p for rnd in self.buffer for p in rnd]
        if not pool:
            raise RuntimeError(f"round {self.round}: no prompt's candidates differ by >= sdpo.min_margin="
                               f"{self.min_margin} on {self.score_key!r}, so there is nothing to train on; lower "
                               "the margin or raise sdpo.per_prompt / prompts_per_round")
        n, B = len(pool), self.batch_size
        start = self.cursor + rank * B
        picks = []
        for pos in range(start, start + B):
            epoch, off = divmod(pos, n)
            perm = np.random.default_rng([self.seed, 0xB0F, self.round, epoch]).permutation(n)
            picks.append(pool[int(perm[off])])
        self.cursor += B * world
        return collate_buffer(picks, self.model_config.lm.code_size)

    def freeze_reference(self) -> None:
        super().freeze_reference()
        if self.ref is None and self.ref_sync_every > 0:
            raise ValueError(f"sdpo.ref_sync_every={self.ref_sync_every} re-syncs a frozen reference copy, but with "
                             "train.lora the reference is the policy without its adapters (model.init); set "
                             "sdpo.ref_sync_every=0")

    def maybe_sync_reference(self) -> None:
        step = int(self.global_step)
        if self.ref_sync_every > 0 and self.ref is not None and step > 0 and step % self.ref_sync_every == 0 \
                and self.ref_synced_at != step:
            self.ref_impl.sync(self)  # type: ignore[union-attr]
            self.ref_synced_at = step

    def on_train_start(self) -> None:
        """``rounds.jsonl`` restarts from the checkpoint's history: rounds a killed run generated after
        its last checkpoint are generated again and must not be listed twice."""
        if self.out_dir is not None and self._rank_world()[0] == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / ROUNDS_NAME
            write_text_atomic(path, jsonl_text(self.history, what=str(path)))

    # -- steps ------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = int(self.global_step)
        r = step // self.sync_every
        if r != self.round:
            st = self.run_round(r)
            for k, v in st.items():
                if k not in ("round", "step") and isinstance(v, (int, float)) and np.isfinite(v):
                    self.log(f"round/{k}", float(v), rank_zero_only=True)
        self.maybe_sync_reference()
        return super().training_step(self.draw_batch(), batch_idx)  # DPO on this rank's share of the buffer

    def on_train_end(self) -> None:
        if self.out_dir is not None and self._rank_world()[0] == 0 and self.history:
            plot_rounds(self.history, self.out_dir / PLOT_NAME, scorer=self.scorer.name,
                        oracle=self.oracle.name if self.oracle is not None else None)


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The per-round records of a ``rounds.jsonl`` (``[]`` when there is none)."""
    if not path.is_file():
        return []
    return [row for _, row in jsonl_rows(path)]


def rounds_figure(history: Sequence[dict[str, Any]], *, scorer: str, oracle: str | None) -> Any:
    """The figure of :func:`plot_rounds`: the scorer's mean and (when an oracle judged them) the hidden
    quality of the same samples per round, with the oracle's agreement with the scorer's pair choices
    on a second axis (the reward-hacking guard); the x-axis counts whole rounds."""
    import matplotlib  # slow import, needed only for this plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [h["round"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)

    def values(key: str) -> list[float]:  # None (an empty round): a gap in the line
        return [np.nan if h.get(key) is None else h[key] for h in history]

    lines = ax.plot(rounds, values("score_mean"), "o-", label=f"scorer mean ({scorer})")
    if oracle is not None and all("hidden_mean" in h for h in history):
        lines += ax.plot(rounds, values("hidden_mean"), "s-", label=f"hidden quality, same samples ({oracle})")
        agree = ax.twinx()
        lines += agree.plot(rounds, values("pair_agreement"), "^--", color="tab:green",
                            label=f"oracle agrees with the scorer's pairs ({oracle})")
        agree.set_ylim(0, 1.05)
        agree.set_ylabel("pair agreement")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (policy re-synced)")
    ax.set_ylabel("mean over the round's candidates")
    ax.grid(alpha=0.3)
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    fig.tight_layout()
    return fig


def plot_rounds(history: Sequence[dict[str, Any]], path: Path, *, scorer: str, oracle: str | None) -> None:
    """Write :func:`rounds_figure` as a PNG at ``path`` (atomic)."""
    import matplotlib.pyplot as plt

    fig = rounds_figure(history, scorer=scorer, oracle=oracle)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


class _Ticks(torch.utils.data.IterableDataset):
    """An endless stream of placeholders: a semi-online run draws its batches from its own buffer."""

    def __iter__(self):  # type: ignore[override]
        while True:
            yield torch.zeros(1)


class RoundDataModule(L.LightningDataModule):
    """The datamodule of a semi-online run: one placeholder per training step (no validation)."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_Ticks(), batch_size=None)

__all__ = ["PLOT_NAME", "ROUNDS_NAME", "RoundDataModule", "SemiOnlineDPOModule", "check_sdpo_reference",
           "check_sdpo_settings", "collate_buffer", "plot_rounds", "read_rounds", "rounds_figure"]
