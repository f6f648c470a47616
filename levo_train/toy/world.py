"""The toy song world: a CPU test bed in which conditions really determine the music.

A song is tokens ``[3, T]`` (mixed, vocal, bgm) over ``TOY_CODE_SIZE = 64`` codes per stream,
plus a lyric (real structure tags and separators over :data:`LYRIC_WORDS`) and a style text
(``"[Musicality-high], rock, sad"``). A hidden, deterministic quality function scores any token
sequence against its lyric and style.

Code allocation (each stream has its own 64-code table, as in LeLM):

* vocal (stream 1): ``0`` silence (instrumental frames), ``1`` sentence boundary, ``2`` section
  start, ``3..7`` unused; ``8..63`` word codes. Word ``w`` is sung as ``[onset_w] + [body_w] *
  (L_w-1)`` with ``L_w`` in {2, 3}; the seeded world gives each word its own onset and body code.
  Every section starts with one ``2`` frame; instrumental sections (``[intro-*]``, ``[inst-*]``,
  ``[outro-*]``) then hold ``0`` for 2 / 4 / 6 frames (short / medium / long), ``[silence]`` for 2.
* bgm (stream 2): genre ``g`` and mood ``m`` own the codes ``4*(3g+m) + s`` (``s`` in 0..3); the
  bgm plays the genre's loop of symbols ``s`` (length 2..4, seeded) with a global phase
  (``bgm[t] = code(loop[t % L])``); ``48`` is bgm silence (``[silence]`` sections); 49..63 unused.
* mixed (stream 0): a lossy function of both (:meth:`ToyWorld.mix_code`): the vocal code where a
  word is sung, else the bgm loop symbol (silent vocal) or a boundary code. Stream 0 has no delay
  in LeLM, so it carries the exact lyric position; the delayed vocal/bgm streams follow from it.

Hidden quality, per dimension in [0, 1], for ANY ``[3, T]`` (alignment based, never crashes). Every
dimension is judged against the lyric's expected length ``E`` (the frame count of its clean
rendering): a song of ``T`` frames inside :data:`LENGTH_BAND` ``[0.8 E, 1.25 E]`` is judged on its
content alone; outside it every dimension is multiplied by the length factor
``min(T / (0.8 E), 1.25 E / T)`` (a quarter of the song keeps at most 0.3125 of any dimension, five
times the song at most 0.25; T = 0 scores 0). Two kinds of frame carry no sound: a *held* frame
(all three streams repeat the previous frame outside bgm silence: no loop holds a code) and bgm
silence outside an *allowed* run (bgm silence is allowed only in runs that open a section, right
after a section-start frame, for at most :data:`MAX_INST_FRAMES` frames per ``[silence]`` of the
lyric). So a 1-frame song, silence, one repeated code or EOS only scores near 0 everywhere.

* ``lyrics``: ``1 - min(1, PER)``; PER = word edit distance between the words decoded from the
  vocal stream (a word counts only when its full pattern is present) and the lyric's words.
* ``structure``: ``1 - edit_distance / len(expected)`` between the vocal "skeleton" (per frame:
  instrumental / quiet (vocal and bgm silent) / sentence boundary / section start / junk (incl.
  held frames), with each run of well-formed words collapsed to one symbol) and the skeleton of
  the clean rendering of the lyric.
* ``harmony``: frames whose bgm code belongs to the style's genre/mood group and follows the loop
  from the previous frame (re-entry after allowed silence), plus allowed bgm-silence frames, over
  ``T``.
* ``mix``: frames with ``mixed == f(vocal, bgm)`` that are neither held nor bgm silence outside an
  allowed run, over ``T``.
* ``quality`` = the unweighted mean of the four dimensions.

Data set: each song is clean or corrupted per dimension independently (see :data:`CORRUPTION`):
lyric words substituted / dropped / repeated, sections resized / duplicated / removed and
boundaries dropped / inserted / gaps inserted, bgm codes replaced off-pattern (never by the previous
frame's code), mixed codes broken. Songs stay inside their length band, so corrupting one dimension
leaves the others at exactly 1.0.
The musicality tier is derived, with Gaussian noise, from ``(harmony + mix) / 2`` only -- lyric
adherence and structure are revealed by no tag -- and about half the songs carry lyric errors, so a
model trained on everything and sampled with the top tier stays below clean quality.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.lyrics import INSTRUMENTAL_TAGS, format_sections, split_sections
from levo_infer.tokenizer import MUSICALITY_TAGS
from levo_train.data.cache import build_once
from levo_train.data.shards import ShardWriter

__all__ = [
    "TOY_CODE_SIZE",
    "TOY_FRAME_RATE",
    "TOY_WORLD_VERSION",
    "DIMENSIONS",
    "LENGTH_BAND",
    "TIERS",
    "LYRIC_WORDS",
    "GENRES",
    "MOODS",
    "CORRUPTION",
    "ToyCondition",
    "ToyWorld",
    "style_text",
    "write_toy_dataset",
    "ensure_toy_dataset",
]

TOY_CODE_SIZE = 64
TOY_FRAME_RATE = 25
#: Bump when the world's rules change: cached data sets are keyed by it.
TOY_WORLD_VERSION = 3
DIMENSIONS: tuple[str, ...] = ("lyrics", "structure", "harmony", "mix")
#: Musicality tiers, best first (the released v2 tags ``[Musicality-<tier>]``)
TIERS: tuple[str, ...] = tuple(t[len("[Musicality-"):-1] for t in MUSICALITY_TAGS)
#: every ``tier`` argument :func:`style_text` takes: ``top`` (= very-high), the tiers, ``none`` (no tag)
TIER_CHOICES: tuple[str, ...] = ("top", *TIERS, "none")
#: Lower bounds of the noisy musical score for each tier but the last.
TIER_THRESHOLDS: tuple[float, ...] = (0.95, 0.85, 0.70, 0.50)
TIER_NOISE = 0.04
#: Share of data-set songs whose style carries no tier tag.
NO_TAG_RATE = 0.1

LYRIC_WORDS: tuple[str, ...] = (
    "love", "night", "fire", "heart", "rain", "dream", "light", "road", "sky", "home",
    "time", "gold", "river", "stone", "wind", "star", "sun", "moon", "sea", "blue",
    "dance", "run", "fly", "hold", "fall", "shine", "burn", "sing",
)  # fmt: skip
GENRES: tuple[str, ...] = ("rock", "pop", "jazz", "folk")
MOODS: tuple[str, ...] = ("happy", "sad", "calm")

#: Per dimension: (probability a data-set song is corrupted in it, rate low, rate high).
#: Rates: lyrics = per-word op probability; structure = per-section op probability;
#: harmony / mix = per-frame replacement probability. A corrupted song gets at least one op.
CORRUPTION: dict[str, tuple[float, float, float]] = {
    "lyrics": (0.55, 0.15, 0.6),
    "structure": (0.3, 0.2, 0.8),
    "harmony": (0.35, 0.05, 0.5),
    "mix": (0.35, 0.05, 0.5),
}

V_SILENCE, V_SENTENCE, V_SECTION = 0, 1, 2
V_WORD0 = 8  # first word code; 3..7 are unused vocal codes
B_SILENCE = 48
INST_FRAMES = {"short": 2, "medium": 4, "long": 6}
SILENCE_FRAMES = 2
#: The longest instrumental or [silence] section the world renders (structure errors resize to it).
MAX_INST_FRAMES = 8
MIN_FRAMES, MAX_CLEAN_FRAMES, MAX_FRAMES = 20, 64, 75
#: Length band around a lyric's expected length E (its clean rendering's frame count): a song of
#: T frames in [lo*E, hi*E] is judged on its content alone; outside it every dimension is scaled by
#: ``min(T / (lo*E), hi*E / T)``. Data-set songs are kept inside the band.
LENGTH_BAND: tuple[float, float] = (0.8, 1.25)
# skeleton symbols: instrumental (vocal silent, bgm playing), sentence, section, word run, junk,
# quiet (vocal and bgm silent)
_SK_I, _SK_S, _SK_B, _SK_W, _SK_X, _SK_Q = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class ToyCondition:
    """What a song is asked to be: lyric (canonical text), style words, genre, mood, sections."""

    lyric: str
    style_base: str
    genre: str
    mood: str
    sections: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]

    def style(self, tier: str | None = "top") -> str:
        """The style text with a tier tag (``"top"`` = very-high, ``None``/``"none"`` = no tag)."""
        return style_text(self.style_base, tier)


def style_text(base: str, tier: str | None) -> str:
    """``"[Musicality-<tier>], <base>"``; tier ``"top"`` means very-high; ``None``/``"none"``: no tag."""
    base = base.strip()
    if tier is None or tier == "none":
        return base
    if tier == "top":
        tier = TIERS[0]
    if tier.startswith("[Musicality-") and tier.endswith("]"):
        tier = tier[len("[Musicality-") : -1]
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}, 'top' or 'none'")
    tag = f"[Musicality-{tier}]"
    return f"{tag}, {base}" if base else tag


@dataclass(frozen=True)
class _LyricInfo:
    """What scoring needs from a lyric: word ids, clean skeleton, [silence] count, clean length."""

    ref: np.ndarray
    skeleton: np.ndarray
    n_silence: int
    length: int


def _tier_of(musical: float) -> str:
    for tier, lo in zip(TIERS, TIER_THRESHOLDS):
        if musical >= lo:
            return tier
    return TIERS[-1]


def _edit_distances(a_list: Sequence[Sequence[int]], b_list: Sequence[Sequence[int]]) -> np.ndarray:
    """Levenshtein distances of many int sequence pairs at once (row-wise numpy DP over the batch)."""
    n = len(a_list)
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    la = np.array([len(a) for a in a_list], dtype=np.int64)
    lb = np.array([len(b) for b in b_list], dtype=np.int64)
    max_a, max_b = int(la.max()), int(lb.max())
    out[la == 0] = lb[la == 0]
    if max_a == 0:
        return out
    a_arr = np.full((n, max_a), -1, dtype=np.int64)
    b_arr = np.full((n, max(max_b, 1)), -2, dtype=np.int64)
    for k, (a, b) in enumerate(zip(a_list, b_list)):
        a_arr[k, : len(a)] = a
        b_arr[k, : len(b)] = b
    b_arr = b_arr[:, :max_b]
    ar = np.arange(max_b + 1, dtype=np.int64)
    prev = np.broadcast_to(ar, (n, max_b + 1)).copy()
    cur = np.empty_like(prev)
    rows = np.arange(n)
    for i in range(1, max_a + 1):
        cost = (a_arr[:, i - 1 : i] != b_arr).astype(np.int64)
        cur[:, 0] = i
        np.minimum(prev[:, 1:] + 1, prev[:, :-1] + cost, out=cur[:, 1:])
        cur -= ar
        np.minimum.accumulate(cur, axis=1, out=cur)
        cur += ar
        done = la == i
        if done.any():
            out[done] = cur[rows[done], lb[done]]
        prev, cur = cur, prev
    return out


class ToyWorld:
    """A seeded toy song world: conditions, rendering, corruption and the hidden quality function."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 0x70E])
        n_words = len(LYRIC_WORDS)
        codes = V_WORD0 + rng.permutation(TOY_CODE_SIZE - V_WORD0)
        self.word_onset = codes[:n_words].astype(np.int64)
        self.word_body = codes[n_words : 2 * n_words].astype(np.int64)
        self.word_len = rng.integers(2, 4, size=n_words).astype(np.int64)
        self.word_index = {w: i for i, w in enumerate(LYRIC_WORDS)}
        self._onset_word = {int(c): i for i, c in enumerate(self.word_onset)}
        lengths = rng.permutation([2, 3, 4, 4])
        self.genre_loops = [tuple(int(s) for s in rng.permutation(4)[:L]) for L in lengths]
        # lookup tables over bgm codes: group (3g+m) and the next code in the loop; -1 = none
        self._bgm_group = np.full(TOY_CODE_SIZE, -1, dtype=np.int64)
        self._bgm_next = np.full(TOY_CODE_SIZE, -1, dtype=np.int64)
        for g, loop in enumerate(self.genre_loops):
            for m in range(len(MOODS)):
                base = 4 * (3 * g + m)
                for k, s in enumerate(loop):
                    self._bgm_group[base + s] = 3 * g + m
                    self._bgm_next[base + s] = base + loop[(k + 1) % len(loop)]
        self._lyric_cache: dict[str, _LyricInfo] = {}

    # ------------------------------------------------------------------ text side
    def vocabulary(self) -> list[str]:
        """Word-level text vocabulary shared by lyrics and styles (structure/tier tags excluded)."""
        return ["<unk>", ".", ",", ";", *LYRIC_WORDS, *GENRES, *MOODS]

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of the world's rules and code allocation."""
        return {
            "version": TOY_WORLD_VERSION,
            "seed": self.seed,
            "code_size": TOY_CODE_SIZE,
            "frame_rate": TOY_FRAME_RATE,
            "dimensions": list(DIMENSIONS),
            "quality": "mean of dimensions",
            "length": {
                "expected": "frames of the lyric's clean rendering (E)",
                "band": list(LENGTH_BAND),
                "factor": "min(1, T/(band[0]*E), band[1]*E/T), multiplies every dimension",
                "silence": f"bgm silence in runs right after a section start, <= {MAX_INST_FRAMES} frames per [silence]",
                "held": "a frame repeating the previous one in all streams (outside bgm silence) counts as junk",
            },
            "vocal_codes": {"silence": V_SILENCE, "sentence": V_SENTENCE, "section": V_SECTION},
            "words": {
                w: {
                    "onset": int(self.word_onset[i]),
                    "body": int(self.word_body[i]),
                    "frames": int(self.word_len[i]),
                }
                for i, w in enumerate(LYRIC_WORDS)
            },
            "bgm": {
                "code": "4*(3*genre+mood)+symbol",
                "silence": B_SILENCE,
                "loops": {g: list(loop) for g, loop in zip(GENRES, self.genre_loops)},
            },
            "mixed": "vocal if vocal>=8 else {0: bgm%4 (6 if bgm silent), 1: 4, 2: 5, 3..7: 7}[vocal]",
            "instrumental_frames": INST_FRAMES,
            "tiers": {
                "thresholds": dict(zip(TIERS, TIER_THRESHOLDS)),
                "noise": TIER_NOISE,
                "from": "harmony,mix",
            },
            "corruption": {k: list(v) for k, v in CORRUPTION.items()},
            "vocabulary": self.vocabulary(),
        }

    def sample_condition(self, rng: np.random.Generator, *, heldout: bool = False) -> ToyCondition:
        """Draw a condition. Training and held-out conditions come from disjoint lyric sets
        (split by a hash of the lyric), so ``heldout=True`` lyrics never occur in training data."""
        while True:
            sections: list[tuple[str, list[list[str]]]] = []
            if rng.random() < 0.7:
                sections.append((f"[intro-{_size(rng)}]", []))
            n_vocal = int(rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3]))
            tags = ["[verse]", "[chorus]", str(rng.choice(["[verse]", "[bridge]", "[chorus]"]))][:n_vocal]
            pool = list(rng.permutation(len(LYRIC_WORDS)))
            for k, tag in enumerate(tags):
                if k > 0 and rng.random() < 0.25:
                    sections.append((f"[inst-{_size(rng)}]", []))
                n_sent = 1 if rng.random() < 0.35 else 2
                sentences = []
                for _ in range(n_sent):
                    n_w = int(rng.integers(2, 5))
                    if len(pool) < n_w:
                        pool += list(rng.permutation(len(LYRIC_WORDS)))
                    sentences.append([LYRIC_WORDS[pool.pop()] for _ in range(n_w)])
                sections.append((tag, sentences))
            if rng.random() < 0.05:
                sections.insert(int(rng.integers(0, len(sections) + 1)), ("[silence]", []))
            if rng.random() < 0.6:
                sections.append((f"[outro-{_size(rng)}]", []))
            genre = GENRES[int(rng.integers(len(GENRES)))]
            mood = MOODS[int(rng.integers(len(MOODS)))]
            n_frames = self._clean_length(sections)
            if not MIN_FRAMES <= n_frames <= MAX_CLEAN_FRAMES:
                continue
            lyric = format_sections(sections)
            if _is_heldout(lyric) != heldout:
                continue
            frozen = tuple((t, tuple(tuple(s) for s in sents)) for t, sents in sections)
            return ToyCondition(
                lyric=lyric, style_base=f"{genre}, {mood}", genre=genre, mood=mood, sections=frozen
            )

    def heldout_conditions(self, n: int, seed: int = 0) -> list[ToyCondition]:
        """``n`` conditions from the held-out split (lyrics disjoint from any training data)."""
        rng = np.random.default_rng([self.seed, 0x4E1D, int(seed)])
        return [self.sample_condition(rng, heldout=True) for _ in range(n)]

    # ------------------------------------------------------------------ rendering
    def _word_codes(self, word: str) -> list[int]:
        i = self.word_index.get(word)
        if i is None:
            raise ValueError(f"word {word!r} is not in the toy world's lyric vocabulary")
        return [int(self.word_onset[i])] + [int(self.word_body[i])] * (int(self.word_len[i]) - 1)

    def _section_items(self, tag: str, sentences: Sequence[Sequence[str]]) -> list[tuple]:
        """A section as items: ("B",), ("I", n, silent_bgm), ("W", word), ("S",)."""
        items: list[tuple] = [("B",)]
        if tag == "[silence]":
            items.append(("I", SILENCE_FRAMES, True))
        elif tag in INSTRUMENTAL_TAGS:
            items.append(("I", INST_FRAMES[tag.rsplit("-", 1)[1].rstrip("]")], False))
        else:
            for k, words in enumerate(sentences):
                if k:
                    items.append(("S",))
                items.extend(("W", w) for w in words)
        return items

    def _render_items(self, sections_items: Sequence[Sequence[tuple]]) -> tuple[list[int], list[bool]]:
        vocal: list[int] = []
        silent: list[bool] = []
        for items in sections_items:
            for it in items:
                if it[0] == "B":
                    codes, sil = [V_SECTION], False
                elif it[0] == "S":
                    codes, sil = [V_SENTENCE], False
                elif it[0] == "I":
                    codes, sil = [V_SILENCE] * it[1], it[2]
                else:
                    codes, sil = self._word_codes(it[1]), False
                vocal.extend(codes)
                silent.extend([sil] * len(codes))
        return vocal, silent

    def _clean_vocal(self, sections: Sequence[tuple[str, Sequence[Sequence[str]]]]) -> list[int]:
        return self._render_items([self._section_items(t, s) for t, s in sections])[0]

    def _clean_length(self, sections: Sequence[tuple[str, Sequence[Sequence[str]]]]) -> int:
        n = 0
        for tag, sentences in sections:
            for it in self._section_items(tag, sentences):
                n += (
                    it[1]
                    if it[0] == "I"
                    else int(self.word_len[self.word_index[it[1]]])
                    if it[0] == "W"
                    else 1
                )
        return n

    def _skeleton_of_items(self, sections_items: Sequence[Sequence[tuple]]) -> list[int]:
        """The skeleton :meth:`_decode` gives for the clean rendering of these items."""
        skel: list[int] = []
        for items in sections_items:
            for it in items:
                kind = it[0]
                if kind == "W":
                    if not skel or skel[-1] != _SK_W:
                        skel.append(_SK_W)
                elif kind == "I":
                    skel.extend([_SK_Q if it[2] else _SK_I] * it[1])
                else:
                    skel.append(_SK_B if kind == "B" else _SK_S)
        return skel

    def _bgm(self, genre: str, mood: str, silent: Sequence[bool]) -> np.ndarray:
        g, m = GENRES.index(genre), MOODS.index(mood)
        loop = self.genre_loops[g]
        t = np.arange(len(silent))
        bgm = 4 * (3 * g + m) + np.asarray(loop, dtype=np.int64)[t % len(loop)]
        bgm[np.asarray(silent, dtype=bool)] = B_SILENCE
        return bgm

    @staticmethod
    def mix_code(vocal: np.ndarray, bgm: np.ndarray) -> np.ndarray:
        """The mixed stream as a function of vocal and bgm codes: the vocal code where a word is
        sung (vocals dominate), else a code of what is heard: the bgm loop symbol ``bgm % 4`` (or 6
        for bgm silence) in silent-vocal frames, 4 / 5 at sentence / section boundaries, 7 for
        unused vocal codes."""
        v = np.asarray(vocal)
        b = np.asarray(bgm)
        other = np.where(b == B_SILENCE, 6, b % 4)
        other = np.where(v == V_SENTENCE, 4, np.where(v == V_SECTION, 5, np.where(v == V_SILENCE, other, 7)))
        return np.where(v >= V_WORD0, v, other)

    def render(
        self,
        cond: ToyCondition,
        corruption: dict[str, float] | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Render tokens int64 ``[3, T]`` for a condition; ``corruption`` maps dimension -> rate
        (see :data:`CORRUPTION`; any rate > 0 applies at least one corruption op)."""
        corruption = corruption or {}
        unknown = set(corruption) - set(DIMENSIONS)
        if unknown:
            raise ValueError(f"unknown corruption dimensions {sorted(unknown)}; expected {DIMENSIONS}")
        if rng is None:
            rng = np.random.default_rng(0)
        sections = [(t, [list(s) for s in sents]) for t, sents in cond.sections]
        if corruption.get("lyrics", 0) > 0:
            self._corrupt_words(sections, float(corruption["lyrics"]), rng)
        items = [self._section_items(t, s) for t, s in sections]
        if corruption.get("structure", 0) > 0:
            items = self._corrupt_structure(items, float(corruption["structure"]), rng)
        vocal_l, silent = self._render_items(items)
        vocal = np.asarray(vocal_l, dtype=np.int64)
        bgm = self._bgm(cond.genre, cond.mood, silent)
        n = len(vocal)
        rate = float(corruption.get("harmony", 0))
        if rate > 0 and n:
            hit = _at_least_one(rng.random(n) < rate, rng)
            group = 3 * GENRES.index(cond.genre) + MOODS.index(cond.mood)
            off = np.array(
                [c for c in range(TOY_CODE_SIZE) if self._bgm_group[c] != group and c != B_SILENCE]
            )
            bgm[hit] = rng.choice(off, size=int(hit.sum()))
            # a replaced code is a wrong note, never a held one (no loop holds a code, and a frame
            # that repeats the previous one in every stream counts as dead air for mix and structure)
            for t in np.flatnonzero(hit[1:] & hit[:-1]) + 1:
                if bgm[t] == bgm[t - 1]:
                    bgm[t] = off[(int(np.searchsorted(off, bgm[t])) + 1) % len(off)]
        mixed = self.mix_code(vocal, bgm)
        rate = float(corruption.get("mix", 0))
        if rate > 0 and n:
            hit = _at_least_one(rng.random(n) < rate, rng)
            mixed[hit] = (mixed[hit] + rng.integers(1, TOY_CODE_SIZE, size=int(hit.sum()))) % TOY_CODE_SIZE
        return np.stack([mixed, vocal, bgm]).astype(np.int64)

    def _corrupt_words(
        self, sections: list[tuple[str, list[list[str]]]], rate: float, rng: np.random.Generator
    ) -> None:
        slots = [
            (si, k, j)
            for si, (_, sents) in enumerate(sections)
            for k, s in enumerate(sents)
            for j in range(len(s))
        ]
        if not slots:
            return
        chosen = _at_least_one(rng.random(len(slots)) < rate, rng)
        # apply from the back so indices stay valid
        for si, k, j in reversed([s for s, c in zip(slots, chosen) if c]):
            words = sections[si][1][k]
            op = int(rng.integers(3))
            if op == 1 and len(words) > 1:  # drop
                del words[j]
            elif op == 2:  # repeat
                words.insert(j, words[j])
            else:  # substitute
                others = [w for w in LYRIC_WORDS if w != words[j]]
                words[j] = others[int(rng.integers(len(others)))]

    def _corrupt_structure(
        self, items: list[list[tuple]], rate: float, rng: np.random.Generator
    ) -> list[list[tuple]]:
        for _ in range(20):
            out: list[list[tuple]] = []
            chosen = _at_least_one(rng.random(len(items)) < rate, rng)
            for sec, c in zip(items, chosen):
                sec = list(sec)
                if not c:
                    out.append(sec)
                    continue
                if sec[1][0] == "I":  # instrumental / silence section
                    op = int(rng.integers(3))
                    if op == 0:
                        sizes = [n for n in (*INST_FRAMES.values(), MAX_INST_FRAMES) if n != sec[1][1]]
                        sec[1] = ("I", sizes[int(rng.integers(len(sizes)))], sec[1][2])
                        out.append(sec)
                    elif op == 1:
                        out += [sec, list(sec)]
                    # op == 2: remove the section
                    continue
                gaps = [k for k in range(2, len(sec)) if sec[k][0] == "W" and sec[k - 1][0] == "W"]
                sents = [k for k, it in enumerate(sec) if it[0] == "S"]
                ops = ["drop_boundary", "gap"] + (["split"] if gaps else []) + (["merge"] if sents else [])
                op_name = ops[int(rng.integers(len(ops)))]
                if op_name == "drop_boundary":
                    sec = sec[1:]
                elif op_name == "merge":
                    del sec[sents[int(rng.integers(len(sents)))]]
                elif op_name == "split":
                    sec.insert(gaps[int(rng.integers(len(gaps)))], ("S",))
                else:
                    pos = int(rng.integers(2, len(sec) + 1))
                    sec.insert(pos, ("I", int(rng.integers(1, 4)), False))
                out.append(sec)
            if out and MIN_FRAMES // 2 <= len(self._render_items(out)[0]) <= MAX_FRAMES:
                return out
        # fall back to the smallest op: drop the first section boundary
        return [items[0][1:], *items[1:]]

    # ------------------------------------------------------------------ scoring
    def _lyric_info(self, lyric: str) -> _LyricInfo:
        info = self._lyric_cache.get(lyric)
        if info is None:
            sections = split_sections(lyric)
            ref = np.array(
                [self.word_index.get(w, -1) for _, sents in sections for s in sents for w in s],
                dtype=np.int64,
            )
            known = [(t, [[w for w in s if w in self.word_index] for s in sents]) for t, sents in sections]
            skeleton = self._skeleton_of_items([self._section_items(t, s) for t, s in known])
            n_silence = sum(t == "[silence]" for t, _ in sections)
            info = _LyricInfo(ref, np.asarray(skeleton, dtype=np.int64), n_silence, self._clean_length(known))
            if len(self._lyric_cache) > 100_000:
                self._lyric_cache.clear()
            self._lyric_cache[lyric] = info
        return info

    def expected_length(self, lyric: str) -> int:
        """Frames of the lyric's clean rendering: the length every dimension is judged against."""
        return self._lyric_info(lyric).length

    @staticmethod
    def length_factor(n_frames: int, expected: int) -> float:
        """1 inside :data:`LENGTH_BAND` around ``expected``, else ``min(T/(lo*E), hi*E/T)``."""
        if expected <= 0:
            return 1.0
        lo, hi = LENGTH_BAND
        return float(min(1.0, n_frames / (lo * expected), hi * expected / max(n_frames, 1)))

    def _decode(self, vocal: Sequence[int], held: Sequence[bool] = (),
                quiet: Sequence[bool] = ()) -> tuple[list[int], list[int]]:
        """Vocal codes -> (word ids, skeleton). A word needs its complete pattern; a frame that holds
        the previous one in every stream is junk, a silent-vocal frame over bgm silence is quiet."""
        words: list[int] = []
        skel: list[int] = []
        t, n = 0, len(vocal)
        onset_word, wlen, body = self._onset_word, self.word_len, self.word_body
        while t < n:
            c = vocal[t]
            wi = onset_word.get(c)
            if held and held[t]:
                skel.append(_SK_X)
            elif wi is not None:
                L = int(wlen[wi])
                b = int(body[wi])
                if t + L <= n and all(vocal[t + k] == b for k in range(1, L)):
                    words.append(wi)
                    if not skel or skel[-1] != _SK_W:
                        skel.append(_SK_W)
                    t += L
                    continue
                skel.append(_SK_X)
            elif c == V_SILENCE:
                skel.append(_SK_Q if quiet and quiet[t] else _SK_I)
            elif c == V_SENTENCE:
                skel.append(_SK_S)
            elif c == V_SECTION:
                skel.append(_SK_B)
            else:
                skel.append(_SK_X)
            t += 1
        return words, skel

    @staticmethod
    def _parse_style(style: str) -> tuple[str | None, str | None]:
        words = [w.strip().lower() for w in style.replace(",", " ").split() if not w.startswith("[")]
        genre = next((w for w in words if w in GENRES), None)
        mood = next((w for w in words if w in MOODS), None)
        return genre, mood

    @staticmethod
    def _frame_masks(tokens: np.ndarray, n_silence: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per frame: (held: all three streams repeat the previous frame, outside bgm silence;
        bgm silence; allowed silence: bgm silence in runs that open a section, right after a
        section-start frame, at most :data:`MAX_INST_FRAMES` frames per [silence] of the lyric)."""
        m, v, b = tokens
        n = tokens.shape[1]
        is_sil = b == B_SILENCE
        held = np.zeros(n, dtype=bool)
        if n > 1:
            held[1:] = (tokens[:, 1:] == tokens[:, :-1]).all(axis=0) & ~is_sil[1:]
        allowed = np.zeros(n, dtype=bool)
        if n_silence and is_sil.any():
            prev_sil = np.concatenate([[False], is_sil[:-1]])
            prev_v = np.concatenate([[-1], v[:-1]])
            start = is_sil & ~prev_sil
            run = np.cumsum(start)
            opens = np.zeros(int(run[-1]) + 1, dtype=bool)
            opens[run[start]] = prev_v[start] == V_SECTION
            allowed = is_sil & opens[run]
            allowed &= np.cumsum(allowed) <= MAX_INST_FRAMES * n_silence
        return held, is_sil, allowed

    def _harmony_frames(self, b: np.ndarray, style: str, allowed_sil: np.ndarray) -> int:
        """Frames whose bgm code is in the style's group and follows the loop from the previous
        frame (any group code may re-enter after allowed silence), plus allowed silence frames."""
        n = len(b)
        if n == 0:
            return 0
        genre, mood = self._parse_style(style)
        gs = [GENRES.index(genre)] if genre else range(len(GENRES))
        ms = [MOODS.index(mood)] if mood else range(len(MOODS))
        group = np.zeros(TOY_CODE_SIZE + 1, dtype=bool)  # last slot: out-of-range codes
        for g in gs:
            for m in ms:
                group[:TOY_CODE_SIZE] |= self._bgm_group == 3 * g + m
        b = np.where((b >= 0) & (b < TOY_CODE_SIZE), b, TOY_CODE_SIZE)
        nxt = np.append(self._bgm_next, -1)
        follows = np.ones(n, dtype=bool)
        follows[1:] = (nxt[b[:-1]] == b[1:]) | allowed_sil[:-1]
        return int(np.count_nonzero((group[b] & follows) | allowed_sil))

    def _mix_frames(self, tokens: np.ndarray, held: np.ndarray, is_sil: np.ndarray,
                    allowed_sil: np.ndarray) -> int:
        """Frames with ``mixed == f(vocal, bgm)`` that carry sound: not held, bgm silence only
        where allowed."""
        if tokens.shape[1] == 0:
            return 0
        m, v, b = tokens
        in_range = ((tokens >= 0) & (tokens < TOY_CODE_SIZE)).all(axis=0)
        live = np.where(is_sil, allowed_sil, ~held)
        return int(np.count_nonzero(in_range & (m == self.mix_code(v, b)) & live))

    @staticmethod
    def _as_tokens(tokens: Any) -> np.ndarray:
        if hasattr(tokens, "detach"):  # a torch tensor
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 2 or arr.shape[0] != 3:
            raise ValueError(f"tokens must be [3, T], got shape {tuple(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
        return arr.astype(np.int64)

    def score_many(self, items: Sequence[tuple[Any, str, str]]) -> list[dict[str, float]]:
        """Score many ``(tokens [3,T'], lyric, style)`` at once; see :meth:`score`."""
        return self._score_batch(items)[0]

    def _score_batch(
        self, items: Sequence[tuple[Any, str, str]]
    ) -> tuple[list[dict[str, float]], np.ndarray]:
        decoded, skels, refs, exps, harm, mix, lengths, factors = [], [], [], [], [], [], [], []
        for tokens, lyric, style in items:
            arr = self._as_tokens(tokens)
            info = self._lyric_info(lyric)
            held, is_sil, allowed = self._frame_masks(arr, info.n_silence)
            words, skel = self._decode(arr[1].tolist(), held.tolist(), (is_sil & (arr[1] == V_SILENCE)).tolist())
            decoded.append(words)
            skels.append(skel)
            refs.append(info.ref)
            exps.append(info.skeleton)
            harm.append(self._harmony_frames(arr[2], style or "", allowed))
            mix.append(self._mix_frames(arr, held, is_sil, allowed))
            lengths.append(arr.shape[1])
            factors.append(self.length_factor(arr.shape[1], info.length))
        word_ed = _edit_distances(decoded, refs)
        skel_ed = _edit_distances(skels, exps)
        results, pers = [], np.zeros(len(items))
        for k in range(len(items)):
            n_ref = len(refs[k])
            per = word_ed[k] / n_ref if n_ref else float(len(decoded[k]) > 0)
            pers[k] = per
            n_exp = max(1, len(exps[k]))
            n, lam = lengths[k], factors[k]
            d = {
                "lyrics": float(max(0.0, 1.0 - per) * lam),
                "structure": float(max(0.0, 1.0 - skel_ed[k] / n_exp) * lam),
                "harmony": float(harm[k] / n * lam) if n else 0.0,
                "mix": float(mix[k] / n * lam) if n else 0.0,
            }
            d["quality"] = float(np.mean([d[k2] for k2 in DIMENSIONS]))
            results.append(d)
        return results, pers

    def score(self, tokens: Any, lyric: str, style: str) -> dict[str, float]:
        """Hidden quality of any tokens ``[3, T']`` for a lyric and style: per dimension in [0, 1]
        plus ``quality`` (their mean). Robust to wrong lengths and garbage codes (scored low)."""
        return self._score_batch([(tokens, lyric, style)])[0][0]

    def per(self, tokens: Any, lyric: str) -> float:
        """Toy PER: word error rate of the vocal stream decoded to words vs the lyric's words."""
        return float(self._score_batch([(tokens, lyric, "")])[1][0])

    # ------------------------------------------------------------------ data sets
    def sample_corruption(self, rng: np.random.Generator) -> dict[str, float]:
        """Draw a corruption dict for one data-set song (empty = clean)."""
        out = {}
        for dim in DIMENSIONS:
            p, lo, hi = CORRUPTION[dim]
            if rng.random() < p:
                out[dim] = float(rng.uniform(lo, hi))
        return out

    def make_dataset(
        self, n: int, rng: np.random.Generator, *, key_prefix: str = "toy", heldout: bool = False
    ) -> list[tuple[str, np.ndarray, str, str, dict[str, Any]]]:
        """``n`` songs ``(key, tokens int64 [3,T], lyric, style, meta)`` of graded quality.

        ``meta``: duration (T/25 s), language "toy", source "toy-world", ``scores`` per dimension,
        ``quality``, ``tier`` (from harmony+mix with noise), ``per``, ``genre``, ``mood``,
        ``corruption`` (dimension -> rate; empty for clean songs). ~10% of styles carry no tier tag.
        """
        conds, corrs, toks = [], [], []
        for _ in range(n):
            while True:  # keep every song within [MIN_FRAMES, MAX_FRAMES] and its length band
                cond = self.sample_condition(rng, heldout=heldout)
                corr = self.sample_corruption(rng)
                tokens = self.render(cond, corr, rng)
                t = tokens.shape[1]
                if MIN_FRAMES <= t <= MAX_FRAMES and self.length_factor(t, self._clean_length(cond.sections)) == 1.0:
                    break
            toks.append(tokens)
            conds.append(cond)
            corrs.append(corr)
        scores, pers = self._score_batch([(t, c.lyric, c.style_base) for t, c in zip(toks, conds)])
        noise = rng.normal(0.0, TIER_NOISE, size=n)
        no_tag = rng.random(n) < NO_TAG_RATE
        out = []
        for i in range(n):
            sc = scores[i]
            tier = _tier_of((sc["harmony"] + sc["mix"]) / 2 + noise[i])
            meta = {
                "duration": toks[i].shape[1] / TOY_FRAME_RATE,
                "language": "toy",
                "source": "toy-world",
                "scores": {d: round(sc[d], 6) for d in DIMENSIONS},
                "quality": round(sc["quality"], 6),
                "tier": tier,
                "per": round(float(pers[i]), 6),
                "genre": conds[i].genre,
                "mood": conds[i].mood,
                "corruption": {k: round(v, 4) for k, v in corrs[i].items()},
            }
            style = style_text(conds[i].style_base, None if no_tag[i] else tier)
            out.append((f"{key_prefix}-{i:07d}", toks[i], conds[i].lyric, style, meta))
        return out


def _size(rng: np.random.Generator) -> str:
    return ("short", "medium", "long")[int(rng.integers(3))]


def _is_heldout(lyric: str) -> bool:
    return zlib.crc32(lyric.encode("utf-8")) % 16 == 0


def _at_least_one(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if len(mask) and not mask.any():
        mask = mask.copy()
        mask[int(rng.integers(len(mask)))] = True
    return mask


# ---------------------------------------------------------------------- writing data sets
def _stats(songs: Sequence[tuple[str, np.ndarray, str, str, dict]]) -> dict[str, Any]:
    if not songs:
        return {"count": 0}
    metas = [m for *_, m in songs]
    q = np.array([m["quality"] for m in metas])
    clean = np.array([not m["corruption"] for m in metas])
    dims = {d: np.array([m["scores"][d] for m in metas]) for d in DIMENSIONS}
    tier_rank = np.array([len(TIERS) - 1 - TIERS.index(m["tier"]) for m in metas], dtype=float)

    def mean(x: np.ndarray) -> float | None:
        return round(float(x.mean()), 4) if len(x) else None

    def corr(a: np.ndarray, b: np.ndarray) -> float | None:
        if a.std() == 0 or b.std() == 0:
            return None
        return round(float(np.corrcoef(a, b)[0, 1]), 4)

    frames = np.array([t.shape[1] for _, t, *_ in songs])
    return {
        "count": len(songs),
        "clean": int(clean.sum()),
        "mean_quality": mean(q),
        "mean_quality_clean": mean(q[clean]),
        "mean_quality_corrupted": mean(q[~clean]),
        "mean_per": mean(np.array([m["per"] for m in metas])),
        "dims_clean": {d: mean(v[clean]) for d, v in dims.items()},
        "dims_corrupted": {d: mean(v[~clean]) for d, v in dims.items()},
        "fraction_corrupted": {
            d: round(float(np.mean([d in m["corruption"] for m in metas])), 4) for d in DIMENSIONS
        },
        "tiers": {t: int(sum(m["tier"] == t for m in metas)) for t in TIERS},
        "tier_correlation": {d: corr(tier_rank, v) for d, v in dims.items()},
        "frames": {
            "min": int(frames.min()),
            "mean": round(float(frames.mean()), 2),
            "max": int(frames.max()),
        },
    }


def write_toy_dataset(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 20000,
    n_val: int = 512,
    records_per_shard: int = 2000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir/train/`` and ``out_dir/val/`` shards plus ``out_dir/toy_world.json``
    (existing shards there raise FileExistsError unless ``overwrite``).

    Returns the summary (counts, mean quality, per-dimension means clean vs corrupted, tier
    correlations) that is also stored in ``toy_world.json``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = ToyWorld(seed)
    summary: dict[str, Any] = {"world": "levo-toy", "version": TOY_WORLD_VERSION, "seed": seed}
    for split, n, stream in (("train", n_train, 1), ("val", n_val, 2)):
        songs = world.make_dataset(n, np.random.default_rng([seed, stream]), key_prefix=split)
        with ShardWriter(
            out / split,
            prefix="songs",
            max_records=records_per_shard,
            code_size=TOY_CODE_SIZE,
            overwrite=overwrite,
        ) as w:
            for key, tokens, lyric, style, meta in songs:
                w.write_song(key, tokens, lyric, style, meta)
        summary[split] = _stats(songs)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    info = {**summary, "rules": world.describe()}
    tmp = out / "toy_world.json.tmp"
    tmp.write_text(strict_dumps(info, indent=1))
    os.replace(tmp, out / "toy_world.json")
    return summary


def toy_dataset_name(seed: int, n_train: int, n_val: int) -> str:
    """Directory name of a cached toy data set (keyed by world version, seed and sizes)."""
    return f"toy-v{TOY_WORLD_VERSION}-s{seed}-n{n_train}-v{n_val}"


def ensure_toy_dataset(
    root: str | os.PathLike, seed: int = 0, n_train: int = 20000, n_val: int = 512
) -> Path:
    """Build the toy data set once under ``root/<name>`` and return its path; an existing complete
    build is reused only when its recorded inputs (world rules version, seed, sizes) and file
    digests still match, concurrent callers wait for one build, a crashed build leaves nothing
    under the final name (:func:`levo_train.data.cache.build_once`)."""
    inputs = {"world": "levo-toy", "version": TOY_WORLD_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val}
    return build_once(root, toy_dataset_name(seed, n_train, n_val), "toy_world.json",
                      lambda tmp: write_toy_dataset(tmp, seed=seed, n_train=n_train, n_val=n_val, overwrite=True),
                      derived_from=inputs)
