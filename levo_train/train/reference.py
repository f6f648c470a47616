"""The DPO reference: where the reference log-probs of a pair batch come from.

Three kinds, chosen once when the init is loaded (:func:`make_reference`):

* :class:`FrozenCopy` (``dpo.reference=model``, full fine-tuning): a copy of the initial policy,
  in eval mode, without gradients or optimizer state; the module owns it as ``module.ref`` (so
  it moves with the module and stays out of checkpoints unless a method re-syncs it).
* :class:`AdaptersOff` (``dpo.reference=model`` with LoRA, :mod:`levo_train.lora`): the policy
  itself with its adapters switched off, which is exactly the init: no second copy.
* :class:`Precomputed` (``dpo.reference=precomputed``): log-probs stored beside the pairs
  (``levo-data ref-logps``), read from the batch; no reference forward at all.

Each returns ``[2B]`` summed log-probs (chosen first) under ``no_grad``. A sharded strategy shards a
frozen copy like the policy; the other two need nothing of it.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch

from levo_infer.model import Conditions, LeLM
from levo_train.lora import adapters_disabled, has_lora

KINDS = ("model", "precomputed")


class Reference(Protocol):
    name: str

    def logps(self, module: Any, batch: dict[str, Any], cond2: Conditions) -> torch.Tensor: ...


class FrozenCopy:
    """``module.ref``: a frozen copy of the policy taken when the reference is made."""

    name = "frozen copy of model.init"

    def logps(self, module: Any, batch: dict[str, Any], cond2: Conditions) -> torch.Tensor:
        with torch.no_grad():
            return module.pair_logps(module.ref, batch, cond2)[0]

    def sync(self, module: Any) -> None:
        """Make the reference the current policy (semi-online DPO's ``ref_sync_every``)."""
        module.ref.load_state_dict(module.model.state_dict())


class AdaptersOff:
    """The policy with its LoRA adapters bypassed."""

    name = "model.init = the policy with its adapters off"

    def logps(self, module: Any, batch: dict[str, Any], cond2: Conditions) -> torch.Tensor:
        with torch.no_grad(), adapters_disabled(module.model):
            return module.pair_logps(module.model, batch, cond2)[0]


class Precomputed:
    """Reference log-probs carried by the batch (``ref_chosen_logps`` / ``ref_rejected_logps``)."""

    name = "precomputed log-probs beside the pairs"

    def logps(self, module: Any, batch: dict[str, Any], cond2: Conditions) -> torch.Tensor:
        if "ref_chosen_logps" not in batch:
            raise ValueError("reference=precomputed but the pair batch has no reference log-probs: "
                             "run `levo-data ref-logps` on the pairs first, or use reference=model")
        dev = module.model.device
        return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(dev, torch.float32)


def frozen_copy(model: LeLM) -> LeLM:
    """An eval-mode copy of ``model`` whose parameters take no gradients."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def make_reference(kind: str, module: Any) -> Reference:
    """The reference of ``dpo.reference=kind`` for ``module`` (sets ``module.ref`` for a frozen copy)."""
    if kind == "precomputed":
        return Precomputed()
    if kind != "model":
        raise ValueError(f"reference must be one of {KINDS}, got {kind!r}")
    if has_lora(module.model):
        module.ref = None
        return AdaptersOff()
    module.ref = frozen_copy(module.model)
    return FrozenCopy()


__all__ = ["KINDS", "AdaptersOff", "FrozenCopy", "Precomputed", "Reference", "frozen_copy", "make_reference"]
