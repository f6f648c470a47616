"""``levo-eval audio-score``: user scorer functions over a folder of audio files.

    levo-eval audio-score --audio DIR [--scorer MODULE:FUNCTION ...] [--requested JSONL] [--out FILE.json]

Every ``*.wav`` / ``*.flac`` file of ``DIR`` (a single file works too) is read with ``soundfile`` as
float32 ``[C, N]`` at its own sample rate and handed to each scorer: a function
``fn(waveform [C, N], sample_rate) -> {dimension: score}`` (or ``fn(waveform, sample_rate, song)``:
here ``song`` is None), named ``module:function`` and loaded by
:func:`levo_train.scorers.load_audio_fn`, the loader the audio-domain reward scorer
(:class:`levo_train.scorers.AudioScorer`, ``--scorer audio:MODULE:FUNCTION``) uses too, so one
function (a SongEval or audiobox-aesthetics wrapper a lab has locally) serves both. A function may
also declare the keywords ``path``, ``requested_s`` and ``expected_s`` (see ``--requested``) to get
them. Scorers resample themselves if they need another rate. Without ``--scorer`` the built-in
:func:`basic` runs (``--scorer basic`` names it too).

``--requested JSONL``: one object per line with ``idx`` (the file name without extension; a
``_vocal`` / ``_bgm`` suffix is also matched to its ``idx``) and the requested seconds, ``duration``
or, for levo-infer's ``jsonl/*.jsonl`` records, ``settings.duration``; a record's ``frames`` also
gives the length the codec writes for them (:func:`levo_infer.codec.decoder.output_samples`).

Output: one line per file, then, as the last line, one JSON object: ``files`` (``{file: {scorer:
{dimension: score}}}``), ``mean`` and ``n`` per scorer and dimension (over the files it scored),
``errors`` (``{file, scorer, error}``) and the counts. ``--out`` writes the same object to a file.
An unreadable file, a scorer that raises, returns a non-dict or a non-finite value fails that file
(for that scorer), named; the others go on and the exit status is 1. A scorer that cannot be
loaded, a missing folder, no audio files or a bad ``--requested`` file: exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from levo_infer.codec.decoder import SAMPLE_RATE, output_samples
from levo_infer.commands import Command
from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.jsonio import write_json_atomic
from levo_infer.jsonl import jsonl_rows
from levo_infer.tokens import SEPARATE_SUFFIXES
from levo_train.scorers import load_audio_fn

from .errors import UsageError

AUDIO_EXTS = (".wav", ".flac")
BUILTIN = "levo_eval.audio_score:basic"
#: a sample at or above this magnitude counts as clipped (int16 full scale reads as 0.99997)
CLIP_LEVEL = 0.999
#: a 50 ms frame whose RMS (all channels) is below this is silent
SILENCE_DBFS = -60.0
SILENCE_FRAME_S = 0.05
#: floors that keep silence finite: dBFS values and the loudness (the BS.1770 absolute gate)
DB_FLOOR = -120.0
LUFS_FLOOR = -70.0
BLOCK_S, HOP_S = 0.4, 0.1


# ----------------------------------------------------------------------------- loudness
def k_weighting(sample_rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two BS.1770 K-weighting biquads ``(b, a)`` (high shelf, then high pass) designed for
    ``sample_rate`` from the analog prototypes (at 48 kHz they are the coefficients BS.1770 lists)."""
    fs = float(sample_rate)
    f0, gain_db, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / fs)
    vh = 10.0 ** (gain_db / 20.0)
    vb = vh ** 0.4996667741545416
    a0 = 1.0 + k / q + k * k
    shelf = (np.array([vh + vb * k / q + k * k, 2.0 * (k * k - vh), vh - vb * k / q + k * k]) / a0,
             np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0]))
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / fs)
    a0 = 1.0 + k / q + k * k
    highpass = (np.array([1.0, -2.0, 1.0]), np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0]))
    return [shelf, highpass]


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (a quick FFT size)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def k_weighted(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """``waveform`` [C, N] through the K-weighting filters (float64), applied as their frequency
    response to the signal padded with 1 s of zeros: the causal IIR output from rest, up to the
    filters' tail after that second (far below 1e-9)."""
    x = np.asarray(waveform, dtype=np.float64)
    n = x.shape[-1]
    size = _fast_len(n + int(sample_rate))
    z = np.exp(-2j * np.pi * np.fft.rfftfreq(size))  # e^{-jw} per bin
    resp = np.ones_like(z)
    for b, a in k_weighting(sample_rate):
        resp *= (b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z)
    return np.stack([np.fft.irfft(np.fft.rfft(ch, size) * resp, size)[:n] for ch in x]) if n else x


def integrated_loudness(waveform: np.ndarray, sample_rate: int) -> float:
    """Gated integrated loudness in LUFS after ITU-R BS.1770-4 (own implementation, not a certified
    meter): K-weighting, 400 ms blocks every 100 ms, absolute gate -70 LUFS, relative gate -10 LU,
    every channel weighted 1 (no surround weights; mono is not boosted). Audio shorter than one
    block is one block. Floored at :data:`LUFS_FLOOR` (silence)."""
    y = k_weighted(waveform, sample_rate)
    n = y.shape[-1]
    if n == 0:
        return LUFS_FLOOR
    block, hop = int(round(BLOCK_S * sample_rate)), int(round(HOP_S * sample_rate))
    starts = np.arange(0, n - block + 1, hop) if n >= block else np.array([0])
    size = min(block, n)
    csum = np.concatenate([np.zeros((y.shape[0], 1)), np.cumsum(y * y, axis=-1)], axis=-1)
    z = (csum[:, starts + size] - csum[:, starts]) / size  # [C, J] mean square per block
    power = z.sum(0)
    with np.errstate(divide="ignore"):
        loud = -0.691 + 10.0 * np.log10(power)
    keep = loud > LUFS_FLOOR
    if not keep.any():
        return LUFS_FLOOR
    rel = -0.691 + 10.0 * math.log10(power[keep].mean()) - 10.0
    keep &= loud > rel
    return max(LUFS_FLOOR, -0.691 + 10.0 * math.log10(power[keep].mean()))


def _db(x: float) -> float:
    return max(DB_FLOOR, 20.0 * math.log10(x)) if x > 0 else DB_FLOOR


def basic(waveform: np.ndarray, sample_rate: int, song: Any = None, *, requested_s: float | None = None,
          expected_s: float | None = None) -> dict[str, float]:
    """The built-in, weight-free scorer (``levo_eval.audio_score:basic``); lower-level facts, not a
    reward (its dimensions are not "higher is better"):

    * ``rms_dbfs``: RMS over all channels and samples in dBFS (a full-scale sine is -3.01);
    * ``peak_dbfs``: the largest magnitude in dBFS;
    * ``loudness_lufs``: :func:`integrated_loudness` (BS.1770-4 gated, approximate);
    * ``clip_ratio``: share of samples (all channels) with magnitude >= :data:`CLIP_LEVEL`;
    * ``silence_ratio``: share of 50 ms frames whose RMS is below :data:`SILENCE_DBFS` dBFS;
    * ``duration_s``; with ``requested_s`` ``duration_ratio`` = duration / requested, with
      ``expected_s`` ``length_error_s`` = duration - expected.

    dBFS values are floored at -120, loudness at -70 LUFS. ``song`` is unused (the audio-domain
    reward scorer passes it)."""
    x = np.asarray(waveform, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"basic: expected a waveform [C, N], got shape {list(x.shape)}")
    n = x.shape[1]
    sq = x * x
    frame = max(1, int(round(SILENCE_FRAME_S * sample_rate)))
    n_frames = max(1, n // frame)
    if n >= frame:
        frame_ms = sq[:, :n_frames * frame].reshape(x.shape[0], n_frames, frame).mean(axis=(0, 2))
    else:
        frame_ms = np.array([sq.mean()]) if n else np.zeros(1)
    thr = 10.0 ** (SILENCE_DBFS / 10.0)
    out = {
        "rms_dbfs": _db(math.sqrt(float(sq.mean()))) if n else DB_FLOOR,
        "peak_dbfs": _db(float(np.abs(x).max())) if n else DB_FLOOR,
        "loudness_lufs": integrated_loudness(x, sample_rate),
        "clip_ratio": float((np.abs(x) >= CLIP_LEVEL).mean()) if n else 0.0,
        "silence_ratio": float((frame_ms < thr).mean()),
        "duration_s": n / float(sample_rate),
    }
    if requested_s is not None and requested_s > 0:
        out["duration_ratio"] = out["duration_s"] / float(requested_s)
    if expected_s is not None:
        out["length_error_s"] = out["duration_s"] - float(expected_s)
    return out


# ----------------------------------------------------------------------------- inputs
def audio_files(path: str | Path) -> list[Path]:
    """The ``*.wav`` / ``*.flac`` files of a folder (sorted), or ``[path]`` for one such file."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in AUDIO_EXTS:
            raise UsageError(f"--audio {p}: not a {' or '.join(AUDIO_EXTS)} file")
        return [p]
    if not p.is_dir():
        raise UsageError(f"--audio {p}: no such folder")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_EXTS)
    if not files:
        raise UsageError(f"--audio {p}: no {' / '.join('*' + e for e in AUDIO_EXTS)} files in the folder")
    return files


def read_requested(path: str | Path) -> dict[str, dict[str, float]]:
    """``{idx: {"requested_s": s, "expected_s": s}}`` from a JSONL file (see the module docstring)."""
    p = Path(path)
    out: dict[str, dict[str, float]] = {}
    for n, rec in jsonl_rows(p, "--requested", UsageError):
        if not isinstance(rec, dict) or rec.get("idx") in (None, ""):
            raise UsageError(f"--requested {p}:{n}: expected an object with an `idx`")
        item: dict[str, float] = {}
        dur = rec.get("duration")
        if dur is None and isinstance(rec.get("settings"), dict):
            dur = rec["settings"].get("duration")
        if dur is not None:
            if isinstance(dur, bool) or not isinstance(dur, (int, float)) or not dur > 0 or not math.isfinite(dur):
                raise UsageError(f"--requested {p}:{n}: duration {dur!r} is not a positive number of seconds")
            item["requested_s"] = float(dur)
        frames = rec.get("frames")
        if isinstance(frames, int) and not isinstance(frames, bool) and frames >= 0:
            item["expected_s"] = output_samples(frames) / SAMPLE_RATE
        if not item:
            raise UsageError(f"--requested {p}:{n}: idx {rec['idx']!r} has neither `duration` (or "
                             "`settings.duration`) nor `frames`")
        out[str(rec["idx"])] = item
    return out


def _match(stem: str, requested: Mapping[str, dict[str, float]]) -> dict[str, float] | None:
    if stem in requested:
        return requested[stem]
    for sfx in SEPARATE_SUFFIXES:
        if stem.endswith(sfx) and stem[: -len(sfx)] in requested:
            return requested[stem[: -len(sfx)]]
    return None


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """(float32 waveform [C, N], sample rate) of an audio file; ValueError naming it otherwise."""
    import soundfile as sf  # soundfile (libsndfile): only when audio is read

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - soundfile raises several types for a bad file
        raise ValueError(f"{path}: cannot read audio ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(data.T), int(sr)


def check_result(res: Any, where: str) -> dict[str, float]:
    """A scorer's result as ``{str: float}``; ValueError naming ``where`` if it is not a non-empty
    dict of finite numbers."""
    if not isinstance(res, Mapping) or not res:
        raise ValueError(f"{where}: returned {type(res).__name__} {res!r:.80}, expected a non-empty "
                         "{dimension: score} dict")
    out = {}
    for k, v in res.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{where}: score {k!r} is {v!r:.40}, expected a number")
        if not math.isfinite(float(v)):
            raise ValueError(f"{where}: score {k!r} is {float(v)}, expected a finite number")
        out[str(k)] = float(v)
    return out


# ----------------------------------------------------------------------------- scoring
def load_scorers(specs: list[str] | None) -> dict[str, Callable[..., Any]]:
    """``{spec: function}`` through :func:`levo_train.scorers.load_audio_fn` (``basic`` and no spec
    at all mean :data:`BUILTIN`); UsageError naming a spec that does not load."""
    out: dict[str, Callable[..., Any]] = {}
    for spec in specs or [BUILTIN]:
        spec = BUILTIN if spec == "basic" else spec
        try:
            out[spec] = load_audio_fn(spec, setting="--scorer")
        except ValueError as e:
            raise UsageError(str(e)) from None
    return out


def score_audio(files: list[Path], scorers: Mapping[str, Callable[..., Any]],
                requested: Mapping[str, dict[str, float]] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every scorer over every file: ``{"files", "mean", "n", "errors", "n_files", "n_ok",
    "no_request"}`` (see the module docstring); a failing file or scorer is recorded, not raised."""
    requested = requested or {}
    root = files[0].parent if files else Path(".")
    res: dict[str, dict[str, dict[str, float]]] = {}
    errors: list[dict[str, Any]] = []
    no_request: list[str] = []
    for f in files:
        name = str(f.relative_to(root)) if f.is_relative_to(root) else str(f)
        try:
            wav, sr = read_audio(f)
        except ValueError as e:
            errors.append({"file": name, "scorer": None, "error": str(e)})
            if log:
                log(f"error: {e}")
            continue
        ctx: dict[str, Any] = {"path": str(f)}
        req = _match(f.stem, requested) if requested else None
        if requested and req is None:
            no_request.append(name)
        ctx.update(req or {})
        res[name] = {}
        for spec, fn in scorers.items():
            where = f"{f}: scorer {spec}"
            try:
                res[name][spec] = check_result(fn(wav.copy() if len(scorers) > 1 else wav, sr, None, **ctx), where)
            except Exception as e:  # noqa: BLE001 - a lab's scorer may raise anything; that file fails
                msg = str(e) if isinstance(e, ValueError) and str(e).startswith(where) else \
                    f"{where}: raised {type(e).__name__}: {e}"
                errors.append({"file": name, "scorer": spec, "error": msg})
                if log:
                    log(f"error: {msg}")
        if log and res[name]:
            log(f"{name}: " + "; ".join(f"{spec}: " + ", ".join(f"{k} {v:.4g}" for k, v in d.items())
                                         for spec, d in res[name].items()))
    means: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    for spec in scorers:
        vals: dict[str, list[float]] = {}
        for d in res.values():
            for k, v in d.get(spec, {}).items():
                vals.setdefault(k, []).append(v)
        means[spec] = {k: float(np.mean(v)) for k, v in vals.items()}
        counts[spec] = {k: len(v) for k, v in vals.items()}
    ok = sum(1 for d in res.values() if len(d) == len(scorers))
    return {"n_files": len(files), "n_ok": ok, "scorers": list(scorers), "mean": means, "n": counts,
            "files": res, "errors": errors, "no_request": no_request}


def cmd_audio_score(args: argparse.Namespace) -> int:
    """``levo-eval audio-score``: the last stdout line is the result JSON (see the module docstring)."""
    t0 = time.time()
    try:
        files = audio_files(args.audio)
        requested = read_requested(args.requested) if args.requested else None
        scorers = load_scorers(args.scorer)
    except UsageError as e:
        print(f"levo-eval audio-score: error: {e}", file=sys.stderr)
        return 2
    def log(msg: str) -> None:
        if msg.startswith("error:"):
            print(f"levo-eval audio-score: {msg}", file=sys.stderr)
        else:
            print(msg)

    res = score_audio(files, scorers, requested, log=log)
    res["seconds"] = round(time.time() - t0, 2)
    for spec in res["scorers"]:
        print(f"mean over {max(res['n'][spec].values(), default=0)} files, {spec}: "
              + ", ".join(f"{k} {v:.4g}" for k, v in res["mean"][spec].items()))
    if res["no_request"]:
        print(f"levo-eval audio-score: warning: {len(res['no_request'])} file(s) have no --requested record "
              f"(e.g. {res['no_request'][0]})", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, res, nonfinite="null")
    print(strict_dumps(res, nonfinite="null"))
    return 1 if res["errors"] else 0


def add_audio_score_arguments(a: argparse.ArgumentParser) -> None:
    """The ``audio-score`` subcommand's options."""
    a.add_argument("--audio", required=True, help="folder of *.wav / *.flac files (or one file)")
    a.add_argument("--scorer", action="append", default=None, metavar="MODULE:FUNCTION",
                   help=f"fn(waveform [C, N], sample_rate) -> {{dimension: score}}; repeatable; default and "
                        f"'basic': {BUILTIN} (loudness, clipping, silence, duration)")
    a.add_argument("--requested", default=None, metavar="JSONL",
                   help="requested seconds per idx: `idx` + `duration` (or levo-infer's settings.duration)")
    a.add_argument("--out", default=None, metavar="FILE.json", help="also write the result JSON here")


#: ``levo-eval audio-score`` (part of its command table)
AUDIO_SCORE_COMMANDS: dict[str, Command] = {
    "audio-score": Command("run audio scorer functions (module:function) over a folder of audio",
                           add_audio_score_arguments, cmd_audio_score),
}

__all__ = ["AUDIO_SCORE_COMMANDS", "BUILTIN", "add_audio_score_arguments", "audio_files", "basic", "check_result",
           "cmd_audio_score", "integrated_loudness", "k_weighting", "k_weighted", "load_scorers", "read_audio",
           "read_requested", "score_audio"]
