"""The :class:`Method` contract: what a training method tells :mod:`levo_train.run`.

A method is one class (``lm``, ``dpo``, ``reward``, ``sdpo``: one file each in this package) with a
typed settings class (``Settings``), read from the composed config and validated once when the run
plan is resolved: the TRL habit of a documented config class per trainer, instead of casting
``cfg`` by hand in every hook. :mod:`levo_train.run` resolves the plan (:class:`Plan`), then calls
the hooks in this order: :meth:`Method.uses_toy`, :meth:`Method.resolve_data`,
:meth:`Method.build_module`, :meth:`Method.after_init`, :meth:`Method.build_datamodule`; and
:meth:`Method.check_resume` when the run resumes, :meth:`Method.export` at its end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from omegaconf import DictConfig, OmegaConf

from levo_infer.checkpoint import save_released
from levo_infer.config import ModelConfig
from levo_train.data.shards import ShardError, resolve_shards
from levo_train.export import export_checkpoint
from levo_train.lora import ADAPTER_DIR, LoraSpec, has_lora, merged_copy, save_adapters
from levo_train.resume import ResumePoint
from levo_train.settings import UsageError, to_floats, typed


@dataclass(frozen=True)
class DataSpec:
    """Where a method trains: ``train`` / ``val`` locations (a path, a pattern or a list of them, as
    the method's datamodule takes them), whether they are toy data the run built, and for scored
    data the score ``dimensions`` it trains on (resolved against the data, recipe=reward)."""

    train: Any
    val: Any
    toy: bool
    dimensions: tuple[str, ...] | None = None


class Plan(Protocol):
    """What a method's hooks read of the run plan (:class:`levo_train.run.RunPlan`)."""

    cfg: DictConfig
    settings: Any
    model_config: ModelConfig
    run_dir: Path
    init: Path | None        # model.init, checked
    init_fp: str | None      # its content fingerprint (keys toy pairs and reference log-probs)
    lora: LoraSpec
    data: DataSpec | None


class Method(ABC):
    """One training method. Class attributes:

    * ``name``: what recipes set as ``method:``;
    * ``Settings``: the typed settings class, ``Settings.from_cfg(cfg)`` validates its keys once
      (a :class:`~levo_train.settings.UsageError` naming the key otherwise);
    * ``data_hint``: the setting that gives real data instead of the toy world's;
    * ``needs_init``: the error when ``model.init`` is required and missing (``None``: optional);
    * ``supports_lora``: whether ``train.lora.r > 0`` may wrap its model (:mod:`levo_train.lora`);
    * ``supports_sharding``: whether it trains under a sharding strategy (``fsdp2``, DeepSpeed ZeRO);
    * ``supports_deepspeed``: with ``supports_sharding``, whether DeepSpeed's ZeRO stages are among them
      (``False``: ``fsdp2`` only).
    """

    name: ClassVar[str]
    Settings: ClassVar[Any]
    data_hint: ClassVar[str]
    needs_init: ClassVar[str | None] = None
    supports_lora: ClassVar[bool] = True
    supports_sharding: ClassVar[bool] = False
    supports_deepspeed: ClassVar[bool] = True

    def settings(self, cfg: DictConfig) -> Any:
        """This method's settings, read and validated once."""
        return self.Settings.from_cfg(cfg)

    @abstractmethod
    def uses_toy(self, plan: Plan) -> bool:
        """Whether the run builds toy data (the toy world needs a 64-code model)."""

    @abstractmethod
    def resolve_data(self, plan: Plan) -> DataSpec:
        """Where it trains, building toy data when none is given."""

    @abstractmethod
    def build_module(self, plan: Plan, common: dict[str, Any]) -> Any:
        """The Lightning module before the init weights are loaded (``common``: the optimiser,
        schedule, freezing and seed keywords every module takes)."""

    def after_init(self, module: Any, plan: Plan) -> None:
        """Called once the init weights (and LoRA adapters) are in, e.g. to freeze a reference
        (default: nothing to do)."""
        return None

    @abstractmethod
    def build_datamodule(self, plan: Plan, common: dict[str, Any]) -> Any:
        """The datamodule over ``plan.data`` (``common``: the loader keywords every datamodule takes)."""

    def check_resume(self, rp: ResumePoint, plan: Plan) -> None:
        """Refuse a checkpoint this run cannot continue (after the generic checks of
        :func:`levo_train.resume.check_resume_checkpoint`; default: nothing more to check)."""
        return None

    def export(self, module: Any, folder: Path, dtype: Any = None) -> None:
        """Write ``run_dir/export``: the policy in the released folder layout (:func:`export_policy`)."""
        export_policy(module, folder, dtype)

    def export_checkpoint(self, path: Path, folder: Path, dtype: Any = None) -> Path:
        """The same export, written from a checkpoint of this method (any strategy) instead of the
        module in memory: the end of a sharded run, ``levo-train export``."""
        return export_checkpoint(path, folder, dtype)
    def summary_lines(self, metrics: Mapping[str, Any], run_dir: Path) -> list[str]:
        """Lines of the final summary this method adds (``metrics``: the trainer's last logged values,
        finite floats or None): what a reader of this method looks for first. Default: none."""
        return []


def dpo_summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """Pair accuracy and reward margin of a DPO-style run: validation's when it ran, else the last
    training step's."""
    for split in ("val", "train"):
        acc, margin = metrics.get(f"{split}/rewards/accuracies"), metrics.get(f"{split}/rewards/margins")
        if acc is not None or margin is not None:
            fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
            return [f"  {split}/pairs        accuracy {fmt(acc, '.3f')} (chosen above rejected), "
                    f"margin {fmt(margin, '.4f')} (implicit reward, chosen - rejected)"]
    return []


def export_policy(module: Any, folder: Path, dtype: Any = None) -> None:
    """The trained LeLM in the released folder layout (``model.pt`` + ``config.yaml``); with LoRA
    adapters, the merged weights there and the adapters alone in ``folder/adapters/``."""
    if has_lora(module.model):
        save_released(merged_copy(module.model), str(folder), dtype=dtype)
        save_adapters(module.model, folder / ADAPTER_DIR, module.lora,
                      base_fingerprint=getattr(module, "init_fingerprint", None))
        return
    save_released(module.model, str(folder), dtype=dtype)


# ----------------------------------------------------------------------------- shared settings
def shard_setting(cfg: DictConfig, name: str) -> str | list[str] | None:
    """``data.<name>`` as the shard reader takes it: ``None``, one location (a folder, a tar, a glob or a
    brace pattern) or a list of them (``data.train=[A,B]``); every location must name at least one shard
    (a usage error naming the setting otherwise)."""
    value = cfg.data.get(name)
    if value is None:
        return None
    spec: str | list[str] = [str(v) for v in value] if OmegaConf.is_list(value) else str(value)
    if spec == [] or spec == "":
        raise UsageError(f"data.{name} is empty: give a shard folder, a tar, a glob or a list of them")
    try:
        resolve_shards(spec)
    except (ShardError, FileNotFoundError, ValueError) as e:
        raise UsageError(f"data.{name}={value}: {e}") from None
    return spec


def stream_weights(cfg: DictConfig) -> list[float] | None:
    """``train.stream_weights``: per-stream loss weights (None: all 1)."""
    weights = typed(cfg.train, "stream_weights", to_floats, "a list of numbers, one per stream", "train")
    return list(weights) if weights is not None else None


__all__ = ["DataSpec", "Method", "Plan", "export_policy", "shard_setting", "stream_weights"]
