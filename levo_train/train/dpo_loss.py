"""The DPO loss family, named and computed as in TRL so runs can be compared.

Two layers:

* :func:`dpo_loss` — one preference loss on whatever sequence log-probs it is given:
  ``Δ = (π_c − ref_c) − (π_r − ref_r)`` and, per pair,

  ============  =====================================================================
  ``sigmoid``   ``−(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)``  (DPO; ε > 0 is conservative DPO, cDPO)
  ``robust``    ``(−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε)``  (robust DPO, unbiased under
                label-flip rate ε)
  ``hinge``     ``relu(1 − βΔ)``  (SLiC)
  ``ipo``       ``(Δ − 1/(2β))²``  (IPO, β is the paper's τ)
  ============  =====================================================================

  with ε = ``label_smoothing`` (0 ≤ ε < 0.5; only ``sigmoid`` and ``robust`` use it).
  Rewards are ``β·(policy − ref)``, detached.
* :func:`combined_dpo_loss` — TRL's ``DPOConfig(loss_type=[...], loss_weights=[...])``: takes
  log-probs **summed** over completion tokens plus the token counts, and adds the weighted
  batch means of each term, including the ``sft`` term (:func:`sft_loss`).

Differences from TRL 1.16 (``trl/trainer/dpo_trainer.py``, checked against the installed code):

* ``sigmoid`` + label smoothing: TRL 1.16 **ignores** ``label_smoothing`` for ``sigmoid`` (its
  config documents it for ``robust``/``exo_pair`` only; older TRL applied the cDPO formula). We
  apply cDPO as the cDPO note and earlier TRL define it. With ε = 0 both are identical; a TRL
  run with ``loss_type="sigmoid", label_smoothing=ε`` corresponds to our ε = 0.
* ``ipo``: TRL divides each completion's summed log-ratio by its number of completion tokens
  before the IPO loss (it says the IPO authors confirmed this form). :func:`dpo_loss` does no
  normalisation — IPO is applied to the log-probs you pass; :func:`combined_dpo_loss` does what
  TRL does (divides by the token counts for the ``ipo`` term only; rewards stay unnormalised, as
  TRL logs them), so pass it **summed** log-probs, never already-normalised ones.
* ``sft``: as TRL, the negative log-likelihood of the chosen completions averaged over all chosen
  tokens in the (per-device) batch, not per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PREFERENCE_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "hinge", "ipo")
LOSS_TYPES: tuple[str, ...] = (*PREFERENCE_LOSS_TYPES, "sft")


def _check_loss_type(loss_type: str, allowed: Sequence[str]) -> None:
    if loss_type not in allowed:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid loss types: {', '.join(allowed)}")


def _float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (log-probs of bf16 models are summed in fp32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards ``(losses, chosen_rewards, rejected_rewards)``, each [B].

    Inputs are sequence log-probs [B] (usually summed over completion tokens; for ``ipo`` pass
    per-token means to match TRL, see the module doc). The reference log-probs are treated as
    constants (detached). ``label_smoothing`` ε ∈ [0, 0.5) is used by ``sigmoid`` (cDPO) and
    ``robust``; a non-zero ε with ``hinge``/``ipo`` is an error rather than silently ignored.
    """
    _check_loss_type(loss_type, PREFERENCE_LOSS_TYPES)
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss expects four log-prob tensors of the same shape [B]; got {sorted(map(tuple, shapes))}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = float(label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {eps}")
    if eps and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing={eps} has no meaning for loss_type={loss_type!r} "
                         "(it is used by 'sigmoid' (cDPO) and 'robust')")

    chosen_logratios = _float(policy_chosen_logps) - _float(ref_chosen_logps).detach()
    rejected_logratios = _float(policy_rejected_logps) - _float(ref_rejected_logps).detach()
    delta = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if eps:
            losses = (1 - eps) * losses - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo
        losses = (delta - 1 / (2 * beta)) ** 2

    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sft_loss(chosen_logps_sum: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """TRL's ``sft`` term: NLL of the chosen completions per token, averaged over all chosen tokens
    of the batch (``−Σ logps / Σ counts``); a scalar."""
    if chosen_logps_sum.shape != chosen_token_counts.shape:
        raise ValueError(f"sft_loss: logps {tuple(chosen_logps_sum.shape)} and counts "
                         f"{tuple(chosen_token_counts.shape)} differ in shape")
    total = _float(chosen_token_counts).sum().clamp(min=1.0)
    return -_float(chosen_logps_sum).sum() / total


@dataclass
class DPOLossOutput:
    """Result of :func:`combined_dpo_loss`: the scalar loss to backpropagate, each term's
    unweighted batch mean (for logging), and the implicit rewards [B] (from summed log-probs)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None


def _as_list(loss_type: str | Sequence[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else [str(t) for t in loss_type]


def combined_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
) -> DPOLossOutput:
    """TRL-style multi-loss: ``Σ_i w_i · mean(term_i)`` over ``loss_type`` (e.g. ``["sigmoid", "sft"]``).

    Log-probs are **summed** over completion tokens; ``*_token_counts`` [B] are the numbers of
    completion tokens (needed by ``sft`` for chosen, and by ``ipo`` for both, which, as TRL,
    normalises the log-probs per token for that term only). Weights default to 1 each.
    """
    types = _as_list(loss_type)
    if not types:
        raise ValueError(f"loss_type is empty; valid loss types: {', '.join(LOSS_TYPES)}")
    for t in types:
        _check_loss_type(t, LOSS_TYPES)
    if len(set(types)) != len(types):
        raise ValueError(f"loss_type lists a loss twice: {types}")
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types {types}")
    needs = {"sft": ("chosen_token_counts",), "ipo": ("chosen_token_counts", "rejected_token_counts")}
    given = {"chosen_token_counts": chosen_token_counts, "rejected_token_counts": rejected_token_counts}
    for t in types:
        missing = [n for n in needs.get(t, ()) if given[n] is None]
        if missing:
            raise ValueError(f"loss_type {t!r} needs {' and '.join(missing)}")
    if label_smoothing and not {"sigmoid", "robust"} & set(types):
        raise ValueError(f"label_smoothing={label_smoothing} is used only by 'sigmoid' (cDPO) and 'robust', "
                         f"not by {types}")

    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    out = DPOLossOutput(loss=policy_chosen_logps.new_zeros((), dtype=_float(policy_chosen_logps).dtype))
    for t, w in zip(types, weights):
        if t == "sft":
            term = sft_loss(policy_chosen_logps, chosen_token_counts)
        else:
            args = logps
            if t == "ipo":
                c = _float(chosen_token_counts).clamp(min=1.0)
                r = _float(rejected_token_counts).clamp(min=1.0)
                args = (_float(policy_chosen_logps) / c, _float(policy_rejected_logps) / r,
                        _float(ref_chosen_logps) / c, _float(ref_rejected_logps) / r)
            ls = label_smoothing if t in ("sigmoid", "robust") else 0.0
            term = dpo_loss(*args, beta=beta, loss_type=t, label_smoothing=ls)[0].mean()
        out.terms[t] = term.detach()
        out.loss = out.loss + w * term
    out.chosen_rewards = beta * (_float(policy_chosen_logps) - _float(ref_chosen_logps)).detach()
    out.rejected_rewards = beta * (_float(policy_rejected_logps) - _float(ref_rejected_logps)).detach()
    return out
