"""Layer offload for large models on small GPUs (``levo-infer --low-mem``).

The decoder layers of both stacks and the large once-per-batch tables (text and prompt
conditioners) keep their weights in (pinned) CPU memory; a forward pre-hook copies a module's
weights to the GPU just before it runs and a forward hook points them back at the CPU copy right
after, so the GPU holds the small always-used parts (code embeddings, heads, norms, bridge MLP),
the KV caches and one layer at a time. Modules the forward pass never reads stay on the CPU.

On a CPU device :func:`enable_layer_offload` does nothing (``force=True`` installs the hooks anyway,
which tests use to check that offloading does not change any result).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .model import LeLM


def _unused_modules(model: LeLM) -> list[nn.Module]:
    return [model.transformer.model.embed_tokens, model.transformer2.model.embed_tokens,
            model.transformer2.lm_head, model.layer2_emb[0], model.out_norm]


def offloaded_modules(model: LeLM) -> list[nn.Module]:
    """Modules whose weights live on the CPU and visit the GPU while they run."""
    conds = model.condition_provider.conditioners
    return [*model.transformer.model.layers, *model.transformer2.model.layers,
            conds["description"], conds["type_info"], conds["prompt_audio"]]


class LayerOffload:
    """The installed hooks; :meth:`remove` takes them out (weights then stay where they are)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.cpu_bytes = 0
        self.transfers = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def enable_layer_offload(model: LeLM, device: str | torch.device, *, pin: bool | None = None, force: bool = False,
                         release: Callable[[torch.Tensor], None] | None = None) -> LayerOffload | None:
    """Offload ``model``'s decoder layers (see the module docstring); returns None on a CPU device.

    ``release(old)`` is called for each weight tensor after it has been copied (``load_model`` uses
    it to drop the memory-mapped file pages behind the original).
    """
    dev = torch.device(device)
    if dev.type == "cpu" and not force:
        return None
    pin = (dev.type == "cuda") if pin is None else pin
    state = LayerOffload(dev)
    off = offloaded_modules(model)
    off_params = {id(p) for m in off for p in m.parameters()}
    unused = {id(p) for m in _unused_modules(model) for p in m.parameters()}

    def place(p: torch.Tensor, target: torch.Tensor) -> None:
        old = p.data
        p.data = target
        if release is not None and target.data_ptr() != old.data_ptr():
            release(old)

    for p in model.parameters():  # always-used weights go to the device
        if id(p) not in off_params and id(p) not in unused:
            place(p, p.data.to(dev))
    for m in off:
        params = list(m.parameters())
        cpu = []
        for p in params:
            c = p.data.to("cpu")
            if pin:
                c = c.pin_memory()
            place(p, c)
            cpu.append(c)
            state.cpu_bytes += c.numel() * c.element_size()

        def pre_hook(_m: nn.Module, _args: tuple, params: list = params, cpu: list = cpu) -> None:
            for p, c in zip(params, cpu):
                p.data = c.to(dev, non_blocking=True)
            state.transfers += 1

        def post_hook(_m: nn.Module, _args: tuple, _out: object, params: list = params, cpu: list = cpu) -> None:
            for p, c in zip(params, cpu):
                p.data = c

        state.handles.append(m.register_forward_pre_hook(pre_hook))
        state.handles.append(m.register_forward_hook(post_hook))
    return state
