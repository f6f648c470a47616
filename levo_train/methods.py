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


def export_policy(module: Any, folder: Path, dtype: Any = None) -> None:
    """The trained LeLM in the released folder layout (``model.pt`` + ``config.yaml``)."""
    from levo_infer.checkpoint import save_released

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
def resolve_songs(cfg: DictConfig, init_fp: str | None = None) -> DataSpec:
    """(train, val, is_toy): song shard locations, building the toy world when none are given."""
    if cfg.data.train is not None:
        return OmegaConf.to_object(cfg.data.train), OmegaConf.to_object(cfg.data.val) if cfg.data.val else None, False
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
                uses_toy=lambda cfg: cfg.data.train is None, data_hint="data.train=..."))


# ----------------------------------------------------------------------------- dpo (offline)
def _dpo_module(cfg: DictConfig, model_config: Any, kw: dict[str, Any], init_fp: str | None) -> Any:
    from levo_train.train.dpo import DPOModule

    d = cfg.dpo
    lt = d.loss_type if isinstance(d.loss_type, str) else list(d.loss_type)
    try:
        return DPOModule(model_config, beta=float(d.beta), loss_type=lt,
                         loss_weights=list(d.loss_weights) if d.loss_weights is not None else None,
                         label_smoothing=float(d.label_smoothing), reference=str(d.reference), **kw)
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
                after_init=_freeze_reference, check_resume=check_reference_init))


__all__ = ["METHODS", "DataSpec", "Method", "export_policy", "get_method", "pair_datamodule", "register", "resolve_pairs",
           "resolve_songs", "song_datamodule", "stream_weights"]
