"""Offline DPO of LeLM on preference pairs.

One forward over the concatenated batch ``[chosen; rejected]`` (both halves share conditions),
sequence log-probs summed over valid tokens of all streams (:func:`sequence_logps`), a frozen
reference — a copy of the initial policy, or reference log-probs precomputed beside the pairs —
and the TRL-named loss family of :mod:`levo_train.train.dpo_loss`. Condition dropout is off for
policy and reference: both must see identical conditions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric

from levo_infer.config import ModelConfig
from levo_infer.model import Conditions, LeLM

from .base import LeLMTrainModule
from .dpo_loss import combined_dpo_loss
from .logps import pair_conditions, pair_logps
from .reference import Reference, make_reference

#: where the DPO reference log-probs come from: a frozen copy of the init, or ref_logps.json beside the pairs
REFERENCES = ("model", "precomputed")


def check_reference(reference: str) -> None:
    """Raise ``ValueError`` for a reference that is not one of :data:`REFERENCES`."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be 'model' or 'precomputed', got {reference!r}")


def check_loss_config(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None, beta: float,
                      label_smoothing: float) -> None:
    """Raise ``ValueError`` now (not at the first step) for an unknown loss type or bad settings."""
    z, one = torch.zeros(1), torch.ones(1)
    combined_dpo_loss(z, z, z, z, loss_type=loss_type, loss_weights=loss_weights, beta=beta,
                      label_smoothing=label_smoothing, chosen_token_counts=one, rejected_token_counts=one)


class DPOModule(LeLMTrainModule):
    """DPO / IPO / hinge / robust (+ optional SFT term) on preference pairs."""

    METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "drift")

    def __init__(
        self,
        model_config: ModelConfig,
        *,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        reference: str = "model",
        **kw: Any,
    ) -> None:
        kw.setdefault("init_weights", False)
        super().__init__(model_config, **kw)
        check_reference(reference)
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)
        self.loss_type = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.loss_weights = list(loss_weights) if loss_weights is not None else None
        check_loss_config(self.loss_type, self.loss_weights, self.beta, self.label_smoothing)
        self.reference = reference
        self.ref: LeLM | None = None  # the frozen copy, when the reference is one
        self.ref_impl: Reference | None = None
        self.val_metrics = torch.nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in self.METRICS})

    def freeze_reference(self) -> None:
        """Make the reference (call after loading the init, and after LoRA adapters if any):
        :func:`levo_train.train.reference.make_reference`."""
        self.ref_impl = make_reference(self.reference, self)

    def state_dict(self, *args: Any, **kw: Any) -> dict[str, Any]:  # type: ignore[override]
        """The reference is kept out of checkpoints (it is rebuilt from the init on resume)."""
        sd = super().state_dict(*args, **kw)
        return {k: v for k, v in sd.items() if not k.startswith("ref.")} if isinstance(sd, dict) else sd

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Strict about everything but the reference, which checkpoints do not carry."""
        res = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in res.missing_keys if not k.startswith("ref.")]
        if strict and (missing or res.unexpected_keys):
            raise RuntimeError(f"DPO checkpoint does not match the module: missing {missing[:5]}, "
                               f"unexpected {res.unexpected_keys[:5]}")
        return res

    # -- core -------------------------------------------------------------------------
    def pair_logps(self, model: LeLM, batch: dict[str, Any], cond2: Conditions) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logps(model, batch, cond2, stream_weights=self.stream_weights)

    def dpo_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics of one pair batch (policy forward; reference forward or precomputed)."""
        B = batch["chosen"].shape[0]
        cond2 = pair_conditions(self.model, batch)
        logps, counts = self.pair_logps(self.model, batch, cond2)
        pc, pr = logps[:B], logps[B:]
        rlogps = self.reference_logps(batch, cond2).to(pc)
        rc, rr = rlogps[:B], rlogps[B:]
        out = combined_dpo_loss(pc, pr, rc, rr, loss_type=self.loss_type, loss_weights=self.loss_weights,
                                beta=self.beta, label_smoothing=self.label_smoothing,
                                chosen_token_counts=counts[:B], rejected_token_counts=counts[B:])
        cr, rj = out.chosen_rewards, out.rejected_rewards
        drift = ((pc - rc) / counts[:B] + (pr - rr) / counts[B:]).detach() / 2  # per token
        m = {"loss": out.loss.detach(), "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
             "rewards/margins": (cr - rj).mean(), "rewards/accuracies": (cr > rj).float().mean(),
             "logps/chosen": (pc.detach() / counts[:B]).mean(), "logps/rejected": (pr.detach() / counts[B:]).mean(),
             "drift": drift.mean()}
        for t, v in out.terms.items():
            m[f"loss/{t}"] = v
        return out.loss, m

    def reference_logps(self, batch: dict[str, Any], cond2: Conditions) -> torch.Tensor:
        """Reference log-probs [2B] of a pair batch (chosen first), from this run's :class:`Reference`."""
        if self.ref_impl is None:
            if self.reference != "precomputed":
                raise RuntimeError("no reference model: call freeze_reference() after loading the init weights")
            self.ref_impl = make_reference("precomputed", self)
        return self.ref_impl.logps(self, batch, cond2)

    # -- steps ------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, m = self.dpo_step(batch)
        B = batch["chosen"].shape[0]
        self.advance_data_position(B)
        for k, v in m.items():  # the loss as the mean over ranks (the global batch's curve)
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "rewards/accuracies"), batch_size=B, sync_dist=k == "loss")
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.no_grad():
            _, m = self.dpo_step(batch)
        B = batch["chosen"].shape[0]
        for k in self.METRICS:
            self.val_metrics[k.replace("/", "_")].update(m[k], weight=B)

    def on_validation_epoch_end(self) -> None:
        for k in self.METRICS:
            metric = self.val_metrics[k.replace("/", "_")]
            self.log(f"val/{k}", metric.compute(), prog_bar=k == "rewards/accuracies")
            metric.reset()
