"""What every LeLM training method shares: the Lightning base module (policy model, AdamW with
warmup + cosine, freezing by parameter-name prefix, exact-resume state) and the global RNG state
in a ``weights_only``-loadable form. Methods (``lm``, ``dpo``, ``reward``, ``sdpo``) subclass
:class:`LeLMTrainModule`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from levo_infer.checkpoint import UNUSED_KEYS
from levo_infer.config import ModelConfig
from levo_infer.model import LeLM
from levo_train.parallel import fill_plan, has_meta, materialize, parallelize, plain_name, weight_source

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Global RNG states in a form that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(st["python"][:1]) + (tuple(st["python"][1]),) + tuple(st["python"][2:]))


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW decays this parameter: matrices do; vectors, norms and biases do not. A
    parameter ZeRO-3 partitioned when it was built (``deepspeed.zero.Init``) has an empty local
    shape: its full shape (``ds_shape``) decides."""
    ndim = len(getattr(param, "ds_shape", param.shape))
    return not (ndim < 2 or "norm" in name or name.endswith(".bias"))


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


@dataclass
class DeferredInit:
    """Where the weights of a policy built on the meta device come from (``meta_init=True``); read
    in :meth:`LeLMTrainModule.configure_model`, once the strategy's process group and mesh exist.

    ``weights``: the ``model.init`` weight file (set by :func:`levo_train.run.build_module`); rank 0
    memory-maps it. Without it, ``rng_state`` is the global torch RNG state the module was built
    from: rank 0 replays today's construction from it (``LeLM(cfg)`` on the CPU, then
    ``init_weights()``), so random init is bit-identical to a model built without ``meta_init``."""

    weights: Path | None = None
    rng_state: torch.Tensor | None = None


