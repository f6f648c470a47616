"""The generation engine: continuous batching over a fixed number of slots, a static KV cache.

Songs wait in a queue; ``slots`` of them generate together. When a song ends (all of its streams
emitted EOS, its own frame limit, or, with ``stop_at_cut``, every frame before its earliest EOS
exists) its slot is refilled at once from the queue: the newcomer's ``[lyrics | prompt | style]``
prefix is put into the slot's cache rows, and from the next step on it joins the shared decode
steps, each slot at its own pattern step and position. ``policy="static"`` is the baseline that the
benchmark compares: a batch of ``slots`` songs is admitted when every slot is free and holds its slots
until its longest song ends (its finished songs' slots keep stepping, as in a fixed-shape batch);
``policy="static-drop"``: the same batches, finished songs leaving the step (see :data:`POLICIES`).

* **Shared prefixes.** A row's prefix (positions ``[0, P)``, never written by a decode step) is copied
  from any cache row that holds the same conditions, and prefilled only when none does: CFG's null
  rows are the same for every song with the same null style, and candidates of one prompt share
  theirs. Prefill is row-independent, so a copy is the prefill bit for bit.

* **Cache.** :class:`levo_infer.model.SlotKVCache` per stack, allocated once for ``slots`` x (prefix
  + the longest song's steps) rows (two per song with CFG, adjacent: cond then null), in the model's
  dtype or 8-bit (``kv_bits=8``). A decode step attends over the first ``key_len`` positions (the
  furthest slot's position rounded up to :data:`~levo_infer.planner.KEY_BLOCK`) with a per-row mask; nothing is
  concatenated, re-indexed or re-allocated as songs come and go.
* **One call per step.** :meth:`LeLM.step_hidden` runs both stacks for every slot in the span of
  busy slots at once; the heads run only for the streams some busy slot can still emit at this step
  (the delay pattern leaves the sub-stack heads idle for the first ``max_delay`` steps and the main
  head idle in the delay tail); CFG, the repetition penalty, the prompt ban and the token choice are
  batched tensor ops over the slots (:mod:`levo_infer.sampling`).
* **Seeds.** Each song's uniforms are drawn from its own generator when it is admitted and indexed by
  its own step, so its tokens depend on its own conditions and seed only (not on the slot count, its
  neighbours or the queue order): tested bit for bit on CPU fp32.
* ``compile=True`` wraps the decode step in :func:`torch.compile` (``mode="reduce-overhead"``:
  CUDA graphs on GPU); the step then always spans every slot and the whole cache (static shapes). A
  compile failure falls back to the eager step with a warning.
"""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .model import Conditions, LeLM
from .planner import KEY_BLOCK, PREFILL_SONGS
from .sampling import SamplingConfig, sample_uniform, song_uniforms, stream_rule

#: songs per engine call, per slot, for callers that split a long queue into calls (levo-infer writes a
#: call's records when it ends; rollouts score per call): long enough that refills keep the slots busy
QUEUE_PER_SLOT = 8

#: ``continuous``: a freed slot is refilled at once; ``static``: a batch of ``slots`` songs holds its slots
#: until its longest song ends; ``static-drop``: the same batches, but finished songs leave the step (the
#: busy songs move down into freed slots), as generation before the engine dropped finished rows
POLICIES = ("continuous", "static", "static-drop")
STATIC = ("static", "static-drop")

ProgressFn = Callable[[int, int, int], None]  # (decode steps run, steps planned, songs still running)


@dataclass
class GenerationOutput:
    codes: torch.Tensor  # [B, K, max_frames] frames, special id from each song's length on
    lengths: torch.Tensor  # [B] frames before the earliest EOS (or the song's frame limit)
    raw_codes: torch.Tensor | None = None  # [B, K, max_frames] per-stream tokens before the cut (EOS kept)
    steps: int = 0  # decode steps run (batch 1: pattern steps)
    prefilled_rows: int = 0  # cache rows whose prefix was computed (the others were copied from a row with the same conditions)
    moves: int = 0  # songs moved down into freed slots (``continuous`` once the queue is empty, ``static-drop``)


