"""``method: reward`` (recipe reward): an aesthetic reward model on scored songs (``data.train``),
on preference pairs (``data.pairs``: Bradley-Terry) or on toy reward data built from ``model.init``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from levo_infer.config import config_from_omegaconf
from levo_train.data.datamodule import PairDataModule
from levo_train.data.scored import UNIT_RANGE, RewardDataModule, check_score_range, data_dimensions
from levo_train.data.shards import ShardError, iter_raw, resolve_shards
from levo_train.export import CheckpointWeights, ExportError
from levo_train.reward.model import POOLINGS, RewardModel, save_reward_model, write_reward_export
from levo_train.settings import UsageError, to_float, to_floats, to_int, to_strings, toy_cache_root, typed
from levo_train.toy.scored import ToyRewardSpec, ensure_toy_reward_data
from levo_train.toy.world import DIMENSIONS
from levo_train.train.reward import RewardModule, check_reward_settings

from .base import DataSpec, Method, Plan, shard_setting
from .dpo import given_pairs


@dataclass(frozen=True)
class RewardSettings:
    """The reward model to train (the ``reward:`` block of ``recipe=reward``). Not semi-online DPO's
    ``reward:`` block, which names a trained scorer to use (:class:`levo_train.methods.sdpo.SDPOScorerSettings`)."""

    dimensions: tuple[str, ...] | None = None
    """``reward.dimensions``: the scores to learn besides overall (null: those of the data)."""
    layers: int | None = None
    """``reward.layers``: main-stack layers kept from the init (null: all)."""
    layers_sub: int | None = None
    """``reward.layers_sub``: sub-stack layers kept (null: all)."""
    pooling: str = "mean_logp"
    """``reward.pooling``: mean | attn | mean_logp (see :mod:`levo_train.reward.model`)."""
    loss: str = "mse"
    """``reward.loss``: mse | smooth_l1, on the raw scores."""
    rank_loss: str = "bt"
    """``reward.rank_loss``: none | bt | listmle."""
    rank_weight: float = 0.1
    """``reward.rank_weight``: the ranking term's weight."""
    rank_margin: float = 0.05
    """``reward.rank_margin``: bt pairs whose true scores differ by at least this (on the [0, 1] targets)."""
    score_range: tuple[float, float] = UNIT_RANGE
    """``reward.score_range``: ``[lo, hi]``, the scale ``data.train``'s scores were rated on (e.g. [1, 5]);
    targets are (s - lo) / (hi - lo), since the loss assumes [0, 1]; a score outside it is refused."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RewardSettings:
        r = cfg.reward
        s = cls(dimensions=typed(r, "dimensions", to_strings, "a list of score names (or null)", "reward"),
                layers=typed(r, "layers", to_int, "a number of layers (or null)", "reward"),
                layers_sub=typed(r, "layers_sub", to_int, "a number of layers (or null)", "reward"),
                pooling=str(r.pooling), loss=str(r.loss), rank_loss=str(r.rank_loss),
                rank_weight=typed(r, "rank_weight", to_float, "a number >= 0", "reward"),
                rank_margin=typed(r, "rank_margin", to_float, "a number >= 0", "reward"),
                score_range=_score_range(r))
        if s.pooling not in POOLINGS:
            raise UsageError(f"reward.pooling={s.pooling!r}: expected one of {POOLINGS}")
        try:
            check_reward_settings(loss=s.loss, rank_loss=s.rank_loss, rank_weight=s.rank_weight,
                                  rank_margin=s.rank_margin)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return s


def _score_range(r: DictConfig) -> tuple[float, float]:
    """``reward.score_range`` (absent or null: [0, 1]) as checked ``(lo, hi)``."""
    given = typed(r, "score_range", to_floats, "[lo, hi], two numbers", "reward")
    if given is None:
        return UNIT_RANGE
    if len(given) != 2:
        raise UsageError(f"reward.score_range={list(given)}: expected [lo, hi], two numbers (e.g. [1, 5])")
    try:
        return check_score_range(given)
    except ValueError as e:
        raise UsageError(str(e)) from None


def pair_dimensions(cfg: DictConfig) -> tuple[str, ...]:
    """The per-dimension scores the first pair of ``data.pairs`` carries for both songs (json
    ``scores.chosen`` / ``scores.rejected``), without the score it was ranked by (json ``dimension``)
    and ``overall``; empty for pairs labelled only by which song is preferred."""
    root = Path(str(cfg.data.pairs))
    try:
        shards = resolve_shards(str(root / "train") if (root / "train").is_dir() else str(root))
    except (ShardError, FileNotFoundError, ValueError) as e:
        raise UsageError(f"data.pairs={root}: {e}") from None
    for sh in shards:
        for raw in iter_raw(sh):
            try:
                meta = json.loads(raw.get("json", b"{}"))
            except ValueError:
                raise UsageError(f"data.pairs: {sh}: record {raw.get('__key__')} has unreadable json") from None
            sc = meta.get("scores") or {}
            ch, rj = sc.get("chosen") or {}, sc.get("rejected") or {}
            ranked_by = meta.get("dimension")
            return tuple(k for k in ch if k in rj and k not in ("overall", ranked_by))
    raise UsageError(f"data.pairs={root}: the shards hold no pair")


def reward_dimensions(plan: Plan) -> tuple[str, ...]:
    """``reward.dimensions``, or (null) those of the data: the toy world's four, or the scores of the
    first song of ``data.train``; requested names the data lacks are a usage error naming the setting."""
    cfg, asked = plan.cfg, plan.settings.dimensions
    if cfg.data.get("pairs"):
        have = pair_dimensions(cfg)
    elif cfg.data.train is None:
        have = DIMENSIONS
    else:
        try:
            have = data_dimensions(shard_setting(cfg, "train"), int(plan.model_config.lm.code_size))
        except (ShardError, FileNotFoundError) as e:
            if asked is None:
                raise UsageError(f"reward.dimensions=null takes the dimensions from data.train: {e}") from None
            return asked
    if asked is None:
        return tuple(have)
    missing = [d for d in asked if d not in have]
    if missing:
        raise UsageError(f"reward.dimensions={list(asked)}: the data's scores have no {missing} (they hold "
                         f"{list(have)}); set reward.dimensions to a subset of those (or null)")
    return asked


def toy_reward_data(plan: Plan) -> DataSpec:
    """The toy reward data of ``data.toy_reward``, sampled from model.init (built once, cached)."""
    cfg = plan.cfg
    tr = OmegaConf.to_container(cfg.data.toy_reward, resolve=True)
    try:
        spec = ToyRewardSpec(**tr)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise UsageError(f"data.toy_reward: {e}") from None
    try:
        root = ensure_toy_reward_data(toy_cache_root(cfg), spec, model=plan.init, fingerprint=str(plan.init_fp),
                                      world_seed=int(cfg.data.toy.seed))
    except ValueError as e:
        raise UsageError(f"data.toy_reward: {e}") from None
    done = json.loads((root / "done.json").read_text())
    print(f"levo-train: toy reward data: {done['train']['songs']} train / {done.get('val', {}).get('songs', 0)} val "
          f"songs in {root}", file=sys.stderr)
    return DataSpec(str(root / "train"), str(root / "val") if (root / "val").is_dir() else None, True)


class RewardMethod(Method):
    name = "reward"
    Settings = RewardSettings
    data_hint = "data.train=... (songs whose json holds scores) or data.pairs=..."
    needs_init = ("recipe=reward needs model.init=PATH: the SFT (or released) export whose trunk the reward model "
                  "starts from (and, on the toy world, samples its training songs), e.g. `levo-train recipe=sft "
                  "run_dir=A` then `levo-train recipe=reward model.init=A/export`")
    supports_lora = False
    supports_sharding = True
    #: the score head is registered as its own FSDP2 unit; under ZeRO it would need DeepSpeed's own
    #: registration of a module outside the trunk, which nothing here tests: refused rather than untested
    supports_deepspeed = False

    def uses_toy(self, plan: Plan) -> bool:
        return plan.cfg.data.train is None and not plan.cfg.data.get("pairs")

    def resolve_data(self, plan: Plan) -> DataSpec:
        """Scored song shards, preference-pair shards (Bradley-Terry) or the toy reward data, with the
        dimensions resolved against them (and recorded in the config train_config.yaml saves)."""
        cfg = plan.cfg
        if cfg.data.get("pairs") and cfg.data.train is not None:
            raise UsageError("recipe=reward trains on scored songs (data.train) or on preference pairs (data.pairs), "
                             "not both in one run: train on one, then continue from its export with the other")
        dims = reward_dimensions(plan)
        cfg.reward.dimensions = list(dims)
        if cfg.data.get("pairs"):
            data = given_pairs(cfg)
        elif cfg.data.train is not None:
            data = DataSpec(shard_setting(cfg, "train"), shard_setting(cfg, "val"), False)
        else:
            data = toy_reward_data(plan)
        return DataSpec(data.train, data.val, data.toy, dims)

    def build_module(self, plan: Plan, common: dict[str, Any]) -> Any:
        s = plan.settings
        assert plan.data is not None and plan.data.dimensions is not None
        try:
            return RewardModule(plan.model_config, dimensions=plan.data.dimensions, pooling=s.pooling, layers=s.layers,
                                layers_sub=s.layers_sub, loss=s.loss, rank_loss=s.rank_loss,
                                rank_weight=s.rank_weight, rank_margin=s.rank_margin, **common)
        except ValueError as e:
            raise UsageError(str(e) if str(e).startswith("reward.") else f"reward: {e}") from e

    def after_init(self, module: Any, plan: Plan) -> None:
        try:
            module.truncate()
        except ValueError as e:
            raise UsageError(str(e)) from e

    def build_datamodule(self, plan: Plan, common: dict[str, Any]) -> Any:
        if plan.cfg.data.get("pairs"):
            return PairDataModule(**common)
        assert plan.data is not None and plan.data.dimensions is not None
        return RewardDataModule(**common, dimensions=plan.data.dimensions, max_frames=plan.cfg.data.max_frames,
                                crop="start", score_range=plan.settings.score_range)

    def export(self, module: Any, folder: Path, dtype: Any = None) -> None:
        """The reward model's export folder (:func:`levo_train.reward.model.save_reward_model`)."""
        save_reward_model(module.reward_model(), folder, {"source": getattr(module, "init_fingerprint", None)}, dtype)

    def export_checkpoint(self, path: Path, folder: Path, dtype: Any = None) -> Path:
        """The reward export folder written from a reward checkpoint of any strategy, tensor by tensor
        (a DCP folder never has the whole model in memory): the same files :meth:`export` writes."""
        return export_reward_checkpoint(path, folder, dtype)


