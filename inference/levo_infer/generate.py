"""Batched autoregressive generation with a KV cache for both stacks and classifier-free guidance.

One call generates many songs through the engine (:mod:`levo_infer.engine`): ``slots`` songs at a
time (default: all of them), continuous batching (a finished song's slot is refilled from the
queue), a static KV cache allocated once, the conditional and unconditional (CFG) halves as adjacent
rows of one batch, the ``[lyrics | prompt | style]`` prefix encoded once per song (prefill), then one
delay-pattern step per call.

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

Seeds are per song (``seed`` + row index, or an explicit list): each song's uniforms come from its
own generator (:mod:`levo_infer.sampling`), so a song's tokens do not depend on which other songs
share its batch, the slot count or the queue order.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .engine import GenerationEngine, GenerationOutput, ProgressFn
from .model import Conditions, LeLM
from .sampling import (
    RELEASED_PENALTY,
    RELEASED_TEMPERATURE,
    RELEASED_TOP_K,
    RELEASED_WINDOW,
    Generators,
    SamplingConfig,
    choose_tokens,
    prompt_ban_mask,
    sample_logits,
    song_uniforms,
)
from .styles import null_styles


def attention_backends(device: torch.device) -> AbstractContextManager:
    """On CUDA, restrict SDPA to the flash / memory-efficient / math kernels. With PyTorch's default
    choice (which may pick cuDNN attention) greedy bf16 generation on an H100 was not reproducible
    from run to run; with these kernels it is (and ``--low-mem`` gives the same tokens)."""
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.no_grad()
def generate_codes(model: LeLM, cond: Conditions, *, max_frames: int | Sequence[int],
                   null_cond: Conditions | None = None, cfg_coef: float = 1.5, sampling: SamplingConfig | None = None,
                   generator: Generators = None, compat: bool = False, repetition_penalty: float = 1.0,
                   penalty_window: int = RELEASED_WINDOW, banned: torch.Tensor | None = None,
                   stop_at_cut: bool = False, use_cache: bool = True, slots: int | None = None,
                   kv_bits: int | None = None, policy: str = "continuous", compile: bool = False,
                   progress: ProgressFn | None = None) -> GenerationOutput:
    """Generate up to ``max_frames`` frames per song (an int, or one limit per song) for a batch of
    tokenised conditions.

    ``generator``: None (global RNG), one shared generator (drawn song by song in order), or one per
    song. ``banned`` [B, V] bool: codes banned from codebook 0 (see :func:`prompt_ban_mask`).
    ``stop_at_cut``: a song stops as soon as every frame before its earliest EOS exists (its cut
    output is unchanged; the frames of the raw output past the cut are then the special id).
    ``slots``: songs generated at once (None: all); ``kv_bits=8``: 8-bit KV cache; ``policy``:
    ``continuous`` (refill a slot as soon as its song ends), ``static`` (a batch holds its slots until its
    longest song ends) or ``static-drop`` (the same batches, finished songs leaving the step);
    ``compile``: :func:`torch.compile` the decode step (see :mod:`levo_infer.engine`).
    ``use_cache=False`` recomputes every step from the full sequence (reference path for tests and
    benchmarks; all songs at once, one frame limit).
    """
    B = cond.batch_size
    frames = [int(max_frames)] * B if isinstance(max_frames, int) else [int(f) for f in max_frames]
    if len(frames) != B:
        raise ValueError(f"got {len(frames)} frame limits for {B} songs")
    if any(f < 0 for f in frames):
        raise ValueError(f"frame limits must be >= 0, got {min(frames)}")
    model.check_frames(max(frames, default=0))
    gens: list[torch.Generator | None] | None
    if generator is None or isinstance(generator, torch.Generator):
        gens = [generator] * B if generator is not None else None
    else:
        gens = list(generator)
        if len(gens) != B:
            raise ValueError(f"got {len(gens)} generators for {B} songs")
    with attention_backends(model.device):
        if not use_cache:
            if len(set(frames)) > 1:
                raise ValueError("use_cache=False (the reference loop) takes one frame limit for all songs")
            return _reference_loop(model, cond, max_frames=frames[0] if frames else 0, null_cond=null_cond,
                                   cfg_coef=cfg_coef, sampling=sampling or SamplingConfig(), gens=gens, compat=compat,
                                   repetition_penalty=repetition_penalty, penalty_window=penalty_window, banned=banned,
                                   stop_at_cut=stop_at_cut, progress=progress)
        engine = GenerationEngine(model, cond, frames=frames, slots=slots or max(B, 1), null_cond=null_cond,
                                  cfg_coef=cfg_coef, sampling=sampling, generators=gens, compat=compat,
                                  repetition_penalty=repetition_penalty, penalty_window=penalty_window, banned=banned,
                                  stop_at_cut=stop_at_cut, kv_bits=kv_bits, policy=policy, compile=compile,
                                  progress=progress)
        return engine.run()


def _reference_loop(model: LeLM, cond: Conditions, *, max_frames: int, null_cond: Conditions | None,
                    cfg_coef: float, sampling: SamplingConfig, gens: Sequence[torch.Generator | None] | None,
                    compat: bool, repetition_penalty: float, penalty_window: int, banned: torch.Tensor | None,
                    stop_at_cut: bool, progress: ProgressFn | None) -> GenerationOutput:
    """No cache: every step runs both stacks over the prefix and the whole sequence so far, for every
    song, with the engine's sampling rules and per-song uniforms (the engine's reference)."""
    B, K = cond.batch_size, model.code_depth
    delays, special, eos = list(model.cfg.delays), model.pad_id, model.eos_id
    dev = model.device
    use_cfg = null_cond is not None and cfg_coef != 1.0
    p1, p2 = model.condition_prefix(Conditions.cat([cond, null_cond]) if use_cfg else cond)  # type: ignore[list-item]
    n_steps = max_frames + max(delays) + 1
    U = torch.stack([song_uniforms(gens[i] if gens is not None else None, n_steps, K, dev).to(dev) for i in range(B)]) \
        if B else torch.zeros((0, n_steps, K), device=dev)
    steps = torch.full((B, K, n_steps), special, dtype=torch.long, device=dev)
    ended = torch.zeros((B, K), dtype=torch.bool, device=dev)
    eos_frame = torch.full((B, K), max_frames, dtype=torch.long, device=dev)
    delay_t = torch.tensor(delays, device=dev)
    done_at = torch.full((B,), n_steps - 1, dtype=torch.long, device=dev)
    banned = banned.to(dev) if banned is not None else None
    s_run = 0
    for s in range(1, n_steps):
        s_run = s
        x = steps[:, :, :s]
        h1, h2 = model.step_hidden(torch.cat([x, x]) if use_cfg else x, (p1, p2), None, start=0)
        lg = torch.stack([model.head(k, (h1 if k == 0 else h2)[:, -1]).float() for k in range(K)], dim=1)
        if use_cfg:
            lg = lg[B:] + (lg[:B] - lg[B:]) * cfg_coef
        if repetition_penalty != 1.0 and penalty_window > 0:
            lo = max(1, s - penalty_window)  # steps s - window .. s - 1, as the engine's sliding counts
            hist = steps[:, :, lo:s]
            seen = torch.zeros_like(lg, dtype=torch.bool)
            seen.scatter_(2, torch.where(hist < eos, hist, eos), True)
            seen[:, :, eos] = False
            lg = torch.where(seen, lg / repetition_penalty, lg)
        if banned is not None:
            lg[:, 0] = lg[:, 0].masked_fill(banned, float("-inf"))
        tok = choose_tokens(lg, U[:, s], compat=compat, sampling=sampling)
        frame = s - 1 - delay_t
        live = s <= done_at
        valid = ((frame >= 0) & (frame < max_frames))[None, :] & ~ended & live[:, None]
        tok = torch.where(valid, tok, torch.full_like(tok, special))
        new_eos = valid & (tok == eos)
        eos_frame = torch.where(new_eos, frame[None, :].expand(B, K), eos_frame)
        ended = ended | new_eos
        steps[:, :, s] = tok
        done = ended.all(dim=1)
        if stop_at_cut:
            done |= ((s - delay_t)[None, :] >= eos_frame.min(dim=1).values[:, None]).all(dim=1)
        done_at = torch.where(done & live, torch.full_like(done_at, s), done_at)
        if progress is not None:
            progress(s, n_steps - 1, int((s < done_at).sum()))
        if bool((done_at <= s).all()):
            break
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
             prompt: torch.Tensor | None = None, *, max_frames: int | Sequence[int], cfg_coef: float | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
             seed: int | Sequence[int] | None = None, compat: bool = False,
             repetition_penalty: float | None = None, penalty_window: int | None = None,
             ban_prompt_tokens: bool = True, stop_at_cut: bool = False, use_cache: bool = True,
             slots: int | None = None, kv_bits: int | None = None, policy: str = "continuous",
             compile: bool = False, progress: ProgressFn | None = None) -> GenerationOutput:
    """Generate songs from text conditions (strings exactly as the conditioners receive them).

    ``prompt``: raw prompt tokens [B, K, frames] (16385 = none; a row of pad = no prompt for that
    song) or None. ``compat=True``: the released sampling rules exactly (``temperature``/``top_k``
    on codebook 0, greedy elsewhere, penalty 1.1 over 50 steps, prompt ban, earliest-EOS cut).
    ``compat=False``: ``temperature``/``top_k``/``top_p`` on every codebook (scalars or per-codebook
    lists), penalty off unless ``repetition_penalty`` is given. ``seed``: per-song seeds
    (``seed + i``, or a list); None draws from torch's global RNG. ``max_frames``: one limit, or one
    per song. ``slots`` (None: all songs at once), ``kv_bits``, ``policy``, ``compile``: the engine's
    settings (:func:`generate_codes`; :func:`levo_infer.planner.plan_generation` picks ``slots`` for a
    memory budget).
    """
    B = len(lyrics)
    model.check_frames(max_frames if isinstance(max_frames, int) else max(max_frames, default=0))
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
                          use_cache=use_cache, slots=slots, kv_bits=kv_bits, policy=policy, compile=compile,
                          progress=progress)


__all__ = ["RELEASED_PENALTY", "RELEASED_TEMPERATURE", "RELEASED_TOP_K", "RELEASED_WINDOW", "GenerationOutput",
           "Generators", "ProgressFn", "SamplingConfig", "attention_backends", "generate", "generate_codes",
           "make_generators", "prompt_ban_mask", "sample_logits"]