def planned_steps(song_steps: Sequence[int], slots: int, policy: str = "continuous") -> int:
    """Decode steps for songs that each run ``song_steps[i]`` steps (none ending early), admitted in
    order into ``slots`` slots: the engine's schedule, computed on the host (progress totals, benchmarks)."""
    if policy in STATIC:
        return sum(max(song_steps[i:i + slots]) for i in range(0, len(song_steps), slots))
    free = [0] * min(slots, max(len(song_steps), 1))
    for n in song_steps:
        heapq.heappush(free, heapq.heappop(free) + n)
    return max(free) if song_steps else 0


class GenerationEngine:
    """Continuous-batching generation for one set of songs (see the module docstring).

    ``cond``/``null_cond``: the songs' tokenised conditions (``null_cond`` None or ``cfg_coef == 1``:
    no CFG); ``frames``: each song's frame limit; ``generators``: one per song (None: torch's global
    RNG, drawn in song order); ``banned`` [B, V] codes banned from codebook 0.
    """

    def __init__(self, model: LeLM, cond: Conditions, *, frames: Sequence[int], slots: int,
                 null_cond: Conditions | None = None, cfg_coef: float = 1.5, sampling: SamplingConfig | None = None,
                 generators: Sequence[torch.Generator | None] | None = None, compat: bool = False,
                 repetition_penalty: float = 1.0, penalty_window: int = 50, banned: torch.Tensor | None = None,
                 stop_at_cut: bool = False, kv_bits: int | None = None, policy: str = "continuous",
                 compile: bool = False, progress: ProgressFn | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        B = cond.batch_size
        if len(frames) != B:
            raise ValueError(f"got {len(frames)} frame limits for {B} songs")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if generators is not None and len(generators) != B:
            raise ValueError(f"got {len(generators)} generators for {B} songs")
        self.m = model
        self.use_cfg = null_cond is not None and cfg_coef != 1.0
        self.cfg_coef, self.compat, self.policy, self.progress = cfg_coef, compat, policy, progress
        self.sampling = sampling or SamplingConfig()
        self.gens = generators
        self.frames = [int(f) for f in frames]
        self.B, self.slots = B, min(slots, max(B, 1))
        self.K = model.code_depth
        self.delays = list(model.cfg.delays)
        self.maxd = max(self.delays)
        self.special, self.eos = model.pad_id, model.eos_id
        self.V = self.eos + 1
        self.P = model.cfg.prefix_len
        self.F = max(self.frames) if self.frames else 0
        self.S = self.F + self.maxd + 1  # pattern steps of the longest song
        self.pen = float(repetition_penalty)
        self.window = int(penalty_window)
        self.use_pen = self.pen != 1.0 and self.window > 0
        self.stop_at_cut = stop_at_cut
        self.banned = banned.to(model.device) if banned is not None else None
        self.static_shapes = compile
        dev = self.dev = model.device
        n, K = self.slots, self.K
        self.m_rows = 2 if self.use_cfg else 1
        # positions 0 .. P + S - 2 (the last step is predicted, never fed), rounded up to whole key blocks so
        # that every step attends over a multiple of KEY_BLOCK keys (the same reduction shapes for a song
        # whatever the other songs' lengths)
        self.max_len = -(-(self.P + self.S - 1) // KEY_BLOCK) * KEY_BLOCK
        self.caches = model.new_slot_caches(n * self.m_rows, self.max_len, bits=kv_bits)
        # per-slot state, allocated once
        self.step = torch.ones(n, dtype=torch.long, device=dev)  # the pattern step each slot generates next
        self.tok = torch.full((n, K), self.special, dtype=torch.long, device=dev)  # last step's tokens (fed next)
        self.hist = torch.full((n, K, self.S), self.special, dtype=torch.long, device=dev)
        self.ended = torch.zeros((n, K), dtype=torch.bool, device=dev)
        self.eos_frame = torch.zeros((n, K), dtype=torch.long, device=dev)
        self.limit = torch.zeros(n, dtype=torch.long, device=dev)
        self.active = torch.zeros(n, dtype=torch.bool, device=dev)
        self.U = torch.zeros((n, self.S, K), dtype=torch.float32, device=dev)
        self.seen = torch.zeros((n, K, self.V), dtype=torch.int32, device=dev) if self.use_pen else None
        self.ban = torch.zeros((n, self.V), dtype=torch.bool, device=dev) if banned is not None else None
        self.delay_t = torch.tensor(self.delays, device=dev)
        self.kpos = torch.arange(self.max_len, device=dev)
        self.ar = torch.arange(n, device=dev)
        self.karange = torch.arange(K, device=dev)
        # host mirrors (no device syncs for scheduling)
        self.song_of: list[int] = [-1] * n
        self.s_host: list[int] = [1] * n
        self.rules = [stream_rule(k, compat=compat, sampling=self.sampling) for k in range(K)]
        # prefix sharing: the conditions of every cache row (a song's cond row, then its null row with CFG)
        # and, per distinct conditions, the rows whose positions [0, P) hold their prefix
        self.all_cond = _interleave(cond, null_cond) if self.use_cfg else cond  # type: ignore[arg-type]
        self.cond_key = _row_keys(self.all_cond)
        self.row_key: list[bytes | None] = [None] * (n * self.m_rows)
        self.key_rows: dict[bytes, set[int]] = {}
        self.prefilled_rows = self.moves = 0  # see GenerationOutput
        self._step_fn: Callable[[int, int, int], torch.Tensor] = self._decode
        if compile:
            self._step_fn = self._compiled()

    # ----------------------------------------------------------------------------- admission
    def _rows(self, lo: int, hi: int) -> slice:
        return slice(lo * self.m_rows, hi * self.m_rows)

    def _admit(self, pairs: list[tuple[int, int]]) -> None:
        """Put songs into free slots: (slot, song) pairs. Each cache row's prefix is copied from a row
        that already holds the same conditions (the null rows of CFG are the same for most songs;
        candidates of one prompt share theirs) and prefilled otherwise, :data:`PREFILL_SONGS` songs'
        rows per call."""
        songs = torch.tensor([i for _, i in pairs], device=self.dev)
        sl = torch.tensor([j for j, _ in pairs], device=self.dev)
        for j, i in pairs:
            g = self.gens[i] if self.gens is not None else None
            n = self.frames[i] + self.maxd + 1
            self.U[j, :n] = song_uniforms(g, n, self.K, self.dev).to(self.dev)
            self.song_of[j], self.s_host[j] = i, 1
        self.step[sl] = 1
        self.tok[sl] = self.special
        self.hist[sl] = self.special
        self.ended[sl] = False
        lim = torch.tensor([self.frames[i] for _, i in pairs], device=self.dev)
        self.limit[sl] = lim
        self.eos_frame[sl] = lim[:, None]
        self.active[sl] = True
        if self.seen is not None:
            self.seen[sl] = 0
        if self.ban is not None:
            self.ban[sl] = self.banned[songs].to(self.dev)  # type: ignore[index]
        self._fill_prefixes([(j * self.m_rows + q, i * self.m_rows + q) for j, i in pairs for q in range(self.m_rows)])

    def _fill_prefixes(self, rows: list[tuple[int, int]]) -> None:
        """(cache row, condition row of :attr:`all_cond`) pairs: copy or prefill positions [0, P) (a row
        that already holds the conditions' prefix keeps it)."""
        rows = [(r, c) for r, c in rows if self.row_key[r] != self.cond_key[c]]
        for r, _ in rows:  # these rows are overwritten: they no longer hold their old prefix
            self._set_row_key(r, None)
        fill: list[tuple[int, int]] = []
        copies: list[tuple[int, int]] = []
        first: dict[bytes, int] = {}
        for r, c in rows:
            key = self.cond_key[c]
            held = self.key_rows.get(key)
            if held:
                copies.append((r, min(held)))
            elif key in first:
                copies.append((r, first[key]))
            else:
                first[key] = r
                fill.append((r, c))
        for a in range(0, len(fill), PREFILL_SONGS * self.m_rows):  # the planner's prefill workspace
            part = fill[a:a + PREFILL_SONGS * self.m_rows]
            idx = torch.tensor([r for r, _ in part], device=self.dev)
            prefix = self.m.condition_prefix(_select(self.all_cond, torch.tensor([c for _, c in part], device=self.dev)))
            for cache in self.caches:
                cache.rows, cache.pos, cache.mask = idx, None, None
            empty = torch.empty((len(part), self.K, 0), dtype=torch.long, device=self.dev)
            self.m.step_hidden(empty, prefix, self.caches)  # type: ignore[arg-type]
        self.prefilled_rows += len(fill)
        if copies:
            dst = torch.tensor([r for r, _ in copies], device=self.dev)
            src = torch.tensor([r for _, r in copies], device=self.dev)
            for cache in self.caches:
                cache.copy_rows(dst, src, self.P)
        for r, c in rows:
            self._set_row_key(r, self.cond_key[c])

    def _set_row_key(self, r: int, key: bytes | None) -> None:
        """Cache row ``r`` now holds the prefix of the conditions ``key`` (None: no usable prefix)."""
        old = self.row_key[r]
        if old is not None:
            self.key_rows[old].discard(r)
        self.row_key[r] = key
        if key is not None:
            self.key_rows.setdefault(key, set()).add(r)

    def _compact(self, free: list[int]) -> None:
        """With the queue empty, move the songs of the highest busy slots into the free slots below
        them, so that the span of busy slots a step runs over shrinks as songs end (a move copies the
        song's state and its cache rows up to its position: far less than the steps it saves)."""
        busy = [j for j in range(self.slots) if self.song_of[j] >= 0]
        holes = sorted(free)
        moves: list[tuple[int, int]] = []
        while holes and busy and holes[0] < busy[-1]:
            moves.append((busy.pop(), holes.pop(0)))
        if not moves:
            return
        src = torch.tensor([a for a, _ in moves], device=self.dev)
        dst = torch.tensor([b for _, b in moves], device=self.dev)
        for t in (self.step, self.tok, self.hist, self.ended, self.eos_frame, self.limit, self.active, self.U,
                  self.seen, self.ban):
            if t is not None:
                t[dst] = t[src]
        self.active[src] = False
        mr = self.m_rows
        rsrc = [a * mr + q for a, _ in moves for q in range(mr)]
        rdst = [b * mr + q for _, b in moves for q in range(mr)]
        length = min(self.max_len, max(self.P + self.s_host[a] for a, _ in moves))
        rows_dst, rows_src = torch.tensor(rdst, device=self.dev), torch.tensor(rsrc, device=self.dev)
        for cache in self.caches:
            cache.copy_rows(rows_dst, rows_src, length)
        for rs, rd in zip(rsrc, rdst):  # the destination rows now hold the moved songs' prefixes too
            self._set_row_key(rd, self.row_key[rs])
        self.moves += len(moves)
        for a, b in moves:
            self.song_of[b], self.s_host[b], self.song_of[a] = self.song_of[a], self.s_host[a], -1
            free.remove(b)
            free.append(a)

    # ----------------------------------------------------------------------------- one decode step
    def _decode(self, lo: int, hi: int, key_len: int) -> torch.Tensor:
        """One pattern step for slots [lo, hi): both stacks, heads, CFG, penalty, ban, token choice,
        EOS bookkeeping. Returns the slots whose song is done (bool [hi - lo])."""
        sl, n, mr = slice(lo, hi), hi - lo, self.m_rows
        s = self.step[sl]
        pos = (s + (self.P - 1)).repeat_interleave(mr)  # the fed token (step s - 1) sits at P + s - 1
        mask = torch.where(self.kpos[:key_len][None, :] <= pos[:, None], 0.0, float("-inf")).view(n * mr, 1, 1, key_len)
        for cache in self.caches:
            cache.rows, cache.pos, cache.mask, cache.key_len = self._rows(lo, hi), pos, mask, key_len
        x = self.tok[sl].repeat_interleave(mr, dim=0)[:, :, None]
        h1, h2 = self.m.step_hidden(x, None, self.caches)  # type: ignore[arg-type]  # positions: checked up front
        frame = s[:, None] - 1 - self.delay_t[None, :]  # [n, K]
        valid = (frame >= 0) & (frame < self.limit[sl, None]) & ~self.ended[sl] & self.active[sl, None]
        u = self.U[sl][self.ar[:n], s]  # [n, K]: each song's own uniforms for its own step
        tok = torch.full((n, self.K), self.special, dtype=torch.long, device=self.dev)
        for k in self._streams(lo, hi):
            lg = self.m.head(k, (h1 if k == 0 else h2)[:, -1]).float()
            if self.use_cfg:
                lg = lg.view(n, 2, -1)
                lg = lg[:, 1] + (lg[:, 0] - lg[:, 1]) * self.cfg_coef
            if self.seen is not None:
                lg = torch.where(self.seen[sl, k] > 0, lg / self.pen, lg)
            if k == 0 and self.ban is not None:
                lg = lg.masked_fill(self.ban[sl], float("-inf"))
            tok[:, k] = sample_uniform(lg, *self.rules[k], u[:, k])
        tok = torch.where(valid, tok, self.special)
        new_eos = valid & (tok == self.eos)
        self.eos_frame[sl] = torch.where(new_eos, frame, self.eos_frame[sl])
        self.ended[sl] |= new_eos
        self.hist[sl][self.ar[:n, None], self.karange[None, :], s[:, None]] = tok
        self.tok[sl] = tok
        if self.seen is not None:  # slide the window: add step s, drop step s - window
            real = tok < self.eos
            self.seen[sl].scatter_add_(2, torch.where(real, tok, self.eos)[:, :, None], real[:, :, None].int())
            back = s - self.window
            old = self.hist[sl][self.ar[:n, None], self.karange[None, :], back.clamp_min(0)[:, None]]
            real = (old < self.eos) & (back >= 1)[:, None]
            self.seen[sl].scatter_add_(2, torch.where(real, old, self.eos)[:, :, None], -real[:, :, None].int())
        done = self.ended[sl].all(dim=1) | (s >= self.limit[sl] + self.maxd)  # the song's last pattern step
        if self.stop_at_cut:
            cut = self.eos_frame[sl].min(dim=1).values
            done |= ((s[:, None] - self.delay_t[None, :]) >= cut[:, None]).all(dim=1)
        done &= self.active[sl]
        self.step[sl] += (self.active[sl] & ~done).long()  # a finished song's slot stays at a valid step
        return done

    def _streams(self, lo: int, hi: int) -> list[int]:
        """Streams that some busy slot in [lo, hi) may emit at its current step (host-side)."""
        if self.static_shapes:
            return list(range(self.K))
        need = []
        for k, d in enumerate(self.delays):
            for j in range(lo, hi):
                i = self.song_of[j]
                if i >= 0 and 0 <= self.s_host[j] - 1 - d < self.frames[i]:
                    need.append(k)
                    break
        return need

    def _compiled(self) -> Callable[[int, int, int], torch.Tensor]:
        try:
            step = torch.compile(self._decode_static, mode="reduce-overhead", dynamic=False)
        except Exception as e:  # pragma: no cover - platform-dependent
            warnings.warn(f"torch.compile of the decode step failed ({e}); using the eager step", stacklevel=3)
            return self._decode
        state = {"ok": True}

        def run(lo: int, hi: int, key_len: int) -> torch.Tensor:
            if state["ok"]:
                try:
                    return step()
                except Exception as e:  # pragma: no cover - platform-dependent
                    warnings.warn(f"the compiled decode step failed ({type(e).__name__}: {e}); using the eager step",
                                  stacklevel=2)
                    state["ok"] = False
            return self._decode(lo, hi, key_len)
        return run

    def _decode_static(self) -> torch.Tensor:
        """The decode step over every slot and the whole cache (static shapes, for compilation)."""
        return self._decode(0, self.slots, self.max_len)

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> GenerationOutput:
        B, K, dev, F = self.B, self.K, self.dev, self.F
        raw = torch.full((B, K, max(F, 0)), self.special, dtype=torch.long, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        song_steps = [f + self.maxd for f in self.frames]
        total = planned_steps(song_steps, self.slots, self.policy)
        queue = list(range(B))[::-1]  # pop() takes the next song
        free = list(range(self.slots))
        n_steps = batch_hi = 0
        while queue or any(i >= 0 for i in self.song_of):
            if queue and free and (self.policy not in STATIC or len(free) == self.slots):
                free.sort()
                take = [(free.pop(0), queue.pop()) for _ in range(min(len(free), len(queue)))]
                self._admit(take)
                batch_hi = take[-1][0] + 1
            busy = [j for j in range(self.slots) if self.song_of[j] >= 0]
            # continuous: the step spans the busy slots; static: a batch holds its slots until its longest
            # song ends (finished songs' slots still step, as in a fixed-shape batch)
            lo, hi = (0, batch_hi) if self.policy == "static" else (busy[0], busy[-1] + 1)
            top = max(self.P + self.s_host[j] - 1 for j in busy)
            key_len = min(self.max_len, -(-(top + 1) // KEY_BLOCK) * KEY_BLOCK)
            done = self._step_fn(lo, hi, key_len)
            n_steps += 1
            for j in busy:
                self.s_host[j] += 1
            finished = [lo + int(j) for j in done.nonzero().flatten().tolist()]
            for j in finished:
                i = self.song_of[j]
                for k, d in enumerate(self.delays):
                    raw[i, k, :self.frames[i]] = self.hist[j, k, 1 + d:1 + d + self.frames[i]]
                lengths[i] = self.eos_frame[j].min()
                self.song_of[j] = -1
                self.active[j] = False
                free.append(j)
            if finished and not self.static_shapes and (self.policy == "static-drop" or
                                                        (self.policy == "continuous" and not queue)):
                self._compact(free)
            if self.progress is not None:
                self.progress(n_steps, max(total, n_steps), sum(i >= 0 for i in self.song_of) + len(queue))
        T = torch.arange(F, device=dev)
        codes = torch.where(T[None, None, :] < lengths[:, None, None], raw, torch.full_like(raw, self.special))
        return GenerationOutput(codes, lengths, raw, n_steps, self.prefilled_rows, self.moves)


def _select(c: Conditions, idx: torch.Tensor) -> Conditions:
    return Conditions(c.lyric_ids[idx], c.lyric_structure[idx], c.style_ids[idx], c.prompt[idx])


def _row_keys(c: Conditions) -> list[bytes]:
    """One key per row of ``c``: equal keys, equal conditions (so equal prefixes)."""
    flat = torch.cat([c.lyric_ids, c.lyric_structure, c.style_ids, c.prompt.flatten(1).long()], dim=1).cpu()
    return [row.numpy().tobytes() for row in flat]


def _interleave(a: Conditions, b: Conditions) -> Conditions:
    """Rows a0, b0, a1, b1, ... (a song's cond and null rows adjacent)."""
    f = lambda x, y: torch.stack([x, y], dim=1).flatten(0, 1)  # noqa: E731
    return Conditions(f(a.lyric_ids, b.lyric_ids), f(a.lyric_structure, b.lyric_structure),
                      f(a.style_ids, b.style_ids), f(a.prompt, b.prompt))


__all__ = ["POLICIES", "QUEUE_PER_SLOT", "GenerationEngine", "GenerationOutput", "ProgressFn", "planned_steps"]
