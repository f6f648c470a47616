"""Lightning module for pretraining and SFT of LeLM.

Loss: per-stream cross-entropy over the delay pattern, on real frames plus the EOS frame (pad
targets excluded), averaged over streams (weights configurable). Logits are computed only at
those target positions. Conditions pass the released dropout (CFG dropout per sample, then
attribute dropout per attribute per batch) and the conditioners train with gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from levo_infer.config import ModelConfig
from levo_infer.model import Conditions
from levo_infer.tokens import append_eos

from .base import LeLMTrainModule

STREAM_NAMES = ("mixed", "vocal", "bgm")


def stream_name(k: int) -> str:
    return STREAM_NAMES[k] if k < len(STREAM_NAMES) else f"stream{k}"


def apply_condition_dropout(
    lyrics: Sequence[str | None], styles: Sequence[str | None], prompt: torch.Tensor | None,
    *, cfg_p: float, attr_p: dict[str, float], generator: torch.Generator, pad: int,
    global_slice: tuple[int, int] | None = None,
) -> tuple[list[str | None], list[str | None], torch.Tensor | None]:
    """Released training-time dropout: all conditions of a sample nulled with ``cfg_p``, then each
    attribute nulled for the whole batch with its own probability.

    ``global_slice=(offset, size)``: this batch is samples ``[offset, offset + len)`` of a global batch
    of ``size`` (data parallel: rank ``r`` of ``W`` with ``B`` songs each passes ``(r*B, W*B)``). Every
    rank draws the global batch's mask from the same generator and keeps its slice, so a W-rank run
    drops exactly what a 1-rank run with the whole global batch drops."""
    lyr, sty = list(lyrics), list(styles)
    pr = prompt.clone() if prompt is not None else None
    off, size = global_slice if global_slice is not None else (0, len(lyr))
    drop = (torch.rand(max(size, off + len(lyr)), generator=generator) < cfg_p)[off:off + len(lyr)]
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
                generator=self.dropout_gen, pad=self.model.pad_id, global_slice=self._global_slice(len(lyrics)))
        return self.model.prepare_conditions(lyrics, styles, prompts)

    def _global_slice(self, n: int) -> tuple[int, int]:
        """Where this rank's batch of ``n`` songs sits in the global batch (see the datamodule contract)."""
        dm = self._datamodule()
        per_rank = int(getattr(dm, "batch_size", n) or n) if dm is not None else n
        if self._trainer is None:
            return 0, max(per_rank, n)
        return self.trainer.global_rank * per_rank, max(per_rank * self.trainer.world_size, n)

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
        # the mean over ranks: with data parallelism the curve is the global batch's, as with one rank
        self.log("train/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
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
