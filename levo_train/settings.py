"""What every part of a ``levo-train`` run reads from the composed config: the usage error, where
the run writes, ``model.init`` and the model config.

:class:`UsageError` is the one user-facing error type of levo_train: a setting that cannot be used,
worded for the user (which key, what was expected). Library code raises it; ``levo-train`` prints it
without a traceback and exits with status 2.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from levo_infer.checkpoint import CheckpointError, find_weights, verify_model_files
from levo_infer.config import ModelConfig, load_config, make_config


class UsageError(ValueError):
    """A setting that cannot be used; ``msg`` is the whole message (``levo-train`` exits with 2)."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


# ----------------------------------------------------------------------------- override keys
#: top-level nodes whose keys are passed on rather than read by levo-train (Lightning Trainer arguments)
OPEN_NODES = ("trainer",)


def config_paths(cfg: Any, prefix: str = "") -> list[str]:
    """Every key path of a config (``optim``, ``optim.lr``, ...), interpolations left unresolved."""
    node = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    out = []
    for k, v in (node.items() if isinstance(node, dict) else ()):
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(v, dict):
            out.extend(config_paths(v, path + "."))
    return out


def check_override_keys(overrides: Sequence[str], base: DictConfig) -> None:
    """:class:`UsageError` for an override ``key=value`` (``+key=value``, ``++key=value`` too) whose
    key the config composed without it lacks, naming the nearest real key: hydra suggests ``+key``
    for a misspelt ``optim.lrr=1e-4``, which then adds a key nothing reads and trains at the default
    LR. Keys under :data:`OPEN_NODES` (Lightning Trainer arguments) pass; so do keys inside a value
    that is not a mapping (hydra checks those)."""
    paths = config_paths(base)
    for o in overrides:
        key, sep, _ = o.partition("=")
        if not sep or key.startswith("~"):
            continue
        key = key.lstrip("+")
        parts = key.split(".")
        if parts[0] in OPEN_NODES:
            continue
        node: Any = base
        for depth, part in enumerate(parts):
            if not isinstance(node, DictConfig):
                break
            if part not in node:
                where = ".".join(parts[:depth])
                near = difflib.get_close_matches(key, paths, n=1, cutoff=0.6)
                siblings = [p for p in paths if p.rpartition(".")[0] == where]
                hint = (f"did you mean {near[0]}?" if near else
                        f"{where or 'the top level'} holds {', '.join(s.rpartition('.')[2] for s in siblings)}")
                raise UsageError(f"unknown setting {key!r} in {o!r}: {hint} (levo-train --help lists the main "
                                 "settings; levo-train recipe=NAME --cfg shows them all)")
            node = node[part] if not OmegaConf.is_missing(node, part) else None


# ----------------------------------------------------------------------------- typed values
def on_cuda(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` resolves to a CUDA GPU here."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def typed(node: Any, key: str, cast: Callable[[Any], Any], expected: str, where: str) -> Any:
    """``node[key]`` converted by ``cast`` (``None`` stays ``None``); a :class:`UsageError` naming
    ``where.key``, the value and ``expected`` when it does not convert."""
    value = node.get(key) if node is not None else None
    if value is None:
        return None
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}.{key}={value}: expected {expected}") from None


def to_float(value: Any) -> float:
    """A number (not a bool) as a float."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a number")
    return float(value)


def to_int(value: Any) -> int:
    """A whole number (not a bool, not 2.5) as an int."""
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(f"{value!r} is not a whole number")
    return int(float(value))


def to_bool(value: Any) -> bool:
    """``true`` / ``false`` (hydra parses them into bools)."""
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not true or false")
    return value


def to_strings(value: Any) -> tuple[str, ...]:
    """One string or a list of them, as a tuple."""
    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    if isinstance(value, (dict, DictConfig)):
        raise TypeError("a mapping is not a list of names")
    return (str(value),)


def to_floats(value: Any) -> tuple[float, ...]:
    """A list of numbers, as a tuple of floats."""
    if not (OmegaConf.is_list(value) or isinstance(value, (list, tuple))):
        raise TypeError("not a list")
    return tuple(to_float(v) for v in value)


# ----------------------------------------------------------------------------- paths
def resolve_run_dir(cfg: DictConfig) -> Path:
    """``run_dir``, or ``$LEVO_RUNS`` (default ``runs``) ``/<recipe>-<time>``."""
    if cfg.run_dir:
        return Path(str(cfg.run_dir))
    root = Path(os.environ.get("LEVO_RUNS", "runs"))
    return root / f"{cfg.recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def toy_cache_root(cfg: DictConfig) -> Path:
    """Where toy data is built and cached: ``data.toy.cache_dir``, else the user cache."""
    if cfg.data.toy.get("cache_dir"):
        return Path(str(cfg.data.toy.cache_dir))
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "levo-train" / "toy"


def check_init_path(init: str) -> Path:
    """The ``model.init`` folder, checked: it holds ``config.yaml`` + weights whose bytes pass their
    checksums (a corrupted export is refused before its config is read, not half-used)."""
    p = Path(init)
    if not p.exists():
        raise UsageError(f"model.init={init}: path does not exist (expected a released model folder or a "
                         "levo-train export folder holding config.yaml + model.pt, e.g. RUN_DIR/export)")
    if p.is_file():
        p = p.parent
    missing = [n for n in ("config.yaml",) if not (p / n).is_file()]
    if missing or not any((p / n).is_file() for n in ("model.pt", "model.safetensors")):
        raise UsageError(f"model.init={init}: folder lacks {missing or ['model.pt']} (expected config.yaml + model.pt)")
    try:
        verify_model_files(p, find_weights(p))
    except CheckpointError as e:
        raise UsageError(f"model.init={init}: {e}") from None
    return p


# ----------------------------------------------------------------------------- model
def build_model_config(cfg: DictConfig, init: Path | None = None) -> ModelConfig:
    """The run's model config: ``model.init``'s ``config.yaml`` (``init``: that folder, checked
    already), else ``model.config_file``, else ``model.config``."""
    strict = bool(cfg.model.get("strict", False))
    if cfg.model.get("init"):
        return load_config(init if init is not None else check_init_path(str(cfg.model.init)), strict=strict)
    if cfg.model.get("config_file"):
        return load_config(str(cfg.model.config_file), strict=strict)
    return make_config(**OmegaConf.to_container(cfg.model.config, resolve=True))


__all__ = ["UsageError", "build_model_config", "check_init_path", "resolve_run_dir", "to_bool", "to_float",
           "to_floats", "to_int", "to_strings", "toy_cache_root", "typed"]
