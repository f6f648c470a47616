"""``levo-data encode``: songs (audio) -> token files ``[3, T]`` with the native codec encoder.

    levo-data encode AUDIO_DIR|CATALOGUE.jsonl --codec CODEC_DIR --out TOKENS_DIR
                     [--separator module:function | --separator-ckpt PATH] [--batch 4] [--chunk-batch 4]
                     [--device auto] [--dtype fp32|bf16|fp16] [--root DIR] [--overwrite]

Input: a folder of audio files (every ``.wav``/``.flac``/``.ogg``/``.mp3``/... below it, read with
libsndfile; ``idx`` = the path below the folder without its suffix, characters other than letters,
digits, ``_``, ``-``, ``/`` replaced by ``_``) or a JSONL catalogue with the field names of
``levo-data shards --manifest``: ``idx``; the song in ``audio`` or ``path``; optional stems ``vocal``
and/or ``bgm`` (a missing one is full − the other; both missing: separated, vocal = the separator's
output, bgm = full − vocal, as released); a line with ``tokens`` instead is passed through. Relative
paths are taken from the catalogue's folder (or ``--root``). Files at other sample rates are
resampled to 48 kHz, mono is duplicated to stereo.

Output (``TOKENS_DIR``):

* ``<idx>.npy``: int16 ``[3, T]`` (rows mixed, vocal, bgm at 25 Hz; ``T = int(N/48000·25) + 1``),
  written to a temporary name and renamed: what ``levo-infer decode TOKENS_DIR OUT_DIR`` and a
  shards catalogue's ``tokens`` field read;
* ``manifest.jsonl``: one line per song that has tokens, in input order: the catalogue line with
  ``audio``/``path``/``vocal``/``bgm`` replaced by ``"tokens": "<idx>.npy"`` and ``source_audio``
  (relative paths made absolute), ready for ``levo-data shards --manifest TOKENS_DIR/manifest.jsonl``
  once it has lyrics (a folder gives ``idx``, ``tokens``, ``source_audio`` only);
* ``errors.jsonl``: one line per song that failed in this run (``idx``, ``line``, ``source``,
  ``error``), also printed as it happens; the exit status is then 1 (2 for usage errors);
* ``encode.json``: the settings (codec files, dtype, separator). A rerun with the same settings
  keeps every ``<idx>.npy`` that reads back as ``[3, T]`` with the length its audio file implies and
  encodes the rest; other settings are refused unless ``--overwrite`` (which encodes everything
  again, replacing the files it writes and nothing else). The audio files themselves are not
  fingerprinted: after replacing a song's audio, delete its ``<idx>.npy`` (or pass ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levo_infer.codec.decoder import CodecError
from levo_infer.codec.dsp import SAMPLE_RATE, ResampleError, load_stereo_48k, resampled_length
from levo_infer.codec.encoder import ENCODER_FILES, frames_for, load_native_encoder
from levo_infer.codec.separate import DemucsSeparator, SeparatorError, bundle_demucs_dir, stems
from levo_infer.commands import Command
from levo_infer.prompts import AUDIO_SUFFIXES
from levo_infer.tokens import CODE_SIZE, STREAMS
from levo_train.data.cache import settings_file_differences
from levo_train.data.shards import _check_key, write_json_atomic
from levo_train.scorers import load_callable

from .errors import UsageError
from .offline import resolve_device

__all__ = ["DTYPES", "ENCODE_COMMANDS", "Item", "check_codec", "encode_items", "encode_settings", "encode_songs",
           "resolve_separator", "token_array", "write_npy_atomic"]

FORMAT = "levo-encode-1"
SETTINGS_NAME, MANIFEST_NAME, ERRORS_NAME = "encode.json", "manifest.jsonl", "errors.jsonl"
_PATH_FIELDS = ("audio", "path", "vocal", "bgm")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-/]+")


@dataclass
class Item:
    """One song to encode (or a catalogue line that failed before that: ``error``)."""

    idx: str | None
    line: int | None = None
    full: Path | None = None
    vocal: Path | None = None
    bgm: Path | None = None
    tokens: Path | None = None          # a catalogue line that already names tokens
    record: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float | None = None        # keep only the first seconds, after separation (a prompt: 10 s)

    @property
    def source(self) -> str:
        return str(self.full or self.tokens or "")


# ----------------------------------------------------------------------------- input
def _folder_items(folder: Path) -> list[Item]:
    items, seen = [], {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or p.suffix.lower() not in AUDIO_SUFFIXES or any(x.startswith(".") for x in rel.parts):
            continue
        idx = "/".join(_BAD_KEY_CHARS.sub("_", part).strip("/") or "_" for part in rel.with_suffix("").parts)
        it = Item(idx=idx, full=p.resolve())
        if idx in seen:
            it.error = f"its idx {idx!r} (from the file name) is already taken by {seen[idx]}; rename one of them"
        seen.setdefault(idx, p)
        items.append(it)
    return items


def _catalogue_items(path: Path, root: Path) -> list[Item]:
    items: list[Item] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            it = Item(idx=None, line=line)
            items.append(it)
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                it.error = f"not valid JSON ({e})"
                continue
            if not isinstance(rec, dict):
                it.error = f"expected a JSON object, found {type(rec).__name__}"
                continue
            key = rec.get("idx")
            key = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
            try:
                it.idx = _check_key(key)
            except ValueError as e:
                it.error = f"idx: {e}" if key is not None else "no 'idx' (every line needs a unique idx)"
                continue
            if key in seen:
                it.error = f"idx {key!r} already used on line {seen[key]}"
                continue
            seen[key] = line
            it.record = rec
            sources = [n for n in ("tokens", "audio", "path") if n in rec]
            if len(sources) != 1:
                it.error = f"expected exactly one of 'tokens', 'audio', 'path' (found {' and '.join(sources) or 'none'})"
                continue
            paths = {}
            for name in (sources[0], "vocal", "bgm"):
                v = rec.get(name)
                if v is None and name != sources[0]:
                    continue
                if not isinstance(v, str) or not v.strip():
                    it.error = f"{name!r} must be a non-empty path string, found {v!r}"
                    break
                paths[name] = Path(v) if Path(v).is_absolute() else root / v
            if it.error:
                continue
            if "tokens" in paths:
                it.tokens = paths["tokens"].resolve()
                if "vocal" in paths or "bgm" in paths:
                    it.error = "a line with 'tokens' has no use for 'vocal'/'bgm' stems"
            else:
                it.full = paths[sources[0]].resolve()
                it.vocal = paths["vocal"].resolve() if "vocal" in paths else None
                it.bgm = paths["bgm"].resolve() if "bgm" in paths else None
    return items


def _expected_frames(path: Path) -> int | None:
    """Frames the song in ``path`` encodes to (from its header), or None when it cannot be read."""
    import soundfile as sf  # soundfile (libsndfile): only when audio is read

    try:
        info = sf.info(str(path))
        return frames_for(resampled_length(int(info.frames), int(info.samplerate), SAMPLE_RATE))
    except (RuntimeError, ValueError, ResampleError, OSError):
        return None


def _done(out: Path, it: Item, code_size: int) -> bool:
    """``out`` holds a token file for ``it`` of the length its audio implies (a finished earlier run)."""
    if not out.is_file() or it.full is None:
        return False
    want = _expected_frames(it.full)
    try:
        arr = np.load(out, allow_pickle=False)
    except (OSError, ValueError):
        return False
    return (want is not None and arr.shape == (3, want) and np.issubdtype(arr.dtype, np.integer)
            and int(arr.min()) >= 0 and int(arr.max()) < code_size)


def write_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """``arr`` as ``.npy`` at ``path``: written to a temporary name in the same folder, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- separators
def resolve_separator(spec: str | None, ckpt: str | None, codec: Path, device: str) -> tuple[Any, str]:
    """The separator and its description for the settings: ``module:function`` (a class is built
    once), else htdemucs from ``ckpt`` or the runtime bundle beside ``codec``; UsageError otherwise."""
    if spec:
        try:
            fn = load_callable(spec, setting="--separator")
        except ValueError as e:
            raise UsageError(str(e)) from None
        return (fn() if isinstance(fn, type) else fn), spec
    where = Path(ckpt) if ckpt else bundle_demucs_dir(codec)
    try:
        return DemucsSeparator.from_path(where, device=device), f"htdemucs:{where}"
    except SeparatorError as e:
        hint = "" if ckpt else " (or pass --separator-ckpt PATH, or --separator module:function, or give stems)"
        raise UsageError(f"{e}{hint}") from None


