"""``levo-eval tokens``: song metrics on token files, and a Fréchet distance between two song sets.

    levo-eval tokens --ref DIR --gen DIR [--rm EXPORT] [--embed MODULE:FUNCTION] [--code-size N]
                     [--max-frames N] [--ngram N] [--out FILE.json]

A set (``--ref``, ``--gen``) is a folder of ``*.pt`` token files as levo-infer writes them
(``tokens/<idx>.pt``, LongTensor ``[3, T]``: mixed, vocal, bgm; ``<idx>_vocal.pt`` / ``<idx>_bgm.pt``
of ``--mode separate`` are skipped when ``<idx>.pt`` is there), a levo-infer output folder (its
``tokens/`` is read), or a song shard folder (``index.json`` or ``*.tar``,
:mod:`levo_train.data.shards`). For token files, each song's lyric, style, length cap and output mode
come from levo-infer's records (``*.jsonl`` in the folder or in ``../jsonl/``, matched by ``idx``;
``lyric``, ``style``, ``settings.max_frames``, ``settings.mode``); a song without a record is scored
by the reward model with an empty lyric and style (counted as ``unconditioned``).

Single-stream output: a ``--mode vocal`` song's file holds the bgm stream replaced by the silent
code 9670, a ``--mode bgm`` song's the vocal stream replaced by 3142 (and a separate-mode
``<idx>_vocal.pt`` / ``<idx>_bgm.pt`` likewise). Such a substituted stream is not the model's output:
it is left out of that stream's metrics (``streams.<name>.songs`` counts the songs measured, the
metrics are null when none is left), and ``substituted`` counts the songs left out per stream.
``frame_repeat_rate`` and ``ngram_repeat_rate`` compare whole frames, which a constant stream does not
change, so they keep every song.

Metrics per set (pooled over its songs; T = a song's frames):

* ``length``: frames mean / std / min / max, ``seconds_mean`` (frames / ``--frame-rate``, 25), and
  ``eos_rate``: the share of songs that ended before their length cap, ``T < cap`` (levo-infer keeps
  the frames before the earliest EOS, so a song that never emitted EOS has ``T == cap``). The cap is
  ``--max-frames`` or, per song, its record's ``settings.max_frames``; ``eos_rate`` is over the songs
  with a known cap (``eos_known``) and null without any.
* per stream (``mixed``, ``vocal``, ``bgm``): ``songs`` (the songs whose stream is measured: all but
  the single-stream substitutes above), ``codes_used`` (distinct codes), ``usage`` (codes_used / code
  size), ``entropy_bits`` (Shannon entropy of the set's code histogram, base 2), ``entropy_norm``
  (entropy / log2(code size)) and ``repeat_rate`` (the share of frames t >= 1 whose code equals the
  code at t - 1, over those songs: Σ repeats / Σ (T - 1)).
* ``frame_repeat_rate``: the same for whole frames (all streams equal the previous frame: a held
  frame); ``ngram_repeat_rate``: the share of n-frame windows (n = ``--ngram``, 4; whole frames)
  that repeat a window seen earlier in the same song, Σ (windows - distinct windows) / Σ windows.
* with ``--rm``: the reward model's mean (and standard error) per dimension and ``overall``.

``frechet``: the Fréchet distance between Gaussians fitted (mean, unbiased covariance, float64) to
the two sets' song embeddings, ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` (square
roots of symmetric PSD matrices by eigendecomposition, negative eigenvalues clipped; the result is
clipped at 0), under ``rm`` for the reward model's pooled features
(:meth:`levo_train.reward.model.RewardModel.embed`) and ``embed`` for ``--embed`` (a function
``songs -> array [N, F]``). A set against itself gives 0 (up to rounding). With fewer songs than
feature dimensions the covariances are singular; the distance is still defined but noisier.

Output: a line per set and one for the distances, then the result JSON as the last line
(``--out`` writes it to a file too). Bad token files are skipped, named, and the exit status is 1;
a missing folder, an empty set, codes outside the code size or a reward model that does not load:
exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levo_infer.commands import Command
from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.jsonio import write_json_atomic
from levo_infer.jsonl import JsonlError, jsonl_lines, parse_json_line
from levo_infer.tokens import CODE_SIZE, FRAME_RATE, SEPARATE_SUFFIXES, STREAMS, SUBSTITUTED
from levo_train.data.batch import ENDED_KEY
from levo_train.data.shards import ShardError, Song, iter_songs, read_index
from levo_train.reward.model import RewardModelError, load_reward_model
from levo_train.scorers import load_callable

from .errors import UsageError

SUBSTITUTED_NOTE = ("single-stream output (levo-infer --mode vocal / bgm, and separate's _vocal / _bgm files) holds "
                    "the other stream replaced by its silent code (bgm 9670, vocal 3142): left out of that stream's "
                    "metrics")


# ----------------------------------------------------------------------------- Fréchet distance
def psd_sqrt(m: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric matrix (eigendecomposition in float64,
    negative eigenvalues, i.e. rounding, clipped to 0)."""
    a = np.asarray(m, dtype=np.float64)
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_gaussians(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, s1) and N(mu2, s2):
    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1^1/2 s2 s1^1/2)^1/2)``, clipped at 0."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Fréchet distance of Gaussians of different sizes: means {mu1.shape} / {mu2.shape}, "
                         f"covariances {s1.shape} / {s2.shape}")
    r1 = psd_sqrt(s1)
    cross = r1 @ s2 @ r1
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((cross + cross.T) / 2.0), 0.0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(d, 0.0)


