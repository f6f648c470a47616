"""``method: lm`` (recipes pretrain and sft): next-token training on song shards, or on the toy
world's songs when ``data.train`` is unset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from levo_train.data.datamodule import SongDataModule
from levo_train.settings import to_bool, to_int, toy_cache_root, typed
from levo_train.toy.world import ensure_toy_dataset
from levo_train.train.lm import LMModule

from .base import DataSpec, Method, Plan, shard_setting


@dataclass(frozen=True)
class LMSettings:
    """Settings of language-model training (pretrain / SFT)."""

    condition_dropout: bool = True
    """``train.condition_dropout``: drop lyric / style / prompt conditions as the released training does."""
    max_frames: int | None = None
    """``data.max_frames``: crop longer songs to a random window of this many frames (None: no crop)."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> LMSettings:
        return cls(condition_dropout=bool(typed(cfg.train, "condition_dropout", to_bool, "true or false", "train")),
                   max_frames=typed(cfg.data, "max_frames", to_int, "a number of frames (or null)", "data"))


def given_songs(cfg: DictConfig) -> DataSpec:
    """The song shards named by ``data.train`` / ``data.val``."""
    return DataSpec(shard_setting(cfg, "train"), shard_setting(cfg, "val"), False)


def resolve_songs(cfg: DictConfig) -> DataSpec:
    """Song shard locations, building the toy world's data set when none are given."""
    if cfg.data.train is not None:
        return given_songs(cfg)
    t = cfg.data.toy
    root = ensure_toy_dataset(toy_cache_root(cfg), seed=int(t.seed), n_train=int(t.n_train), n_val=int(t.n_val))
    return DataSpec(str(root / "train"), str(root / "val"), True)


class LMMethod(Method):
    name = "lm"
    Settings = LMSettings
    data_hint = "data.train=..."
    supports_sharding = True

    def uses_toy(self, plan: Plan) -> bool:
        return plan.cfg.data.train is None

    def resolve_data(self, plan: Plan) -> DataSpec:
        return resolve_songs(plan.cfg)

    def build_module(self, plan: Plan, common: dict[str, Any]) -> Any:
        return LMModule(plan.model_config, condition_dropout=plan.settings.condition_dropout, **common)

    def build_datamodule(self, plan: Plan, common: dict[str, Any]) -> Any:
        return SongDataModule(**common, max_frames=plan.settings.max_frames)


__all__ = ["LMMethod", "LMSettings", "given_songs", "resolve_songs"]
