"""Training methods of ``levo-train``: name -> how to build its module, data and resume checks.

A recipe names its method (``method: lm`` in ``recipes/sft.yaml``); :func:`levo_train.cli.run`
looks it up here and never branches on the name. Adding a method means writing its module and
data in their own files and registering one :class:`Method` below (the way
``data_tools/levo_data/cli.py`` registers its commands).

Every hook gets the composed config; ``init_fp`` is the content fingerprint of ``model.init``
(``None`` without one), computed once per run.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from levo_train.cli import ResumePoint, UsageError, check_init_path, toy_cache_root

log = logging.getLogger("levo_train")

#: (train, val, is_toy): the data locations a method trains on
DataSpec = tuple[Any, Any, bool]


@dataclass(frozen=True)
class Method:
    """One training method.

    * ``build_module(cfg, model_config, common_kwargs, init_fp)``: the Lightning module, before the
      init weights are loaded (``common_kwargs``: optimiser, schedule, freezing, seed).
    * ``after_init(module, cfg)``: called once the init weights are in (e.g. freeze a reference).
    * ``resolve_data(cfg, init_fp)``: where it trains (building toy data when none is given).
    * ``build_datamodule(cfg, train, val, code_size, init_fp, common)``: the datamodule;
      ``common`` holds the loader keywords every datamodule takes.
    * ``uses_toy(cfg)``: whether the run will build toy data (the toy world needs a 64-code model);
      ``data_hint`` names the setting that gives real data instead.
    * ``needs_init``: the error when ``model.init`` is required and missing (``None``: optional).
    * ``check_resume(rp, cfg, init_fp)``: refuse a checkpoint this run cannot continue.
    * ``export(module, folder, dtype)``: write ``run_dir/export`` (default: the policy in the released
      folder layout, :func:`export_policy`).
    * ``supports_lora``: whether ``train.lora.r > 0`` may wrap its model (:mod:`levo_train.lora`).
    * ``supports_sharding``: whether it trains under a sharding strategy (``fsdp2``, DeepSpeed ZeRO);
      semi-online DPO is not yet (its generation rounds would have to gather the sharded policy).
    """

    name: str
    build_module: Callable[[DictConfig, Any, dict[str, Any], str | None], Any]
    resolve_data: Callable[[DictConfig, str | None], DataSpec]
    build_datamodule: Callable[[DictConfig, Any, Any, int, str | None, dict[str, Any]], Any]
    uses_toy: Callable[[DictConfig], bool]
    data_hint: str
    needs_init: str | None = None
    after_init: Callable[[Any, DictConfig], None] | None = None
    check_resume: Callable[[ResumePoint, DictConfig, str | None], None] | None = None
    export: Callable[[Any, Path, Any], None] | None = None
    supports_lora: bool = True
    supports_sharding: bool = False


def export_policy(module: Any, folder: Path, dtype: Any = None) -> None:
    """The trained LeLM in the released folder layout (``model.pt`` + ``config.yaml``); with LoRA
    adapters, the merged weights there and the adapters alone in ``folder/adapters/``."""
    from levo_infer.checkpoint import save_released
    from levo_train.lora import ADAPTER_DIR, has_lora, merged_copy, save_adapters

    if has_lora(module.model):
        save_released(merged_copy(module.model), str(folder), dtype=dtype)
        save_adapters(module.model, folder / ADAPTER_DIR, module.lora,
                      base_fingerprint=getattr(module, "init_fingerprint", None))
        return
    save_released(module.model, str(folder), dtype=dtype)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; a usage error naming the known ones otherwise."""
    if name not in METHODS:
        raise UsageError(f"method={name!r} is not a training method; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def stream_weights(cfg: DictConfig) -> list[float] | None:
    return list(cfg.train.stream_weights) if cfg.train.stream_weights is not None else None


# ----------------------------------------------------------------------------- lm (pretrain / SFT)
def shard_setting(cfg: DictConfig, name: str) -> str | list[str] | None:
    """``data.<name>`` as the shard reader takes it: ``None``, one location (a folder, a tar, a glob or a
    brace pattern) or a list of them (``data.train=[A,B]``); every location must name at least one shard
    (a usage error naming the setting otherwise)."""
    from levo_train.data.shards import ShardError, resolve_shards

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


def given_songs(cfg: DictConfig) -> DataSpec:
    """(train, val, False): the song shards named by ``data.train`` / ``data.val``."""
    return shard_setting(cfg, "train"), shard_setting(cfg, "val"), False


def resolve_songs(cfg: DictConfig, init_fp: str | None = None) -> DataSpec:
    """(train, val, is_toy): song shard locations, building the toy world when none are given."""
    if cfg.data.train is not None:
        return given_songs(cfg)
    from levo_train.toy.world import ensure_toy_dataset

    t = cfg.data.toy
    root = ensure_toy_dataset(toy_cache_root(cfg), seed=int(t.seed), n_train=int(t.n_train), n_val=int(t.n_val))
    return str(root / "train"), str(root / "val"), True


def _lm_module(cfg: DictConfig, model_config: Any, kw: dict[str, Any], init_fp: str | None) -> Any:
    from levo_train.train.lm import LMModule

    return LMModule(model_config, condition_dropout=bool(cfg.train.condition_dropout), **kw)


def song_datamodule(cfg: DictConfig, train: Any, val: Any, code_size: int, init_fp: str | None,
                    common: dict[str, Any]) -> Any:
    from levo_train.data.datamodule import SongDataModule

    return SongDataModule(**common, max_frames=cfg.data.max_frames)


register(Method("lm", build_module=_lm_module, resolve_data=resolve_songs, build_datamodule=song_datamodule,
                uses_toy=lambda cfg: cfg.data.train is None, data_hint="data.train=...", supports_sharding=True))


# ----------------------------------------------------------------------------- dpo (offline)
def dpo_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The DPO loss and reference settings (``dpo.*``) as :class:`~levo_train.train.dpo.DPOModule` keywords."""
    d = cfg.dpo
    return {"beta": float(d.beta), "loss_type": d.loss_type if isinstance(d.loss_type, str) else list(d.loss_type),
            "loss_weights": list(d.loss_weights) if d.loss_weights is not None else None,
            "label_smoothing": float(d.label_smoothing), "reference": str(d.reference)}


def _dpo_module(cfg: DictConfig, model_config: Any, kw: dict[str, Any], init_fp: str | None) -> Any:
    from levo_train.train.dpo import DPOModule

    try:
        return DPOModule(model_config, **dpo_kwargs(cfg), **kw)
    except ValueError as e:  # unknown loss_type / reference, bad beta or weights
        raise UsageError(f"dpo: {e}") from e


def _freeze_reference(module: Any, cfg: DictConfig) -> None:
    module.freeze_reference()


def pair_datamodule(cfg: DictConfig, train: Any, val: Any, code_size: int, init_fp: str | None,
                    common: dict[str, Any]) -> Any:
    from levo_train.data.pairs import PairDataModule

    precomputed = str(cfg.dpo.reference) == "precomputed"
    return PairDataModule(**common, use_ref_logps=precomputed, ref_fingerprint=init_fp if precomputed else None,
                          ref_stream_weights=stream_weights(cfg))


def check_reference_init(rp: ResumePoint, cfg: DictConfig, init_fp: str | None) -> None:
    """A resume rebuilds a frozen reference from ``model.init``: it must be the init the run started from."""
    fp_then = rp.levo.get("init_fingerprint")
    if str(cfg.dpo.reference) != "model" or not fp_then or not init_fp:
        return
    if len(str(fp_then)) != len(init_fp):
        log.warning("%s records its init's fingerprint in an older format: the DPO reference cannot be checked "
                    "against model.init", rp.path)
    elif fp_then != init_fp:
        raise UsageError(f"{rp.path}: the run started from a model.init with fingerprint {fp_then}, this one is "
                         f"{init_fp} ({cfg.model.init}); the frozen DPO reference is rebuilt from model.init on "
                         "resume, so pass the original init (or use a new run_dir)")


def resolve_pairs(cfg: DictConfig, init_fp: str | None = None) -> DataSpec:
    """(train, val, is_toy) pair shard folders; toy-world pairs when ``data.pairs`` is unset."""
    if cfg.data.get("pairs"):
        root = Path(str(cfg.data.pairs))
        if not root.exists():
            raise UsageError(f"data.pairs={root}: no such folder")
        if (root / "train").is_dir():
            return str(root / "train"), str(root / "val") if (root / "val").is_dir() else None, False
        return str(root), str(cfg.data.pairs_val) if cfg.data.get("pairs_val") else None, False
    from levo_train.toy.pairs import ToyPairSpec, ensure_toy_pairs

    tp = OmegaConf.to_container(cfg.data.toy_pairs, resolve=True)
    try:
        spec = ToyPairSpec(**tp)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise UsageError(f"data.toy_pairs: {e}") from None
    init = check_init_path(str(cfg.model.init)) if spec.source == "model" else None
    try:
        root = ensure_toy_pairs(toy_cache_root(cfg), spec, world_seed=int(cfg.data.toy.seed), model=init,
                                fingerprint=init_fp)
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
    if str(cfg.dpo.reference) == "precomputed":  # toy pairs are ours to annotate: compute them once
        from levo_train.train.ref_logps import ensure_ref_logps

        init_dir = check_init_path(str(cfg.model.init))
        for f in ensure_ref_logps(folders, init_dir, stream_weights=stream_weights(cfg), fingerprint=init_fp):
            print(f"levo-train: computed reference log-probs of {f} under {init_dir}", file=sys.stderr)
    return str(folders[0]), str(folders[1]) if n_val > 0 else None, True


register(Method("dpo", build_module=_dpo_module, resolve_data=resolve_pairs, build_datamodule=pair_datamodule,
                uses_toy=lambda cfg: not cfg.data.get("pairs"), data_hint="data.pairs=...",
                needs_init="recipe=dpo needs model.init=PATH: the SFT export to start from (and the frozen "
                           "reference), e.g. `levo-train recipe=sft run_dir=A` then `levo-train recipe=dpo "
                           "model.init=A/export`",
                after_init=_freeze_reference, check_resume=check_reference_init, supports_sharding=True))


# ----------------------------------------------------------------------------- reward (aesthetic RM)
def reward_dimensions(cfg: DictConfig) -> tuple[str, ...]:
    """``reward.dimensions``, or (null) those of the data: the toy world's four, or the scores of the
    first song of ``data.train``; requested names the data lacks are a usage error naming the setting."""
    from levo_train.data.shards import ShardError
    from levo_train.reward.data import data_dimensions
    from levo_train.toy.world import DIMENSIONS

    asked = cfg.reward.get("dimensions")
    if cfg.data.get("pairs"):
        have = pair_dimensions(cfg)
    elif cfg.data.train is None:
        have = DIMENSIONS
    else:
        try:
            have = data_dimensions(shard_setting(cfg, "train"), int(build_code_size(cfg)))
        except (ShardError, FileNotFoundError) as e:
            if asked is None:
                raise UsageError(f"reward.dimensions=null takes the dimensions from data.train: {e}") from None
            return tuple(str(d) for d in asked)
    if asked is None:
        return tuple(have)
    dims = tuple(str(d) for d in asked)
    missing = [d for d in dims if d not in have]
    if missing:
        raise UsageError(f"reward.dimensions={list(dims)}: the data's scores have no {missing} (they hold "
                         f"{list(have)}); set reward.dimensions to a subset of those (or null)")
    return dims


def pair_dimensions(cfg: DictConfig) -> tuple[str, ...]:
    """The per-dimension scores the first pair of ``data.pairs`` carries for both songs (json
    ``scores.chosen`` / ``scores.rejected``), without the score it was ranked by (json ``dimension``)
    and ``overall``; empty for pairs labelled only by which song is preferred."""
    from levo_train.data.shards import ShardError, iter_raw, resolve_shards

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


def build_code_size(cfg: DictConfig) -> int:
    from levo_train.cli import build_model_config

    return int(build_model_config(cfg).lm.code_size)


def _reward_module(cfg: DictConfig, model_config: Any, kw: dict[str, Any], init_fp: str | None) -> Any:
    from levo_train.train.reward import RewardModule

    r = cfg.reward
    try:
        return RewardModule(model_config, dimensions=tuple(r.dimensions), pooling=str(r.pooling),
                            layers=None if r.layers is None else int(r.layers),
                            layers_sub=None if r.layers_sub is None else int(r.layers_sub), loss=str(r.loss),
                            rank_loss=str(r.rank_loss), rank_weight=float(r.rank_weight),
                            rank_margin=float(r.rank_margin), **kw)
    except ValueError as e:
        raise UsageError(str(e) if str(e).startswith("reward.") else f"reward: {e}") from e


def _truncate_trunk(module: Any, cfg: DictConfig) -> None:
    try:
        module.truncate()
    except ValueError as e:
        raise UsageError(str(e)) from e


def resolve_reward_data(cfg: DictConfig, init_fp: str | None = None) -> DataSpec:
    """(train, val, is_toy): scored song shards, preference-pair shards (``data.pairs``: Bradley-Terry),
    or the toy reward data built from ``model.init``."""
    if cfg.data.get("pairs") and cfg.data.train is not None:
        raise UsageError("recipe=reward trains on scored songs (data.train) or on preference pairs (data.pairs), "
                         "not both in one run: train on one, then continue from its export with the other")
    # resolved (and checked against the data) once; the module and the datamodule read it from here
    cfg.reward.dimensions = list(reward_dimensions(cfg))
    if cfg.data.get("pairs"):
        return resolve_pairs(cfg, init_fp)
    if cfg.data.train is not None:
        return given_songs(cfg)
    from levo_train.reward.data import ToyRewardSpec, ensure_toy_reward_data

    tr = OmegaConf.to_container(cfg.data.toy_reward, resolve=True)
    try:
        spec = ToyRewardSpec(**tr)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise UsageError(f"data.toy_reward: {e}") from None
    init = check_init_path(str(cfg.model.init))
    try:
        root = ensure_toy_reward_data(toy_cache_root(cfg), spec, model=init, fingerprint=str(init_fp),
                                      world_seed=int(cfg.data.toy.seed))
    except ValueError as e:
        raise UsageError(f"data.toy_reward: {e}") from None
    done = json.loads((root / "done.json").read_text())
    print(f"levo-train: toy reward data: {done['train']['songs']} train / {done.get('val', {}).get('songs', 0)} val "
          f"songs in {root}", file=sys.stderr)
    return str(root / "train"), str(root / "val") if (root / "val").is_dir() else None, True


def reward_datamodule(cfg: DictConfig, train: Any, val: Any, code_size: int, init_fp: str | None,
                      common: dict[str, Any]) -> Any:
    if cfg.data.get("pairs"):
        from levo_train.data.pairs import PairDataModule

        return PairDataModule(**common)
    from levo_train.reward.data import RewardDataModule

    return RewardDataModule(**common, dimensions=tuple(cfg.reward.dimensions), max_frames=cfg.data.max_frames,
                            crop="start")


def export_reward(module: Any, folder: Path, dtype: Any = None) -> None:
    """The reward model's export folder (:func:`levo_train.reward.model.save_reward_model`)."""
    from levo_train.reward.model import save_reward_model

    save_reward_model(module.reward_model(), folder, {"source": getattr(module, "init_fingerprint", None)}, dtype)


register(Method("reward", build_module=_reward_module, resolve_data=resolve_reward_data,
                build_datamodule=reward_datamodule,
                uses_toy=lambda cfg: cfg.data.train is None and not cfg.data.get("pairs"),
                data_hint="data.train=... (songs whose json holds scores) or data.pairs=...",
                needs_init="recipe=reward needs model.init=PATH: the SFT (or released) export whose trunk the reward "
                           "model starts from (and, on the toy world, samples its training songs), e.g. "
                           "`levo-train recipe=sft run_dir=A` then `levo-train recipe=reward model.init=A/export`",
                after_init=_truncate_trunk, export=export_reward, supports_lora=False))


# ----------------------------------------------------------------------------- sdpo (semi-online)
def sdpo_prompts(cfg: DictConfig, model: Any = None) -> list[Any]:
    """The prompt pool: ``sdpo.prompts`` (song/pair shards or a released-format JSONL, formatted for
    ``model`` as levo-infer does), else the toy training prompts of ``data.toy_pairs`` (the pool, seed
    and tiers of ``recipe=dpo``'s toy pairs)."""
    src = cfg.sdpo.get("prompts")
    if src:
        from levo_train.prompts import read_prompts

        paths = [str(x) for x in src] if isinstance(src, (list, tuple)) or OmegaConf.is_list(src) else [str(src)]
        try:
            return read_prompts(paths, model, setting="sdpo.prompts")
        except (OSError, ValueError) as e:
            raise UsageError(str(e) if "sdpo.prompts" in str(e) else f"sdpo.prompts={src}: {e}") from None
    from levo_train.toy.pairs import ToyPairSpec, split_seeds, toy_prompts
    from levo_train.toy.world import ToyWorld

    tp = OmegaConf.to_container(cfg.data.toy_pairs, resolve=True)
    spec = ToyPairSpec(**{**tp, "source": "model", "scorer": "toy"})  # type: ignore[arg-type]
    world_seed = int(cfg.data.toy.seed)
    return toy_prompts(ToyWorld(world_seed), spec.n_train, seed=split_seeds(spec, world_seed)["train"], tier=spec.tier)


def sdpo_scorers(cfg: DictConfig, model_config: Any) -> tuple[Any, Any]:
    """(scorer, oracle) of a semi-online run, checked against the policy: ``reward.ckpt`` (a reward
    model export) or ``reward.scorer`` (a spec); the oracle is the toy world's hidden quality on toy
    runs (``sdpo.oracle=auto``)."""
    from levo_train.scorers import load_scorer

    r = cfg.reward
    device = str(r.device) if r.get("device") else "cpu"
    if r.get("ckpt") and r.get("scorer"):
        raise UsageError("give reward.ckpt=EXPORT (a reward model) or reward.scorer=SPEC, not both")
    if r.get("ckpt"):
        setting, spec = "reward.ckpt", f"rm:{r.ckpt}"
    elif r.get("scorer"):
        setting, spec = "reward.scorer", str(r.scorer)
    else:
        raise UsageError("recipe=sdpo needs a reward: reward.ckpt=RM_RUN/export (a `levo-train recipe=reward` "
                         "export) or reward.scorer=toy (the toy world's hidden quality) / another scorer spec")
    try:
        scorer = load_scorer(spec, device=device, world_seed=int(cfg.data.toy.seed), setting=setting)
    except (OSError, ValueError) as e:
        raise UsageError(str(e) if setting in str(e) else f"{setting}: {e}") from None
    rm_cfg = getattr(scorer, "model_config", None)
    if rm_cfg is not None:  # a reward model reads the policy's tokens: same codebooks and sizes
        for name in ("code_size", "code_depth"):
            have, want = getattr(rm_cfg.lm, name), getattr(model_config.lm, name)
            if have != want:
                raise UsageError(f"{setting}={r.ckpt or r.scorer}: the reward model reads {name}={have}, the policy "
                                 f"(model.init) writes {name}={want}; train a reward model on this policy's tokens")
        if list(rm_cfg.delays) != list(model_config.delays):
            raise UsageError(f"{setting}: the reward model's delay pattern {list(rm_cfg.delays)} differs from the "
                             f"policy's {list(model_config.delays)}")
    want = r.get("dimensions")
    if want:
        missing = [d for d in want if d not in scorer.dimensions]
        if missing:
            raise UsageError(f"reward.dimensions={list(want)}: {setting}={r.ckpt or r.scorer} scores "
                             f"{list(scorer.dimensions)} (no {missing})")
    if r.get("key"):
        key = str(r.key)
        if key != scorer.overall and key not in scorer.dimensions:
            raise UsageError(f"reward.key={key}: {scorer.name} scores {[scorer.overall, *scorer.dimensions]}")
        from levo_train.scorers import WeightedScorer

        scorer = WeightedScorer({key: 1.0}, scorer=scorer, name=f"{scorer.name}[{key}]")
    oracle = None
    toy = not cfg.sdpo.get("prompts")
    if str(cfg.sdpo.get("oracle", "auto")) == "auto" and toy:
        from levo_train.toy.scorer import ToyOracleScorer

        oracle = ToyOracleScorer(int(cfg.data.toy.seed))
    return scorer, oracle


def _sdpo_module(cfg: DictConfig, model_config: Any, kw: dict[str, Any], init_fp: str | None) -> Any:
    from levo_train.cli import resolve_run_dir
    from levo_train.rollout import Sampling
    from levo_train.train.sdpo import SemiOnlineDPOModule

    s = cfg.sdpo
    scorer, oracle = sdpo_scorers(cfg, model_config)
    sampling = Sampling(temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
                        cfg_coef=None if s.cfg_coef is None else float(s.cfg_coef), max_frames=int(s.max_frames),
                        batch_size=int(s.gen_batch_size))
    try:
        return SemiOnlineDPOModule(
            model_config, prompts=None, scorer=scorer, oracle=oracle, sync_every=int(s.sync_every),
            per_prompt=int(s.per_prompt), prompts_per_round=int(s.prompts_per_round), min_margin=float(s.min_margin),
            buffer_rounds=int(s.buffer_rounds), ref_sync_every=int(s.ref_sync_every), sampling=sampling,
            batch_size=int(cfg.data.batch_size), out_dir=str(resolve_run_dir(cfg) / "sdpo"),
            save_candidates=bool(s.save_candidates), scorer_follows_policy=not cfg.reward.get("device"),
            **dpo_kwargs(cfg), **kw)
    except ValueError as e:
        raise UsageError(str(e) if str(e).startswith("sdpo.") else f"sdpo: {e}") from e


def _sdpo_after_init(module: Any, cfg: DictConfig) -> None:
    """Freeze the reference, then read the prompt pool (released JSONL prompts are formatted for the model)."""
    try:
        module.freeze_reference()
        module.set_prompts(sdpo_prompts(cfg, module.model))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _sdpo_data(cfg: DictConfig, init_fp: str | None) -> DataSpec:
    return (str(cfg.sdpo.prompts) if cfg.sdpo.get("prompts") else "toy prompts"), None, not cfg.sdpo.get("prompts")


def _round_datamodule(cfg: DictConfig, train: Any, val: Any, code_size: int, init_fp: str | None,
                      common: dict[str, Any]) -> Any:
    from levo_train.train.sdpo import RoundDataModule

    return RoundDataModule()


register(Method("sdpo", build_module=_sdpo_module, resolve_data=_sdpo_data, build_datamodule=_round_datamodule,
                uses_toy=lambda cfg: not cfg.sdpo.get("prompts"), data_hint="sdpo.prompts=...",
                needs_init="recipe=sdpo needs model.init=PATH: the SFT or DPO export to start from (and the "
                           "reference), e.g. `levo-train recipe=sdpo model.init=A/export reward.ckpt=R/export`",
                after_init=_sdpo_after_init, check_resume=check_reference_init))


__all__ = ["METHODS", "DataSpec", "Method", "dpo_kwargs", "export_policy", "get_method", "given_songs",
           "pair_datamodule", "register", "resolve_pairs", "resolve_songs", "shard_setting", "song_datamodule",
           "stream_weights"]
