"""Semi-online DPO's typed settings (``sdpo.*`` and the scorer under ``reward.*``), read and checked
before anything is built; :mod:`levo_train.methods.sdpo` builds the run from them.

Two settings classes: :class:`SDPOSettings` (``sdpo.*``, with the DPO loss of :class:`DPOSettings`)
and :class:`SDPOScorerSettings`, the scorer that ranks the candidates. The scorer is given under
``reward.*`` (``reward.ckpt``, ``reward.scorer``, ``reward.key``, ``reward.dimensions``,
``reward.device``: the user-facing keys), but it is not the reward recipe's ``reward:`` block
(:class:`levo_train.methods.reward.RewardSettings`, a reward model to train): here it names a
trained scorer to use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from levo_infer.generate import RELEASED_TEMPERATURE, RELEASED_TOP_K
from levo_infer.integrity import sha256_file
from levo_train.rollout import Sampling
from levo_train.settings import UsageError, to_bool, to_float, to_int, to_strings, typed
from levo_train.train.inference_copy import GEN_DTYPES
from levo_train.train.sdpo import (
    check_sdpo_reference,
    check_sdpo_settings,
)

from .dpo import DPOSettings

log = logging.getLogger("levo_train")


ORACLES = ("auto", "none")
#: ``sdpo.sampling``: ``default`` samples every codebook with temperature / top-k / top-p (defaults
#: 1.0 / off / off); ``compat`` the released rules (levo-infer's default): temperature and top-k on
#: codebook 0 (defaults 0.8 and 5000), greedy vocal and bgm, repetition penalty 1.1 over 50 steps
SAMPLING_MODES = {"default": (1.0, 0, 0.0), "compat": (RELEASED_TEMPERATURE, RELEASED_TOP_K, 0.0)}
#: ``sdpo.max_frames``: a number of frames (the same budget for every prompt), ``auto`` (each
#: prompt's budget from its lyric, :func:`levo_train.prompts.lyric_frame_budget`; on the toy world
#: :data:`TOY_MAX_FRAMES`) or ``model`` (the model's limit for every prompt)
FRAME_MODES = ("auto", "model")
#: the toy world's frame budget: its songs have at most 75 frames (``levo_train.toy.world.MAX_FRAMES``)
TOY_MAX_FRAMES = 96
#: the settings of :class:`SDPOSettings` that shape rounds: a resume must ask for the same ones
#: (:meth:`SDPOSettings.identity`); the others (``gen_batch_size``, ``gen_dtype``, ``oracle``,
#: ``save_candidates``, ``reward.device``, ``reward.dimensions``) change how a round runs or what it
#: logs, never which songs it samples or which pairs it makes, and may change on resume
ROUND_SETTINGS = ("sync_every", "prompts_per_round", "per_prompt", "min_margin", "buffer_rounds", "ref_sync_every",
                  "prompts")
#: the sampling rules that shape candidates (``Sampling`` field -> its setting); ``batch_size`` does not
SAMPLING_SETTINGS = {"temperature": "sdpo.temperature", "top_k": "sdpo.top_k", "top_p": "sdpo.top_p",
                     "cfg_coef": "sdpo.cfg_coef", "max_frames": "sdpo.max_frames", "compat": "sdpo.sampling"}


@dataclass(frozen=True)
class SDPOScorerSettings:
    """The scorer that ranks semi-online DPO's candidates (``reward.*`` under ``recipe=sdpo``)."""

    setting: str
    """Which key names it: ``reward.ckpt`` (a reward-model export) or ``reward.scorer`` (a scorer spec)."""
    value: str
    """That key's value as given (errors quote it)."""
    spec: str
    """The scorer spec :func:`levo_train.scorers.load_scorer` reads (``rm:EXPORT`` for ``reward.ckpt``)."""
    key: str | None = None
    """``reward.key``: the score to rank by (null: the scorer's overall score)."""
    dimensions: tuple[str, ...] | None = None
    """``reward.dimensions``: scores the scorer must have (checked when it is loaded)."""
    device: str | None = None
    """``reward.device``: where it runs (null: on the policy's device, following it)."""
    codec: str | None = None
    """``reward.codec``: the codec ``audio:`` scorers decode with (a codec folder, decoded by
    ``levo_infer.codec``, or ``MODULE:FACTORY``)."""

    def identity(self) -> dict[str, Any]:
        """What ranks the candidates: a reward model by the sha256 of its weights (its folder may move
        between a run and its resume), any other scorer by its spec; and the score ranked by."""
        kind, _, rest = self.spec.partition(":")
        weights = Path(rest) / "reward.pt"
        who = f"reward model sha256:{sha256_file(weights)}" if kind == "rm" and weights.is_file() else self.spec
        return {self.setting: who, "reward.key": self.key}

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> SDPOScorerSettings:
        r = cfg.reward
        if r.get("ckpt") and r.get("scorer"):
            raise UsageError("give reward.ckpt=EXPORT (a reward model) or reward.scorer=SPEC, not both")
        if r.get("ckpt"):
            setting, value, spec = "reward.ckpt", str(r.ckpt), f"rm:{r.ckpt}"
        elif r.get("scorer"):
            setting, value, spec = "reward.scorer", str(r.scorer), str(r.scorer)
        else:
            raise UsageError("recipe=sdpo needs a reward: reward.ckpt=RM_RUN/export (a `levo-train recipe=reward` "
                             "export) or reward.scorer=toy (the toy world's hidden quality) / another scorer spec")
        dims = typed(r, "dimensions", to_strings, "a list of score names (or null)", "reward")
        return cls(setting, value, spec, key=str(r.key) if r.get("key") else None, dimensions=dims or None,
                   device=str(r.device) if r.get("device") else None,
                   codec=str(r.codec) if r.get("codec") else None)


