"""Lightning module of the aesthetic reward model (``levo-train recipe=reward``).

``self.model`` is the LeLM trunk: built with the init's full config so that ``model.init`` loads
into it with the usual checks, then cut to ``reward.layers`` / ``reward.layers_sub`` layers by
:meth:`RewardModule.truncate` (the method's ``after_init``; a resume truncates the same way before
the checkpoint's weights load). ``self.head`` pools and scores (:class:`RewardHead`).

Loss: regression on every dimension and overall (``mse`` or ``smooth_l1`` with beta 0.1, on the raw
targets), plus ``rank_weight`` times a ranking term on every output (``rank_loss``): ``bt`` is
Bradley-Terry over all within-batch pairs whose true scores differ by at least ``rank_margin``
(score differences scaled by :data:`RANK_SCALE`), ``listmle`` the ListMLE likelihood of the batch's
true order. Validation logs ``val/<dim>/{lcc,srcc,ktau,pair_acc}`` for each dimension and overall.

Preference pairs (``data.pairs``: pair shards instead of scored songs): Bradley-Terry on the
chosen-minus-rejected score difference (:func:`pair_bt_loss`): on ``overall`` for every pair (the
chosen song is the preferred one), and on each dimension whose scores the pair's json carries
(``scores.chosen`` / ``scores.rejected``, as the pairs levo-data and the toy world write) where the
two songs differ by at least ``rank_margin``, in the direction of that difference. Validation on
held-out pairs logs ``val/<output>/pair_acc`` (how often the RM orders a pair as its labels do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import CatMetric, MeanMetric

from levo_infer.config import ModelConfig
from levo_train.parallel import apply_fsdp_unit
from levo_train.reward.metrics import METRICS, ranking_metrics
from levo_train.reward.model import OVERALL, RewardHead, RewardModel, reward_forward, truncate_trunk

from .base import LeLMTrainModule, decays, warmup_cosine

LOSSES = ("mse", "smooth_l1")
RANK_LOSSES = ("none", "bt", "listmle")
#: scores are on the targets' scale ([0, 1] in the toy world): a 0.1 gap is a BT logit of 1
RANK_SCALE = 10.0
#: trunk parameters the reward model never uses (LM heads, released-layout extras): kept frozen
UNUSED_TRUNK = ("transformer.lm_head.", "transformer2.lm_head.", "linears.", "out_norm.",
                "transformer.model.embed_tokens.", "transformer2.model.embed_tokens.")


def check_reward_settings(*, loss: str, rank_loss: str, rank_weight: float, rank_margin: float) -> None:
    """Raise ``ValueError`` naming the ``reward.*`` setting that cannot work."""
    if loss not in LOSSES:
        raise ValueError(f"reward.loss={loss!r}: expected one of {LOSSES}")
    if rank_loss not in RANK_LOSSES:
        raise ValueError(f"reward.rank_loss={rank_loss!r}: expected one of {RANK_LOSSES}")
    if rank_weight < 0 or rank_margin < 0:
        raise ValueError(f"reward.rank_weight={rank_weight} and reward.rank_margin={rank_margin} must be >= 0")


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean over songs and outputs of the per-output regression loss."""
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=0.1)
    raise ValueError(f"reward.loss={kind!r}: expected one of {LOSSES}")


def bt_loss(pred: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Bradley-Terry: mean ``-log sigmoid(RANK_SCALE * (p_i - p_j))`` over pairs with ``t_i - t_j >=
    margin``, per column [B, C] then averaged over the columns that have pairs (0 when none)."""
    dt = target[:, None, :] - target[None, :, :]          # [B, B, C]
    dp = pred[:, None, :] - pred[None, :, :]
    use = (dt >= max(margin, 1e-12)).to(pred.dtype)
    per = -(F.logsigmoid(RANK_SCALE * dp) * use).sum((0, 1))
    n = use.sum((0, 1))
    have = n > 0
    if not bool(have.any()):
        return pred.sum() * 0.0
    return (per[have] / n[have]).mean()


def listmle_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ListMLE per column: the negative log-likelihood (Plackett-Luce, scores scaled by
    :data:`RANK_SCALE`) of the true order, divided by the batch size, averaged over columns."""
    order = target.argsort(dim=0, descending=True)
    s = RANK_SCALE * pred.gather(0, order)                 # best first
    # log sum_{k >= i} exp(s_k): reverse cumulative logsumexp
    tail = torch.logcumsumexp(s.flip(0), dim=0).flip(0)
    return (tail - s).mean()


def pair_labels(metas: Sequence[dict[str, Any]], outputs: Sequence[str], margin: float) -> torch.Tensor:
    """Per pair and output: +1 / -1 when the chosen song is better / worse on it by at least
    ``margin``, 0 when unknown or closer. ``overall`` (last output) is +1: the pair's own label."""
    lab = torch.zeros(len(metas), len(outputs))
    lab[:, -1] = 1.0
    for i, m in enumerate(metas):
        sc = (m or {}).get("scores") or {}
        ch, rj = sc.get("chosen") or {}, sc.get("rejected") or {}
        for j, d in enumerate(outputs[:-1]):
            a, b = ch.get(d), rj.get(d)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) >= max(margin, 1e-12):
                lab[i, j] = 1.0 if a > b else -1.0
    return lab


