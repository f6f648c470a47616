"""Training methods of ``levo-train``: name -> :class:`Method` (its settings, module, data, resume checks).

A recipe names its method (``method: lm`` in ``recipes/sft.yaml``); :mod:`levo_train.run` looks it
up here and never branches on the name. Adding a method means writing its module and data in their
own files, one file here with its :class:`Method` subclass and typed settings, and one line in
:data:`METHODS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from levo_train.export import read_checkpoint
from levo_train.settings import UsageError

from .base import DataSpec, Method, Plan, export_policy, shard_setting, stream_weights
from .dpo import DPOMethod, DPOSettings
from .lm import LMMethod, LMSettings
from .reward import RewardMethod, RewardSettings
from .sdpo import SDPOMethod, SDPOScorerSettings, SDPOSettings

#: every training method, by the name recipes give as ``method:``
METHODS: dict[str, Method] = {m.name: m for m in (LMMethod(), DPOMethod(), RewardMethod(), SDPOMethod())}


def get_method(name: str) -> Method:
    """The method ``name``; a usage error naming the known ones otherwise."""
    if name not in METHODS:
        raise UsageError(f"method={name!r} is not a training method; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def export_checkpoint(path: str | Path, folder: str | Path, dtype: Any = None) -> Path:
    """Any levo-train checkpoint (any strategy) -> its method's export: a reward model's export
    folder for a ``recipe=reward`` checkpoint (its ``levo.reward`` section), else the policy in the
    released folder layout (``levo-train export``, the end of a sharded run)."""
    levo = read_checkpoint(path, verify=False).get("levo")
    method = METHODS["reward"] if isinstance(levo, dict) and "reward" in levo else METHODS["lm"]
    return method.export_checkpoint(Path(path), Path(folder), dtype)


__all__ = ["METHODS", "export_checkpoint", "DPOSettings", "DataSpec", "LMSettings", "Method", "Plan", "RewardSettings",
           "SDPOScorerSettings", "SDPOSettings", "export_policy", "get_method", "shard_setting", "stream_weights"]