def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of the rows of ``x`` [N, F], float64; N >= 2."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"a Gaussian fit needs embeddings [N >= 2, F], got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError("embeddings hold non-finite values")
    return a.mean(0), np.cov(a, rowvar=False, ddof=1).reshape(a.shape[1], a.shape[1])


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets ``x`` [N, F], ``y`` [M, F]."""
    return frechet_gaussians(*gaussian_fit(x), *gaussian_fit(y))


# ----------------------------------------------------------------------------- token statistics
def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy (bits) of a histogram (zeros ignored; 0 for an empty one)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def repeat_rates(tokens: Sequence[np.ndarray]) -> tuple[list[float | None], float | None]:
    """(per stream: Σ #{t >= 1: x[k, t] == x[k, t-1]} / Σ (T - 1), the same for whole frames) over
    songs ``tokens`` [K, T]; None where no song has 2 frames."""
    k = tokens[0].shape[0] if tokens else len(STREAMS)
    same = np.zeros(k)
    frames = 0.0
    pairs = 0
    for t in tokens:
        if t.shape[1] < 2:
            continue
        eq = t[:, 1:] == t[:, :-1]
        same += eq.sum(1)
        frames += float(eq.all(0).sum())
        pairs += t.shape[1] - 1
    if pairs == 0:
        return [None] * k, None
    return [float(s / pairs) for s in same], frames / pairs


def ngram_repeat_rate(tokens: Sequence[np.ndarray], n: int = 4) -> float | None:
    """Σ (windows - distinct windows) / Σ windows over songs, a window being ``n`` whole frames:
    the share of n-frame windows that repeat an earlier window of the same song (None: no song
    has ``n`` frames)."""
    if n < 1:
        raise ValueError(f"--ngram {n}: expected n >= 1")
    total = repeated = 0
    for t in tokens:
        w = t.shape[1] - n + 1
        if w < 1:
            continue
        rows = np.ascontiguousarray(np.stack([t[:, i:i + w] for i in range(n)], axis=-1).transpose(1, 0, 2)
                                    .reshape(w, -1))
        total += w
        repeated += w - int(np.unique(rows, axis=0).shape[0])
    return repeated / total if total else None


def stream_stats(tokens: Sequence[np.ndarray], code_size: int,
                 substituted: Sequence[str | None] | None = None) -> dict[str, dict[str, Any]]:
    """Per stream: ``songs``, ``codes_used``, ``usage``, ``entropy_bits``, ``entropy_norm``,
    ``repeat_rate``; ``substituted[j]`` names song j's stream that is a silent substitute (left out of
    that stream), if any. A stream no song is measured in has null metrics."""
    k = tokens[0].shape[0] if tokens else len(STREAMS)
    names = STREAMS if k == len(STREAMS) else tuple(f"s{i}" for i in range(k))
    sub = list(substituted) if substituted is not None else [None] * len(tokens)
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        rows = [t[i:i + 1] for t, x in zip(tokens, sub) if x != name]
        if not rows:
            out[name] = {"songs": 0, "codes_used": None, "usage": None, "entropy_bits": None, "entropy_norm": None,
                         "repeat_rate": None}
            continue
        counts = np.zeros(code_size, dtype=np.int64)
        for r in rows:
            counts += np.bincount(r[0], minlength=code_size)[:code_size]
        h = entropy_bits(counts)
        used = int((counts > 0).sum())
        out[name] = {"songs": len(rows), "codes_used": used, "usage": used / code_size, "entropy_bits": h,
                     "entropy_norm": h / math.log2(code_size) if code_size > 1 else None,
                     "repeat_rate": repeat_rates(rows)[0][0]}
    return out


def length_stats(lengths: Sequence[int], caps: Sequence[int | None], frame_rate: float = FRAME_RATE
                 ) -> dict[str, Any]:
    """Frame statistics and ``eos_rate`` = share of songs with a known cap whose ``T < cap``."""
    x = np.asarray(lengths, dtype=np.float64)
    known = [(t, c) for t, c in zip(lengths, caps) if c is not None]
    return {"frames_mean": float(x.mean()), "frames_std": float(x.std()), "frames_min": int(x.min()),
            "frames_max": int(x.max()), "seconds_mean": float(x.mean() / frame_rate),
            "eos_rate": (sum(t < c for t, c in known) / len(known)) if known else None, "eos_known": len(known),
            "max_frames": sorted({int(c) for _, c in known}) or None}


# ----------------------------------------------------------------------------- reading sets
@dataclass
class TokenSet:
    """Songs of one ``--ref`` / ``--gen`` folder and what was learned about them."""

    path: str
    kind: str  # "pt" or "shards"
    songs: list[Any]  # levo_train.data.shards.Song
    caps: list[int | None]
    code_size: int | None = None  # from a shard index
    unconditioned: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    modes: list[str | None] = field(default_factory=list)  # each song's levo-infer mode (None: unknown)

    def substituted(self) -> list[str | None]:
        """Each song's stream that its mode replaced by a silent code (None: every stream is real)."""
        return [SUBSTITUTED.get(m or "") for m in self.modes] if self.modes else [None] * len(self.songs)


