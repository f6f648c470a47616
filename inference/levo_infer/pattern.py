"""The delay pattern that interleaves the K token streams.

Step 0 is all special; step t+1 holds frame t - d_k of stream k when that frame exists, else the
special id. A sequence of T frames becomes T + max(d) + 1 steps. Logits at step s predict step
s+1, so the prediction of frame t of stream k comes from step t + d_k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def build_delayed(codes: torch.Tensor, delays: Sequence[int], special: int) -> torch.Tensor:
    """[B, K, T] frames -> [B, K, T + max(delays) + 1] pattern steps."""
    B, K, T = codes.shape
    maxd = max(delays)
    out = codes.new_full((B, K, T + maxd + 1), special)
    for k, d in enumerate(delays):
        out[:, k, 1 + d:1 + d + T] = codes[:, k]
    return out


def revert_steps(h_main: torch.Tensor, h_sub: torch.Tensor, delays: Sequence[int], T: int) -> torch.Tensor:
    """Per-step outputs [B, S, ...] of the two stacks -> per-frame [B, K, T, ...]: frame t of
    stream k reads step t + d_k (stream 0 from the main stack, the others from the sub-stack)."""
    parts = [(h_main if k == 0 else h_sub)[:, d:d + T] for k, d in enumerate(delays)]
    return torch.stack(parts, dim=1)


def step_frame_index(step: int, delays: Sequence[int]) -> list[int]:
    """For the step being generated (index ``step`` >= 1), the frame index of each stream (may be
    negative: not yet started)."""
    return [step - 1 - d for d in delays]