# ----------------------------------------------------------------------------- shared with levo-data shards
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_codec(codec: Path) -> None:
    """UsageError unless ``codec`` holds both encoder files of the released runtime layout."""
    if not codec.is_dir():
        raise UsageError(f"--codec {codec}: no such codec folder")
    missing = [str(rel) for rel in ENCODER_FILES.values() if not (codec / rel).is_file()]
    if missing:
        raise UsageError(f"--codec {codec}: no {' and no '.join(missing)} (the encoder reads the released runtime's "
                         f"{' and '.join(str(r) for r in ENCODER_FILES.values())})")


def encode_settings(codec: Path, dtype: str, separator: str | None, separator_ckpt: str | None) -> dict[str, Any]:
    """What decides the tokens: the codec files (by size), the precision and the separator."""
    return {"format": FORMAT, "codec": {str(rel): (codec / rel).stat().st_size for rel in ENCODER_FILES.values()},
            "dtype": dtype, "separator": separator or (f"htdemucs:{Path(separator_ckpt).resolve()}" if separator_ckpt
                                                       else "htdemucs:bundle"),
            "rows": list(STREAMS), "dtype_on_disk": "int16"}


def token_array(tokens: torch.Tensor, code_size: int = CODE_SIZE) -> np.ndarray:
    """Encoder output ``[3, T]`` as stored: int16 (int32 for a code size int16 cannot hold)."""
    return tokens.numpy().astype(np.int16 if code_size <= 32767 else np.int32)


