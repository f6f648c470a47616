"""``method: sdpo`` (recipe sdpo): semi-online DPO. Every ``sdpo.sync_every`` steps the policy samples
candidates for a round of prompts, a scorer ranks them, best-vs-worst pairs train the next steps.

The typed settings (``sdpo.*``, the scorer under ``reward.*``) are in :mod:`levo_train.methods.sdpo_settings`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from levo_infer.planner import InsufficientMemoryError, plan_generation
from levo_train.prompts import lyric_frame_budget, model_frame_limit, read_prompts
from levo_train.reward.model import token_layout_mismatch
from levo_train.rollout import Prompt, Sampling, Scorer
from levo_train.scorers import WeightedScorer, load_scorer
from levo_train.settings import UsageError, on_cuda
from levo_train.toy.pairs import ToyPairSpec, split_seeds, toy_prompts
from levo_train.toy.scorer import ToyOracleScorer
from levo_train.toy.world import ToyWorld
from levo_train.train.inference_copy import gen_dtype as resolve_gen_dtype
from levo_train.train.sdpo import (
    PLOT_NAME,
    ROUNDS_NAME,
    RoundDataModule,
    SemiOnlineDPOModule,
    read_rounds,
)

from .base import DataSpec, Method, Plan, dpo_summary_lines
from .dpo import check_reference_init
from .sdpo_settings import (
    FRAME_MODES,
    ORACLES,
    ROUND_SETTINGS,
    SAMPLING_MODES,
    SAMPLING_SETTINGS,
    TOY_MAX_FRAMES,
    SDPOScorerSettings,
    SDPOSettings,
)

log = logging.getLogger("levo_train")

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


def frame_budgets(settings: SDPOSettings, model: Any, prompts: list[Prompt]) -> tuple[Sampling, list[Prompt]]:
    """The sampling rules and prompts of a run, with the frame budgets of ``sdpo.max_frames``: a
    number is checked against the model's limit; ``model`` budgets every prompt at the limit
    (:func:`levo_train.prompts.model_frame_limit`); ``auto`` each prompt by its lyric
    (:func:`levo_train.prompts.lyric_frame_budget`)."""
    limit = model_frame_limit(model)
    if not isinstance(settings.frames, str):
        if settings.frames > model.max_frames:
            raise UsageError(f"sdpo.max_frames={settings.frames}: the model holds at most {model.max_frames} frames "
                             "(its positions, after the conditioning prefix and the delay tail); lower it, or use "
                             "sdpo.max_frames=auto (per prompt, from its lyric) or model")
        return settings.sampling, prompts
    sampling = dataclasses.replace(settings.sampling, max_frames=limit)
    if settings.frames == "model":
        return sampling, prompts
    rate = float(model.cfg.frame_rate)
    return sampling, [dataclasses.replace(p, max_frames=lyric_frame_budget(p.lyric, frame_rate=rate, limit=limit))
                      for p in prompts]


def generation_slots(settings: SDPOSettings, sampling: Sampling, prompts: list[Prompt], model_cfg: Any,
                     device: str) -> Sampling:
    """``sampling`` with the engine's slot count for ``sdpo.gen_memory_gb`` (unchanged without it):
    the most songs of the longest budget among ``prompts`` whose predicted peak, in ``sdpo.gen_dtype``
    on ``device``, fits the budget, at most ``sdpo.gen_batch_size``. A budget that cannot hold one
    song is refused with the planner's terms."""
    if settings.gen_memory_gb is None:
        return sampling
    longest = max([p.max_frames or sampling.max_frames for p in prompts] or [sampling.max_frames])
    dtype = resolve_gen_dtype(settings.gen_dtype, device)
    try:
        gp = plan_generation(model_cfg, memory_gb=settings.gen_memory_gb, max_frames=longest, dtype=dtype,
                             kv_bits=sampling.kv_bits, max_slots=sampling.batch_size)
    except InsufficientMemoryError as e:
        raise UsageError(f"sdpo.gen_memory_gb={settings.gen_memory_gb:g}: {e}") from None
    log.info("sdpo.gen_memory_gb=%g: %d generation slots for songs of up to %d frames in %s", settings.gen_memory_gb,
             gp.slots, longest, str(dtype).removeprefix("torch."))
    return dataclasses.replace(sampling, batch_size=gp.slots)


def policy_device(accelerator: str) -> str:
    """The device this rank's policy trains on: its GPU (``LOCAL_RANK`` / ``SLURM_LOCALID`` modulo the
    GPUs) when ``trainer.accelerator`` resolves to CUDA, else cpu."""
    if not on_cuda(accelerator):
        return "cpu"
    local = next((int(os.environ[v]) for v in ("LOCAL_RANK", "SLURM_LOCALID") if os.environ.get(v, "").isdigit()), 0)
    return f"cuda:{local % torch.cuda.device_count()}"


