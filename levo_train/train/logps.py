"""Sequence log-probabilities of songs under LeLM (DPO policy/reference, reference precompute).

Log-softmax is taken in fp32 and only at valid targets (real frames plus EOS; pad excluded),
summed per song over all streams with per-stream weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from levo_infer.model import Conditions, LeLM
from levo_infer.tokens import append_eos  # the EOS rule of the token format; lm.py imports it from here


def sequence_logps(
    model: LeLM,
    codes: torch.Tensor,
    lengths: torch.Tensor,
    cond: Conditions,
    *,
    stream_weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B] of each song (frames + EOS) and the number of scored tokens [B]
    (weighted by ``stream_weights``, so ``logps / counts`` is a per-token mean)."""
    codes = append_eos(codes, lengths, model.eos_id, model.pad_id)
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