@dataclass(frozen=True)
class SDPOSettings:
    """Semi-online DPO's rounds and sampling (``sdpo.*``), its DPO loss and its scorer."""

    dpo: DPOSettings
    scorer: SDPOScorerSettings
    sync_every: int = 30
    """Optimizer steps per round: the policy generates new pairs at steps 0, sync_every, ..."""
    prompts_per_round: int = 300
    """Prompts per round (all ranks together)."""
    per_prompt: int = 4
    """Candidates per prompt; best vs worst."""
    min_margin: float = 0.05
    """On the scorer's score: closer candidates make no pair."""
    buffer_rounds: int = 1
    """Pairs of the last N rounds are trained on."""
    ref_sync_every: int = 0
    """Re-sync the reference to the policy every N steps (0: model.init throughout)."""
    prompts: tuple[str, ...] | None = None
    """Song/pair shards or a released-format JSONL (null: the toy training prompts of data.toy_pairs)."""
    sampling: Sampling = Sampling()
    """temperature, top_k, top_p, cfg_coef, max_frames, gen_batch_size, compat (``sdpo.sampling``)."""
    frames: int | str = TOY_MAX_FRAMES
    """``sdpo.max_frames`` as given: frames, ``auto`` or ``model`` (:data:`FRAME_MODES`); a mode's
    budgets are set per prompt once the model is loaded (:func:`frame_budgets`)."""
    oracle: str = "auto"
    """auto: on the toy world also score the same samples with the hidden quality | none."""
    save_candidates: bool = False
    """Write every round's candidates to run_dir/sdpo/candidates/."""
    gen_dtype: str = "auto"
    """The dtype rounds generate in (auto: bfloat16 on a GPU, float32 on CPU); a sharded or LoRA policy
    generates from a rank-local copy in it (:mod:`levo_train.train.inference_copy`)."""
    gen_memory_gb: float | None = None
    """GiB a round may use for generation on its device (the generation copy's weights, the KV cache in
    ``gen_dtype``, per-song state, workspace): the engine's slot count is then chosen by
    :func:`levo_infer.planner.plan_generation` for the longest song budget, at most ``gen_batch_size``
    (null: ``gen_batch_size`` slots). The training state beside it is not counted."""

    def identity(self) -> dict[str, Any]:
        """The settings that shape rounds (:data:`ROUND_SETTINGS`, the sampling rules, the scorer), by
        their keys: stored in every checkpoint, compared on resume (:meth:`SDPOMethod.check_resume`).
        A new setting that changes which songs a round samples or which pairs it makes belongs here."""
        out: dict[str, Any] = {f"sdpo.{k}": getattr(self, k) for k in ROUND_SETTINGS}
        out["sdpo.prompts"] = list(self.prompts) if self.prompts else None
        out.update({key: getattr(self.sampling, f.name) for f in fields(self.sampling)
                    if (key := SAMPLING_SETTINGS.get(f.name))})
        out["sdpo.max_frames"] = self.frames if isinstance(self.frames, str) else self.sampling.max_frames
        out.update(self.scorer.identity())
        return out

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> SDPOSettings:
        s, w = cfg.sdpo, "sdpo"
        cfg_coef = typed(s, "cfg_coef", to_float, "a number (or null)", w)
        mode = str(s.get("sampling") or "default")
        if mode not in SAMPLING_MODES:
            raise UsageError(f"sdpo.sampling={mode}: expected one of {', '.join(SAMPLING_MODES)} (compat: the released "
                             "rules, top-k/temperature on codebook 0, greedy vocal/bgm, repetition penalty)")
        temp, top_k, top_p = SAMPLING_MODES[mode]  # a null setting takes its mode's default
        temperature = typed(s, "temperature", to_float, "a number (or null)", w)
        top_k_set = typed(s, "top_k", to_int, "an integer (or null)", w)
        top_p_set = typed(s, "top_p", to_float, "a number (or null)", w)
        raw_frames = s.get("max_frames")
        frames: int | str
        if isinstance(raw_frames, str) and raw_frames in FRAME_MODES:
            # the toy world's songs are short: its budget is a constant (and the run's identity a number)
            frames = TOY_MAX_FRAMES if raw_frames == "auto" and not s.get("prompts") else raw_frames
        else:
            frames = typed(s, "max_frames", to_int, f"a number of frames or one of {', '.join(FRAME_MODES)}", w)
            if frames is None or frames < 1:
                raise UsageError(f"sdpo.max_frames={raw_frames}: expected a number of frames >= 1, or auto (each "
                                 "prompt's budget from its lyric) or model (the model's limit)")
        sampling = Sampling(temperature=temp if temperature is None else temperature,
                            top_k=top_k if top_k_set is None else top_k_set,
                            top_p=top_p if top_p_set is None else top_p_set, cfg_coef=cfg_coef,
                            max_frames=frames if isinstance(frames, int) else TOY_MAX_FRAMES,
                            compat=mode == "compat", batch_size=typed(s, "gen_batch_size", to_int, "an integer", w))
        scorer = SDPOScorerSettings.from_cfg(cfg)  # checked first, then the DPO loss, then the rounds
        out = cls(dpo=DPOSettings.from_cfg(cfg, recipe="sdpo"), scorer=scorer,
                  sync_every=typed(s, "sync_every", to_int, "an integer", w),
                  prompts_per_round=typed(s, "prompts_per_round", to_int, "an integer", w),
                  per_prompt=typed(s, "per_prompt", to_int, "an integer", w),
                  min_margin=typed(s, "min_margin", to_float, "a number", w),
                  buffer_rounds=typed(s, "buffer_rounds", to_int, "an integer", w),
                  ref_sync_every=typed(s, "ref_sync_every", to_int, "an integer", w),
                  prompts=typed(s, "prompts", to_strings, "a path or a list of paths", w) if s.get("prompts") else None,
                  sampling=sampling, frames=frames, oracle=str(s.get("oracle", "auto")),
                  save_candidates=bool(typed(s, "save_candidates", to_bool, "true or false", w)),
                  gen_dtype=str(s.get("gen_dtype", "auto")),
                  gen_memory_gb=typed(s, "gen_memory_gb", to_float, "a number of GiB (or null)", w))
        if out.gen_memory_gb is not None and not out.gen_memory_gb > 0:
            raise UsageError(f"sdpo.gen_memory_gb={out.gen_memory_gb}: expected a number of GiB > 0 (or null: "
                             "sdpo.gen_batch_size slots)")
        if out.oracle not in ORACLES:
            raise UsageError(f"sdpo.oracle={out.oracle}: expected one of {', '.join(ORACLES)}")
        if out.gen_dtype not in GEN_DTYPES:
            raise UsageError(f"sdpo.gen_dtype={out.gen_dtype}: expected one of {', '.join(GEN_DTYPES)}")
        try:
            check_sdpo_reference(out.dpo.reference)
        except ValueError as e:
            raise UsageError(f"sdpo: {e}") from None
        try:
            check_sdpo_settings(sync_every=out.sync_every, per_prompt=out.per_prompt,
                                prompts_per_round=out.prompts_per_round, buffer_rounds=out.buffer_rounds,
                                ref_sync_every=out.ref_sync_every, min_margin=out.min_margin)
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
        return out