def load_sdpo_scorer(plan: Plan) -> tuple[Scorer, Scorer | None]:
    """(scorer, oracle) of a semi-online run, checked against the policy; the oracle is the toy
    world's hidden quality on toy runs (``sdpo.oracle=auto``)."""
    s: SDPOScorerSettings = plan.settings.scorer
    world_seed, mc = int(plan.cfg.data.toy.seed), plan.model_config
    # a scorer (and a factory building one) gets the device it runs on: reward.device, else the policy's
    device = s.device or policy_device(str(plan.cfg.trainer.get("accelerator", "auto")))
    if s.codec is None and "audio:" in s.spec:
        raise UsageError(f"{s.setting}={s.value}: an audio scorer decodes the songs with a codec: add "
                         "reward.codec=CODEC_DIR (the released runtime folder with model_septoken/ and vae/) or "
                         "reward.codec=MODULE:FACTORY")
    try:
        scorer = load_scorer(s.spec, device=device, world_seed=world_seed, setting=s.setting, codec=s.codec)
    except (OSError, ValueError) as e:
        raise UsageError(str(e) if s.setting in str(e) else f"{s.setting}: {e}") from None
    rm_cfg = getattr(scorer, "model_config", None)
    if rm_cfg is not None:  # a reward model reads the policy's tokens: same codebooks, sizes and delays
        what = token_layout_mismatch(rm_cfg, "the policy (model.init)", code_size=mc.lm.code_size,
                                     code_depth=mc.lm.code_depth, delays=mc.delays)
        if what:
            raise UsageError(f"{s.setting}={s.value}: {what}; train a reward model on this policy's tokens")
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
    supports_sharding = True
    #: a round generates from a rank-local copy gathered from FSDP2's shards (DTensors); a ZeRO-3
    #: partitioned policy would need DeepSpeed's own gather, which no test here can run (GPU only)
    supports_deepspeed = False

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
                gen_dtype=s.gen_dtype, gen_batch_size=s.sampling.batch_size, settings_identity=s.identity(),
                **s.dpo.module_kwargs(), **common)
        except ValueError as e:
            raise UsageError(str(e) if str(e).startswith("sdpo.") else f"sdpo: {e}") from e

    def after_init(self, module: Any, plan: Plan) -> None:
        """Freeze the reference, then read the prompt pool (released JSONL prompts are formatted for the model)."""
        try:
            module.freeze_reference()
            sampling, prompts = frame_budgets(plan.settings, module.model, sdpo_prompts(plan, module.model))
            device = policy_device(str(plan.cfg.trainer.get("accelerator", "auto")))
            module.sampling = generation_slots(plan.settings, sampling, prompts, module.model.cfg, device)
            module.set_prompts(prompts)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def build_datamodule(self, plan: Plan, common: dict[str, Any]) -> Any:
        return RoundDataModule()

    def settings(self, cfg: DictConfig) -> SDPOSettings:
        """``sdpo.*`` and the scorer, checked; a warning when the whole run is one round."""
        s: SDPOSettings = super().settings(cfg)
        max_steps = int(cfg.trainer.get("max_steps", -1) or -1)
        if 0 < max_steps <= s.sync_every:
            print(f"levo-train: warning: sdpo.sync_every={s.sync_every} >= trainer.max_steps={max_steps}: the run "
                  "makes one round (at step 0) and trains on its pairs throughout; lower sdpo.sync_every for rounds "
                  "from the moving policy", file=sys.stderr)
        return s

    def check_resume(self, rp: Any, plan: Plan) -> None:
        """The reference's init, then the settings that shape rounds (:meth:`SDPOSettings.identity`):
        refused, naming each one, when the resume asks for others than the checkpoint's run."""
        check_reference_init(rp, plan, plan.settings.dpo.reference)
        st = rp.levo.get("sdpo")
        then = st.get("settings") if isinstance(st, dict) else None
        if not isinstance(then, dict):
            log.warning("%s does not record its sdpo settings (an older levo-train): a resume with other sdpo.* "
                        "settings cannot be detected", rp.path)
            return
        now = plan.settings.identity()
        changed = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        if changed:
            what = "; ".join(f"{k}: the run has {then.get(k)!r}, this resume asks for {now.get(k)!r}" for k in changed)
            raise UsageError(f"{rp.path}: {what}. These settings shape the rounds (which prompts, how many songs, "
                             "how they are sampled, scored and paired), so a resume keeps the run's own: drop the "
                             "override(s), or start a new run from the checkpoint's export (model.init=RUN/export)")


__all__ = ["FRAME_MODES", "ORACLES", "ROUND_SETTINGS", "SAMPLING_MODES", "SAMPLING_SETTINGS", "TOY_MAX_FRAMES",
           "frame_budgets", "SDPOMethod", "SDPOScorerSettings", "SDPOSettings", "load_sdpo_scorer", "sdpo_prompts"]