def _records(folder: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """levo-infer records by idx from ``folder/*.jsonl`` and ``folder/../jsonl/*.jsonl`` (the one JSONL
    reader, :mod:`levo_infer.jsonl`), and the lines that could not be read (named by file and line)."""
    out: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    for d in (folder, folder.parent / "jsonl"):
        for f in sorted(d.glob("*.jsonl")) if d.is_dir() else []:
            if f.name.endswith(".errors.jsonl"):
                continue
            try:
                for n, line in jsonl_lines(f):
                    try:
                        if isinstance(line, JsonlError):
                            raise line
                        rec = parse_json_line(line)
                    except ValueError as e:
                        bad.append(str(e) if isinstance(e, JsonlError) else f"{f}:{n}: {e}")
                        continue
                    if isinstance(rec, dict) and rec.get("idx") not in (None, ""):
                        out.setdefault(str(rec["idx"]), rec)
            except JsonlError as e:
                bad.append(str(e))
    return out, bad


def _mode(recs: dict[str, dict[str, Any]], stem: str) -> str | None:
    """The levo-infer mode a token file was written in, from its record's ``settings.mode``; a
    separate-mode ``<idx>_vocal`` / ``<idx>_bgm`` file is a vocal / bgm one."""
    def mode_of(rec: dict[str, Any] | None) -> str | None:
        settings = rec.get("settings") if isinstance(rec, dict) else None
        m = settings.get("mode") if isinstance(settings, dict) else None
        return m if isinstance(m, str) else None

    if stem in recs:
        return mode_of(recs[stem])
    for sfx in SEPARATE_SUFFIXES:
        if stem.endswith(sfx) and mode_of(recs.get(stem[: -len(sfx)])) == "separate":
            return sfx[1:]
    return None


def _cond(rec: dict[str, Any] | None) -> tuple[str, str, int | None] | None:
    if rec is None:
        return None
    inp = rec.get("input") if isinstance(rec.get("input"), dict) else {}
    lyric = rec.get("lyric", inp.get("gt_lyric", rec.get("gt_lyric")))
    style = rec.get("style", inp.get("descriptions", rec.get("descriptions")))
    settings = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
    cap = settings.get("max_frames")
    return (str(lyric or ""), str(style or ""),
            int(cap) if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None)


def load_token_set(path: str | Path, *, max_frames: int | None = None) -> TokenSet:
    """The songs of a token-file folder or a shard folder (see the module docstring)."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{p}: no such folder")
    pts = sorted(p.glob("*.pt"))
    if not pts and (p / "tokens").is_dir() and any((p / "tokens").glob("*.pt")):  # a levo-infer output folder
        p = p / "tokens"
        pts = sorted(p.glob("*.pt"))
    if not pts:
        try:
            index = read_index(p)
        except ShardError as e:
            raise UsageError(str(e)) from None
        if index is None and not any(p.glob("*.tar")):
            raise UsageError(f"{p}: neither *.pt token files, a levo-infer output folder (tokens/*.pt) nor a song "
                             "shard folder (index.json / *.tar)")
        cs = int((index or {}).get("code_size") or CODE_SIZE)
        try:
            songs = list(iter_songs(str(p), code_size=cs))
        except ShardError as e:
            raise UsageError(str(e)) from None
        if not songs:
            raise UsageError(f"{p}: the shard folder holds no songs")
        return TokenSet(str(p), "shards", songs, [max_frames] * len(songs), cs if index else None)

    recs, bad_records = _records(p)
    stems = {f.stem for f in pts}
    ts = TokenSet(str(p), "pt", [], [], errors=[f"{b} (records line skipped)" for b in bad_records])
    for f in pts:
        if any(f.stem.endswith(s) and f.stem[: -len(s)] in stems for s in SEPARATE_SUFFIXES):
            ts.skipped.append(f.name)
            continue
        try:
            t = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling refused, truncated file: all "cannot be read"
            ts.errors.append(f"{f}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e})")
            continue
        if (not isinstance(t, torch.Tensor) or t.ndim != 2 or t.is_floating_point() or t.is_complex()
                or t.shape[0] < 1):
            what = f"a {t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            ts.errors.append(f"{f}: holds {what}, expected an integer tensor [3, T]")
            continue
        arr = t.numpy().astype(np.int64)
        if arr.size and arr.min() < 0:
            ts.errors.append(f"{f}: holds negative codes (min {int(arr.min())})")
            continue
        rec = _cond(recs.get(f.stem))
        if rec is None:
            ts.unconditioned += 1
        lyric, style, cap = rec or ("", "", None)
        # whether the song ended with EOS (levo-infer records it; else: stopped before its cap), so a
        # reward model embeds a song cut at its cap without an EOS, as sDPO and `levo-data sample` do
        raw = recs.get(f.stem) or {}
        ended = raw.get(ENDED_KEY)
        if ended is None and cap is not None:
            ended = arr.shape[1] < cap
        ts.songs.append(Song(f.stem, arr, lyric, style, None, {} if ended is None else {ENDED_KEY: bool(ended)}))
        ts.caps.append(max_frames if max_frames is not None else cap)
        ts.modes.append(_mode(recs, f.stem))
    if not ts.songs:
        raise UsageError(f"{p}: no readable token files" + (f" ({ts.errors[0]})" if ts.errors else ""))
    if len({s.tokens.shape[0] for s in ts.songs}) != 1:
        raise UsageError(f"{p}: token files with different stream counts "
                         f"{sorted({s.tokens.shape[0] for s in ts.songs})}")
    return ts


# ----------------------------------------------------------------------------- report
def set_metrics(ts: TokenSet, *, code_size: int, ngram: int = 4, frame_rate: float = FRAME_RATE) -> dict[str, Any]:
    """Length, EOS, codebook and repetition metrics of a set (see the module docstring)."""
    toks = [s.tokens for s in ts.songs]
    top = max(int(t.max()) for t in toks if t.size) if any(t.size for t in toks) else -1
    if top >= code_size:
        raise UsageError(f"{ts.path}: codes up to {top}, but the code size is {code_size}: pass --code-size "
                         f"{top + 1} or more (or --rm with the export the songs belong to)")
    _, frame_rep = repeat_rates(toks)
    sub = ts.substituted()
    out = {"path": ts.path, "kind": ts.kind, "n": len(toks), "skipped": len(ts.skipped),
           "unconditioned": ts.unconditioned, "length": length_stats([t.shape[1] for t in toks], ts.caps, frame_rate),
           "streams": stream_stats(toks, code_size, sub), "frame_repeat_rate": frame_rep,
           "ngram_repeat_rate": ngram_repeat_rate(toks, ngram),
           "substituted": {name: sum(x == name for x in sub) for name in ("vocal", "bgm")}}
    if any(sub):
        out["note"] = SUBSTITUTED_NOTE
    return out


def rm_embedder(model: Any, batch_size: int = 64) -> Callable[[Sequence[Any]], np.ndarray]:
    """Songs -> the reward model's pooled features [N, F] (:meth:`RewardModel.embed`)."""
    model.eval()
    return lambda songs: model.embed(songs, batch_size).double().numpy()


def tokens_report(ref: TokenSet, gen: TokenSet, *, code_size: int, rm: Any = None,
                  embed: Callable[[Sequence[Any]], Any] | None = None, ngram: int = 4,
                  frame_rate: float = FRAME_RATE, batch_size: int = 64) -> dict[str, Any]:
    """``{"ref": metrics, "gen": metrics, "frechet": {"rm"?, "embed"?}, "code_size", "ngram"}``;
    ``rm``: a :class:`~levo_train.reward.model.RewardModel` (scores and pooled features), ``embed``: a
    function ``songs -> [N, F]``."""
    out: dict[str, Any] = {"ref": set_metrics(ref, code_size=code_size, ngram=ngram, frame_rate=frame_rate),
                           "gen": set_metrics(gen, code_size=code_size, ngram=ngram, frame_rate=frame_rate),
                           "frechet": {}, "code_size": code_size, "ngram": ngram, "frame_rate": frame_rate}
    embedders: dict[str, Callable[[Sequence[Any]], Any]] = {}
    if rm is not None:
        rm.eval()
        rm_codes = int(rm.config.lm.code_size)
        for ts in (ref, gen):
            top = max((int(s.tokens.max()) for s in ts.songs if s.tokens.size), default=-1)
            if top >= rm_codes:
                raise UsageError(f"{ts.path}: codes up to {top}, but the reward model reads {rm_codes} codes per "
                                 "stream: the songs are not of the model the reward model was trained for")
        for key, ts in (("ref", ref), ("gen", gen)):
            sc = rm.score_songs(ts.songs, batch_size).double().numpy()
            n = sc.shape[0]
            out[key]["rm"] = {d: float(sc[:, i].mean()) for i, d in enumerate(rm.outputs)}
            out[key]["rm_se"] = {d: float(sc[:, i].std(ddof=1) / math.sqrt(n)) if n > 1 else None
                                 for i, d in enumerate(rm.outputs)}
        embedders["rm"] = rm_embedder(rm, batch_size)
    if embed is not None:
        embedders["embed"] = embed
    for name, fn in embedders.items():
        feats = []
        for ts in (ref, gen):
            e = np.asarray(fn(ts.songs), dtype=np.float64)
            if e.ndim != 2 or e.shape[0] != len(ts.songs):
                raise UsageError(f"embedding {name} returned shape {list(e.shape)} for {len(ts.songs)} songs of "
                                 f"{ts.path}, expected [N, F]")
            feats.append(e)
        try:
            out["frechet"][name] = frechet_distance(*feats)
        except ValueError as e:
            raise UsageError(f"Fréchet distance ({name}): {e}") from None
        out.setdefault("embedding_dim", {})[name] = int(feats[0].shape[1])
    return out


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def describe_set(label: str, m: dict[str, Any]) -> str:
    """One human line for a set's metrics."""
    ln, st = m["length"], m["streams"]
    parts = [f"{label} {m['path']}: {m['n']} songs ({m['kind']})",
             f"frames {ln['frames_mean']:.1f} ± {ln['frames_std']:.1f} [{ln['frames_min']}, {ln['frames_max']}]",
             f"EOS before cap {_fmt(ln['eos_rate'])}",
             "usage " + "/".join(_fmt(s["usage"]) for s in st.values()),
             "entropy bits " + "/".join("n/a" if s["entropy_bits"] is None else f"{s['entropy_bits']:.2f}"
                                        for s in st.values()),
             "repeat " + "/".join(_fmt(s["repeat_rate"]) for s in st.values()),
             f"held frames {_fmt(m['frame_repeat_rate'])}", f"repeated n-grams {_fmt(m['ngram_repeat_rate'])}"]
    sub = {k: v for k, v in m.get("substituted", {}).items() if v}
    if sub:
        parts.append("silent substitutes left out: " + ", ".join(f"{k} of {v} song(s)" for k, v in sub.items()))
    if "rm" in m:
        parts.append("RM " + ", ".join(f"{k} {v:.3f}" for k, v in m["rm"].items()))
    return "; ".join(parts)


def cmd_tokens(args: argparse.Namespace) -> int:
    """``levo-eval tokens``: the last stdout line is the result JSON (see the module docstring)."""
    t0 = time.time()
    try:
        if args.max_frames is not None and args.max_frames < 1:
            raise UsageError(f"--max-frames {args.max_frames}: expected >= 1")
        if args.ngram < 1:
            raise UsageError(f"--ngram {args.ngram}: expected >= 1")
        ref = load_token_set(args.ref, max_frames=args.max_frames)
        gen = load_token_set(args.gen, max_frames=args.max_frames)
        model = None
        if args.rm:
            try:
                model, info = load_reward_model(args.rm, args.device)
            except RewardModelError as e:
                raise UsageError(str(e)) from None
        embed = None
        if args.embed:
            try:
                embed = load_callable(args.embed, setting="--embed")
            except ValueError as e:
                raise UsageError(str(e)) from None
        code_size = (args.code_size or ref.code_size or gen.code_size
                     or (int(model.config.lm.code_size) if model is not None else None) or CODE_SIZE)
        res = tokens_report(ref, gen, code_size=code_size, rm=model, embed=embed, ngram=args.ngram,
                            frame_rate=args.frame_rate, batch_size=args.batch_size)
    except UsageError as e:
        print(f"levo-eval tokens: error: {e}", file=sys.stderr)
        return 2
    errors = ref.errors + gen.errors
    for e in errors:
        print(f"levo-eval tokens: error: {e}", file=sys.stderr)
    for ts in (ref, gen):
        if model is not None and ts.unconditioned:
            print(f"levo-eval tokens: warning: {ts.unconditioned} song(s) of {ts.path} have no levo-infer record "
                  "(lyric, style): the reward model scores them with an empty lyric and style", file=sys.stderr)
    for key in ("ref", "gen"):
        if "note" in res[key]:
            print(f"levo-eval tokens: note: {res[key]['path']}: {res[key]['note']}", file=sys.stderr)
    res["errors"] = errors
    res["seconds"] = round(time.time() - t0, 2)
    print(describe_set("ref", res["ref"]))
    print(describe_set("gen", res["gen"]))
    if res["frechet"]:
        print("Fréchet distance gen vs ref: " + ", ".join(f"{k} {v:.4g}" for k, v in res["frechet"].items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, res, nonfinite="null")
    print(strict_dumps(res, nonfinite="null"))
    return 1 if errors else 0


def add_tokens_arguments(t: argparse.ArgumentParser) -> None:
    """The ``tokens`` subcommand's options."""
    t.add_argument("--ref", required=True, help="reference set: folder of *.pt token files, a levo-infer output folder "
                                                "or a song shard folder")
    t.add_argument("--gen", required=True, help="generated set: folder of *.pt token files, a levo-infer output folder "
                                                "or a song shard folder")
    t.add_argument("--rm", default=None, metavar="EXPORT", help="reward-model export: scores per dimension and the "
                                                                "Fréchet distance over its pooled features")
    t.add_argument("--embed", default=None, metavar="MODULE:FUNCTION",
                   help="an embedding function songs -> array [N, F] for another Fréchet distance")
    t.add_argument("--code-size", type=int, default=None,
                   help=f"codes per stream (default: the shard index's, the RM's, else {CODE_SIZE})")
    t.add_argument("--max-frames", type=int, default=None,
                   help="length cap for the EOS rate (default: levo-infer records' settings.max_frames)")
    t.add_argument("--frame-rate", type=float, default=FRAME_RATE)
    t.add_argument("--ngram", type=int, default=4, help="window (frames) of the repeated n-gram rate")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", default=None, metavar="FILE.json", help="also write the result JSON here")


#: ``levo-eval tokens`` (part of its command table)
TOKENS_COMMANDS: dict[str, Command] = {
    "tokens": Command("length, EOS, codebook, repetition and reward-model metrics of token sets, and their "
                      "Fréchet distance", add_tokens_arguments, cmd_tokens),
}

__all__ = ["TOKENS_COMMANDS", "TokenSet", "add_tokens_arguments", "cmd_tokens",
           "describe_set", "entropy_bits", "frechet_distance", "frechet_gaussians", "gaussian_fit", "length_stats",
           "load_token_set", "ngram_repeat_rate", "psd_sqrt", "repeat_rates", "rm_embedder", "set_metrics",
           "stream_stats", "tokens_report"]
