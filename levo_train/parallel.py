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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.fsdp as fsdp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.distributed.tensor import DTensor, distribute_tensor

from levo_infer.checkpoint import PREFIX, StateSource

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
    mp = _mp_policy(mixed_precision)
    for layers, i in decoder_layers(model):
        fsdp.fully_shard(layers[i], mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fsdp.fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for name in FSDP_FORWARD_METHODS:
        fsdp.register_fsdp_forward_method(model, name)
    return model


def apply_fsdp_unit(module: nn.Module, mesh: Any, *, mixed_precision: str | None = None,
                    reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 on one extra module beside the policy (the reward head): a unit of its own over
    ``mesh``, gathered by its ``forward`` (idempotent)."""
    if is_sharded(module):
        return module
    fsdp.fully_shard(module, mesh=mesh, mp_policy=_mp_policy(mixed_precision), reshard_after_forward=reshard_after_forward)
    return module


def _mp_policy(mixed_precision: str | None) -> Any:
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"strategy.mixed_precision must be one of {sorted(map(str, MIXED_PRECISION))}, "
                         f"got {mixed_precision!r}")
    dtype = MIXED_PRECISION[mixed_precision]
    return (fsdp.MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
            if dtype else fsdp.MixedPrecisionPolicy())


def parallelize(model: nn.Module, *, activation_checkpointing: bool = False, mesh: Any = None,
                mixed_precision: str | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply the execution options to ``model`` in place (called from ``configure_model``):
    activation checkpointing first (inside each layer's FSDP unit), then FSDP2 when ``mesh`` is given."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is not None:
        apply_fsdp(model, mesh, mixed_precision=mixed_precision, reshard_after_forward=reshard_after_forward)
    return model


# ----------------------------------------------------------------------------- meta-device init
def has_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is still on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _is_first(group: Any) -> bool:
    return not dist.is_initialized() or dist.get_rank(group) == 0


def fill_plan(names: list[str], source: Mapping[str, torch.Tensor] | None, fill_missing: Callable[..., Any] | None,
          may_be_zero: Callable[[str], bool], group: Any) -> dict[str, str]:
    """Rank 0 of ``group`` decides where each of ``names`` comes from (``source`` / ``zero`` /
    ``fill``, see :func:`materialize`), or the error every rank raises; the others learn it in one
    broadcast, before any tensor moves (so a missing key never leaves a rank waiting)."""
    plan: dict[str, str] | str = {}
    if _is_first(group):
        if source is None:
            plan = "materialize: rank 0 was given no weight source"
        else:
            missing = [n for n in names if n not in source and not may_be_zero(n) and fill_missing is None]
            plan = (f"the init weights lack {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                               else "") + ", which the model needs"
                    if missing else {n: "source" if n in source else "zero" if may_be_zero(n) else "fill"
                                     for n in names})
    if dist.is_initialized():
        box = [plan]
        dist.broadcast_object_list(box, src=_src_rank(group), group=group)
        plan = box[0]
    if isinstance(plan, str):
        raise ValueError(plan)
    return plan


def _src_rank(group: Any) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def materialize(model: nn.Module, source: Mapping[str, torch.Tensor] | None, *, device: torch.device | str,
                copies: Iterable[nn.Module] = (), group: Any = None,
                fill_missing: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                may_be_zero: Callable[[str], bool] = lambda name: False) -> nn.Module:
    r"""Give ``model`` (built on the meta device, then :func:`parallelize`\ d: sharded or not) real
    storage on ``device`` and fill it from ``source``: the torchtune / verl pattern of
    ``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)``.

    ``source`` (read on rank 0 of ``group`` only; other ranks pass ``None``) maps state-dict names
    (``model.state_dict()``'s, without the checkpoint wrapper's segment) to full tensors: a
    memory-mapped ``model.pt`` (:func:`weight_source`) or the state dict of a module built on rank
    0. Tensor by tensor, in state-dict order, rank 0 converts one to the parameter's dtype and
    broadcasts it; each rank copies its own shard into the parameter (a DTensor: its ``Shard``
    slice; a plain tensor: all of it) and drops the full tensor. So a rank holds its shards plus one
    full tensor at a time, and rank 0 adds the file pages it maps. ``copies`` (e.g. a frozen
    reference sharded exactly like ``model``) get the same values shard by shard: no second read,
    no second broadcast.

    A name the source lacks gets zeros when ``may_be_zero(name)`` (parameters the released layout
    keeps but never reads), else ``fill_missing(name, param)``'s full tensor (rank 0; e.g. a LoRA
    adapter's initial value); with neither, every rank raises ``ValueError`` before any tensor
    moves. A failure on rank 0 while producing a tensor (a damaged file) is raised on every rank.
    Without a process group everything is local. Returns ``model``."""
    copies = list(copies)
    for m in (model, *copies):
        m.to_empty(device=device)
    state = model.state_dict(keep_vars=True)
    twins = [m.state_dict(keep_vars=True) for m in copies]
    if any(list(t) != list(state) for t in twins):
        raise ValueError("materialize: a copy does not have the model's state-dict keys")
    plan = fill_plan(list(state), source, fill_missing, may_be_zero, group)
    first = _is_first(group)
    many = dist.is_initialized() and dist.get_world_size(group) > 1
    with torch.no_grad():
        for name, p in state.items():
            dest = [p, *(t[name] for t in twins)]
            if plan[name] == "zero":
                for d in dest:
                    (d.to_local() if isinstance(d, DTensor) else d).zero_()
                continue
            comm_dev = torch.device(p.device_mesh.device_type) if isinstance(p, DTensor) else p.device
            full, error = None, ""
            if first:
                try:
                    full = source[name] if plan[name] == "source" else fill_missing(name, p)  # type: ignore[index,misc]
                    if tuple(full.shape) != tuple(p.shape):
                        raise ValueError(f"{name} has shape {tuple(full.shape)} in the init weights, the model "
                                         f"expects {tuple(p.shape)}")
                    full = full.to(comm_dev, p.dtype)
                except Exception as e:  # noqa: BLE001 - every rank must learn it, then it is raised
                    error = f"{type(e).__name__}: {e}"
            if many:  # one flag first, so that a failure on rank 0 never leaves the others waiting
                ok = torch.tensor([0 if error else 1], device=comm_dev)
                dist.broadcast(ok, src=_src_rank(group), group=group)
                if not ok.item():
                    raise ValueError(f"materialize: rank 0 could not produce {name}" + (f": {error}" if error else ""))
            elif error:
                raise ValueError(f"materialize: {name}: {error}")
            if full is None:
                full = torch.empty(p.shape, dtype=p.dtype, device=comm_dev)
            if many:
                dist.broadcast(full, src=_src_rank(group), group=group)
            local = (distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                     if isinstance(p, DTensor) else full)
            for d in dest:
                (d.to_local() if isinstance(d, DTensor) else d).copy_(local)
            del full, local
    return model


def weight_source(path: Any) -> Mapping[str, torch.Tensor]:
    """A released-format weight file (``model.pt`` memory-mapped, or ``.safetensors``) as the
    ``source`` of :func:`materialize`: state-dict names without the ``audiolm.`` prefix, each tensor
    read from the file only when asked for. The file is checked (checksums, CRCs) when opened."""
    return _PrefixedSource(StateSource(path), PREFIX)


class _PrefixedSource(Mapping):
    def __init__(self, src: Any, prefix: str) -> None:
        self.src = src
        self.names = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in src.meta}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.src.tensor(self.names[name])

    def __iter__(self) -> Any:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


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


__all__ = ["apply_activation_checkpointing", "apply_fsdp", "apply_fsdp_unit", "decoder_layers", "fill_plan", "full_value",
           "has_meta", "is_checkpointed", "is_sharded", "materialize", "parallelize", "plain_name", "reshard_all",
           "weight_source"]
