"""A rank-local copy of the policy to generate with: a plain LeLM, refreshed from the policy one
parameter at a time.

Semi-online DPO generates every round with the **current** policy. A policy sharded by FSDP2 cannot
generate as it is: a KV-cached generation calls the model's parts directly, thousands of times,
outside any FSDP-hooked forward (and a forward would all-gather every layer at every token, a
collective that ranks with fewer songs would skip). So each round every rank fills a plain,
unwrapped :class:`~levo_infer.model.LeLM` (no FSDP, no checkpoint wrappers, no LoRA layers) with the
policy's current weights, generates with it without any collective, and frees it:

* **One parameter at a time.** The copy's skeleton lives on the ``meta`` device between rounds (no
  memory); a refresh allocates it in the generation dtype on the policy's device, then walks the
  policy's parameters in the same order on every rank, gathering each sharded one
  (:func:`levo_train.parallel.full_value`: ``DTensor.full_tensor()``) and casting it into its slot.
  The peak is the copy plus one whole parameter (two for a LoRA layer's merge), never two full
  fp32 copies of the model.
* **LoRA** (:mod:`levo_train.lora`): each adapted layer's slot gets the merged weight
  ``W + scaling · B A``, computed in fp32 from the gathered base and adapter weights: the copy is
  exactly the model the run's export will hold.
* **dtype**: bf16 on a GPU, fp32 on CPU (``sdpo.gen_dtype=auto``); generation on CPU in fp32 from a
  copy of an fp32 policy computes what the policy itself computes, bit for bit.

:func:`needs_copy` says when a round may generate with the policy itself (one unsharded, plain
model already in the generation dtype): then no copy is made.
"""

from __future__ import annotations

import torch
from torch import nn

from levo_infer.config import ModelConfig
from levo_infer.model import LeLM
from levo_train.lora import ADAPTER_NAME, has_lora, lora_delta, lora_layers
from levo_train.parallel import full_value, is_sharded, plain_name, reshard_all

#: ``sdpo.gen_dtype`` values; ``auto``: bfloat16 on a GPU, float32 on CPU
GEN_DTYPES = ("auto", "float32", "bfloat16", "float16")


def gen_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The generation dtype ``name`` (:data:`GEN_DTYPES`) resolves to on ``device``."""
    if name not in GEN_DTYPES:
        raise ValueError(f"sdpo.gen_dtype={name}: expected one of {', '.join(GEN_DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def needs_copy(policy: nn.Module, dtype: torch.dtype) -> bool:
    """Whether generating needs an :class:`InferenceCopy`: the policy is sharded, carries LoRA
    layers (generation from the merged weights, as the export), or is held in another dtype."""
    return is_sharded(policy) or has_lora(policy) or policy.emb[0].weight.dtype != dtype  # type: ignore[index]


class InferenceCopy:
    """A plain LeLM that :meth:`refresh` fills with the policy's current weights (module docstring)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        with torch.device("meta"):
            self.model = LeLM(config).to(dtype)
        self.model.eval().requires_grad_(False)
        self.dtype = dtype

    @property
    def allocated(self) -> bool:
        return self.model.emb[0].weight.device.type != "meta"

    @torch.no_grad()
    def refresh(self, policy: nn.Module, device: torch.device | str) -> LeLM:
        """The copy on ``device`` holding ``policy``'s weights now. Under FSDP2 a collective: every
        rank calls it at the same point (ranks without prompts too)."""
        model = self.model
        reshard_all(policy)  # read the fp32 shards, not a unit's gathered (maybe bf16) working copy
        if not self.allocated or model.emb[0].weight.device != torch.device(device):
            model.to_empty(device=device)
        slots = dict(model.named_parameters())
        slots.update(model.named_buffers())
        filled: set[str] = set()
        lora = {plain_name(n): m for n, m in lora_layers(policy)}
        for name, t in [*policy.named_parameters(), *policy.named_buffers()]:
            plain = plain_name(name)
            if ".lora_" in plain:  # merged with its base weight below
                continue
            if ".base_layer." in plain:  # a LoRA layer's base: W + scaling · B A
                owner, leaf = plain.rsplit(".base_layer.", 1)
                key = f"{owner}.{leaf}"
                value = full_value(t)
                if leaf == "weight" and owner in lora:
                    layer = lora[owner]
                    a = full_value(layer.lora_A[ADAPTER_NAME].weight)
                    b = full_value(layer.lora_B[ADAPTER_NAME].weight)
                    value = value.float() + lora_delta(layer, a, b)
            else:
                key, value = plain, full_value(t)
            if key not in slots:
                raise RuntimeError(f"the policy's {name} has no place in a plain LeLM ({key})")
            slots[key].copy_(value)
            filled.add(key)
            del value
        missing = sorted(set(slots) - filled)
        if missing:
            raise RuntimeError(f"the policy has no value for {missing[:4]} of the inference copy")
        model.truncate_lyrics = bool(getattr(policy, "truncate_lyrics", False))
        return model

    def release(self) -> None:
        """Free the weights (the skeleton stays, on ``meta``, with its tokenizers)."""
        if self.allocated:
            self.model.to_empty(device="meta")


__all__ = ["GEN_DTYPES", "InferenceCopy", "gen_dtype", "needs_copy"]