def encode_items(items: Sequence[Item], enc: Any, sep: Any, *, batch: int, done: Callable[[Item, torch.Tensor], None],
                 fail: Callable[[Item, str], None], progress: Callable[[int], None] | None = None) -> float:
    """Read, separate (stems missing from an item), cut (``item.seconds``) and encode ``items``,
    ``batch`` songs per encoder call; ``done(item, tokens [3, T])`` or ``fail(item, message)`` for
    each, one song at a time (a failed batch is retried song by song to name the song).
    ``progress(n_done)`` after each call. Returns the seconds of audio encoded."""
    audio_s = 0.0
    n_done = 0
    pending: list[tuple[Item, tuple]] = []

    def flush() -> None:
        nonlocal audio_s, n_done
        if not pending:
            return
        try:
            results = enc.encode_songs([s for _, s in pending])
        except Exception:  # noqa: BLE001 - find the song: one at a time
            results = []
            for _, s in pending:
                try:
                    results.append(enc.encode_songs([s])[0])
                except Exception as e:  # noqa: BLE001
                    results.append(e)
        for (it, s), r in zip(pending, results):
            if isinstance(r, Exception):
                fail(it, f"encoding failed ({type(r).__name__}: {r})")
                continue
            done(it, r)
            n_done += 1
            audio_s += s[0].shape[-1] / SAMPLE_RATE
        pending.clear()
        if progress is not None:
            progress(n_done)

    for it in items:
        try:
            full = load_stereo_48k(it.full)  # type: ignore[arg-type]
            vocal = load_stereo_48k(it.vocal) if it.vocal is not None else None
            bgm = load_stereo_48k(it.bgm) if it.bgm is not None else None
            vocal, bgm = stems(full, vocal, bgm, separator=sep, what=str(it.full))
        except ValueError as e:  # AudioError, SeparatorError: this song's
            fail(it, str(e))
            continue
        if it.seconds is not None:
            n = int(it.seconds * SAMPLE_RATE)
            full, vocal, bgm = full[:, :n], vocal[:, :n], bgm[:, :n]
        pending.append((it, (full, vocal, bgm)))
        if len(pending) >= batch:
            flush()
    flush()
    return audio_s