def pair_bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry on pairs: mean over labelled (pair, output) cells of ``-log sigmoid(RANK_SCALE *
    label * (s_chosen - s_rejected))``; [B, C] scores and labels in {-1, 0, +1}."""
    use = labels != 0
    if not bool(use.any()):
        return chosen.sum() * 0.0
    z = RANK_SCALE * labels * (chosen - rejected)
    return -(F.logsigmoid(z)[use]).mean()


def reward_loss(pred: torch.Tensor, target: torch.Tensor, *, loss: str = "mse", rank_loss: str = "none",
                rank_weight: float = 0.0, rank_margin: float = 0.05) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, parts): regression plus ``rank_weight`` times the ranking term."""
    reg = regression_loss(pred.float(), target.float(), loss)
    parts = {"reg": reg.detach()}
    total = reg
    if rank_loss != "none" and rank_weight > 0:
        if rank_loss == "bt":
            rk = bt_loss(pred.float(), target.float(), rank_margin)
        elif rank_loss == "listmle":
            rk = listmle_loss(pred.float(), target.float())
        else:
            raise ValueError(f"reward.rank_loss={rank_loss!r}: expected one of {RANK_LOSSES}")
        total = total + rank_weight * rk
        parts["rank"] = rk.detach()
    return total, parts


