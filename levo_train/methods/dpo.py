"""``method: dpo`` (recipe dpo): offline DPO on preference pairs from an SFT export; without
``data.pairs`` on toy pairs sampled from ``model.init`` (``data.toy_pairs``)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from levo_train.data.datamodule import PairDataModule
from levo_train.resume import ResumePoint
from levo_train.scorers import load_scorer
from levo_train.settings import UsageError, to_float, to_floats, to_strings, toy_cache_root, typed
from levo_train.toy.pairs import ToyPairSpec, ensure_toy_pairs
from levo_train.train.dpo import DPOModule, check_loss_config, check_reference
from levo_train.train.ref_logps import ensure_ref_logps

from .base import DataSpec, Method, Plan, dpo_summary_lines, stream_weights

log = logging.getLogger("levo_train")


@dataclass(frozen=True)
class DPOSettings:
    """The DPO loss and its reference (``dpo.*``), as TRL's ``DPOConfig`` names them."""

    beta: float = 0.1
    """``dpo.beta``: the KL weight; larger keeps the policy closer to the reference."""
    loss_type: str | tuple[str, ...] = "sigmoid"
    """``dpo.loss_type``: sigmoid | robust | hinge | ipo, or a list such as [sigmoid, sft]."""
    loss_weights: tuple[float, ...] | None = None
    """``dpo.loss_weights``: one weight per ``loss_type`` entry (default all 1)."""
    label_smoothing: float = 0.0
    """``dpo.label_smoothing``: cDPO / robust DPO's epsilon."""
    reference: str = "model"
    """``dpo.reference``: model (a frozen copy of model.init) | precomputed (ref_logps.json beside the pairs)."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig, recipe: str = "dpo") -> DPOSettings:
        """``dpo.*``, checked; errors of the loss settings are worded as ``recipe``'s."""
        d = cfg.dpo
        loss_type = typed(d, "loss_type", to_strings, "a loss type or a list of them", "dpo")
        s = cls(beta=typed(d, "beta", to_float, "a number > 0", "dpo"),
                loss_type=loss_type[0] if isinstance(d.loss_type, str) else loss_type,
                loss_weights=typed(d, "loss_weights", to_floats, "a list of numbers (or null)", "dpo"),
                label_smoothing=typed(d, "label_smoothing", to_float, "a number in [0, 0.5)", "dpo"),
                reference=str(d.reference))
        try:  # the module's own checks, now rather than at its construction
            check_reference(s.reference)
            check_loss_config(s.loss_type, s.loss_weights, s.beta, s.label_smoothing)
        except ValueError as e:
            raise UsageError(f"{recipe}: {e}") from None
        return s

    def module_kwargs(self) -> dict[str, Any]:
        """As :class:`~levo_train.train.dpo.DPOModule` keywords."""
        return {"beta": self.beta, "loss_type": self.loss_type if isinstance(self.loss_type, str) else
                list(self.loss_type), "loss_weights": list(self.loss_weights) if self.loss_weights is not None else None,
                "label_smoothing": self.label_smoothing, "reference": self.reference}


def given_pairs(cfg: DictConfig) -> DataSpec:
    """The pair shard folders of ``data.pairs`` (with ``train/`` and ``val/``, or the shards
    themselves and ``data.pairs_val``)."""
    root = Path(str(cfg.data.pairs))
    if not root.exists():
        raise UsageError(f"data.pairs={root}: no such folder")
    if (root / "train").is_dir():
        return DataSpec(str(root / "train"), str(root / "val") if (root / "val").is_dir() else None, False)
    return DataSpec(str(root), str(cfg.data.pairs_val) if cfg.data.get("pairs_val") else None, False)