# ----------------------------------------------------------------------------- the command
def encode_songs(source: str | os.PathLike, codec: str | os.PathLike, out: str | os.PathLike, *,
                 separator: str | None = None, separator_ckpt: str | None = None, batch: int = 4,
                 chunk_batch: int = 4, device: str = "cpu", dtype: str = "fp32", root: str | os.PathLike | None = None,
                 overwrite: bool = False, report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Encode every song of ``source`` into ``out`` (see the module docstring); returns the summary.

    Raises :class:`UsageError` for unusable settings; a song that fails is recorded in
    ``errors.jsonl`` (and the summary) and the others go on."""
    t0 = time.perf_counter()
    say = report or (lambda s: print(s, file=sys.stderr, flush=True))
    source, codec, out = Path(source), Path(codec), Path(out)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if batch < 1 or chunk_batch < 1:
        raise UsageError("--batch and --chunk-batch must be >= 1")
    if source.is_dir():
        items = _folder_items(source)
    elif source.is_file():
        items = _catalogue_items(source, Path(root) if root is not None else source.parent)
    else:
        raise UsageError(f"{source}: no such folder or catalogue file")
    if not items:
        raise UsageError(f"{source}: no songs (a folder of audio files, or a JSONL catalogue)")
    check_codec(codec)
    code_size = CODE_SIZE
    settings = encode_settings(codec, dtype, separator, separator_ckpt)
    out.mkdir(parents=True, exist_ok=True)
    spath = out / SETTINGS_NAME
    if spath.is_file() and not overwrite:
        try:
            what = settings_file_differences(spath, settings)
        except ValueError as e:
            raise UsageError(f"{e}; pass --overwrite to start afresh") from None
        if what:
            raise UsageError(f"--out {out} holds tokens made with other settings ({what}); rerun with the same "
                             "settings to resume, or pass --overwrite")
    write_json_atomic(spath, settings, sort_keys=True)

    errors: list[dict[str, Any]] = []
    failed: set[int] = set()

    def fail(it: Item, msg: str) -> None:
        errors.append({"idx": it.idx, "line": it.line, "source": it.source, "error": msg})
        failed.add(id(it))
        where = f"{source}:{it.line}: " if it.line else ""
        say(f"levo-data encode: {where}{it.source or it.idx}: {msg}")

    todo, kept, given = [], 0, 0
    for it in items:
        if it.error:
            fail(it, it.error)
        elif it.tokens is not None:
            given += 1
        elif not overwrite and _done(out / f"{it.idx}.npy", it, code_size):
            kept += 1
        else:
            todo.append(it)
    enc, sep, encoded = None, None, set()
    if todo:
        try:
            enc = load_native_encoder(codec, device=device, dtype=DTYPES[dtype])
        except CodecError as e:
            raise UsageError(str(e)) from None
        enc.chunk_batch = chunk_batch
        if any(it.vocal is None and it.bgm is None for it in todo):
            sep, desc = resolve_separator(separator, separator_ckpt, codec, device)
            say(f"levo-data encode: separating stems with {desc}")

    def done(it: Item, toks: torch.Tensor) -> None:
        write_npy_atomic(out / f"{it.idx}.npy", token_array(toks, code_size))
        encoded.add(it.idx)

    audio_s = encode_items(todo, enc, sep, batch=batch, done=done, fail=fail, progress=lambda n: say(
        f"levo-data encode: {n} of {len(todo)} song(s) encoded ({len(errors)} failed so far)"))

    rows = []
    for it in items:
        if id(it) in failed or (it.tokens is None and it.idx not in encoded and not (out / f"{it.idx}.npy").is_file()):
            continue
        rec = {k: v for k, v in it.record.items() if k not in (*_PATH_FIELDS, "tokens")} or {"idx": it.idx}
        for k in ("prompt", "prompt_audio_path"):
            v = rec.get(k)
            if isinstance(v, str) and not Path(v).is_absolute():
                rec[k] = str(((Path(root) if root is not None else source.parent) / v).resolve())
        rec["tokens"] = str(it.tokens) if it.tokens is not None else f"{it.idx}.npy"
        if it.full is not None:
            rec["source_audio"] = str(it.full)
        rows.append(rec)
    _write_jsonl(out / MANIFEST_NAME, rows)
    _write_jsonl(out / ERRORS_NAME, errors)
    secs = time.perf_counter() - t0
    return {"source": str(source), "out": str(out), "songs": len(items), "encoded": len(encoded), "kept": kept,
            "tokens_given": given, "failed": len(errors), "manifest": str(out / MANIFEST_NAME),
            "errors": str(out / ERRORS_NAME), "audio_seconds": round(audio_s, 2), "seconds": round(secs, 2),
            "device": device, "dtype": dtype}


# ----------------------------------------------------------------------------- CLI
def _encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="AUDIO_DIR|JSONL",
                   help="a folder of audio files, or a JSONL catalogue (idx, audio|path, optional vocal/bgm stems)")
    p.add_argument("--codec", required=True, metavar="CODEC_DIR",
                   help="the released runtime's ckpt/ folder (model_1rvq/, model_septoken/)")
    p.add_argument("--out", required=True, metavar="TOKENS_DIR", help="folder for <idx>.npy, manifest.jsonl, errors.jsonl")
    p.add_argument("--separator", default=None, metavar="module:function",
                   help="vocal separator f(wave [2,N], sample_rate) -> vocals (a class: built once); default htdemucs")
    p.add_argument("--separator-ckpt", default=None, metavar="PATH",
                   help="htdemucs.pth, a folder holding htdemucs.{pth,yaml}, or the runtime bundle root "
                        "(default: ../third_party/demucs/ckpt beside --codec)")
    p.add_argument("--batch", type=int, default=4, help="songs per encoder call (default 4)")
    p.add_argument("--chunk-batch", type=int, default=4, help="40 s chunks per forward pass (default 4; ~1 GB each in fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: this rank's GPU, else cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="conv front end and conformer precision (default fp32, as released)")
    p.add_argument("--root", default=None, help="folder of a catalogue's relative paths (default: its folder)")
    p.add_argument("--overwrite", action="store_true", help="encode every song again (other settings allowed)")


def _encode_run(args: argparse.Namespace) -> int:
    try:
        summary = encode_songs(args.source, args.codec, args.out, separator=args.separator,
                               separator_ckpt=args.separator_ckpt, batch=args.batch, chunk_batch=args.chunk_batch,
                               device=resolve_device(args.device), dtype=args.dtype, root=args.root,
                               overwrite=args.overwrite)
    except UsageError as e:
        print(f"levo-data encode: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 1 if summary["failed"] else 0


#: ``levo-data encode`` (part of its command table)
ENCODE_COMMANDS: dict[str, Command] = {
    "encode": Command("audio songs (a folder or a JSONL catalogue) -> [3, T] token files with the native codec "
                      "encoder; resumable, per-song errors", _encode_args, _encode_run),
}
