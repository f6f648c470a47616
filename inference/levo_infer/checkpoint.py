"""Released folder format: ``config.yaml`` + ``model.pt`` (flat ``{"audiolm.<key>": tensor}``).

Loading never runs pickled code (``weights_only=True``), memory-maps the file, builds the model
on the meta device and assigns the mapped tensors, so peak memory stays near one model copy.
Unlike the released loader (``strict=False``), every used key must be present with its shape.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import ModelConfig, load_config, save_config
from .model import LeLM

PREFIX = "audiolm."
# present in the released state dict but never read by the forward pass
UNUSED_KEYS = frozenset({
    "transformer.model.embed_tokens.weight",
    "transformer2.model.embed_tokens.weight",
    "transformer2.lm_head.weight",
    "layer2_emb.0.weight",
    "out_norm.weight",
    "out_norm.bias",
})


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the file and the key."""


def released_state_dict(model: LeLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under released names (``audiolm.`` prefix)."""
    out = {}
    for k, v in model.state_dict().items():
        t = v.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[PREFIX + k] = t.contiguous()
    return out


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_released(model: LeLM, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/model.pt`` and ``folder/config.yaml`` (each atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(released_state_dict(model, dtype), folder / "model.pt")
    save_config(model.cfg, folder / "config.yaml")
    return folder


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # not a zip-format file: cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a flat dict of tensors, got {type(sd).__name__}")
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping) and len(sd) <= 3:
            sd = sd[wrapper]
    return dict(sd)


def check_state_dict(model: LeLM, sd: Mapping[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Strip the ``audiolm.`` prefix and check keys and shapes against ``model``.

    Missing used keys, unknown keys and shape mismatches raise :class:`CheckpointError` naming
    the key; missing unused keys (present in the released layout, never read) are tolerated.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stripped: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        key = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is not a tensor ({type(v).__name__})")
        stripped[key] = v
    unknown = sorted(set(stripped) - set(expected))
    if unknown:
        raise CheckpointError(
            f"{source}: unexpected key {PREFIX + unknown[0]!r} (and {len(unknown) - 1} more) — the checkpoint "
            "does not match this model config (different layer count or vocabulary?)")
    missing = sorted(k for k in set(expected) - set(stripped) if k not in UNUSED_KEYS)
    if missing:
        raise CheckpointError(f"{source}: missing key {PREFIX + missing[0]!r}"
                              + (f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else ""))
    for k, v in stripped.items():
        if tuple(v.shape) != expected[k]:
            raise CheckpointError(f"{source}: key {PREFIX + k!r} has shape {tuple(v.shape)}, "
                                  f"the config expects {expected[k]}")
    return stripped


def load_weights(model: LeLM, path: str | os.PathLike, *, assign: bool = False) -> LeLM:
    """Load a released-format ``model.pt`` (or ``.safetensors``) into ``model`` with full checks."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    sd = check_state_dict(model, _read_state_dict(path), source=str(path))
    if assign:
        # meta-initialised model: fill in tensors the file lacks (unused keys) with zeros
        for k, v in model.state_dict().items():
            if k not in sd:
                sd[k] = torch.zeros(v.shape, dtype=v.dtype if v.dtype != torch.bool else v.dtype)
    model.load_state_dict(sd, strict=assign, assign=assign)
    return model


def find_weights(folder: Path) -> Path:
    for name in ("model.pt", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no model.pt or model.safetensors in this folder")


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               config: ModelConfig | None = None) -> LeLM:
    """Load a released model folder or one of our exports; the model is returned in eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (expected config.yaml + model.pt)")
    cfg = config or load_config(folder)
    with torch.device("meta"):
        model = LeLM(cfg)
    load_weights(model, find_weights(folder), assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()
