"""``method: sdpo`` (recipe sdpo): semi-online DPO. Every ``sdpo.sync_every`` steps the policy samples
candidates for a round of prompts, a scorer ranks them, best-vs-worst pairs train the next steps.

Two settings classes: :class:`SDPOSettings` (``sdpo.*``, with the DPO loss of :class:`DPOSettings`)
and :class:`SDPOScorerSettings`, the scorer that ranks the candidates. The scorer is given under
``reward.*`` (``reward.ckpt``, ``reward.scorer``, ``reward.key``, ``reward.dimensions``,
``reward.device``: the user-facing keys), but it is not the reward recipe's ``reward:`` block
(:class:`levo_train.methods.reward.RewardSettings`, a reward model to train): here it names a
trained scorer to use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from levo_train.prompts import read_prompts
from levo_train.rollout import Prompt, Sampling, Scorer
from levo_train.scorers import WeightedScorer, load_scorer
from levo_train.settings import UsageError, to_bool, to_float, to_int, to_strings, typed
from levo_train.toy.pairs import ToyPairSpec, split_seeds, toy_prompts
from levo_train.toy.scorer import ToyOracleScorer
from levo_train.toy.world import ToyWorld
from levo_train.train.sdpo import (
    PLOT_NAME,
    ROUNDS_NAME,
    RoundDataModule,
    SemiOnlineDPOModule,
    check_sdpo_reference,
    check_sdpo_settings,
    read_rounds,
)

from .base import DataSpec, Method, Plan, dpo_summary_lines
from .dpo import DPOSettings, check_reference_init

ORACLES = ("auto", "none")


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
                   device=str(r.device) if r.get("device") else None)


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
    """temperature, top_k, top_p, cfg_coef, max_frames, gen_batch_size."""
    oracle: str = "auto"
    """auto: on the toy world also score the same samples with the hidden quality | none."""
    save_candidates: bool = False
    """Write every round's candidates to run_dir/sdpo/candidates/."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> SDPOSettings:
        s, w = cfg.sdpo, "sdpo"
        cfg_coef = typed(s, "cfg_coef", to_float, "a number (or null)", w)
        sampling = Sampling(temperature=typed(s, "temperature", to_float, "a number", w),
                            top_k=typed(s, "top_k", to_int, "an integer", w), top_p=typed(s, "top_p", to_float, "a number", w),
                            cfg_coef=cfg_coef, max_frames=typed(s, "max_frames", to_int, "a number of frames", w),
                            batch_size=typed(s, "gen_batch_size", to_int, "an integer", w))
        scorer = SDPOScorerSettings.from_cfg(cfg)  # checked first, then the DPO loss, then the rounds
        out = cls(dpo=DPOSettings.from_cfg(cfg, recipe="sdpo"), scorer=scorer,
                  sync_every=typed(s, "sync_every", to_int, "an integer", w),
                  prompts_per_round=typed(s, "prompts_per_round", to_int, "an integer", w),
                  per_prompt=typed(s, "per_prompt", to_int, "an integer", w),
                  min_margin=typed(s, "min_margin", to_float, "a number", w),
                  buffer_rounds=typed(s, "buffer_rounds", to_int, "an integer", w),
                  ref_sync_every=typed(s, "ref_sync_every", to_int, "an integer", w),
                  prompts=typed(s, "prompts", to_strings, "a path or a list of paths", w) if s.get("prompts") else None,
                  sampling=sampling, oracle=str(s.get("oracle", "auto")),
                  save_candidates=bool(typed(s, "save_candidates", to_bool, "true or false", w)))
        if out.oracle not in ORACLES:
            raise UsageError(f"sdpo.oracle={out.oracle}: expected one of {', '.join(ORACLES)}")
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


def sdpo_prompts(plan: Plan, model: Any = None) -> list[Prompt]:
    """The prompt pool: ``sdpo.prompts`` (song/pair shards or a released-format JSONL, formatted for
    ``model`` as levo-infer does), else the toy training prompts of ``data.toy_pairs`` (the pool, seed
    and tiers of ``recipe=dpo``'s toy pairs)."""
    src = plan.settings.prompts
    if src:
        try:
            return read_prompts(list(src), model, setting="sdpo.prompts")
        except (OSError, ValueError) as e:
            raise UsageError(str(e) if "sdpo.prompts" in str(e) else f"sdpo.prompts={plan.cfg.sdpo.prompts}: {e}"
                             ) from None
    cfg = plan.cfg
    tp = OmegaConf.to_container(cfg.data.toy_pairs, resolve=True)
    spec = ToyPairSpec(**{**tp, "source": "model", "scorer": "toy"})  # type: ignore[arg-type]
    world_seed = int(cfg.data.toy.seed)
    return toy_prompts(ToyWorld(world_seed), spec.n_train, seed=split_seeds(spec, world_seed)["train"], tier=spec.tier)