def export_reward_checkpoint(path: str | Path, folder: str | Path, dtype: Any = None) -> Path:
    """:meth:`RewardMethod.export_checkpoint`: ``config.yaml``, ``reward.pt``, ``reward.json`` and
    ``checksums.json`` from the trunk (``model.*``) and head (``head.*``) weights of a checkpoint whose
    ``levo.reward`` section names the outputs, the pooling and the truncated trunk's config."""
    w = CheckpointWeights(path, ("model.", "head."))
    r = w.levo.get("reward")
    if not isinstance(r, dict) or not {"dimensions", "pooling", "model_config"} <= set(r):
        raise ExportError(f"{path}: not a reward-model checkpoint of this levo-train (no levo.reward section with "
                          "dimensions, pooling and model_config)")
    config = config_from_omegaconf(OmegaConf.create(r["model_config"]), where=f"{path} levo.reward.model_config")
    with torch.device("meta"):
        want = {k: (tuple(v.shape), v.dtype) for k, v in
                RewardModel(config, r["dimensions"], pooling=r["pooling"]).state_dict().items()}
    name = {k: "model." + k[len("lm."):] if k.startswith("lm.") else k for k in want}  # RewardModel -> module names
    have = w.entries
    missing = [k for k in want if name[k] not in have]
    unexpected = sorted(set(have) - set(name.values()))
    bad = [k for k in want if name[k] in have and have[name[k]][0] != want[k][0]]
    if missing or unexpected or bad:
        raise ExportError(f"{path}: its weights do not match its reward model: missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}, other shapes {bad[:4]}")
    return write_reward_export(folder, config, r["dimensions"], r["pooling"], {"source": w.levo.get("init_fingerprint")},
                               want, lambda k: w.get(name[k]).to(want[k][1]), dtype)


__all__ = ["RewardMethod", "RewardSettings", "export_reward_checkpoint", "pair_dimensions", "reward_dimensions", "toy_reward_data"]
