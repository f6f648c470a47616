"""Parallelism and memory savings applied to LeLM from outside the model (torchtitan's pattern).

:func:`parallelize` is what a training module's ``configure_model`` calls: the model file defines
the math only, and everything that changes how it is executed is applied here, per decoder layer
of both stacks: activation checkpointing (``train.activation_checkpointing``) and FSDP2 sharding
(``strategy=fsdp2``: ``fully_shard`` per decoder layer, then the root).

Activation checkpointing wraps each decoder layer with torch's ``checkpoint_wrapper`` (non-reentrant):
its activations are recomputed in the backward pass instead of stored. The wrapper's state-dict
hooks keep parameter names unchanged in ``state_dict()`` (checkpoints and exports look the same
with and without it); ``named_parameters()`` gains a ``_checkpoint_wrapped_module.`` segment. Under
``no_grad`` (validation, generation with the KV cache) the layer runs as is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.fsdp as fsdp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.distributed.tensor import DTensor

WRAPPED = "_checkpoint_wrapped_module."


def _checkpoint_when_grad(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Recompute in backward only when a backward can happen (a KV-cache step never runs twice)."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def decoder_layers(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(layer list, index) of every decoder layer of both stacks."""
    out = []
    for stack in (model.transformer, model.transformer2):  # type: ignore[attr-defined]
        layers = stack.model.layers
        out.extend((layers, i) for i in range(len(layers)))
    return out


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every decoder layer of both stacks (idempotent)."""
    for layers, i in decoder_layers(model):
        if not isinstance(layers[i], CheckpointWrapper):
            layers[i] = checkpoint_wrapper(layers[i], checkpoint_fn=_checkpoint_when_grad)
    return model


def is_checkpointed(model: nn.Module) -> bool:
    return any(isinstance(layers[i], CheckpointWrapper) for layers, i in decoder_layers(model))


#: the LeLM method the losses call instead of ``forward`` (``frame_hidden``, then ``head``): FSDP2
#: unshards the root's parameters around it too. Only the outermost entry point may be registered
#: (a registered method called inside another would end the outer one's forward state early).
FSDP_FORWARD_METHODS = ("frame_hidden",)

MIXED_PRECISION = {None: None, "bf16": "bfloat16", "fp16": "float16"}


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded ``model`` (its parameters are DTensors)."""
    return isinstance(model, fsdp.FSDPModule)


def apply_fsdp(model: nn.Module, mesh: Any, *, mixed_precision: str | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer of both stacks, then the root (idempotent).

    Each layer is its own all-gather / reduce-scatter unit, so at most one layer is gathered at a
    time (plus the root's embeddings, conditioners and heads). The root keeps its parameters
    gathered after forward (``reshard_after_forward=False``): the losses call ``model.head`` after
    ``frame_hidden`` returns, outside any FSDP-hooked forward. ``mixed_precision="bf16"``: FSDP2's
    own policy (weights gathered and computed in bf16, gradients reduced in fp32, fp32 master
    weights and optimizer state); leave it ``None`` with Lightning's ``bf16-mixed`` autocast.
    """
    if is_sharded(model):
        return model
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"strategy.mixed_precision must be one of {sorted(map(str, MIXED_PRECISION))}, "
                         f"got {mixed_precision!r}")
    dtype = MIXED_PRECISION[mixed_precision]
    mp = (fsdp.MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
          if dtype else fsdp.MixedPrecisionPolicy())
    for layers, i in decoder_layers(model):
        fsdp.fully_shard(layers[i], mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fsdp.fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for name in FSDP_FORWARD_METHODS:
        fsdp.register_fsdp_forward_method(model, name)
    return model


def parallelize(model: nn.Module, *, activation_checkpointing: bool = False, mesh: Any = None,
                mixed_precision: str | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply the execution options to ``model`` in place (called from ``configure_model``):
    activation checkpointing first (inside each layer's FSDP unit), then FSDP2 when ``mesh`` is given."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is not None:
        apply_fsdp(model, mesh, mixed_precision=mixed_precision, reshard_after_forward=reshard_after_forward)
    return model


def reshard_all(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded state (a no-op for one that is): the root
    keeps its parameters gathered after a forward without backward (``reshard_after_forward=False``),
    and those gathered copies are in the mixed-precision dtype, not the fp32 master weights."""
    for m in model.modules():
        if isinstance(m, fsdp.FSDPModule):
            m.reshard()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter or buffer of a possibly sharded model, on its device.

    A DTensor (an FSDP2 shard) is gathered from every rank with ``full_tensor()``: a collective, so
    every rank must ask for the same tensors in the same order. A plain tensor (DDP, one process, a
    buffer, an FSDP2 unit that is currently unsharded) is returned as it is, not copied.
    """
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t


def plain_name(name: str) -> str:
    """A parameter or module name without the checkpoint wrapper's segment (the state-dict name)."""
    return name.replace(WRAPPED, "")


__all__ = ["apply_activation_checkpointing", "apply_fsdp", "decoder_layers", "full_value", "is_checkpointed", "is_sharded",
           "parallelize", "plain_name", "reshard_all"]