def toy_pairs(plan: Plan, reference: str) -> DataSpec:
    """The toy pairs of ``data.toy_pairs`` (sampled from model.init, or the world's renderings),
    built once into the toy cache; with a precomputed reference, their log-probs under model.init."""
    cfg = plan.cfg
    tp = OmegaConf.to_container(cfg.data.toy_pairs, resolve=True)
    try:
        spec = ToyPairSpec(**tp)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise UsageError(f"data.toy_pairs: {e}") from None
    world_seed = int(cfg.data.toy.seed)

    def make_scorer(device: str) -> Any:  # data.toy_pairs.scorer, loaded only when the pairs are built
        return load_scorer(spec.scorer, device=device, world_seed=world_seed, setting="data.toy_pairs.scorer")

    init = plan.init if spec.source == "model" else None
    try:
        root = ensure_toy_pairs(toy_cache_root(cfg), spec, world_seed=world_seed, model=init, fingerprint=plan.init_fp,
                                make_scorer=make_scorer)
    except ValueError as e:
        raise UsageError(f"data.toy_pairs.source=model: {e}") from None
    done = json.loads((root / "done.json").read_text())
    n_train, n_val = done["train"]["pairs"], done.get("val", {}).get("pairs", 0)
    print(f"levo-train: toy pairs (source={spec.source}): {n_train} train / {n_val} val pairs in {root}",
          file=sys.stderr)
    if n_train == 0:
        raise UsageError(f"toy pairs in {root}: no training prompt's candidates differ by >= data.toy_pairs.min_margin="
                         f"{spec.min_margin} (mean quality {done['train'].get('mean_quality')}); lower the margin or "
                         "raise data.toy_pairs.n_candidates / n_train, or start from a better-trained model.init")
    if n_val == 0 and spec.n_val > 0:
        log.warning("toy pairs in %s: no held-out pairs passed the margin; validation is skipped", root)
    folders = [root / "train"] + ([root / "val"] if n_val > 0 else [])
    if reference == "precomputed":  # toy pairs are ours to annotate: compute them once
        for f in ensure_ref_logps(folders, plan.init, stream_weights=stream_weights(cfg), fingerprint=plan.init_fp):
            print(f"levo-train: computed reference log-probs of {f} under {plan.init}", file=sys.stderr)
    return DataSpec(str(folders[0]), str(folders[1]) if n_val > 0 else None, True)


def check_reference_init(rp: ResumePoint, plan: Plan, reference: str) -> None:
    """A resume rebuilds a frozen reference from ``model.init``: it must be the init the run started from."""
    fp_then, init_fp = rp.levo.get("init_fingerprint"), plan.init_fp
    if reference != "model" or not fp_then or not init_fp:
        return
    if len(str(fp_then)) != len(init_fp):
        log.warning("%s records its init's fingerprint in an older format: the DPO reference cannot be checked "
                    "against model.init", rp.path)
    elif fp_then != init_fp:
        raise UsageError(f"{rp.path}: the run started from a model.init with fingerprint {fp_then}, this one is "
                         f"{init_fp} ({plan.cfg.model.init}); the frozen DPO reference is rebuilt from model.init on "
                         "resume, so pass the original init (or use a new run_dir)")


class DPOMethod(Method):
    name = "dpo"
    Settings = DPOSettings
    data_hint = "data.pairs=..."
    needs_init = ("recipe=dpo needs model.init=PATH: the SFT export to start from (and the frozen reference), e.g. "
                  "`levo-train recipe=sft run_dir=A` then `levo-train recipe=dpo model.init=A/export`")
    supports_sharding = True

    def summary_lines(self, metrics: Any, run_dir: Path) -> list[str]:
        return dpo_summary_lines(metrics)

    def uses_toy(self, plan: Plan) -> bool:
        return not plan.cfg.data.get("pairs")

    def resolve_data(self, plan: Plan) -> DataSpec:
        if plan.cfg.data.get("pairs"):
            return given_pairs(plan.cfg)
        return toy_pairs(plan, plan.settings.reference)

    def build_module(self, plan: Plan, common: dict[str, Any]) -> Any:
        try:
            return DPOModule(plan.model_config, **plan.settings.module_kwargs(), **common)
        except ValueError as e:
            raise UsageError(f"dpo: {e}") from e

    def after_init(self, module: Any, plan: Plan) -> None:
        module.freeze_reference()

    def build_datamodule(self, plan: Plan, common: dict[str, Any]) -> Any:
        precomputed = plan.settings.reference == "precomputed"
        return PairDataModule(**common, use_ref_logps=precomputed, ref_fingerprint=plan.init_fp if precomputed else None,
                              ref_stream_weights=stream_weights(plan.cfg))

    def check_resume(self, rp: ResumePoint, plan: Plan) -> None:
        check_reference_init(rp, plan, plan.settings.reference)


__all__ = ["DPOMethod", "DPOSettings", "check_reference_init", "given_pairs", "toy_pairs"]
