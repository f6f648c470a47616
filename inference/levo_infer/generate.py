"""Batched autoregressive generation with a KV cache for both stacks and classifier-free guidance.

One call generates many songs: the conditional and unconditional (CFG) halves run as one batch,
the ``[lyrics | prompt | style]`` prefix is encoded once (prefill), every later step feeds one
delay-pattern step, and a song that has finished leaves the batch (its cache rows are dropped).

Sampling, applied to the CFG-combined logits of each step in this order:

1. repetition penalty: every distinct code (< EOS) seen in a stream during the last
   ``penalty_window`` pattern steps has its logit **divided** by ``repetition_penalty`` (released:
   1.1 over 50 steps, all streams; a division, so negative logits move up - as released);
2. prompt-token ban: the audio prompt's mixed-track codes are banned from codebook 0 (EOS never);
3. token choice. ``compat=True`` reproduces the released rules exactly: temperature + top-k on
   codebook 0, greedy on the other codebooks (released top-p > 0: top-p on every codebook).
   ``compat=False`` applies temperature / top-k / top-p to every codebook (each may be a
   per-codebook list, see :class:`SamplingConfig`). ``temperature <= 0`` or ``top_k == 1`` is greedy.

EOS: a stream's tokens after its EOS are the special id; a song stops when all of its streams
emitted EOS (or at ``max_frames``); its frames are cut at the earliest EOS frame of any stream.

Seeds are per song (``seed`` + row index, or an explicit list), so a song's tokens do not depend
on which other songs share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import Conditions, KVCache, LeLM
from .styles import null_styles

RELEASED_PENALTY = 1.1
RELEASED_WINDOW = 50
RELEASED_TOP_K = 5000
RELEASED_TEMPERATURE = 0.8

ProgressFn = Callable[[int, int, int], None]  # (step, total steps, songs still running)


# ----------------------------------------------------------------------------- sampling
@dataclass
class SamplingConfig:
    """Per-stream sampling settings (a value or a list with one entry per stream)."""

    temperature: float | Sequence[float] = 1.0
    top_k: int | Sequence[int] = 0
    top_p: float | Sequence[float] = 0.0

    def for_stream(self, k: int) -> tuple[float, int, float]:
        pick = lambda v: v[k] if isinstance(v, (list, tuple)) else v  # noqa: E731
        return float(pick(self.temperature)), int(pick(self.top_k)), float(pick(self.top_p))


Generators = torch.Generator | Sequence[torch.Generator] | None


def _multinomial(probs: torch.Tensor, gens: Generators) -> torch.Tensor:
    """One draw per row of ``probs`` [N, V]; ``gens``: None (global RNG), one shared generator, or
    one generator per row (rows then do not depend on each other)."""
    if gens is None or isinstance(gens, torch.Generator):
        return torch.multinomial(probs, 1, generator=gens).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).squeeze(-1) for i, g in enumerate(gens)])


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: Generators = None) -> torch.Tensor:
    """Sample one id per row of ``logits`` [N, V] (greedy when ``temperature <= 0`` or ``top_k == 1``).

    Top-k draws among the k largest logits only (the same distribution as masking the others, at a
    fraction of the cost for a 16385-way vocabulary); top-p keeps the smallest set of most likely
    tokens whose mass reaches ``top_p`` (after top-k when both are given)."""
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
    j = _multinomial(probs / probs.sum(-1, keepdim=True), generator)
    return j if idx is None else idx.gather(-1, j[:, None]).squeeze(-1)


def _choose(lg: torch.Tensor, *, compat: bool, sampling: SamplingConfig, gens: Generators) -> torch.Tensor:
    """Tokens [N, K] from processed logits [N, K, V]."""
    K = lg.shape[1]
    if compat:  # released: use_sampling with temp > 0; top_p wins over top_k; top-k on codebook 0 only
        temp, top_k, top_p = sampling.for_stream(0)
        if temp <= 0:
            return lg.argmax(-1)
        if top_p > 0:
            return torch.stack([sample_logits(lg[:, k], temp, 0, top_p, gens) for k in range(K)], dim=1)
        if top_k > 0:
            first = sample_logits(lg[:, 0], temp, top_k, 0.0, gens)
            return torch.cat([first[:, None], lg[:, 1:].argmax(-1)], dim=1)
        return torch.stack([sample_logits(lg[:, k], temp, 0, 0.0, gens) for k in range(K)], dim=1)
    return torch.stack([sample_logits(lg[:, k], *sampling.for_stream(k), gens) for k in range(K)], dim=1)


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


# ----------------------------------------------------------------------------- the loop
@dataclass
class GenerationOutput:
    codes: torch.Tensor  # [B, K, max_frames] frames, special id from each song's length on
    lengths: torch.Tensor  # [B] frames before the earliest EOS (or max_frames)
    raw_codes: torch.Tensor | None = None  # [B, K, max_frames] per-stream tokens before the cut (EOS kept)
    steps: int = 0  # pattern steps run


def attention_backends(device: torch.device) -> AbstractContextManager:
    """On CUDA, restrict SDPA to the flash / memory-efficient / math kernels. With PyTorch's default
    choice (which may pick cuDNN attention) greedy bf16 generation on an H100 was not reproducible
    from run to run; with these kernels it is (and ``--low-mem`` gives the same tokens)."""
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _select_rows(caches: tuple[KVCache, KVCache], index: torch.Tensor) -> None:
    """Keep cache rows ``index`` (one layer at a time, so the peak is one extra layer)."""
    for cache in caches:
        for i in range(len(cache.k)):
            cache.k[i] = cache.k[i].index_select(0, index)
            cache.v[i] = cache.v[i].index_select(0, index)


@torch.no_grad()
def generate_codes(model: LeLM, cond: Conditions, *, max_frames: int, null_cond: Conditions | None = None,
                   cfg_coef: float = 1.5, sampling: SamplingConfig | None = None,
                   generator: Generators = None, compat: bool = False, repetition_penalty: float = 1.0,
                   penalty_window: int = RELEASED_WINDOW, banned: torch.Tensor | None = None,
                   stop_at_cut: bool = False, use_cache: bool = True,
                   progress: ProgressFn | None = None) -> GenerationOutput:
    """Generate up to ``max_frames`` frames per song for a batch of tokenised conditions.

    ``generator``: None (global RNG), one shared generator, or one per song. ``banned`` [B, V] bool:
    codes banned from codebook 0 (see :func:`prompt_ban_mask`). ``stop_at_cut``: a song stops as soon
    as every frame before its earliest EOS exists (its cut output is unchanged; the frames of the
    raw output past the cut are then the special id). ``use_cache=False`` recomputes every step from
    the full sequence (reference path for tests and benchmarks).
    """
    model.check_frames(max_frames)
    with attention_backends(model.device):
        return _generate_codes(model, cond, max_frames=max_frames, null_cond=null_cond, cfg_coef=cfg_coef,
                               sampling=sampling, generator=generator, compat=compat,
                               repetition_penalty=repetition_penalty, penalty_window=penalty_window, banned=banned,
                               stop_at_cut=stop_at_cut, use_cache=use_cache, progress=progress)


def _generate_codes(model: LeLM, cond: Conditions, *, max_frames: int, null_cond: Conditions | None,
                    cfg_coef: float, sampling: SamplingConfig | None, generator: Generators, compat: bool,
                    repetition_penalty: float, penalty_window: int, banned: torch.Tensor | None,
                    stop_at_cut: bool, use_cache: bool, progress: ProgressFn | None) -> GenerationOutput:
    sampling = sampling or SamplingConfig()
    B, K = cond.batch_size, model.code_depth
    delays, special, eos = list(model.cfg.delays), model.pad_id, model.eos_id
    V = eos + 1
    dev = model.device
    use_cfg = null_cond is not None and cfg_coef != 1.0
    c = Conditions.cat([cond, null_cond]) if use_cfg else cond
    p1, p2 = model.condition_prefix(c)
    P = p1.shape[1]
    n_steps = max_frames + max(delays) + 1
    caches = model.new_caches(c.batch_size, P + n_steps) if use_cache else None
    steps = torch.full((B, K, n_steps), special, dtype=torch.long, device=dev)
    ended = torch.zeros((B, K), dtype=torch.bool, device=dev)
    eos_frame = torch.full((B, K), max_frames, dtype=torch.long, device=dev)
    delay_t = torch.tensor(delays, device=dev)
    use_pen = repetition_penalty != 1.0 and penalty_window > 0
    seen = torch.zeros((B, K, V), dtype=torch.int32, device=dev) if use_pen else None
    banned = banned.to(dev) if banned is not None else None
    gens = generator
    if gens is not None and not isinstance(gens, torch.Generator) and len(gens) != B:
        raise ValueError(f"got {len(gens)} generators for {B} songs")

    def both(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if use_cfg else x

    active = torch.arange(B, device=dev)  # original row of each batch row
    per_row = gens is not None and not isinstance(gens, torch.Generator)
    row_gens = [gens[i] for i in range(B)] if per_row else gens
    s_run = 0
    if use_cache:
        h1, h2 = model.step_hidden(both(steps[:, :, :1]), (p1, p2), caches, start=0)
    for s in range(1, n_steps):
        s_run = s
        nA = active.numel()
        if not use_cache:
            h1, h2 = model.step_hidden(both(steps[active, :, :s]), (p1, p2), None, start=0)
        lg = torch.stack([model.head(k, (h1 if k == 0 else h2)[:, -1]).float() for k in range(K)], dim=1)
        if use_cfg:
            lg = lg[nA:] + (lg[:nA] - lg[nA:]) * cfg_coef
        if use_pen:
            lg = torch.where(seen[active] > 0, lg / repetition_penalty, lg)
        if banned is not None:
            lg[:, 0] = lg[:, 0].masked_fill(banned[active], float("-inf"))
        tok = _choose(lg, compat=compat, sampling=sampling, gens=row_gens)
        frame = s - 1 - delay_t  # [K]
        valid = ((frame >= 0) & (frame < max_frames))[None, :] & ~ended[active]
        tok = torch.where(valid, tok, torch.full_like(tok, special))
        new_eos = valid & (tok == eos)
        eos_frame[active] = torch.where(new_eos, frame[None, :].expand(nA, K), eos_frame[active])
        ended[active] = ended[active] | new_eos
        steps[active, :, s] = tok
        if use_pen:  # slide the window: add step s, drop step s - window
            real = tok < eos
            seen[active] = seen[active].scatter_add(2, torch.where(real, tok, eos)[:, :, None], real[:, :, None].int())
            if s - penalty_window >= 1:
                old = steps[active, :, s - penalty_window]
                real = old < eos
                seen[active] = seen[active].scatter_add(2, torch.where(real, old, eos)[:, :, None], -real[:, :, None].int())
        if progress is not None:
            progress(s, n_steps - 1, nA)
        if s == n_steps - 1:
            break
        done = ended[active].all(dim=1)
        if stop_at_cut:
            cut = eos_frame[active].min(dim=1).values
            done |= ((s - delay_t)[None, :] >= cut[:, None]).all(dim=1)
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            active = active[keep]
            if per_row:
                row_gens = [gens[i] for i in active.tolist()]
            rows = torch.cat([keep, keep + nA]) if use_cfg else keep
            p1, p2 = p1.index_select(0, rows), p2.index_select(0, rows)
            if use_cache:
                _select_rows(caches, rows)
            tok = tok[keep]
        if use_cache:
            h1, h2 = model.step_hidden(both(tok[:, :, None]), None, caches, start=P + s)
    lengths = eos_frame.min(dim=1).values
    raw = torch.stack([steps[:, k, 1 + d:1 + d + max_frames] for k, d in enumerate(delays)], dim=1)
    T = torch.arange(max_frames, device=dev)
    codes = torch.where(T[None, None, :] < lengths[:, None, None], raw, torch.full_like(raw, special))
    return GenerationOutput(codes, lengths, raw, s_run)


def make_generators(seed: int | Sequence[int] | None, batch: int, device: torch.device | str) -> list[torch.Generator] | None:
    """One generator per song: ``seed + i`` for an int seed, or the given per-song seeds."""
    if seed is None:
        return None
    seeds = [int(seed) + i for i in range(batch)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} songs")
    dev = torch.device(device)
    gens = []
    for s in seeds:
        g = torch.Generator(device=dev)
        g.manual_seed(s)
        gens.append(g)
    return gens


@torch.no_grad()
def generate(model: LeLM, lyrics: Sequence[str | None], styles: Sequence[str | None],
             prompt: torch.Tensor | None = None, *, max_frames: int, cfg_coef: float | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
             seed: int | Sequence[int] | None = None, compat: bool = False,
             repetition_penalty: float | None = None, penalty_window: int | None = None,
             ban_prompt_tokens: bool = True, stop_at_cut: bool = False, use_cache: bool = True,
             progress: ProgressFn | None = None) -> GenerationOutput:
    """Generate songs from text conditions (strings exactly as the conditioners receive them).

    ``prompt``: raw prompt tokens [B, K, frames] (16385 = none; a row of pad = no prompt for that
    song) or None. ``compat=True``: the released sampling rules exactly (``temperature``/``top_k``
    on codebook 0, greedy elsewhere, penalty 1.1 over 50 steps, prompt ban, earliest-EOS cut).
    ``compat=False``: ``temperature``/``top_k``/``top_p`` on every codebook (scalars or per-codebook
    lists), penalty off unless ``repetition_penalty`` is given. ``seed``: per-song seeds
    (``seed + i``, or a list); None draws from torch's global RNG.
    """
    B = len(lyrics)
    model.check_frames(max_frames)
    cfg_coef = model.cfg.cfg_coef if cfg_coef is None else cfg_coef
    if compat:
        if repetition_penalty not in (None, RELEASED_PENALTY) or penalty_window not in (None, RELEASED_WINDOW):
            raise ValueError("compat=True fixes the released repetition penalty (1.1 over 50 steps)")
        if not ban_prompt_tokens:
            raise ValueError("compat=True bans the prompt's tokens on codebook 0, as released")
        pen, win = RELEASED_PENALTY, RELEASED_WINDOW
    else:
        pen = 1.0 if repetition_penalty is None else float(repetition_penalty)
        win = RELEASED_WINDOW if penalty_window is None else int(penalty_window)
        if pen <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {pen}")
    cond = model.prepare_conditions(lyrics, styles, prompt)
    null = model.prepare_conditions([None] * B, null_styles(styles, model.cfg.version), None)
    banned = None
    if ban_prompt_tokens and prompt is not None:
        banned = prompt_ban_mask(prompt, model.eos_id + 1, model.cfg.prompt_frames, model.cfg.lm.code_size)
    return generate_codes(model, cond, max_frames=max_frames, null_cond=null, cfg_coef=cfg_coef,
                          sampling=SamplingConfig(temperature, top_k, top_p),
                          generator=make_generators(seed, B, model.device), compat=compat,
                          repetition_penalty=pen, penalty_window=win, banned=banned, stop_at_cut=stop_at_cut,
                          use_cache=use_cache, progress=progress)