class LeLMTrainModule(L.LightningModule):
    """What every LeLM training method shares: the policy model, AdamW with warmup + cosine,
    freezing by parameter-name prefix, and the state an exact resume needs (data position,
    dropout generator, global RNGs)."""

    def __init__(
        self,
        model_config: ModelConfig,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 100,
        total_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        stream_weights: Sequence[float] | None = None,
        freeze: Sequence[str] = (),
        activation_checkpointing: bool = False,
        seed: int = 0,
        init_weights: bool = True,
        meta_init: bool = False,
    ) -> None:
        super().__init__()
        self.model_config = model_config
        #: set when the policy (and a frozen reference copied from it) is built on the meta device
        self.deferred_init: DeferredInit | None = None
        if meta_init:  # a sharding strategy: every rank gets only its shards in configure_model
            rng = torch.get_rng_state() if init_weights else None
            with torch.device("meta"):
                self.model = LeLM(model_config)
            self.deferred_init = DeferredInit(rng_state=rng)
        else:
            self.model = LeLM(model_config)
            if init_weights:
                self.model.init_weights()
        self.activation_checkpointing = bool(activation_checkpointing)  # applied in configure_model
        K = model_config.lm.code_depth
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.stream_weights = list(stream_weights) if stream_weights is not None else [1.0] * K
        if len(self.stream_weights) != K:
            raise ValueError(f"stream_weights has {len(self.stream_weights)} entries, the model has {K} streams")
        self.freeze_prefixes = list(freeze)
        self._apply_freeze()
        # parameters kept only for the released layout never get gradients (DDP would complain)
        for n, p in self.model.named_parameters():
            if n in UNUSED_KEYS:
                p.requires_grad_(False)
        self.seed = seed
        self.dropout_gen = torch.Generator().manual_seed(seed + 1)
        self.samples_seen = 0  # global stream position of the training data (for exact resume)

    # -- setup ------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Execution options applied from outside the model (:mod:`levo_train.parallel`): activation
        checkpointing per decoder layer and, under ``strategy=fsdp2``, FSDP2 sharding of the policy
        and of a frozen reference copy (sharded like the policy; it has no gradients or optimizer
        state). A model built on the meta device (``meta_init``) is then materialised on this rank's
        device and filled (:meth:`materialize_model`); under DeepSpeed ZeRO-3 it is rebuilt inside
        DeepSpeed's ``zero.Init`` instead (:meth:`materialize_zero3`). Idempotent (Lightning calls it
        for validate and again for fit)."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "zero_stage_3", False) and self.deferred_init is not None and has_meta(self.model):
            self.materialize_zero3()
            parallelize(self.model, activation_checkpointing=self.activation_checkpointing)
            return
        mesh, opts = None, {}
        if getattr(strategy, "shards_model", False):
            mesh, opts = strategy.data_parallel_mesh, dict(strategy.fsdp_options)  # type: ignore[union-attr]
        parallelize(self.model, activation_checkpointing=self.activation_checkpointing, mesh=mesh, **opts)
        ref = getattr(self, "ref", None)
        if mesh is not None and isinstance(ref, torch.nn.Module):
            parallelize(ref, mesh=mesh, **opts)
        if self.deferred_init is not None and has_meta(self.model):
            device = strategy.root_device if strategy is not None else torch.device("cpu")
            self.materialize_model(device, mesh.get_group() if mesh is not None else None)

    # -- meta-device init -------------------------------------------------------------
    def init_source(self) -> Mapping[str, torch.Tensor]:
        """The full weights the meta-built policy is filled from (rank 0 only): ``model.init``'s
        file, memory-mapped, or a CPU replay of the seeded random init (:class:`DeferredInit`)."""
        d = self.deferred_init
        assert d is not None
        if d.weights is not None:
            return weight_source(d.weights)
        if d.rng_state is None:
            raise ValueError("the policy was built on the meta device with neither model.init weights nor a random "
                             "init to fill it from")
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(d.rng_state)
            full = LeLM(self.model_config)
            full.init_weights()
        return full.state_dict()

    def init_missing(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The full initial value of a policy tensor the init weights lack (rank 0 only; called only
        when a subclass overrides it). The base policy needs none: parameters the released layout
        keeps unused get zeros when missing, anything else missing is an error. A subclass that
        adds parameters on the meta device (adapters) returns their initial values here."""
        raise ValueError(f"the init weights lack {name!r}")

    def _fill_missing(self) -> Any:
        return self.init_missing if type(self).init_missing is not LeLMTrainModule.init_missing else None

    def materialize_model(self, device: torch.device | str, group: Any = None) -> None:
        r"""Materialise the meta-built policy (already :func:`~levo_train.parallel.parallelize`\ d)
        and a meta-built frozen reference on ``device`` and fill both from one read of
        :meth:`init_source` on rank 0 of ``group`` (:func:`levo_train.parallel.materialize`: each
        rank receives its shards; the reference gets the policy's values shard by shard)."""
        ref = getattr(self, "ref", None)
        copies = [ref] if isinstance(ref, nn.Module) and has_meta(ref) else []
        first = not dist.is_initialized() or dist.get_rank(group) == 0
        if first:
            d = self.deferred_init
            log.info("meta-device init: rank 0 fills the policy%s from %s", " and its reference" if copies else "",
                     d.weights if d is not None and d.weights is not None else "a seeded random init")
        materialize(self.model, self.init_source() if first else None, device=device, copies=copies, group=group,
                    fill_missing=self._fill_missing(), may_be_zero=lambda n: n in UNUSED_KEYS)

    def materialize_zero3(self) -> None:
        """DeepSpeed ZeRO-3 (called inside the ``deepspeed.zero.Init`` context Lightning's DeepSpeed
        strategy opens around ``configure_model``): rebuild the policy (and a frozen reference) for
        real, so that ``zero.Init`` partitions each parameter as it is created, copy the meta
        model's trainable flags, then fill parameter by parameter from rank 0's :meth:`init_source`
        (``GatheredParameters(modifier_rank=0)``: one full parameter gathered at a time; rank 0's
        values are re-partitioned to every rank). The reference gets the same values in the same pass."""
        import deepspeed  # noqa: PLC0415  # deepspeed: optional extra, heavy; only a ZeRO-3 run gets here

        meta_model = self.model
        self.model = self._rebuild(meta_model)
        ref = getattr(self, "ref", None)
        if isinstance(ref, nn.Module) and has_meta(ref):
            self.ref = self._rebuild(ref)
        pairs = [(self.model, dict(self.model.named_parameters()))]
        if isinstance(ref, nn.Module) and has_meta(ref):
            pairs.append((self.ref, dict(self.ref.named_parameters())))  # type: ignore[arg-type]
        first = dist.get_rank() == 0
        source = self.init_source() if first else None
        names = [plain_name(n) for n in pairs[0][1]]
        plan = fill_plan(names, source, self._fill_missing(), lambda n: n in UNUSED_KEYS, None)
        with torch.no_grad():
            for (name, p), plain in zip(pairs[0][1].items(), names):
                group = [p, *(named[name] for _, named in pairs[1:])]
                with deepspeed.zero.GatheredParameters(group, modifier_rank=0):
                    if first:
                        assert source is not None
                        full = (source[plain] if plan[plain] == "source" else torch.zeros(p.shape)
                                if plan[plain] == "zero" else self.init_missing(plain, p))
                        for q in group:
                            q.data.copy_(full.to(q.dtype))

    def _rebuild(self, meta: nn.Module) -> LeLM:
        """A real LeLM with ``meta``'s (possibly truncated) config, trainable flags and options."""
        model = LeLM(meta.cfg)  # type: ignore[attr-defined]
        flags = {plain_name(n): p.requires_grad for n, p in meta.named_parameters()}
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
        model.truncate_lyrics = meta.truncate_lyrics  # type: ignore[attr-defined]
        model.train(meta.training)
        return model

    def _apply_freeze(self) -> None:
        """Modular extension: parameters whose name starts with a listed prefix stay fixed
        (e.g. ``transformer.`` trains the sub-stack with the main stack frozen)."""
        names = [n for n, _ in self.model.named_parameters()]
        for pre in self.freeze_prefixes:
            if not any(n.startswith(pre) for n in names):
                raise ValueError(f"freeze prefix {pre!r} matches no parameter; top-level modules: "
                                 f"{sorted({n.split('.')[0] for n in names})}")
        for n, p in self.model.named_parameters():
            if any(n.startswith(pre) for pre in self.freeze_prefixes):
                p.requires_grad_(False)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if decays(n, p) else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=self.betas,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
            s, warmup=self.warmup_steps, total=self.total_steps, min_ratio=self.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- data position ----------------------------------------------------------------
    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _global_batch(self, batch_size: int) -> int:
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "batch_samples_global"):
            return int(dm.batch_samples_global)
        return batch_size * max(1, self.trainer.world_size if self._trainer is not None else 1)

    def advance_data_position(self, batch_size: int) -> None:
        """Count one consumed training batch (all ranks) towards the resumable data position."""
        self.samples_seen += self._global_batch(batch_size)
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "set_position"):
            dm.set_position(self.samples_seen)  # keeps the datamodule's checkpointed state current

    # -- exact resume -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["levo"] = {
            "samples_seen": self.samples_seen,
            "dropout_gen": self.dropout_gen.get_state(),
            "rng": rng_state(),
            "model_config": self.model_config.to_dict(),
            "init_fingerprint": getattr(self, "init_fingerprint", None),
            # the LoRA adapters the state dict holds (levo_train.lora), None without
            "lora": self.lora.identity() if getattr(self, "lora", None) is not None else None,
            # the LR schedule this run follows: a resume continues it (levo_train.resume.resolve_schedule)
            "schedule": {"lr": self.lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                         "min_lr_ratio": self.min_lr_ratio},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        st = checkpoint.get("levo")
        if st is None:
            raise ValueError("checkpoint has no `levo` section: not written by levo-train, cannot resume exactly")
        self.samples_seen = int(st["samples_seen"])
        self.dropout_gen.set_state(st["dropout_gen"])
        set_rng_state(st["rng"])
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "set_position"):
            dm.set_position(self.samples_seen)
            log.info("resuming data at global sample %d", self.samples_seen)
