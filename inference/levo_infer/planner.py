"""Memory planner for the generation engine: how many songs fit a memory budget.

:func:`plan_generation` is a pure function of the model config, the longest song, the dtypes and a
budget (``levo-infer --memory-gb``, ``sdpo.gen_memory_gb``): it returns the slot count for
:func:`levo_infer.generate.generate` with the byte breakdown behind it, or raises
:class:`InsufficientMemoryError`, with the numbers, when not even one song fits.

What the engine holds (:mod:`levo_infer.engine`), term by term:

* **weights**: every parameter of the LeLM at the weights' dtype (counted on the meta device);
* **KV cache** per song: keys and values of every layer of both stacks, for the prefix plus the
  longest song's pattern steps (rounded up to the engine's key block), two rows with CFG, at the
  cache dtype (the model's, or 8-bit plus one fp32 scale per head and position);
* **slot state** per song: the step history (int64), the song's uniforms (fp32), the repetition
  penalty's counts (int32 per stream and code) and the prompt ban (bool per code);
* **workspace**: the largest prefill call, :data:`PREFILL_SONGS` songs' rows at most (the
  activations of one decoder layer over the prefix, the MLP's four [tokens, F] tensors dominating;
  with CFG a first admission of ``n`` songs prefills ``n`` condition rows and at most
  :data:`NULL_PREFIXES` null rows, the rest are copies)
  plus one decode step over every slot (the step's logits, the attention scores, the 8-bit cache's
  dequantised keys and values of one layer).

Checked against measured peaks (CPU RSS above the process's own baseline) at three slot counts for a
tiny and a medium model: ``eval/bench/bench_engine.py``; rows in the README's performance table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import LevoInferError
from .model import LeLM

#: songs prefilled together when slots are refilled (bounds the prefill workspace)
PREFILL_SONGS = 4
#: distinct CFG null conditions :func:`levo_infer.generate.generate` makes (no lyrics, no prompt; v2's
#: negative style or no style), so at most this many null rows are ever prefilled in one admission
NULL_PREFIXES = 2
#: a decode step attends over a multiple of this many keys, and the cache is allocated in whole blocks
KEY_BLOCK = 32

GIB = 2 ** 30


class InsufficientMemoryError(LevoInferError):
    """A memory budget cannot hold the weights plus one song's cache, state and workspace."""


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the LeLM for ``cfg`` (built on the meta device: no memory, exact)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LeLM(cfg).parameters())


@dataclass(frozen=True)
class GenerationPlan:
    """A slot count and the bytes behind it (see the module docstring for each term)."""

    slots: int
    budget_bytes: int
    weights_bytes: int
    cache_bytes_per_song: int
    state_bytes_per_song: int
    prefill_bytes_per_song: int  # all of a song's rows (two with CFG)
    decode_bytes_per_song: int
    max_frames: int
    cache_positions: int
    rows_per_song: int = 2

    def prefill_rows(self, slots: int) -> int:
        """Rows of the largest prefill call with ``slots`` slots (see the module docstring)."""
        r = self.rows_per_song
        return min(PREFILL_SONGS * r, slots * r if r == 1 else slots + min(slots, NULL_PREFIXES))

    def workspace_bytes(self, slots: int | None = None) -> int:
        n = self.slots if slots is None else slots
        # added, not the larger of the two: the allocator keeps much of the prefill's freed memory resident
        return self.prefill_bytes_per_song * self.prefill_rows(n) // self.rows_per_song + self.decode_bytes_per_song * n

    def predicted_bytes(self, slots: int | None = None) -> int:
        """Peak bytes of a generation with ``slots`` slots (default: the planned count)."""
        n = self.slots if slots is None else slots
        return (self.weights_bytes + n * (self.cache_bytes_per_song + self.state_bytes_per_song)
                + self.workspace_bytes(n))

    def describe(self) -> str:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        return (f"{self.slots} slots in {g(self.budget_bytes)}: weights {g(self.weights_bytes)}, KV cache "
                f"{g(self.cache_bytes_per_song)} per song ({self.cache_positions} positions), slot state "
                f"{self.state_bytes_per_song / 2**20:.1f} MiB per song, workspace {g(self.workspace_bytes())}; "
                f"predicted peak {g(self.predicted_bytes())}")