def load_sdpo_scorer(plan: Plan) -> tuple[Scorer, Scorer | None]:
    """(scorer, oracle) of a semi-online run, checked against the policy; the oracle is the toy
    world's hidden quality on toy runs (``sdpo.oracle=auto``)."""
    s: SDPOScorerSettings = plan.settings.scorer
    world_seed, mc = int(plan.cfg.data.toy.seed), plan.model_config
    try:
        scorer = load_scorer(s.spec, device=s.device or "cpu", world_seed=world_seed, setting=s.setting)
    except (OSError, ValueError) as e:
        raise UsageError(str(e) if s.setting in str(e) else f"{s.setting}: {e}") from None
    rm_cfg = getattr(scorer, "model_config", None)
    if rm_cfg is not None:  # a reward model reads the policy's tokens: same codebooks and sizes
        for name in ("code_size", "code_depth"):
            have, want = getattr(rm_cfg.lm, name), getattr(mc.lm, name)
            if have != want:
                raise UsageError(f"{s.setting}={s.value}: the reward model reads {name}={have}, the policy "
                                 f"(model.init) writes {name}={want}; train a reward model on this policy's tokens")
        if list(rm_cfg.delays) != list(mc.delays):
            raise UsageError(f"{s.setting}: the reward model's delay pattern {list(rm_cfg.delays)} differs from the "
                             f"policy's {list(mc.delays)}")
    if s.dimensions:
        missing = [d for d in s.dimensions if d not in scorer.dimensions]
        if missing:
            raise UsageError(f"reward.dimensions={list(s.dimensions)}: {s.setting}={s.value} scores "
                             f"{list(scorer.dimensions)} (no {missing})")
    if s.key:
        if s.key != scorer.overall and s.key not in scorer.dimensions:
            raise UsageError(f"reward.key={s.key}: {scorer.name} scores {[scorer.overall, *scorer.dimensions]}")
        scorer = WeightedScorer({s.key: 1.0}, scorer=scorer, name=f"{scorer.name}[{s.key}]")
    toy = not plan.settings.prompts
    oracle = ToyOracleScorer(world_seed) if plan.settings.oracle == "auto" and toy else None
    return scorer, oracle


class SDPOMethod(Method):
    name = "sdpo"
    Settings = SDPOSettings
    data_hint = "sdpo.prompts=..."
    needs_init = ("recipe=sdpo needs model.init=PATH: the SFT or DPO export to start from (and the reference), "
                  "e.g. `levo-train recipe=sdpo model.init=A/export reward.ckpt=R/export`")

    def summary_lines(self, metrics: Any, run_dir: Path) -> list[str]:
        """DPO's pair accuracy and margin, then where the per-round record and its plot are, with the
        last round's scorer-oracle agreement when an oracle judged it."""
        lines = dpo_summary_lines(metrics)
        folder = run_dir / "sdpo"
        rounds = read_rounds(folder / ROUNDS_NAME)
        last = rounds[-1] if rounds else {}
        agree = last.get("pair_agreement")
        note = f"; last round {last.get('round')}" + (f": oracle agrees on {agree:.1%} of pairs" if agree is not None
                                                      else "") if last else ""
        lines.append(f"  rounds           {folder / ROUNDS_NAME} ({len(rounds)} rounds{note})")
        if (folder / PLOT_NAME).is_file():
            lines.append(f"  rounds plot      {folder / PLOT_NAME}")
        return lines

    def uses_toy(self, plan: Plan) -> bool:
        return not plan.settings.prompts

    def resolve_data(self, plan: Plan) -> DataSpec:
        prompts = plan.cfg.sdpo.get("prompts")
        return DataSpec(str(prompts) if prompts else "toy prompts", None, not prompts)

    def build_module(self, plan: Plan, common: dict[str, Any]) -> Any:
        s: SDPOSettings = plan.settings
        scorer, oracle = load_sdpo_scorer(plan)
        try:
            return SemiOnlineDPOModule(
                plan.model_config, prompts=None, scorer=scorer, oracle=oracle, sync_every=s.sync_every,
                per_prompt=s.per_prompt, prompts_per_round=s.prompts_per_round, min_margin=s.min_margin,
                buffer_rounds=s.buffer_rounds, ref_sync_every=s.ref_sync_every, sampling=s.sampling,
                batch_size=int(plan.cfg.data.batch_size), out_dir=str(plan.run_dir / "sdpo"),
                save_candidates=s.save_candidates, scorer_follows_policy=s.scorer.device is None,
                **s.dpo.module_kwargs(), **common)
        except ValueError as e:
            raise UsageError(str(e) if str(e).startswith("sdpo.") else f"sdpo: {e}") from e

    def after_init(self, module: Any, plan: Plan) -> None:
        """Freeze the reference, then read the prompt pool (released JSONL prompts are formatted for the model)."""
        try:
            module.freeze_reference()
            module.set_prompts(sdpo_prompts(plan, module.model))
        except ValueError as e:
            raise UsageError(str(e)) from None

    def build_datamodule(self, plan: Plan, common: dict[str, Any]) -> Any:
        return RoundDataModule()

    def check_resume(self, rp: Any, plan: Plan) -> None:
        check_reference_init(rp, plan, plan.settings.dpo.reference)


__all__ = ["ORACLES", "SDPOMethod", "SDPOScorerSettings", "SDPOSettings", "load_sdpo_scorer", "sdpo_prompts"]
