"""Batched autoregressive generation with a KV cache for both stacks and classifier-free guidance.

The conditional and unconditional halves run as one batch; the prefix is encoded once (prefill)
and every later step feeds one pattern step. Sampling: temperature, top-k, top-p per stream;
``temperature == 0`` or ``top_k == 1`` is greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .model import Conditions, LeLM

VERY_HIGH = "[Musicality-very-high]"
NEGATIVE_STYLE_V2 = "[Musicality-very-low], ."


def null_styles(styles: Sequence[str | None], version: str) -> list[str | None]:
    """The unconditional style for CFG: v2 uses the negative prompt when the style asks for the
    top musicality tier, otherwise no style at all."""
    if version != "v2":
        return [None] * len(styles)
    return [NEGATIVE_STYLE_V2 if (s is not None and VERY_HIGH in s) else None for s in styles]


@dataclass
class SamplingConfig:
    """Per-stream sampling settings (a value or a list with one entry per stream)."""

    temperature: float | Sequence[float] = 1.0
    top_k: int | Sequence[int] = 0
    top_p: float | Sequence[float] = 0.0

    def for_stream(self, k: int) -> tuple[float, int, float]:
        pick = lambda v: v[k] if isinstance(v, (list, tuple)) else v  # noqa: E731
        return float(pick(self.temperature)), int(pick(self.top_k)), float(pick(self.top_p))


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Sample one id per row of ``logits`` [N, V]."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k and top_k > 0 and top_k < probs.shape[-1]:
        v, _ = probs.topk(top_k, dim=-1)
        probs = torch.where(probs < v[:, -1:], torch.zeros_like(probs), probs)
    if top_p and top_p > 0.0:
        sp, si = probs.sort(dim=-1, descending=True)
        cum = sp.cumsum(-1)
        drop = cum - sp > top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationOutput:
    codes: torch.Tensor  # [B, K, T] frames, special id past each song's length
    lengths: torch.Tensor  # [B] frames before the earliest EOS (or max_frames)


@torch.no_grad()
def generate_codes(model: LeLM, cond: Conditions, *, max_frames: int, null_cond: Conditions | None = None,
                   cfg_coef: float = 1.5, sampling: SamplingConfig | None = None,
                   generator: torch.Generator | None = None) -> GenerationOutput:
    """Generate up to ``max_frames`` frames per song for a batch of tokenised conditions."""
    sampling = sampling or SamplingConfig()
    B, K = cond.batch_size, model.code_depth
    delays, special, eos = model.cfg.delays, model.pad_id, model.eos_id
    maxd = max(delays)
    use_cfg = null_cond is not None and cfg_coef != 1.0
    c = Conditions.cat([cond, null_cond]) if use_cfg else cond
    prefix = model.condition_prefix(c)
    P = prefix[0].shape[1]
    n_steps = max_frames + maxd + 1
    caches = model.new_caches(c.batch_size, P + n_steps)
    dev = model.device
    steps = torch.full((B, K, n_steps), special, dtype=torch.long, device=dev)
    ended = torch.zeros((B, K), dtype=torch.bool, device=dev)
    eos_frame = torch.full((B, K), max_frames, dtype=torch.long, device=dev)
    delay_t = torch.tensor(delays, device=dev)
    first = steps[:, :, :1].repeat(2, 1, 1) if use_cfg else steps[:, :, :1]
    h1, h2 = model.step_hidden(first, prefix, caches, start=0)
    for s in range(1, n_steps):
        toks = []
        for k in range(K):
            lg = model.head(k, (h1 if k == 0 else h2)[:, -1]).float()
            if use_cfg:
                lg = lg[B:] + (lg[:B] - lg[B:]) * cfg_coef
            t, tk, tp = sampling.for_stream(k)
            toks.append(sample_logits(lg, t, tk, tp, generator))
        tok = torch.stack(toks, dim=1)  # [B, K]
        frame = s - 1 - delay_t  # [K]
        valid = ((frame >= 0) & (frame < max_frames))[None, :] & ~ended
        tok = torch.where(valid, tok, torch.full_like(tok, special))
        new_eos = valid & (tok == eos)
        eos_frame = torch.where(new_eos, frame[None, :].expand(B, K), eos_frame)
        ended |= new_eos
        steps[:, :, s] = tok
        if bool(ended.all()) or s == n_steps - 1:
            break
        feed = tok[:, :, None]
        h1, h2 = model.step_hidden(feed.repeat(2, 1, 1) if use_cfg else feed, None, caches, start=P + s)
    lengths = eos_frame.min(dim=1).values
    frames = torch.stack([steps[:, k, 1 + d:1 + d + max_frames] for k, d in enumerate(delays)], dim=1)
    T = torch.arange(max_frames, device=dev)
    frames = torch.where(T[None, None, :] < lengths[:, None, None], frames, torch.full_like(frames, special))
    return GenerationOutput(frames, lengths)


@torch.no_grad()
def generate(model: LeLM, lyrics: Sequence[str | None], styles: Sequence[str | None],
             prompt: torch.Tensor | None = None, *, max_frames: int, cfg_coef: float | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
             seed: int | None = None) -> GenerationOutput:
    """Generate songs from text conditions (strings exactly as the conditioners receive them)."""
    cfg_coef = model.cfg.cfg_coef if cfg_coef is None else cfg_coef
    cond = model.prepare_conditions(lyrics, styles, prompt)
    null = model.prepare_conditions([None] * len(lyrics), null_styles(styles, model.cfg.version), None)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(seed)
    return generate_codes(model, cond, max_frames=max_frames, null_cond=null, cfg_coef=cfg_coef,
                          sampling=SamplingConfig(temperature, top_k, top_p), generator=gen)