class RewardModule(LeLMTrainModule):
    """Reward-model training: LeLM trunk (``self.model``) + :class:`RewardHead` (``self.head``)."""

    def __init__(self, model_config: ModelConfig, *, dimensions: Sequence[str], pooling: str = "mean",
                 layers: int | None = None, layers_sub: int | None = None, loss: str = "mse",
                 rank_loss: str = "none", rank_weight: float = 0.0, rank_margin: float = 0.05, **kw: Any) -> None:
        check_reward_settings(loss=loss, rank_loss=rank_loss, rank_weight=rank_weight, rank_margin=rank_margin)
        super().__init__(model_config, **kw)
        self.dimensions = tuple(dimensions)
        self.outputs = (*self.dimensions, OVERALL)
        self.pooling = pooling
        # the head's initial weights come from its own seeded generator: the same under every strategy
        # and device, whether the trunk is built for real or on the meta device (which draws nothing)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed_for_head(kw.get("seed", 0)))
            self.head = RewardHead(model_config.lm.dim, len(self.outputs), pooling, model_config.lm.code_depth)
        self.layers, self.layers_sub = layers, layers_sub
        self.loss_kind, self.rank_loss, self.rank_weight, self.rank_margin = loss, rank_loss, rank_weight, rank_margin
        unused = UNUSED_TRUNK if pooling != "mean_logp" else UNUSED_TRUNK[3:]  # mean_logp reads the LM heads
        for n, p in self.model.named_parameters():
            if n.startswith(unused):
                p.requires_grad_(False)
        self.val_loss = MeanMetric()
        self.val_pred, self.val_target = CatMetric(), CatMetric()
        self.val_pair_right, self.val_pair_n = CatMetric(), CatMetric()  # per (pair, output): agreed / labelled
        self.truncated = False

    @staticmethod
    def seed_for_head(seed: int) -> int:
        """The seed of the head's initialisation (``seed`` + 2: ``seed + 1`` is the dropout generator's)."""
        return int(seed) + 2

    def configure_model(self) -> None:
        """The trunk as every method's (:meth:`LeLMTrainModule.configure_model`); under FSDP2 the head
        is its own FSDP unit over the same mesh (its ``forward`` gathers it; gradients are
        reduce-scattered like the trunk's)."""
        super().configure_model()
        strategy = self.trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "shards_model", False):
            apply_fsdp_unit(self.head, strategy.data_parallel_mesh, **strategy.fsdp_options)  # type: ignore[union-attr]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Besides every method's ``levo`` section, what the reward export needs to be written from
        the checkpoint alone (``levo-train export``, the end of a sharded run): the outputs, the
        pooling and the truncated trunk's config."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["levo"]["reward"] = {"dimensions": list(self.dimensions), "pooling": self.pooling,
                                        "model_config": self.model.cfg.to_dict()}

    def truncate(self) -> None:
        """Drop the trunk's layers beyond ``layers`` / ``layers_sub`` (once, after the init loads)."""
        if not self.truncated:
            truncate_trunk(self.model, self.layers, self.layers_sub)
            self.truncated = True

    def reward_model(self) -> RewardModel:
        """The trained trunk and head as a :class:`RewardModel` (shares their parameters)."""
        return RewardModel(self.model.cfg, self.dimensions, pooling=self.pooling, lm=self.model, head=self.head)

    # -- optimiser: trunk + head -----------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for n, p in list(self.model.named_parameters()) + [("head." + n, p) for n, p in self.head.named_parameters()]:
            if not p.requires_grad:
                continue
            (decay if decays(n, p) else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=self.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
            s, warmup=self.warmup_steps, total=self.total_steps, min_ratio=self.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- steps ------------------------------------------------------------------------
    def predict_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scores [B, D + 1] of a batch (no condition dropout: the RM judges songs as prompted)."""
        cond = self.model.prepare_conditions(batch["lyrics"], batch["styles"], batch.get("prompts"))
        return reward_forward(self.model, self.head, batch["codes"], batch["lengths"], cond, batch.get("eos"))

    def predict_pairs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores of a pair batch's chosen and rejected songs [B, D + 1] each, and their labels."""
        cond = self.model.prepare_conditions(batch["lyrics"], batch["styles"], batch.get("prompts"))
        ch = reward_forward(self.model, self.head, batch["chosen"], batch["chosen_lengths"], cond,
                            batch.get("chosen_eos"))
        rj = reward_forward(self.model, self.head, batch["rejected"], batch["rejected_lengths"], cond,
                            batch.get("rejected_eos"))
        labels = pair_labels(batch.get("meta") or [{}] * ch.shape[0], self.outputs, self.rank_margin).to(ch.device)
        return ch.float(), rj.float(), labels

    def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return reward_loss(pred, target, loss=self.loss_kind, rank_loss=self.rank_loss, rank_weight=self.rank_weight,
                           rank_margin=self.rank_margin)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if "chosen" in batch:  # preference pairs
            ch, rj, labels = self.predict_pairs(batch)
            loss = pair_bt_loss(ch, rj, labels)
            B = ch.shape[0]
            self.advance_data_position(B)
            self.log("train/loss", loss, prog_bar=True, batch_size=B)
            self.log("train/pair_acc", ((ch[:, -1] - rj[:, -1]) > 0).float().mean(), batch_size=B)
            return loss
        pred = self.predict_batch(batch)
        target = batch["targets"].to(pred.device)
        loss, parts = self._loss(pred, target)
        B = pred.shape[0]
        self.advance_data_position(B)
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        for k, v in parts.items():
            self.log(f"train/{k}", v, batch_size=B)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "chosen" in batch:
            ch, rj, labels = self.predict_pairs(batch)
            self.val_loss.update(pair_bt_loss(ch, rj, labels), weight=ch.shape[0])
            d = ch - rj
            right = torch.where(d == 0, 0.5, ((d * labels) > 0).float()) * (labels != 0)
            self.val_pair_right.update(right)
            self.val_pair_n.update((labels != 0).float())
            return
        pred = self.predict_batch(batch).float()
        target = batch["targets"].to(pred.device)
        self.val_loss.update(regression_loss(pred, target, self.loss_kind), weight=pred.shape[0])
        self.val_pred.update(pred)
        self.val_target.update(target)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        if self.val_pair_n.update_count:
            right, n = self.val_pair_right.compute(), self.val_pair_n.compute()
            for j, name in enumerate(self.outputs):
                if float(n[:, j].sum()) > 0:
                    self.log(f"val/{name}/pair_acc", right[:, j].sum() / n[:, j].sum(),
                             prog_bar=name == OVERALL)
            self.val_pair_right.reset()
            self.val_pair_n.reset()
        if not self.val_pred.update_count:
            self.val_loss.reset()
            return
        pred, target = self.val_pred.compute(), self.val_target.compute()
        if pred.ndim == 2 and pred.shape[0] >= 2:
            for j, name in enumerate(self.outputs):
                m = ranking_metrics(pred[:, j].cpu(), target[:, j].cpu())
                for k in METRICS:
                    self.log(f"val/{name}/{k}", m[k], prog_bar=(name == OVERALL and k == "srcc"))
        for m in (self.val_loss, self.val_pred, self.val_target):
            m.reset()


__all__ = ["LOSSES", "RANK_LOSSES", "RANK_SCALE", "RewardModule", "bt_loss", "check_reward_settings",
           "listmle_loss", "pair_bt_loss",
           "pair_labels", "regression_loss", "reward_loss"]
