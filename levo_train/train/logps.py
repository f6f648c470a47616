"""Sequence log-probabilities of songs under LeLM (DPO policy/reference, reference precompute).

Log-softmax is taken in fp32 and only at valid targets (real frames plus EOS; pad excluded),
summed per song over all streams with per-stream weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from levo_infer.model import Conditions, LeLM
from levo_infer.tokens import append_eos


def sequence_logps(
    model: LeLM,
    codes: torch.Tensor,
    lengths: torch.Tensor,
    cond: Conditions,
    *,
    stream_weights: Sequence[float] | None = None,
    ended: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B] of each song (frames + EOS) and the number of scored tokens [B]
    (weighted by ``stream_weights``, so ``logps / counts`` is a per-token mean). ``ended`` [B]
    bool: songs that ended with EOS (None: all); a song cut at its frame limit is scored on its
    frames alone (no EOS appended: the policy is not taught to stop where the budget ran out)."""
    codes = append_eos(codes, lengths, model.eos_id, model.pad_id, ended)
    H = model.frame_hidden(codes, cond)
    B, K = codes.shape[:2]
    w = list(stream_weights) if stream_weights is not None else [1.0] * K
    total = H.new_zeros(B, dtype=torch.float32)
    count = H.new_zeros(B, dtype=torch.float32)
    for k in range(K):
        if w[k] == 0:
            continue
        mask = codes[:, k] != model.pad_id  # [B, T+1]
        logits = model.head(k, H[:, k][mask]).float()
        tgt = codes[:, k][mask]
        tok = torch.log_softmax(logits, dim=-1).gather(-1, tgt[:, None]).squeeze(-1)
        row = torch.nonzero(mask, as_tuple=True)[0]
        total = total.index_add(0, row, tok * w[k])
        count = count.index_add(0, row, torch.full_like(tok, float(w[k])))
    return total, count


def cat_pairs(chosen: torch.Tensor, rejected: torch.Tensor, pad: int) -> torch.Tensor:
    """[B,K,Tc] and [B,K,Tr] -> [2B, K, max(Tc,Tr)] (chosen first), right-padded with ``pad``."""
    T = max(chosen.shape[2], rejected.shape[2])
    pad_to = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[2]), value=pad)  # noqa: E731
    return torch.cat([pad_to(chosen), pad_to(rejected)], dim=0)


def pair_conditions(model: LeLM, batch: dict[str, Any]) -> Conditions:
    """Conditions of the concatenated ``[chosen; rejected]`` batch: each pair's shared lyric, style
    and prompt, tokenised once and repeated for both halves. No condition dropout (policy and
    reference must see identical conditions)."""
    cond = model.prepare_conditions(batch["lyrics"], batch["styles"], batch.get("prompts"))
    return Conditions.cat([cond, cond])


def pair_logps(model: LeLM, batch: dict[str, Any], cond2: Conditions | None = None, *,
               stream_weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and scored-token counts, each [2B] (chosen first), of a pair batch under
    ``model`` in one forward; the single definition used by training and ``levo-data ref-logps``."""
    cond2 = pair_conditions(model, batch) if cond2 is None else cond2
    dev = model.device
    codes = cat_pairs(batch["chosen"].to(dev), batch["rejected"].to(dev), model.pad_id)
    lengths = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]]).to(dev)
    ended = None
    if batch.get("chosen_eos") is not None and batch.get("rejected_eos") is not None:
        ended = torch.cat([batch["chosen_eos"], batch["rejected_eos"]]).to(dev)
    return sequence_logps(model, codes, lengths, cond2, stream_weights=stream_weights, ended=ended)
