"""Collating decoded song records into model batches (no Lightning: the reward model, reference
log-probs and the datamodules all batch songs the same way)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from levo_train.data.shards import Song

__all__ = ["ENDED_KEY", "collate_songs"]

#: song meta key: false for a song cut at its frame limit without EOS (levo-infer's output key)
ENDED_KEY = "ended_with_eos"


def collate_songs(songs: Sequence[Song], code_size: int) -> dict[str, Any]:
    """Collate songs into a batch dict.

    ``codes`` LongTensor [B, 3, Tmax] right-padded with ``code_size + 1``; ``lengths`` [B];
    ``eos`` BoolTensor [B]: the song ended with EOS (``meta["ended_with_eos"]``, default true; false
    for a song cut at its frame limit, which is then scored without an appended EOS);
    ``prompts`` LongTensor [B, 3, Pmax] (``code_size + 1`` padded; all ``code_size + 1`` for songs
    without one) or None when no song has a prompt; ``lyrics``, ``styles``, ``keys``, ``meta`` lists.
    """
    if not songs:
        raise ValueError("cannot collate an empty list of songs")
    pad = code_size + 1
    lengths = [int(s.tokens.shape[1]) for s in songs]
    codes = torch.full((len(songs), 3, max(lengths)), pad, dtype=torch.long)
    for i, s in enumerate(songs):
        codes[i, :, : lengths[i]] = torch.from_numpy(np.ascontiguousarray(s.tokens, dtype=np.int64))
    prompts = None
    if any(s.prompt is not None for s in songs):
        p_len = max(int(s.prompt.shape[1]) for s in songs if s.prompt is not None)
        prompts = torch.full((len(songs), 3, p_len), pad, dtype=torch.long)
        for i, s in enumerate(songs):
            if s.prompt is not None:
                prompts[i, :, : s.prompt.shape[1]] = torch.from_numpy(
                    np.ascontiguousarray(s.prompt, dtype=np.int64)
                )
    return {
        "codes": codes,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "eos": torch.tensor([bool(s.meta.get(ENDED_KEY, True)) for s in songs], dtype=torch.bool),
        "lyrics": [s.lyric for s in songs],
        "styles": [s.style for s in songs],
        "prompts": prompts,
        "keys": [s.key for s in songs],
        "meta": [s.meta for s in songs],
    }
