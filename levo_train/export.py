"""Consolidate a training checkpoint of any strategy into the released-format export.

``levo-train export run_dir=R [ckpt=PATH] [out=DIR] [dtype=bfloat16]`` and the end of a sharded run
both come here. A checkpoint is one of:

* a file (``auto`` / ``ddp``): a Lightning checkpoint, the model under ``state_dict["model.*"]``;
* a torch distributed-checkpoint folder (``fsdp2``, :mod:`levo_train.strategies`): every rank's
  shard plus ``meta.pt``; read here in one process (DCP reassembles the full tensors, no process
  group needed);
* a DeepSpeed ZeRO folder (``deepspeed_zero2`` / ``deepspeed_zero3``): consolidated to fp32 by
  DeepSpeed's own ``zero_to_fp32`` (:mod:`levo_train.zero`).

Whatever the kind, the result is the same ``model.pt`` + ``config.yaml`` (``levo_infer`` reads it),
with LoRA adapters merged (and written alone to ``adapters/``) when the run trained them.

Every checkpoint is checked byte for byte before it is used
(:func:`levo_train.checkpointing.verify_checkpoint`): a file
through the CRC-32 torch stores for each of its records, a folder through the sizes and checksums
its completion marker lists (a missing rank file is named). Resume and export treat a checkpoint
that fails as one that does not load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from levo_infer.checkpoint import save_released
from levo_infer.config import config_from_omegaconf
from levo_infer.model import LeLM
from levo_infer.safe_load import torch_load
from levo_train import dcp
from levo_train.checkpointing import COMPLETE, META, verify_checkpoint
from levo_train.lora import ADAPTER_DIR, LoraSpec, apply_lora, merged_copy, save_adapters
from levo_train.parallel import plain_name
from levo_train.zero import is_zero_checkpoint, read_zero_meta, zero_fp32_state_dict

#: the Lightning module's attribute that holds the policy
POLICY = "model."


class ExportError(ValueError):
    """A checkpoint that cannot be consolidated (incomplete, not ours, another kind of run)."""


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``file``, ``dcp`` or ``zero``; :class:`ExportError` for anything else."""
    p = Path(path)
    if p.is_file():
        return "file"
    if p.is_dir():
        if (p / META).is_file() or (p / ".metadata").is_file():
            return "dcp"
        if is_zero_checkpoint(p):
            return "zero"
        raise ExportError(f"{p} is a folder but neither a torch distributed checkpoint (no {META} / .metadata) "
                          "nor a DeepSpeed ZeRO checkpoint")
    raise ExportError(f"{p}: no such checkpoint")


def _load_meta_file(path: Path) -> dict[str, Any]:
    ck = torch_load(path, error=ExportError)
    if not isinstance(ck, dict):
        raise ExportError(f"{path}: not a levo-train checkpoint (a {type(ck).__name__}, expected a Lightning "
                          "checkpoint dict)")
    return ck


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's Lightning dict without running code (``weights_only``): for a file the
    whole dict (memory-mapped), for a folder its non-tensor part (``global_step``, ``levo``, ...).
    A folder counts only when complete (:data:`levo_train.checkpointing.COMPLETE`, written last).
    ``verify``: check every byte first (:func:`~levo_train.checkpointing.verify_checkpoint`); ``False`` reads only the
    metadata (cheap), for choosing among checkpoints before the chosen one is verified."""
    p = Path(path)
    try:
        kind = checkpoint_kind(p)
    except ExportError:
        if p.is_dir() and (p / COMPLETE).is_file():
            verify_checkpoint(p)  # a damaged file (`latest`, ...) may be why it is not recognised
        raise
    if kind != "file" and not (p / COMPLETE).is_file():
        raise ExportError(f"incomplete sharded checkpoint: no {COMPLETE} (a rank did not finish writing it)")
    if verify:
        verify_checkpoint(p)
    if kind in ("file", "dcp"):
        target = p if kind == "file" else p / META
        try:
            if kind == "dcp":
                dcp.check_folder(p)  # before anything reads a shard: .metadata and every non-tensor item, no code run
            return _load_meta_file(target)
        except ValueError as e:
            if not verify:  # say "corrupted" (naming the file) when that is why it does not load
                verify_checkpoint(p)
            if str(p) in str(e):
                raise ExportError(str(e)) from None
            raise ExportError(f"{target}: {e}") from None
    try:
        return read_zero_meta(p)  # also checks that every rank's files are there
    except ValueError as e:
        raise ExportError(str(e)) from None


def _dcp_policy_state(path: Path) -> dict[str, torch.Tensor]:
    md = dcp.read_metadata(path)
    pre = "state_dict." + POLICY
    want = {k[len("state_dict."):]: torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in md.state_dict_metadata.items()
            if k.startswith(pre) and isinstance(m, TensorStorageMetadata)}
    if not want:
        raise ExportError(f"{path}: the distributed checkpoint holds no policy weights (no state_dict.{POLICY}* keys)")
    state = {"state_dict": want}
    dcp.load(state, path, no_dist=True)
    return state["state_dict"]


def policy_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The policy's full weights (plain LeLM names, with LoRA adapter keys if it had them) and the
    checkpoint's ``levo`` section, from a checkpoint of any kind."""
    p = Path(path)
    meta = read_checkpoint(p)
    levo = meta.get("levo")
    if not isinstance(levo, dict) or "model_config" not in levo:
        raise ExportError(f"{p}: no `levo` section with the model config: not a levo-train checkpoint")
    kind = checkpoint_kind(p)
    if kind == "file":
        raw = meta.get("state_dict")
        if not isinstance(raw, dict):
            raise ExportError(f"{p}: no state_dict")
    elif kind == "dcp":
        raw = _dcp_policy_state(p)
    else:
        try:
            raw = {POLICY + k: v for k, v in zero_fp32_state_dict(p).items()}
        except ValueError as e:
            raise ExportError(str(e)) from None
    sd = {plain_name(k[len(POLICY):]): v for k, v in raw.items() if k.startswith(POLICY)}
    if not sd:
        raise ExportError(f"{p}: no policy weights (`{POLICY}*`): a reward-model run exports itself at the end "
                          "of the run (run_dir/export)")
    return sd, levo


def export_checkpoint(path: str | os.PathLike, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/model.pt`` + ``config.yaml`` (and ``adapters/`` for a LoRA run) from ``path``."""
    sd, levo = policy_state_dict(path)
    model = LeLM(config_from_omegaconf(OmegaConf.create(levo["model_config"]), where=f"{path} levo.model_config"))
    lora = levo.get("lora")
    if lora:
        spec = LoraSpec(**lora)
        apply_lora(model, spec)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path}: its weights do not match its own model config: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    folder = Path(folder)
    if lora:
        save_released(merged_copy(model), folder, dtype=dtype)
        save_adapters(model, folder / ADAPTER_DIR, spec, base_fingerprint=levo.get("init_fingerprint"))
    else:
        save_released(model, folder, dtype=dtype)
    return folder


__all__ = ["ExportError", "checkpoint_kind", "export_checkpoint", "policy_state_dict", "read_checkpoint"]
