"""Lightning module for pretraining and SFT of LeLM.

Loss: per-stream cross-entropy over the delay pattern, on real frames plus the EOS frame (pad
targets excluded), averaged over streams (weights configurable). Logits are computed only at
those target positions. Conditions pass the released dropout (CFG dropout per sample, then
attribute dropout per attribute per batch) and the conditioners train with gradients.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from levo_infer.config import ModelConfig
from levo_infer.model import Conditions, LeLM

log = logging.getLogger(__name__)

STREAM_NAMES = ("mixed", "vocal", "bgm")


def stream_name(k: int) -> str:
    return STREAM_NAMES[k] if k < len(STREAM_NAMES) else f"stream{k}"


def append_eos(codes: torch.Tensor, lengths: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """[B, K, T] padded frames -> [B, K, T+1] with EOS at each song's length and pad after it."""
    B, K, T = codes.shape
    out = torch.cat([codes, codes.new_full((B, K, 1), pad)], dim=2)
    t = torch.arange(T + 1, device=codes.device)[None, None, :]
    ln = lengths.to(codes.device)[:, None, None]
    out = torch.where(t < ln, out, torch.full_like(out, pad))
    return torch.where(t == ln, torch.full_like(out, eos), out)


def apply_condition_dropout(
    lyrics: Sequence[str | None], styles: Sequence[str | None], prompt: torch.Tensor | None,
    *, cfg_p: float, attr_p: dict[str, float], generator: torch.Generator, pad: int,
) -> tuple[list[str | None], list[str | None], torch.Tensor | None]:
    """Released training-time dropout: all conditions of a sample nulled with ``cfg_p``, then each
    attribute nulled for the whole batch with its own probability."""
    lyr, sty = list(lyrics), list(styles)
    pr = prompt.clone() if prompt is not None else None
    drop = torch.rand(len(lyr), generator=generator) < cfg_p
    for i in torch.nonzero(drop).flatten().tolist():
        lyr[i], sty[i] = None, None
        if pr is not None:
            pr[i] = pad
    if torch.rand(1, generator=generator).item() < attr_p.get("description", 0.0):
        lyr = [None] * len(lyr)
    if torch.rand(1, generator=generator).item() < attr_p.get("type_info", 0.0):
        sty = [None] * len(sty)
    if torch.rand(1, generator=generator).item() < attr_p.get("prompt_audio", 0.0) and pr is not None:
        pr[:] = pad
    return lyr, sty, pr


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


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


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
    ) -> None:
        super().__init__()
        self.model_config = model_config
        self.model = LeLM(model_config)
        if init_weights:
            self.model.init_weights()
        self.model.set_activation_checkpointing(activation_checkpointing)
        K = model_config.lm.code_depth
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.stream_weights = list(stream_weights) if stream_weights is not None else [1.0] * K
        if len(self.stream_weights) != K:
            raise ValueError(f"stream_weights has {len(self.stream_weights)} entries, the model has {K} streams")
        self.freeze_prefixes = list(freeze)
        self._apply_freeze()
        # parameters kept only for the released layout never get gradients (DDP would complain)
        from levo_infer.checkpoint import UNUSED_KEYS

        for n, p in self.model.named_parameters():
            if n in UNUSED_KEYS:
                p.requires_grad_(False)
        self.seed = seed
        self.dropout_gen = torch.Generator().manual_seed(seed + 1)
        self.samples_seen = 0  # global stream position of the training data (for exact resume)

    # -- setup ------------------------------------------------------------------------
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
            (no_decay if p.ndim < 2 or "norm" in n or n.endswith(".bias") else decay).append(p)
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
            # the LR schedule this run follows: a resume continues it (levo_train.cli.resolve_schedule)
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


class LMModule(LeLMTrainModule):
    """Pretraining / SFT of LeLM with masked per-codebook cross-entropy."""

    def __init__(self, model_config: ModelConfig, *, condition_dropout: bool = True, **kw: Any) -> None:
        super().__init__(model_config, **kw)
        self.condition_dropout = condition_dropout
        K = model_config.lm.code_depth
        V = model_config.lm.code_size + 1
        self.val_loss = MeanMetric()
        self.val_acc1 = torch.nn.ModuleList(
            [MulticlassAccuracy(num_classes=V, top_k=1, average="micro") for _ in range(K)])
        self.val_acc10 = torch.nn.ModuleList(
            [MulticlassAccuracy(num_classes=V, top_k=min(10, V), average="micro") for _ in range(K)])
        self.val_stream_loss = torch.nn.ModuleList([MeanMetric() for _ in range(K)])

    # -- loss -------------------------------------------------------------------------
    def conditions(self, batch: dict[str, Any], *, dropout: bool) -> Conditions:
        lyrics, styles, prompts = batch["lyrics"], batch["styles"], batch.get("prompts")
        if dropout:
            c = self.model_config
            lyrics, styles, prompts = apply_condition_dropout(
                lyrics, styles, prompts, cfg_p=c.cfg_dropout, attr_p=c.attribute_dropout,
                generator=self.dropout_gen, pad=self.model.pad_id)
        return self.model.prepare_conditions(lyrics, styles, prompts)

    def lm_loss(self, batch: dict[str, Any], cond: Conditions) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Weighted mean over streams of the masked CE; also per-stream logits/targets."""
        m = self.model
        codes = append_eos(batch["codes"], batch["lengths"], m.eos_id, m.pad_id)
        H = m.frame_hidden(codes, cond)
        total, wsum, parts = codes.new_zeros((), dtype=torch.float32), 0.0, []
        for k in range(m.code_depth):
            mask = codes[:, k] != m.pad_id
            tgt = codes[:, k][mask]
            logits = m.head(k, H[:, k][mask])
            ce = F.cross_entropy(logits.float(), tgt)
            w = self.stream_weights[k]
            total = total + w * ce
            wsum += w
            parts.append({"ce": ce.detach(), "logits": logits.detach(), "target": tgt})
        return total / max(wsum, 1e-12), parts

    # -- steps ------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts = self.lm_loss(batch, self.conditions(batch, dropout=self.condition_dropout))
        B = batch["codes"].shape[0]
        self.advance_data_position(B)
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        for k, p in enumerate(parts):
            acc = (p["logits"].argmax(-1) == p["target"]).float().mean()
            self.log(f"train/ce_{stream_name(k)}", p["ce"], batch_size=B)
            self.log(f"train/acc1_{stream_name(k)}", acc, batch_size=B)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, parts = self.lm_loss(batch, self.conditions(batch, dropout=False))
        B = batch["codes"].shape[0]
        self.val_loss.update(loss, weight=B)
        for k, p in enumerate(parts):
            self.val_stream_loss[k].update(p["ce"], weight=p["target"].numel())
            self.val_acc1[k].update(p["logits"], p["target"])
            self.val_acc10[k].update(p["logits"], p["target"])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=False)
        self.val_loss.reset()
        for k in range(self.model.code_depth):
            n = stream_name(k)
            self.log(f"val/ce_{n}", self.val_stream_loss[k].compute())
            self.log(f"val/acc1_{n}", self.val_acc1[k].compute())
            self.log(f"val/acc10_{n}", self.val_acc10[k].compute())
            for m in (self.val_stream_loss[k], self.val_acc1[k], self.val_acc10[k]):
                m.reset()
