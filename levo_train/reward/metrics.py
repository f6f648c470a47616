"""How well predicted scores rank songs: LCC, SRCC, KTAU and pairwise accuracy.

The one definition used by reward-model validation (``val/<dim>/<metric>``) and ``levo-eval
reward``. Correlations come from torchmetrics' functional forms (Pearson, Spearman, Kendall tau-b);
``pair_acc`` is the share of song pairs whose true scores differ by at least ``margin`` that the
prediction orders the same way (a predicted tie counts one half).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional import kendall_rank_corrcoef, pearson_corrcoef, spearman_corrcoef

METRICS = ("lcc", "srcc", "ktau", "pair_acc")
#: the true-score gap a pair needs to count towards pair accuracy
PAIR_MARGIN = 0.05


def pair_accuracy(pred: torch.Tensor, target: torch.Tensor, margin: float = PAIR_MARGIN) -> tuple[float, int]:
    """(accuracy, number of pairs) over all pairs ``i < j`` with ``|target_i - target_j| >= margin``."""
    p, t = pred.double().flatten(), target.double().flatten()
    dt = t[:, None] - t[None, :]
    dp = p[:, None] - p[None, :]
    use = torch.triu(dt.abs() >= margin, diagonal=1)
    n = int(use.sum())
    if n == 0:
        return float("nan"), 0
    agree = torch.where(dp == 0, 0.5, (torch.sign(dp) == torch.sign(dt)).double())
    return float(agree[use].sum() / n), n


def ranking_metrics(pred: Any, target: Any, margin: float = PAIR_MARGIN) -> dict[str, float]:
    """``{"lcc", "srcc", "ktau", "pair_acc"}`` of predictions against true scores (1-D); NaN where
    undefined (fewer than two songs, or a constant side)."""
    p = torch.as_tensor(pred, dtype=torch.float64).flatten()
    t = torch.as_tensor(target, dtype=torch.float64).flatten()
    if p.shape != t.shape:
        raise ValueError(f"{p.numel()} predictions for {t.numel()} targets")
    nan = float("nan")
    out = {"lcc": nan, "srcc": nan, "ktau": nan}
    if p.numel() >= 2 and float(p.std()) > 0 and float(t.std()) > 0:
        out = {"lcc": float(pearson_corrcoef(p, t)), "srcc": float(spearman_corrcoef(p, t)),
               "ktau": float(kendall_rank_corrcoef(p, t))}
    out["pair_acc"] = pair_accuracy(p, t, margin)[0]
    return out


__all__ = ["METRICS", "PAIR_MARGIN", "pair_accuracy", "ranking_metrics"]
