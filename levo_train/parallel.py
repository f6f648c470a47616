"""Parallelism and memory savings applied to LeLM from outside the model (torchtitan's pattern).

:func:`parallelize` is what a training module's ``configure_model`` calls: the model file defines
the math only, and everything that changes how it is executed is applied here, per decoder layer
of both stacks. Today that is activation checkpointing (``train.activation_checkpointing``);
sharding (FSDP2 ``fully_shard`` per decoder layer, then the root) is the next thing to go here.

Activation checkpointing wraps each decoder layer with torch's ``checkpoint_wrapper`` (non-reentrant):
its activations are recomputed in the backward pass instead of stored. The wrapper's state-dict
hooks keep parameter names unchanged in ``state_dict()`` (checkpoints and exports look the same
with and without it); ``named_parameters()`` gains a ``_checkpoint_wrapped_module.`` segment. Under
``no_grad`` (validation, generation with the KV cache) the layer runs as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    for layers, i in decoder_layers(model):
        if not isinstance(layers[i], CheckpointWrapper):
            layers[i] = checkpoint_wrapper(layers[i], checkpoint_fn=_checkpoint_when_grad)
    return model


def is_checkpointed(model: nn.Module) -> bool:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return any(isinstance(layers[i], CheckpointWrapper) for layers, i in decoder_layers(model))


def parallelize(model: nn.Module, *, activation_checkpointing: bool = False) -> nn.Module:
    """Apply the execution options to ``model`` in place (called from ``configure_model``)."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def plain_name(name: str) -> str:
    """A parameter or module name without the checkpoint wrapper's segment (the state-dict name)."""
    return name.replace(WRAPPED, "")


__all__ = ["apply_activation_checkpointing", "decoder_layers", "is_checkpointed", "parallelize", "plain_name"]