def plan_generation(cfg: ModelConfig, *, memory_gb: float, max_frames: int, dtype: torch.dtype = torch.bfloat16,
                    kv_bits: int | None = None, cfg_guidance: bool = True, penalty: bool = True,
                    prompt_ban: bool = True, max_slots: int | None = None, weights_dtype: torch.dtype | None = None,
                    params: int | None = None) -> GenerationPlan:
    """The most slots (at most ``max_slots``) whose predicted peak fits ``memory_gb`` GiB for songs
    of up to ``max_frames`` frames; activations and the cache in ``dtype`` (weights in
    ``weights_dtype``, default the same). ``params``: the parameter count when already known.
    Raises :class:`InsufficientMemoryError` naming every term when not one song fits."""
    if memory_gb <= 0:
        raise InsufficientMemoryError(f"the memory budget must be > 0 GiB, got {memory_gb}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    lm = cfg.lm
    act = _bytes(dtype)
    rows = 2 if cfg_guidance else 1
    layers = lm.num_layers + lm.num_layers_sub
    D, F, H, hd, K = lm.dim, lm.intermediate_size, lm.num_heads, lm.head_dim, lm.code_depth
    V = lm.code_size + 1
    steps = max_frames + cfg.max_delay + 1
    positions = -(-(cfg.prefix_len + steps - 1) // KEY_BLOCK) * KEY_BLOCK
    kv_el = (1.0 + 4.0 / hd) if kv_bits == 8 else float(act)
    cache = int(2 * layers * rows * H * positions * hd * kv_el)
    state = steps * K * (8 + 4) + (K * V * 4 if penalty else 0) + (V if prompt_ban else 0) + 64 * K
    weights = (param_count(cfg) if params is None else params) * _bytes(weights_dtype or dtype)
    # prefill: PREFILL_SONGS songs x rows over the prefix; one decoder layer's live tensors (residual, norm
    # output, q/k/v, roped q/k, attention output: ~10 [T, D]; MLP gate, up, silu, product: 4 [T, F]),
    # plus both stacks' prefixes, the bridge input [T, 2D] and RMSNorm's fp32 copy
    T = rows * cfg.prefix_len
    prefill = T * ((10 * D + 4 * F + 4 * D) * act + D * 4)  # per song prefilled together
    # one decode step per song: fp32 logits and their processed copies (~6 per stream in flight), attention
    # scores and probabilities (fp32), the 8-bit cache's dequantised keys and values of one layer
    decode = rows * 6 * V * 4 + rows * H * positions * 4 * 3
    if kv_bits == 8:
        decode += 2 * rows * H * positions * hd * (act + 4)
    plan = GenerationPlan(1, int(memory_gb * GIB), weights, cache, state, prefill, decode, max_frames, positions, rows)
    fits = lambda n: GenerationPlan(n, **_rest(plan)).predicted_bytes() <= plan.budget_bytes  # noqa: E731
    lo, hi = 0, max(1, (plan.budget_bytes - weights) // max(cache + state, 1) + 1)  # fits(lo) (or n = 0); not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    n = lo
    if max_slots is not None:
        n = min(n, max_slots)
    if n < 1:
        one = plan
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        raise InsufficientMemoryError(
            f"a memory budget of {memory_gb:g} GiB cannot hold one song of {max_frames} frames: weights "
            f"{g(weights)} ({dtype_name(weights_dtype or dtype)}) + KV cache {g(cache)} per song "
            f"({positions} positions, {'8-bit' if kv_bits == 8 else dtype_name(dtype)}"
            f"{', CFG' if cfg_guidance else ''}) + slot state {state / 2**20:.1f} MiB + workspace {g(one.workspace_bytes())} = "
            f"{g(one.predicted_bytes())} for one song; raise the budget, shorten the songs, or use an 8-bit KV "
            "cache / a half-precision dtype")
    return GenerationPlan(int(n), **_rest(plan))


def _rest(plan: GenerationPlan) -> dict:
    return {k: getattr(plan, k) for k in ("budget_bytes", "weights_bytes", "cache_bytes_per_song",
                                          "state_bytes_per_song", "prefill_bytes_per_song", "decode_bytes_per_song",
                                          "max_frames", "cache_positions", "rows_per_song")}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


__all__ = ["GIB", "KEY_BLOCK", "NULL_PREFIXES", "PREFILL_SONGS", "GenerationPlan", "InsufficientMemoryError", "param_count",
           "plan_generation"]
