"""LoRA adapters on LeLM, applied from outside the model with ``peft`` (``train.lora.*``).

``train.lora.r > 0`` injects peft LoRA layers into the listed linear layers of both stacks
(``train.lora.targets``, default every attention and MLP projection) after the init weights are
loaded, and freezes every other parameter. The model file knows nothing of it:

* **Training**: only the adapters train; their learning rate is ``train.lora.lr`` or, unset,
  ``optim.lr × train.lora.lr_scale`` (low-rank updates need a larger step than full fine-tuning:
  the recipe's LR is tuned for full weights).
* **DPO reference**: the same model with the adapters switched off (:func:`adapters_disabled`),
  which is exactly ``model.init`` — no second copy of the weights.
* **Export**: ``export/model.pt`` holds the merged weights ``W + (alpha / r) · B A`` in the released
  layout (``levo_infer`` never sees LoRA), and ``export/adapters/`` the adapters alone
  (``adapter_model.safetensors`` + ``adapter_config.json``, peft's names) for sharing, with a
  ``checksums.json`` (sha256 of both) that :func:`read_adapters` checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from levo_infer.integrity import remove_manifest, verify_folder, write_manifest
from levo_infer.jsonio import write_json_atomic
from levo_infer.model import LeLM
from levo_train.parallel import plain_name

#: every projection of the decoder layers of both stacks
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "adapters"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSpec:
    """``train.lora``: rank (0 = off), scaling numerator, dropout, target layer names and LR."""

    r: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float | None = None
    lr_scale: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        if self.r < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1 or self.lr_scale <= 0:
            raise ValueError(f"train.lora: need r >= 0, alpha > 0, 0 <= dropout < 1, lr_scale > 0; got {self}")
        if self.r > 0 and not self.targets:
            raise ValueError("train.lora.targets is empty: name the linear layers to adapt, e.g. [q_proj,v_proj]")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def learning_rate(self, base_lr: float) -> float:
        """The adapters' peak LR: ``lr`` when given, else ``base_lr × lr_scale``."""
        return float(self.lr) if self.lr is not None else float(base_lr) * self.lr_scale

    def identity(self) -> dict[str, Any]:
        """What a checkpoint's adapters were built with (a resume must build the same ones)."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        return {k: d[k] for k in ("r", "alpha", "dropout", "targets")}


def _tuner_layers(model: nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer  # peft: optional extra (lora), slow import

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(_tuner_layers(model))


def lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """(module name, peft LoRA layer) of every adapted linear layer of ``model``."""
    return _tuner_layers(model)


def lora_delta(layer: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What merging adds to a LoRA layer's base weight: ``scaling · B A`` in fp32 (peft's
    ``get_delta_weight``; ``a``, ``b``: the layer's whole ``lora_A`` / ``lora_B`` weights, passed
    in because under FSDP2 they are gathered from their shards first)."""
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError("LoRA layers with fan_in_fan_out (Conv1D-style weights) are not used by LeLM")
    return (b.float() @ a.float()) * float(layer.scaling[ADAPTER_NAME])


def check_targets(model: nn.Module, spec: LoraSpec) -> None:
    """A target is a linear layer's name or a dotted suffix of it (peft's rule); a target list with
    names that match nothing is a ``ValueError`` naming ``train.lora.targets`` and the candidates.
    Works on a meta-device model (the CLI checks before any data is built)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = [t for t in spec.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"train.lora.targets={list(spec.targets)}: {unknown} name no linear layer of the model "
                         f"(linear layer names: {linear}; a dotted suffix such as linears.0 also works)")


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; a target list that
    matches no linear layer is a ``ValueError`` naming ``train.lora.targets`` and the candidates."""
    try:  # peft: optional extra (lora), slow import
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ValueError(f"train.lora.r={spec.r} needs the peft package ({e}): pip install 'levo-train[lora]'") from None

    check_targets(model, spec)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets),
                     bias="none")
    inject_adapter_in_model(cfg, model, adapter_name=ADAPTER_NAME)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` computing with its base weights only (the adapters bypassed), restored afterwards."""
    layers = [m for _, m in _tuner_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter merged into its base weight, under the names of
    the model without adapters (``...q_proj.weight``); ``model`` itself is not changed."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        out[k.replace(".base_layer.", ".")] = v
    for name, layer in _tuner_layers(model):
        key = f"{plain_name(name)}.weight"
        with torch.no_grad():
            delta = lora_delta(layer, layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight)
        out[key] = (out[key].float() + delta).to(out[key].dtype)
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A new LeLM (no adapters) holding the merged weights: what the export writes."""
    plain = LeLM(model.cfg)  # type: ignore[attr-defined]
    plain.load_state_dict(merged_state_dict(model), strict=True)
    return plain.to(next(model.parameters()).device)


def save_adapters(model: nn.Module, folder: str | os.PathLike, spec: LoraSpec, *,
                  base_fingerprint: str | None = None) -> Path:
    """The adapters alone: ``adapter_model.safetensors`` (peft's key names) and ``adapter_config.json``."""
    from peft import get_peft_model_state_dict  # peft: optional extra (lora), slow import

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_manifest(folder)
    sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
    tmp = folder / f".{ADAPTER_WEIGHTS}.tmp{os.getpid()}"
    save_file(sd, str(tmp))
    os.replace(tmp, folder / ADAPTER_WEIGHTS)
    info = {"peft_type": "LORA", **spec.identity(), "target_modules": list(spec.targets), "lora_alpha": spec.alpha,
            "base_model_fingerprint": base_fingerprint, "base_layout": "levo-train LeLM (released audiolm keys)"}
    write_json_atomic(folder / ADAPTER_CONFIG, info)
    write_manifest(folder, [ADAPTER_WEIGHTS, ADAPTER_CONFIG])
    return folder


def read_adapters(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors under peft's names, ``adapter_config.json``) of an adapters folder, after
    checking both files against its ``checksums.json``; ``ValueError`` naming the file otherwise
    (a folder without checksums, written by another tool, is read unchecked)."""
    folder = Path(folder)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: not a LoRA adapters folder, {name} is missing")
    verify_folder(folder)
    try:
        info = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    try:
        sd = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - a damaged safetensors header, a truncated file
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: not a readable safetensors file ({e})") from None
    return sd, info


def lora_spec(cfg: Any) -> LoraSpec:
    """``train.lora`` of a composed config (absent: off)."""
    lo = cfg.train.get("lora") if cfg.train is not None else None
    if lo is None:
        return LoraSpec()
    d = OmegaConf.to_container(lo, resolve=True)
    if d.get("targets") is not None:
        d["targets"] = tuple(d["targets"])
    else:
        d.pop("targets", None)
    return LoraSpec(**d)  # type: ignore[arg-type]


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    n_all = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), n_all


__all__ = ["ADAPTER_CONFIG", "ADAPTER_DIR", "ADAPTER_WEIGHTS", "DEFAULT_TARGETS", "LoraSpec", "adapters_disabled",
           "apply_lora", "has_lora", "lora_delta", "lora_layers", "lora_spec", "merged_copy", "merged_state_dict",
           "read_adapters", "save_adapters", "trainable_share"]
