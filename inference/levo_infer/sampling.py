"""Token choice for generation, fused over the batch, with one random stream per song.

Every song owns a block of uniform numbers drawn once from its own generator (``seed``), one per
(pattern step, stream): :func:`song_uniforms`. A sampled token is the inverse CDF of the step's
(temperature / top-k / top-p processed) distribution at that song's uniform for that step and stream,
so sampling is a handful of batched tensor ops per step (no per-row Python loop, no generator call
per step) and a song's tokens depend only on its own logits and its own seed: not on the songs
beside it, the slot count or the queue order. Greedy (``temperature <= 0`` or ``top_k == 1``) is
an argmax and uses no randomness.

Rules per stream (``compat=True``: the released ones; see :mod:`levo_infer.generate`):
temperature, then top-k (the k largest logits; sampling among them only is the same distribution as
masking the rest), then top-p (the smallest set of most likely tokens whose mass reaches ``top_p``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: which random numbers a sampled song is drawn from, for caches of sampled songs to key on: 2 is this
#: module's per-song inverse-CDF draws (the generation engine); 1 was one batch-shared generator's
#: ``torch.multinomial`` per step. Greedy songs do not depend on it.
SAMPLER_VERSION = 2

RELEASED_PENALTY = 1.1
RELEASED_WINDOW = 50
RELEASED_TOP_K = 5000
RELEASED_TEMPERATURE = 0.8

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SamplingConfig:
    """Per-stream sampling settings (a value or a list with one entry per stream)."""

    temperature: float | Sequence[float] = 1.0
    top_k: int | Sequence[int] = 0
    top_p: float | Sequence[float] = 0.0

    def for_stream(self, k: int) -> tuple[float, int, float]:
        pick = lambda v: v[k] if isinstance(v, (list, tuple)) else v  # noqa: E731
        return float(pick(self.temperature)), int(pick(self.top_k)), float(pick(self.top_p))


def song_uniforms(generator: torch.Generator | None, steps: int, streams: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The random stream of one song: uniforms [steps, streams] in [0, 1) from ``generator``
    (None: torch's global RNG), drawn in one call."""
    dev = generator.device if generator is not None else (device or "cpu")
    return torch.rand((steps, streams), generator=generator, device=dev)


def _row_uniforms(n: int, gens: Generators, device: torch.device) -> torch.Tensor:
    if gens is None or isinstance(gens, torch.Generator):
        return torch.rand(n, generator=gens, device=gens.device if gens is not None else device).to(device)
    if len(gens) != n:
        raise ValueError(f"got {len(gens)} generators for {n} rows")
    return torch.cat([torch.rand(1, generator=g, device=g.device) for g in gens]).to(device)


def sample_uniform(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                   u: torch.Tensor) -> torch.Tensor:
    """One id per row of ``logits`` [N, V] by inverse CDF at ``u`` [N] (greedy when
    ``temperature <= 0`` or ``top_k == 1``; ``u`` is then unused)."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1)
    x = logits.float() / temperature
    idx = None
    if top_k and 0 < top_k < x.shape[-1]:
        x, idx = x.topk(top_k, dim=-1)  # sorted, largest first
    probs = torch.softmax(x, dim=-1)
    if top_p and top_p > 0.0:
        if idx is None:
            probs, idx = probs.sort(dim=-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    cdf = probs.cumsum(-1)
    # first j with cdf[j] > u * total; tokens of zero probability are never chosen (strict >)
    j = (cdf <= u.to(cdf.dtype)[:, None] * cdf[:, -1:]).sum(-1)
    j = torch.minimum(j, (probs > 0).cumsum(-1).argmax(-1))  # u*total rounding up to the total: last live token
    return j if idx is None else idx.gather(-1, j[:, None]).squeeze(-1)


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: Generators = None) -> torch.Tensor:
    """Sample one id per row of ``logits`` [N, V]; ``generator``: None (global RNG), one shared
    generator, or one per row (rows then do not depend on each other). See :func:`sample_uniform`."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1)
    return sample_uniform(logits, temperature, top_k, top_p, _row_uniforms(logits.shape[0], generator, logits.device))


def stream_rule(k: int, *, compat: bool, sampling: SamplingConfig) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) for stream ``k``. ``compat``: the released rules, from stream 0's
    settings: temperature > 0 samples; top-p (when > 0) on every stream and wins over top-k; else
    top-k on codebook 0 and greedy on the others (temperature 0 here means greedy)."""
    if not compat:
        return sampling.for_stream(k)
    temp, top_k, top_p = sampling.for_stream(0)
    if top_p > 0:
        return temp, 0, top_p
    if top_k > 0 and k > 0:
        return 0.0, 0, 0.0
    return temp, top_k, 0.0


def choose_tokens(lg: torch.Tensor, u: torch.Tensor, *, compat: bool, sampling: SamplingConfig) -> torch.Tensor:
    """Tokens [N, K] from processed logits [N, K, V] and the songs' uniforms ``u`` [N, K] for this step."""
    return torch.stack([sample_uniform(lg[:, k], *stream_rule(k, compat=compat, sampling=sampling), u[:, k])
                        for k in range(lg.shape[1])], dim=1)


def prompt_ban_mask(prompt: torch.Tensor | None, n_classes: int, frames: int, code_size: int) -> torch.Tensor | None:
    """[B, n_classes] bool: the prompt's mixed-stream codes (first ``frames`` frames, codes below
    ``code_size``; EOS and pad never banned). None when there is no prompt."""
    if prompt is None:
        return None
    row = prompt[:, 0, :frames].long()
    mask = torch.zeros(prompt.shape[0], n_classes, dtype=torch.bool, device=prompt.device)
    ok = (row >= 0) & (row < code_size)
    mask.scatter_(1, torch.where(ok, row, torch.zeros_like(row)), ok)
    return mask


__all__ = ["RELEASED_PENALTY", "RELEASED_TEMPERATURE", "RELEASED_TOP_K", "RELEASED_WINDOW", "Generators",
           "SamplingConfig", "choose_tokens", "stream_rule", "prompt_ban_mask", "sample_logits", "sample_uniform", "song_uniforms"]
