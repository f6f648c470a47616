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
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from levo_infer.checkpoint import PREFIX, save_released
from levo_infer.config import ModelConfig, config_from_omegaconf, save_config
from levo_infer.integrity import remove_manifest, write_manifest
from levo_infer.model import LeLM
from levo_infer.safe_load import torch_load
from levo_train import dcp
from levo_train.checkpointing import COMPLETE, META, verify_checkpoint, write_torch_stream
from levo_train.lora import ADAPTER_DIR, LoraSpec, apply_lora, merged_copy, save_adapters
from levo_train.parallel import plain_name
from levo_train.zero import is_zero_checkpoint, read_zero_meta, zero_fp32_module_state

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


#: tensors a DCP export reads per ``dcp.load`` call (a larger tensor is read alone)
CHUNK_BYTES = 64 << 20


class CheckpointWeights:
    """The full weights of a checkpoint of any kind, named as the Lightning module names them
    (``model.<LeLM key>``, ``head.*``, ...; the activation-checkpoint wrapper's segment removed),
    read tensor by tensor: :attr:`entries` gives each one's shape and dtype without reading data,
    :meth:`get` reads one. A DCP folder is read in chunks of at most :data:`CHUNK_BYTES` (or one
    tensor) in the order tensors are asked for; a one-file checkpoint is memory-mapped; a ZeRO
    folder is consolidated once by DeepSpeed (one full copy)."""

    def __init__(self, path: str | os.PathLike, prefixes: tuple[str, ...]) -> None:
        self.path = p = Path(path)
        meta = read_checkpoint(p)
        levo = meta.get("levo")
        if not isinstance(levo, dict) or "model_config" not in levo:
            raise ExportError(f"{p}: no `levo` section with the model config: not a levo-train checkpoint")
        self.levo: dict[str, Any] = levo
        self.kind = checkpoint_kind(p)
        self._dict: dict[str, torch.Tensor] = {}
        self._raw: dict[str, str] = {}
        self._cache: dict[str, torch.Tensor] = {}
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if self.kind == "file":
            raw = meta.get("state_dict")
            if not isinstance(raw, dict):
                raise ExportError(f"{p}: no state_dict")
            self._dict = raw
            items = {k: (tuple(v.shape), v.dtype) for k, v in raw.items() if isinstance(v, torch.Tensor)}
        elif self.kind == "dcp":
            self._md = dcp.read_metadata(p)
            items = {k[len("state_dict."):]: (tuple(m.size), m.properties.dtype)
                     for k, m in self._md.state_dict_metadata.items()
                     if k.startswith("state_dict.") and isinstance(m, TensorStorageMetadata)}
        else:
            try:
                self._dict = zero_fp32_module_state(p)
            except ValueError as e:
                raise ExportError(str(e)) from None
            items = {k: (tuple(v.shape), v.dtype) for k, v in self._dict.items()}
        for k, v in items.items():
            if k.startswith(prefixes):
                name = plain_name(k)
                self._raw[name] = k
                self.entries[name] = v

    def get(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (read now; a DCP chunk also reads the tensors after it)."""
        raw = self._raw[name]
        if self.kind != "dcp":
            return self._dict[raw]
        if raw not in self._cache:
            self._read_chunk(name)
        return self._cache.pop(raw)

    def _read_chunk(self, first: str) -> None:
        names = list(self._raw)
        want, size = {}, 0
        for name in names[names.index(first):]:
            raw = self._raw[name]
            if raw in self._cache:
                continue
            shape, dtype = self.entries[name]
            n = dtype.itemsize
            for d in shape:
                n *= d
            if want and size + n > CHUNK_BYTES:
                break
            want[raw], size = torch.empty(shape, dtype=dtype), size + n
        state = {"state_dict": want}
        dcp.load(state, self.path, no_dist=True, metadata=self._md)
        self._cache.update(state["state_dict"])

    def under(self, prefix: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The entries whose names start with ``prefix``, the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.entries.items() if k.startswith(prefix)}


def write_released_stream(folder: str | os.PathLike, config: ModelConfig, weights: CheckpointWeights,
                          dtype: torch.dtype | None = None, prefix: str = POLICY) -> Path:
    """``folder/model.pt`` (``audiolm.<key>`` for every key of the LeLM state dict, in its order)
    and ``config.yaml``, then ``checksums.json``: what :func:`levo_infer.checkpoint.save_released`
    writes for a model, written here from ``weights`` one tensor at a time (tensors in the model's
    parameter dtype, or ``dtype``). ExportError when the weights do not fit the config."""
    with torch.device("meta"):
        expected = {k: (tuple(v.shape), v.dtype) for k, v in LeLM(config).state_dict().items()}
    have = weights.under(prefix)
    missing, unexpected = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    bad = [k for k in expected if k in have and have[k][0] != expected[k][0]]
    if missing or unexpected or bad:
        raise ExportError(f"{weights.path}: its weights do not match its own model config: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}, other shapes {bad[:4]}")
    out = {k: (dtype if dtype is not None and dt.is_floating_point else dt) for k, (_, dt) in expected.items()}
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        remove_manifest(folder)
        write_torch_stream(folder / "model.pt", [(PREFIX + k, expected[k][0], out[k]) for k in expected],
                           lambda name: weights.get(prefix + name[len(PREFIX):]).to(out[name[len(PREFIX):]]))
        save_config(config, folder / "config.yaml")
        write_manifest(folder, ["model.pt", "config.yaml"])
    except BaseException:
        if created:  # a read that fails mid-stream (a bad or crafted item) leaves no half export behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def policy_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The policy's full weights (plain LeLM names, with LoRA adapter keys if it had them) and the
    checkpoint's ``levo`` section, from a checkpoint of any kind (all in memory: for small models
    and tests; exports stream through :class:`CheckpointWeights`)."""
    w = CheckpointWeights(path, (POLICY,))
    if not w.entries:
        raise ExportError(f"{path}: no policy weights (`{POLICY}*`)")
    return {k: w.get(POLICY + k) for k in w.under(POLICY)}, w.levo


def export_checkpoint(path: str | os.PathLike, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/model.pt`` + ``config.yaml`` (and ``adapters/`` for a LoRA run) from ``path``.
    Without LoRA adapters the weights stream from the checkpoint into ``model.pt`` tensor by tensor
    (:func:`write_released_stream`: a DCP folder never has two full copies in memory, nor one); with
    them, the model is built to merge them."""
    w = CheckpointWeights(path, (POLICY,))
    levo = w.levo
    if "reward" in levo:
        raise ExportError(f"{path} is a reward-model checkpoint: `levo-train export` writes its reward export "
                          "(levo_train.methods.export_checkpoint)")
    if not w.entries:
        raise ExportError(f"{path}: no policy weights (`{POLICY}*`)")
    config = config_from_omegaconf(OmegaConf.create(levo["model_config"]), where=f"{path} levo.model_config")
    lora = levo.get("lora")
    if not lora:
        return write_released_stream(folder, config, w, dtype)
    sd = {k: w.get(POLICY + k) for k in w.under(POLICY)}
    model = LeLM(config)
    spec = LoraSpec(**lora)
    apply_lora(model, spec)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path}: its weights do not match its own model config: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    folder = Path(folder)
    save_released(merged_copy(model), folder, dtype=dtype)
    save_adapters(model, folder / ADAPTER_DIR, spec, base_fingerprint=levo.get("init_fingerprint"))
    return folder


__all__ = ["CHUNK_BYTES", "CheckpointWeights", "ExportError", "checkpoint_kind", "export_checkpoint", "policy_state_dict",
           "read_checkpoint", "write_released_stream"]
