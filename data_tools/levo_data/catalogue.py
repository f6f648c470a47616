"""``levo-data shards``: a song catalogue (JSONL manifest) -> training shards.

    levo-data shards --manifest songs.jsonl --out DIR [--shard-size 2000|256MB] [--val-fraction 0.01]
                     [--lyrics check|normalize] [--require-vocal]
                     [--codec CODEC_DIR [--separator module:function | --separator-ckpt PATH]
                      [--encode-batch 4] [--chunk-batch 4] [--dtype fp32|bf16|fp16] [--device auto]]
                     [--codec-encoder songgeneration:PATH --model-config CONFIG.yaml]

Manifest line (one JSON object per line, read by :mod:`levo_infer.jsonl`: lines end at ``"\\n"``
only, a BOM is skipped, a line over the size limit is rejected as ``line_too_long``; blank lines are
ignored; relative paths are taken from the manifest's folder, or from ``--root``):

==========================  ================================================================================
``idx``                     required, unique; a string (or integer) of letters, digits, ``_``, ``-``, ``/``
``tokens`` | ``audio`` |    exactly one: a token file (``.npy``/``.pt``/``.pth``, integer ``[3, T]`` or
``path``                    ``[1, 3, T]``: mixed, vocal, bgm at 25 Hz, codes in ``[0, code_size)``) or an
                            audio file (encoded by ``--codec`` or ``--codec-encoder``); ``path``: the
                            suffix decides
``vocal`` / ``bgm``         optional stems of an audio song (``--codec`` only; one given: the other is
                            full − it; none: separated, vocal = the separator's, bgm = full − vocal)
``gt_lyric`` | ``lyric``    required; checked by the shared checker (:mod:`levo_infer.lyrics`)
``descriptions`` | ``style`` optional style text (default ``""``)
``prompt`` |                optional prompt: a token file ``[3, P]`` (stored as given; may hold the none code
``prompt_audio_path``       ``code_size + 1``) or an audio file (encoded, first 250 frames = 10 s kept)
anything else               kept as the record's ``json`` metadata (schema of :mod:`levo_train.data.shards`);
                            ``duration`` defaults to T / 25, ``script`` to the lyric's detected script
==========================  ================================================================================

Output (``DIR``): ``train/train-NNNNNN.tar`` and ``val/val-NNNNNN.tar`` (song shards written by
:class:`levo_train.data.shards.ShardWriter`, records in manifest order) with an ``index.json`` each,
so ``SongDataModule(train="DIR/train", val="DIR/val")`` reads them as they are; ``stats.json``
(songs, hours, token histograms, scripts, languages, rejected lines); ``rejected.jsonl`` (one
object per bad line: ``line``, ``idx``, ``reason``, ``error``, lyric ``rule``); ``catalogue.json``
(the settings); ``progress/`` (one file per finished shard).

* Audio (``--codec CODEC_DIR``, the released runtime's ``ckpt/``): before any shard is written, every
  audio song and audio prompt of the lines that pass the cheap checks is encoded natively
  (:func:`levo_infer.codec.load_encoder`; ``--encode-batch`` songs per call) into
  ``DIR/encoded/<name>.npy``, or ``<name>.error.json`` for a song that cannot be encoded (not audio,
  no samples, NaN, a refused sample rate, stems of another length: the line is then rejected as
  ``encode_failed``, naming the file). ``name`` hashes the encode settings and the files' paths,
  sizes and modification times, so reruns, ``--overwrite`` and other shard settings reuse what is
  encoded, and a changed file is encoded again. Prompts: the whole file separated, its first 10 s
  encoded (251 frames), 250 kept. The separator: htdemucs from ``--separator-ckpt`` or the runtime
  bundle beside ``--codec`` (``../third_party/demucs/ckpt/htdemucs.{pth,yaml}``), or
  ``--separator module:function``; it is loaded only when a song lacks both stems.
* Ranks (``RANK``/``WORLD_SIZE`` of torchrun or ``SLURM_PROCID``/``SLURM_NTASKS`` of srun): rank r
  encodes the audio files ``i % world == r`` and prints its share as JSON; rank 0 encodes its share,
  waits until every file is encoded or failed (a rank that stops with an error leaves
  ``encoded/rankNNN.failed.json``, and rank 0 exits naming it), then writes the shards alone. The
  shards do not depend on the number of ranks.
* Split: a record goes to ``val`` when ``sha256("levo-split:" + idx)`` read as a fraction in
  [0, 1) is below ``--val-fraction``: the same idx lands in the same split on every run and machine,
  whatever the other lines.
* Shard size: ``--shard-size N`` songs, or ``--shard-size 256MB`` (``KB``/``MB``/``GB`` = 10^3/6/9
  bytes of tar file, computed exactly from the members' sizes: a shard is closed before the song that
  would take it past the target; a single song larger than the target gets a shard of its own).
* Bad lines are reported (stderr, ``rejected.jsonl``, ``stats.json``) with their line number while
  the rest is written; exit status 1 when any line was rejected, 2 for usage errors, else 0.
  Lyrics: a line breaking the shared checker's rules (or, with ``--require-vocal``, lacking a
  vocal section) is rejected, naming the rule -- never kept, since every shard reader refuses such a
  record. Kept with a note in the stats: instrumental lyrics and lyrics not in canonical spacing
  (``--lyrics normalize`` stores the canonical form instead of the line's own). The second line
  with an idx is rejected even if the first was rejected for another reason.
* Resume: each split's shards cover consecutive runs of that split's candidate lines (lines that
  pass the cheap checks). A shard is written in ``DIR/.partial/`` and renamed into place when
  complete, then ``progress/<split>-NNNNNN.json`` records it (records, byte size, candidate range,
  song lines, the file-check rejections in its range, its stats). A rerun with the same manifest
  bytes and settings keeps the recorded shards whose tar is present with the recorded size (a
  consecutive run from shard 0), drops everything after them and any half-written shard, re-reads
  the manifest (cheap checks are redone, files of finished ranges are not opened) and continues
  each split after its last kept shard. The write is deterministic, so a resumed run yields the same
  shards, byte for byte, as an uninterrupted one. ``index.json``, ``stats.json`` and
  ``rejected.jsonl`` are (re)written when a run completes. Other settings or another manifest are
  refused (exit 2) unless ``--overwrite``; a ``DIR`` that holds another kind of data (a song shard
  folder, samples, pairs: :mod:`levo_data.outputs`) is refused (exit 2) even then. The files the
  manifest names are not fingerprinted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levo_infer.codec.decoder import CodecError
from levo_infer.codec.encoder import Encoder, EncoderError, load_encoder, load_native_encoder
from levo_infer.commands import Command
from levo_infer.jsonio import jsonl_text
from levo_infer.jsonl import JsonlError, jsonl_lines, parse_json_line
from levo_infer.lyrics import VOCAL_TAGS, LyricError, format_sections, split_sections
from levo_infer.prompts import AUDIO_SUFFIXES
from levo_infer.tokens import CODE_SIZE, FRAME_RATE, STREAMS
from levo_train.data.cache import settings_file_differences
from levo_train.data.shards import (
    INDEX_NAME,
    SCHEMA_VERSION,
    SONG_FORMAT,
    ShardError,
    ShardWriter,
    _check_key,
    _check_meta,
    _check_range,  # the shard reader's own rule, not a copy
    write_json_atomic,
)
from levo_train.locking import locks_output

from .encode import (
    DTYPES,
    Item,
    check_codec,
    encode_items,
    encode_settings,
    resolve_separator,
    token_array,
    write_npy_atomic,
)
from .errors import UsageError
from .offline import rank_world, resolve_device
from .outputs import check_output_folder

__all__ = ["CATALOGUE_COMMANDS", "Rejection", "build_shards", "format_table", "parse_shard_size",
           "script_of", "split_of"]

FORMAT = "levo-catalogue-1"
SETTINGS_NAME = "catalogue.json"
STATS_NAME = "stats.json"
REJECTED_NAME = "rejected.jsonl"
PROGRESS_DIR = "progress"
PARTIAL_DIR = ".partial"
SPLITS = ("train", "val")
HIST_BINS = 32
PROMPT_FRAMES = 250
#: test hook: hard-exit (no clean-up, like a kill) once this many shards were finished in this run
#: and one more song went into a half-written shard
CRASH_ENV = "LEVO_DATA_SHARDS_CRASH_AFTER"
_TOKEN_SUFFIXES = frozenset({".npy", ".pt", ".pth"})
_SOURCE_KEYS = ("tokens", "audio", "path")
_STEM_KEYS = ("vocal", "bgm")
_CONSUMED = frozenset({"idx", *_SOURCE_KEYS, *_STEM_KEYS, "gt_lyric", "lyric", "descriptions", "style", "prompt",
                       "prompt_audio_path"})
ENCODED_DIR = "encoded"
#: seconds of a prompt audio file that are encoded (the released prompt cut: 10 s -> 251 frames)
PROMPT_SECONDS = 10.0
#: how often rank 0 says which songs it still waits for, while other ranks encode
WAIT_REPORT_S = 60.0
_MAX_PRINTED = 200


class _Bad(Exception):
    """A manifest line that cannot become a record."""

    def __init__(self, reason: str, message: str, rule: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.rule = reason, message, rule


@dataclass
class Rejection:
    """One rejected manifest line: 1-based ``line``, its ``idx`` (when known), ``reason``, ``error``,
    and the lyric ``rule`` it broke (lyric rejections only)."""

    line: int
    idx: str | None
    reason: str
    error: str
    rule: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {"line": self.line, "idx": self.idx, "reason": self.reason, "error": self.error}
        if self.rule is not None:
            d["rule"] = self.rule
        return d


# ----------------------------------------------------------------------------- small pure helpers
def parse_shard_size(text: str) -> tuple[str, int]:
    """``"2000"`` -> ``("songs", 2000)``; ``"256MB"`` -> ``("bytes", 256_000_000)`` (KB/MB/GB, SI)."""
    s = str(text).strip().upper().replace(" ", "")
    for suffix, mult in (("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("K", 10**3), ("M", 10**6), ("G", 10**9)):
        if s.endswith(suffix):
            try:
                n = float(s[: -len(suffix)])
            except ValueError:
                break
            if n <= 0:
                break
            return "bytes", int(n * mult)
    else:
        if s.isdigit() and int(s) >= 1:
            return "songs", int(s)
    raise ValueError(f"--shard-size {text!r}: expected a song count (e.g. 2000) or a size (e.g. 256MB)")


def split_of(key: str, val_fraction: float) -> str:
    """``"val"`` when sha256 of the key (as a fraction of 2^64) is below ``val_fraction``, else ``"train"``."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha256(("levo-split:" + key).encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2.0**64 < val_fraction else "train"


def _char_class(ch: str) -> str | None:
    o = ord(ch)
    if (0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF
            or 0x1100 <= o <= 0x11FF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FFFF):
        return "cjk"
    if not ch.isalpha():
        return None
    return "latin" if o < 0x250 or 0x1E00 <= o <= 0x1EFF else "other"


def script_of(words: list[str]) -> str:
    """Script of sung words: ``cjk`` (Han, kana, hangul), ``latin`` or ``other`` when one holds >= 80 %
    of the letters, ``mixed`` otherwise, ``none`` without letters (instrumental)."""
    counts = {"cjk": 0, "latin": 0, "other": 0}
    for w in words:
        for ch in w:
            c = _char_class(ch)
            if c is not None:
                counts[c] += 1
    total = sum(counts.values())
    if total == 0:
        return "none"
    best = max(counts, key=lambda k: counts[k])
    return best if counts[best] >= 0.8 * total else "mixed"


# ----------------------------------------------------------------------------- stats
def _new_stats() -> dict[str, Any]:
    return {"songs": 0, "frames": 0, "min_frames": None, "max_frames": None, "with_prompt": 0, "from_audio": 0,
            "instrumental": 0, "non_canonical_lyrics": 0, "scripts": {}, "languages": {},
            "hist": [[0] * HIST_BINS for _ in STREAMS]}


def _merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k in ("songs", "frames", "with_prompt", "from_audio", "instrumental", "non_canonical_lyrics"):
        out[k] = a[k] + b[k]
    for k, f in (("min_frames", min), ("max_frames", max)):
        vals = [v for v in (a[k], b[k]) if v is not None]
        out[k] = f(vals) if vals else None
    for k in ("scripts", "languages"):
        out[k] = dict(a[k])
        for name, n in b[k].items():
            out[k][name] = out[k].get(name, 0) + n
    out["hist"] = [[x + y for x, y in zip(ra, rb)] for ra, rb in zip(a["hist"], b["hist"])]
    return out


# ----------------------------------------------------------------------------- one manifest line
@dataclass
class _Entry:
    line: int
    key: str
    split: str
    source: Path
    kind: str  # "tokens" | "audio"
    stems: tuple[Path | None, Path | None]  # vocal, bgm audio files (native encoder; None: separated)
    lyric: str
    style: str
    prompt: tuple[Path, str] | None
    meta: dict[str, Any]
    script: str
    instrumental: bool
    non_canonical: bool


@dataclass
class _Options:
    root: Path
    code_size: int
    val_fraction: float
    lyrics: str
    require_vocal: bool
    encoder: Any
    native: _NativeCache | None = None


def _file_kind(value: Any, field_name: str, opts: _Options) -> tuple[Path, str]:
    if not isinstance(value, str) or not value.strip():
        raise _Bad("bad_source", f"{field_name!r} must be a non-empty path string, found {value!r}")
    p = Path(value)
    p = p if p.is_absolute() else opts.root / p
    suffix = p.suffix.lower()
    kind = "tokens" if suffix in _TOKEN_SUFFIXES else "audio" if suffix in AUDIO_SUFFIXES else None
    if kind is None or field_name in ("tokens", "audio") and kind != field_name:
        want = {"tokens": "a token file .npy/.pt/.pth", "audio": "an audio file (.wav, .flac, ...)"}
        expected = want.get(field_name, "a token file .npy/.pt/.pth or an audio file")
        raise _Bad("bad_source", f"{field_name!r} {value!r}: unsupported file type {suffix or '(none)'}; "
                                 f"expected {expected}")
    if kind == "audio" and opts.encoder is None and opts.native is None:
        raise _Bad("audio_without_encoder", f"{field_name!r} {value!r} is an audio file: tokenising audio needs "
                                            "--codec CODEC_DIR (the native encoder) or --codec-encoder "
                                            "songgeneration:PATH --model-config CONFIG.yaml (or give a token file)")
    return p, kind


def _one_of(rec: dict[str, Any], names: tuple[str, ...], reason: str) -> tuple[str, Any] | None:
    given = [n for n in names if n in rec and rec[n] is not None]
    if not given:
        return None
    vals = {json.dumps(rec[n], sort_keys=True) for n in given}
    if len(vals) > 1:
        raise _Bad(reason, f"both {' and '.join(repr(n) for n in given)} are given and differ; give one")
    return given[0], rec[given[0]]


def _parse_line(text: str, line: int, seen: dict[str, int], opts: _Options) -> _Entry:
    """The cheap checks of one line (JSON, idx, duplicates, lyric, style, paths, metadata)."""
    try:
        rec = parse_json_line(text)
    except ValueError as e:
        raise _Bad("invalid_json", str(e)) from None
    if not isinstance(rec, dict):
        raise _Bad("not_an_object", f"expected a JSON object, found {type(rec).__name__}")
    key = rec.get("idx")
    if key is None:
        raise _Bad("missing_idx", "no 'idx' (every line needs a unique idx)")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    try:
        _check_key(key)
    except ValueError as e:
        raise _Bad("bad_idx", f"idx: {e}") from None
    if key in seen:
        raise _Bad("duplicate_idx", f"idx {key!r} already used on line {seen[key]}")
    seen[key] = line
    sources = [n for n in _SOURCE_KEYS if n in rec]
    if len(sources) != 1:
        what = "none" if not sources else " and ".join(repr(s) for s in sources)
        raise _Bad("no_source" if not sources else "bad_source",
                   f"expected exactly one of 'tokens', 'audio', 'path' (found {what})")
    source, kind = _file_kind(rec[sources[0]], sources[0], opts)
    stems: list[Path | None] = []
    for name in _STEM_KEYS:
        v = rec.get(name)
        if v is None:
            stems.append(None)
            continue
        if kind != "audio":
            raise _Bad("bad_source", f"{name!r}: stems go with an audio song; this line's song is a token file")
        if opts.native is None:
            raise _Bad("bad_source", f"{name!r}: stems are used by the native encoder (--codec CODEC_DIR); "
                                     "--codec-encoder separates the song itself")
        path, stem_kind = _file_kind(v, name, opts)
        if stem_kind != "audio":
            raise _Bad("bad_source", f"{name!r} {v!r}: expected an audio file (.wav, .flac, ...)")
        stems.append(path)
    got = _one_of(rec, ("gt_lyric", "lyric"), "bad_lyric")
    if got is None:
        raise _Bad("missing_lyric", "no 'gt_lyric' or 'lyric' (an instrumental song has e.g. '[inst-long]')")
    if not isinstance(got[1], str):
        raise _Bad("bad_lyric", f"{got[0]!r} must be a string, found {type(got[1]).__name__}")
    lyric = got[1]
    try:
        sections = split_sections(lyric, require_vocal=opts.require_vocal)
    except LyricError as e:
        raise _Bad("bad_lyric", str(e), rule=e.rule) from None
    canonical = format_sections(sections)
    style_got = _one_of(rec, ("descriptions", "style"), "bad_style")
    style = "" if style_got is None else style_got[1]
    if not isinstance(style, str):
        raise _Bad("bad_style", f"{style_got[0]!r} must be a string, found {type(style).__name__}")
    prompt_got = _one_of(rec, ("prompt", "prompt_audio_path"), "bad_prompt")
    prompt = None
    if prompt_got is not None:
        try:
            prompt = _file_kind(prompt_got[1], prompt_got[0], opts)
        except _Bad as b:
            raise _Bad(b.reason if b.reason == "audio_without_encoder" else "bad_prompt", b.message) from None
    meta = {k: v for k, v in rec.items() if k not in _CONSUMED}
    words = [w for _, sentences in sections for s in sentences for w in s]
    script = script_of(words)
    meta.setdefault("script", script)
    try:
        _check_meta(meta)
    except ValueError as e:
        raise _Bad("bad_meta", str(e)) from None
    return _Entry(line=line, key=key, split=split_of(key, opts.val_fraction), source=source, kind=kind,
                  stems=(stems[0], stems[1]), lyric=canonical if opts.lyrics == "normalize" else lyric, style=style, prompt=prompt, meta=meta,
                  script=script, instrumental=not any(tag in VOCAL_TAGS for tag, _ in sections),
                  non_canonical=lyric != canonical)


# ----------------------------------------------------------------------------- token files
def _check_codes(arr: Any, what: str, code_size: int, allow_none: bool) -> np.ndarray:
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.integer):
        raise _Bad("bad_dtype", f"{what} has dtype {arr.dtype}, expected integers")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] != 3 or arr.shape[1] < 1:
        raise _Bad("bad_shape", f"{what} has shape {list(arr.shape)}, expected [3, T] (mixed, vocal, bgm), T >= 1")

    try:
        return _check_range(arr.astype(np.int64), f"{what}:", code_size=code_size, allow_none=allow_none)
    except ValueError as e:
        raise _Bad("out_of_range", str(e)) from None


def _load_codes(path: Path, kind: str, what: str, opts: _Options, *, allow_none: bool,
                stems: tuple[Path | None, Path | None] = (None, None), seconds: float | None = None) -> np.ndarray:
    if not path.is_file():
        raise _Bad("missing_file", f"{what} {path}: file not found")
    if kind == "audio" and opts.native is not None:
        got = opts.native.result(opts.native.item(path, *stems, seconds=seconds))
        if isinstance(got, str):  # the message names the file already
            raise _Bad("encode_failed", got if str(path) in got else f"{what} {path}: {got}")
        return _check_codes(got, f"{what} {path} (encoded)", opts.code_size, allow_none)
    if kind == "audio":
        try:
            toks = opts.encoder.encode_file(path.resolve())
        except Exception as e:  # noqa: BLE001 - the user's encoder; any failure is this line's
            raise _Bad("encode_failed", f"{what} {path}: the codec encoder failed ({type(e).__name__}: {e})") from None
        toks = toks.detach().cpu().numpy() if hasattr(toks, "detach") else np.asarray(toks)
        return _check_codes(toks, f"{what} {path} (encoded)", opts.code_size, allow_none)
    try:
        if path.suffix.lower() == ".npy":
            obj: Any = np.load(path, allow_pickle=False)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, torch.Tensor):
                raise _Bad("bad_shape", f"{what} {path}: holds a {type(obj).__name__}, expected a tensor [3, T]")
            if obj.is_floating_point() or obj.is_complex() or obj.dtype == torch.bool:
                raise _Bad("bad_dtype", f"{what} {path} has dtype {obj.dtype}, expected integers")
            obj = obj.numpy()
    except _Bad:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure makes the file unreadable
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _Bad("unreadable", f"{what} {path}: cannot read it ({first})") from None
    return _check_codes(obj, f"{what} {path}", opts.code_size, allow_none)


def _load_entry(e: _Entry, opts: _Options) -> tuple[np.ndarray, np.ndarray | None]:
    tokens = _load_codes(e.source, e.kind, "tokens" if e.kind == "tokens" else "audio", opts, allow_none=False,
                         stems=e.stems)
    prompt = None
    if e.prompt is not None:
        try:
            prompt = _load_codes(e.prompt[0], e.prompt[1], "prompt", opts, allow_none=True, seconds=PROMPT_SECONDS)
        except _Bad as b:
            raise _Bad("bad_prompt", f"{b.reason}: {b.message}") from None
        if e.prompt[1] == "audio":
            prompt = prompt[:, :PROMPT_FRAMES]
    return tokens, prompt


# ----------------------------------------------------------------------------- the native encoder's cache
class _NativeCache:
    """Token files of the audio songs and prompts, encoded by the native encoder before the shards are
    written: ``DIR/encoded/<name>.npy`` (int16 ``[3, T]``) or ``<name>.error.json`` for a song that
    could not be encoded. ``name`` hashes the encode settings and each audio file's path, size and
    modification time (and a prompt's cut), so a changed file or setting is encoded afresh and the
    files of any rank, run or world size can be shared; a file is written atomically by the rank
    that owns its song (``job index % world == rank``)."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.folder = out / ENCODED_DIR
        self.settings = settings
        self.digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def item(self, full: Path, vocal: Path | None = None, bgm: Path | None = None, *,
             seconds: float | None = None) -> Item:
        ident: list[Any] = [self.digest, seconds]
        for f in (full, vocal, bgm):
            try:
                st = f.stat() if f is not None else None
            except OSError:
                st = None
            ident.append(None if f is None else [str(f.resolve()), st and st.st_size, st and st.st_mtime_ns])
        name = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]
        return Item(idx=name, full=full.resolve(), vocal=vocal.resolve() if vocal else None,
                    bgm=bgm.resolve() if bgm else None, seconds=seconds)

    def paths(self, it: Item) -> tuple[Path, Path]:
        return self.folder / f"{it.idx}.npy", self.folder / f"{it.idx}.error.json"

    def result(self, it: Item) -> np.ndarray | str | None:
        """The tokens of ``it``, the message of its failure, or None while it is not encoded yet."""
        npy, err = self.paths(it)
        try:
            return np.load(npy, allow_pickle=False)
        except (OSError, ValueError):
            pass
        try:
            return str(json.loads(err.read_text())["error"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, it: Item, toks: torch.Tensor) -> None:
        npy, err = self.paths(it)
        write_npy_atomic(npy, token_array(toks))
        err.unlink(missing_ok=True)

    def fail(self, it: Item, msg: str) -> None:
        npy, err = self.paths(it)
        write_json_atomic(err, {"source": str(it.full), "vocal": it.vocal and str(it.vocal),
                                "bgm": it.bgm and str(it.bgm), "error": msg})
        npy.unlink(missing_ok=True)


def _audio_jobs(manifest: Path, opts: _Options) -> list[Item]:
    """Every distinct audio song and audio prompt of the lines that pass the cheap checks, in manifest order."""
    assert opts.native is not None
    jobs: dict[str, Item] = {}
    seen: dict[str, int] = {}
    for line, text in jsonl_lines(manifest):
        if isinstance(text, JsonlError):
            continue
        try:
            e = _parse_line(text, line, seen, opts)
        except _Bad:
            continue
        if e.kind == "audio":
            it = opts.native.item(e.source, *e.stems)
            jobs.setdefault(it.idx, it)
        if e.prompt is not None and e.prompt[1] == "audio":
            it = opts.native.item(e.prompt[0], seconds=PROMPT_SECONDS)
            jobs.setdefault(it.idx, it)
    return list(jobs.values())


def _encode_share(cache: _NativeCache, jobs: list[Item], *, rank: int, world: int, codec: Path, device: str,
                  dtype: str, batch: int, chunk_batch: int, separator: str | None, separator_ckpt: str | None,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """Encode this rank's share of ``jobs`` that the cache does not hold yet (failures are retried)."""
    mine = [it for i, it in enumerate(jobs) if i % world == rank]
    for it in mine:
        cache.paths(it)[1].unlink(missing_ok=True)  # an earlier run's failure: tried again
    todo = [it for it in mine if it.full is not None and it.full.is_file() and cache.result(it) is None]
    t0 = time.perf_counter()
    failed: list[str] = []
    audio_s = 0.0
    if todo:
        cache.folder.mkdir(parents=True, exist_ok=True)
        try:
            enc = load_native_encoder(codec, device=device, dtype=DTYPES[dtype])
        except CodecError as e:
            raise UsageError(str(e)) from None
        enc.chunk_batch = chunk_batch
        sep = None
        if any(it.vocal is None and it.bgm is None for it in todo):
            sep, desc = resolve_separator(separator, separator_ckpt, codec, device)
            say(f"levo-data shards: rank {rank}: separating stems with {desc}")

        def fail(it: Item, msg: str) -> None:
            failed.append(msg)
            cache.fail(it, msg)

        audio_s = encode_items(todo, enc, sep, batch=batch, done=cache.write, fail=fail, progress=lambda n: say(
            f"levo-data shards: rank {rank}: {n} of {len(todo)} audio file(s) encoded ({len(failed)} failed)"))
    return {"rank": rank, "world": world, "audio_files": len(jobs), "this_rank": len(mine), "encoded": len(todo) - len(failed),
            "kept": len(mine) - len(todo), "failed": len(failed), "audio_seconds": round(audio_s, 2),
            "seconds": round(time.perf_counter() - t0, 2)}


def _failure_marker(cache: _NativeCache, rank: int) -> Path:
    return cache.folder / f"rank{rank:03d}.failed.json"


def _wait_for_ranks(cache: _NativeCache, jobs: list[Item], world: int, say: Callable[[str], None],
                    poll_s: float = 0.5) -> None:
    """Rank 0: wait until every job is encoded or failed (other ranks' shares); UsageError when a
    rank recorded that it stopped."""
    last = time.monotonic()
    while True:
        left = [it for it in jobs if it.full is not None and it.full.is_file() and cache.result(it) is None]
        if not left:
            return
        for r in range(1, world):
            marker = _failure_marker(cache, r)
            if marker.is_file():
                try:
                    why = json.loads(marker.read_text()).get("error")
                except (OSError, ValueError, AttributeError):
                    why = "unknown"
                raise UsageError(f"rank {r} stopped before encoding its songs ({why}); {len(left)} audio file(s) "
                                 f"are not encoded. Fix it and run again: what is encoded is kept ({marker})")
        if time.monotonic() - last >= WAIT_REPORT_S:
            last = time.monotonic()
            say(f"levo-data shards: rank 0 waits for the other ranks: {len(left)} audio file(s) left, e.g. "
                f"{left[0].full}")
        time.sleep(poll_s)


def _record_bytes(tokens: np.ndarray, prompt: np.ndarray | None, e: _Entry, meta: dict[str, Any],
                  itemsize: int) -> int:
    """Tar bytes of one record as the writer stores it (512-byte header + padded data per member,
    the 64 hex digits of its sha256 member included)."""
    sizes = [128 + tokens.size * itemsize, len(e.lyric.encode()), len(e.style.encode()),
             len(json.dumps(meta, sort_keys=True).encode()), 64]
    if prompt is not None:
        sizes.append(128 + prompt.size * itemsize)
    return sum(512 + -(-n // 512) * 512 for n in sizes)


def _tar_size(record_bytes: int) -> int:
    """File size of a tar holding records of ``record_bytes``: plus the end marker, in 10240-byte blocks."""
    return -(-(record_bytes + 1024) // 10240) * 10240


# ----------------------------------------------------------------------------- one split's shards
class _Split:
    """The shards of one split: finished ones (from progress files) and the one being written."""

    def __init__(self, name: str, out: Path, finished: list[dict[str, Any]], size: tuple[str, int],
                 code_size: int, on_shard: Callable[[dict[str, Any]], None]) -> None:
        self.name, self.out, self.finished = name, out, finished
        self.size_kind, self.size_limit = size
        self.code_size = code_size
        self.itemsize = 2 if code_size + 1 <= np.iinfo(np.int16).max else 4
        self.on_shard = on_shard
        self.next_cand = finished[-1]["candidates"][1] if finished else 0
        self.cands = 0  # candidates of this split met so far in this pass
        self.range_start = self.next_cand
        self.rejected: list[Rejection] = []  # file-check rejections since range_start
        self.writer: Any = None
        self.records = self.bytes = 0
        self.lines: list[int] = []
        self.stats = _new_stats()

    @property
    def number(self) -> int:
        return len(self.finished)

    def _tmp_dir(self) -> Path:
        return self.out / PARTIAL_DIR / f"{self.name}-{self.number:06d}"

    def _open(self) -> None:
        tmp = self._tmp_dir()
        shutil.rmtree(tmp, ignore_errors=True)
        self.writer = ShardWriter(tmp, prefix=self.name, max_records=2**62, code_size=self.code_size)
        self.records = self.bytes = 0
        self.lines = []
        self.stats = _new_stats()

    def reject(self, r: Rejection) -> None:
        self.rejected.append(r)

    def add(self, e: _Entry, cand: int, tokens: np.ndarray, prompt: np.ndarray | None) -> None:
        """Write one song (closing shards by the size rule); raises _Bad if the writer refuses it."""
        meta = dict(e.meta)
        meta.setdefault("duration", tokens.shape[1] / FRAME_RATE)
        meta.setdefault("language", "unknown")
        meta.setdefault("source", "unknown")
        nbytes = _record_bytes(tokens, prompt, e, meta, self.itemsize)
        if self.size_kind == "bytes" and self.records and _tar_size(self.bytes + nbytes) > self.size_limit:
            self.finish(end=cand)
        if self.writer is None:
            self._open()
        try:
            self.writer.write_song(e.key, tokens, e.lyric, e.style, meta, prompt)
        except ShardError as err:
            msg = str(err)
            where = f"{err.shard}: record {err.key!r}: "
            raise _Bad("invalid_record", msg[len(where):] if msg.startswith(where) else msg) from None
        self.records += 1
        self.bytes += nbytes
        self.lines.append(e.line)
        s = self.stats
        T = int(tokens.shape[1])
        s["songs"] += 1
        s["frames"] += T
        s["min_frames"] = T if s["min_frames"] is None else min(s["min_frames"], T)
        s["max_frames"] = T if s["max_frames"] is None else max(s["max_frames"], T)
        s["with_prompt"] += prompt is not None
        s["from_audio"] += e.kind == "audio"
        s["instrumental"] += e.instrumental
        s["non_canonical_lyrics"] += e.non_canonical
        s["scripts"][e.script] = s["scripts"].get(e.script, 0) + 1
        lang = str(meta["language"])
        s["languages"][lang] = s["languages"].get(lang, 0) + 1
        for i in range(3):
            h = np.bincount(tokens[i] * HIST_BINS // self.code_size, minlength=HIST_BINS)
            s["hist"][i] = [a + int(b) for a, b in zip(s["hist"][i], h)]
        full = (self.records >= self.size_limit if self.size_kind == "songs"
                else _tar_size(self.bytes) >= self.size_limit)
        if full:
            self.finish(end=cand + 1)

    def finish(self, end: int) -> None:
        """Close the open shard, rename it into place and record it in its progress file."""
        if self.writer is None:
            return
        if self.records == 0:  # every song offered to it was refused: no shard, its rejections stay pending
            self.abort()
            return
        n = self.number
        name = f"{self.name}-{n:06d}.tar"
        tmp = self._tmp_dir()
        self.writer.close()
        self.writer = None
        (self.out / self.name).mkdir(parents=True, exist_ok=True)
        final = self.out / self.name / name
        os.replace(tmp / f"{self.name}-000000.tar", final)
        shutil.rmtree(tmp, ignore_errors=True)
        prog = {"format": FORMAT, "split": self.name, "shard": name, "number": n, "records": self.records,
                "bytes": final.stat().st_size, "candidates": [self.range_start, end],
                "lines": [self.lines[0], self.lines[-1]], "song_lines": self.lines,
                "rejected": [r.as_dict() for r in self.rejected], "stats": self.stats}
        write_json_atomic(self.out / PROGRESS_DIR / f"{self.name}-{n:06d}.json", prog, sort_keys=True)
        self.finished.append(prog)
        self.range_start = end
        self.rejected = []
        self.on_shard(prog)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        shutil.rmtree(self._tmp_dir(), ignore_errors=True)


# ----------------------------------------------------------------------------- output folder
def _our_paths(out: Path) -> list[Path]:
    return [out / s for s in SPLITS] + [out / PROGRESS_DIR, out / PARTIAL_DIR, out / SETTINGS_NAME,
                                       out / STATS_NAME, out / REJECTED_NAME]


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Create ``out`` or check that it holds a run with the same settings (``--overwrite``: start afresh)."""
    # another kind of data is refused even with --overwrite (which replaces only our own files): a UsageError
    check_output_folder(out, "catalogue", command="shards")
    if overwrite:
        for p in _our_paths(out):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    path = out / SETTINGS_NAME
    if path.is_file():
        try:
            what = settings_file_differences(path, settings)
        except ValueError as e:
            raise UsageError(f"{e}; pass --overwrite to start afresh") from None
        if what:
            raise UsageError(f"--out {out} holds shards made from another manifest or with other settings ({what}); "
                             "rerun with the same manifest and settings to resume, or pass --overwrite")
        return
    foreign = [p for p in _our_paths(out)[:3] if p.exists() and any(p.iterdir())]
    if foreign:
        raise UsageError(f"--out {out} already holds {foreign[0].name}/ but no {SETTINGS_NAME} (not made by "
                         "levo-data shards); pass --overwrite to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings, sort_keys=True)


def _kept_shards(out: Path, split: str) -> list[dict[str, Any]]:
    """The recorded shards of a split that can be kept (consecutive from 0, tar present with its size);
    everything after them -- progress files, shards, half-written shards -- is removed."""
    kept: list[dict[str, Any]] = []
    while True:
        p = out / PROGRESS_DIR / f"{split}-{len(kept):06d}.json"
        try:
            prog = json.loads(p.read_text())
            tar = out / split / prog["shard"]
            start = kept[-1]["candidates"][1] if kept else 0
            ok = (prog.get("format") == FORMAT and prog["number"] == len(kept) and tar.is_file()
                  and tar.stat().st_size == prog["bytes"] and prog["candidates"][0] == start)
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            break
        kept.append(prog)

    def number(path: Path) -> int:
        try:
            return int(path.name.split(".")[0].rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return -1

    for p in (out / PROGRESS_DIR).glob(f"{split}-*.json"):
        if number(p) >= len(kept) or number(p) < 0:
            p.unlink()
    for p in list((out / split).glob(f"{split}-*.tar*")) if (out / split).is_dir() else []:
        if p.name.endswith(".tmp") or number(p) >= len(kept) or number(p) < 0:
            p.unlink()
    return kept


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the command
def _shards_rank(a: dict[str, Any]) -> tuple[int, int]:
    if a["rank"] is not None and a["world"] is not None:
        return int(a["rank"]), int(a["world"])
    try:
        return rank_world()
    except ValueError as e:
        raise UsageError(str(e)) from None


@locks_output("levo-data shards", lambda a: [a["out"]], per_rank=_shards_rank)
def build_shards(manifest: str | os.PathLike, out: str | os.PathLike, *, shard_size: str | int = 2000,
                 val_fraction: float = 0.01, code_size: int = CODE_SIZE, lyrics: str = "check",
                 require_vocal: bool = False, root: str | os.PathLike | None = None, encoder: Encoder | None = None,
                 encoder_spec: str | None = None, codec: str | os.PathLike | None = None,
                 separator: str | None = None, separator_ckpt: str | None = None, encode_batch: int = 4,
                 chunk_batch: int = 4, dtype: str = "fp32", device: str = "cpu", rank: int | None = None,
                 world: int | None = None, overwrite: bool = False,
                 report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the manifest's songs as train/val shards in ``out`` (resumable; see the module docstring).

    Audio lines: ``codec`` (a codec folder) encodes them natively, ``encoder_batch`` songs per call,
    into ``out/encoded/`` first, this rank's share (``rank``/``world``, default from torchrun or
    srun) only; rank 0 then waits for the other ranks' shares and writes the shards, the other ranks
    return their encode summary. ``encoder`` (an adapter such as ``songgeneration:PATH``) encodes
    them one by one instead.

    Returns the stats (also written to ``out/stats.json``). ``report`` receives one line per rejected
    line and per finished shard (default: stderr). Raises :class:`UsageError` for unusable settings.
    """
    t_start = time.perf_counter()
    manifest, out = Path(manifest), Path(out)
    say = report or (lambda s: print(s, file=sys.stderr, flush=True))
    rank, world = _shards_rank({"rank": rank, "world": world})
    if encoder is not None and codec is not None:
        raise UsageError("give --codec CODEC_DIR (the native encoder) or --codec-encoder, not both")
    if encode_batch < 1 or chunk_batch < 1:
        raise UsageError("--encode-batch and --chunk-batch must be >= 1")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    native = None
    if codec is not None:
        check_codec(Path(codec))
        native = _NativeCache(out, encode_settings(Path(codec), dtype, separator, separator_ckpt))
    if rank != 0:  # an encoding rank: its share of the audio files, then rank 0 writes the shards
        if not manifest.is_file():
            raise UsageError(f"--manifest {manifest}: file not found")
        check_output_folder(out, "catalogue", command="shards")
        if native is None:
            return {"rank": rank, "world": world, "note": "only rank 0 writes shards; other ranks encode audio "
                                                          "files with --codec, and there is none"}
        _failure_marker(native, rank).unlink(missing_ok=True)
        opts = _Options(root=Path(root) if root is not None else manifest.parent, code_size=code_size,
                        val_fraction=val_fraction, lyrics=lyrics, require_vocal=require_vocal, encoder=None,
                        native=native)
        try:
            return _encode_share(native, _audio_jobs(manifest, opts), rank=rank, world=world, codec=Path(codec),  # type: ignore[arg-type]
                                 device=device, dtype=dtype, batch=encode_batch, chunk_batch=chunk_batch,
                                 separator=separator, separator_ckpt=separator_ckpt, say=say)
        except BaseException as e:
            native.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(_failure_marker(native, rank), {"rank": rank, "error": f"{type(e).__name__}: {e}"})
            raise
    if not manifest.is_file():
        raise UsageError(f"--manifest {manifest}: file not found")
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction {val_fraction}: expected 0 <= fraction < 1")
    if lyrics not in ("check", "normalize"):
        raise UsageError(f"--lyrics {lyrics!r}: expected check or normalize")
    if code_size < 1:
        raise UsageError(f"--code-size {code_size}: expected >= 1")
    try:
        size = parse_shard_size(str(shard_size))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if encoder is not None and encoder_spec is None:
        encoder_spec = type(encoder).__name__
    settings = {"format": FORMAT, "manifest_sha256": _sha256_file(manifest), "shard_size": {size[0]: size[1]},
                "val_fraction": val_fraction, "code_size": code_size, "lyrics": lyrics,
                "require_vocal": require_vocal, "codec_encoder": encoder_spec, "split_rule": "sha256-levo-split"}
    if native is not None:
        settings["codec_encoder"], settings["encode"] = "native", native.settings
    _prepare_out(out, settings, overwrite)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)  # half-written shards of an interrupted run
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    for name in (STATS_NAME, REJECTED_NAME, *(f"{s}/{INDEX_NAME}" for s in SPLITS)):
        (out / name).unlink(missing_ok=True)  # written again when this run completes
    opts = _Options(root=Path(root) if root is not None else manifest.parent, code_size=code_size,
                    val_fraction=val_fraction, lyrics=lyrics, require_vocal=require_vocal, encoder=encoder,
                    native=native)
    encoded = None
    if native is not None:  # the audio files first: this rank's share, then the other ranks'
        jobs = _audio_jobs(manifest, opts)
        encoded = _encode_share(native, jobs, rank=rank, world=world, codec=Path(codec),  # type: ignore[arg-type]
                                device=device, dtype=dtype, batch=encode_batch, chunk_batch=chunk_batch,
                                separator=separator, separator_ckpt=separator_ckpt, say=say)
        if world > 1:
            _wait_for_ranks(native, jobs, world, say)
    crash_after = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None
    written: list[dict[str, Any]] = []
    printed = [0]

    def on_reject(r: Rejection) -> None:
        printed[0] += 1
        if printed[0] <= _MAX_PRINTED:
            who = f"idx {r.idx!r}: " if r.idx is not None else ""
            say(f"{manifest}:{r.line}: {who}{r.reason}: {r.error}")
        elif printed[0] == _MAX_PRINTED + 1:
            say(f"levo-data shards: more rejected lines: see {out / REJECTED_NAME} when the run completes")

    def on_shard(prog: dict[str, Any]) -> None:
        written.append(prog)
        say(f"levo-data shards: wrote {prog['split']}/{prog['shard']} ({prog['records']} songs, manifest lines "
            f"{prog['lines'][0]}-{prog['lines'][1]})")

    splits = {s: _Split(s, out, _kept_shards(out, s), size, code_size, on_shard) for s in SPLITS}
    resumed = {s: sp.number for s, sp in splits.items()}
    cheap: list[Rejection] = []
    seen: dict[str, int] = {}
    n_lines = 0
    try:
        for line, text in jsonl_lines(manifest):  # "\n" line ends only, BOM skipped, line-size limit
            n_lines += 1
            try:
                if isinstance(text, JsonlError):
                    raise _Bad("line_too_long" if text.reason == "line_too_long" else "invalid_json", text.message)
                entry = _parse_line(text, line, seen, opts)
            except _Bad as b:
                key = None
                try:
                    k = json.loads(text).get("idx") if isinstance(text, str) else None
                    key = None if k is None else str(k)
                except (ValueError, AttributeError):
                    pass
                cheap.append(Rejection(line, key, b.reason, b.message, b.rule))
                on_reject(cheap[-1])
                continue
            sp = splits[entry.split]
            cand = sp.cands
            sp.cands += 1
            if cand < sp.next_cand:
                continue  # in a finished shard's range
            try:
                tokens, prompt = _load_entry(entry, opts)
                sp.add(entry, cand, tokens, prompt)
            except _Bad as b:
                sp.reject(Rejection(line, entry.key, b.reason, b.message, b.rule))
                on_reject(sp.rejected[-1])
                continue
            if crash_after is not None and len(written) >= crash_after and sp.writer is not None:
                os._exit(86)
        for sp in splits.values():
            sp.finish(end=sp.cands)
    except BaseException:
        for sp in splits.values():
            sp.abort()
        raise

    # ---- the run is complete: index per split, rejected lines, stats
    rejected = list(cheap)
    for sp in splits.values():
        for prog in sp.finished:
            rejected += [Rejection(**r) for r in prog["rejected"]]
        rejected += sp.rejected  # after the last shard
    rejected.sort(key=lambda r: r.line)
    earlier = len(rejected) - printed[0]
    if earlier > 0:
        say(f"levo-data shards: {earlier} lines were rejected by an earlier run (listed in {out / REJECTED_NAME})")
    for s, sp in splits.items():
        if sp.finished:
            shards = [{"name": p["shard"], "records": p["records"]} for p in sp.finished]
            write_json_atomic(out / s / INDEX_NAME, {"format": SONG_FORMAT, "version": SCHEMA_VERSION,
                                                     "code_size": code_size,
                                                     "records": sum(x["records"] for x in shards), "shards": shards})
    tmp = out / f".{REJECTED_NAME}.{os.getpid()}.tmp"
    tmp.write_text(jsonl_text((r.as_dict() for r in rejected), ensure_ascii=False))
    os.replace(tmp, out / REJECTED_NAME)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)

    per_split = {}
    total = _new_stats()
    for s, sp in splits.items():
        st = _new_stats()
        for prog in sp.finished:
            st = _merge_stats(st, prog["stats"])
        total = _merge_stats(total, st)
        per_split[s] = {"songs": st["songs"], "shards": sp.number, "frames": st["frames"],
                        "hours": round(st["frames"] / FRAME_RATE / 3600, 4), "min_frames": st["min_frames"],
                        "max_frames": st["max_frames"], "dir": str(out / s) if sp.finished else None}
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
    seconds = time.perf_counter() - t_start
    new_songs = sum(p["records"] for p in written)
    stats = {
        "format": "levo-catalogue-stats-1", "manifest": str(manifest), "out": str(out), "complete": True,
        "lines": n_lines, "songs": total["songs"], "frames": total["frames"], "min_frames": total["min_frames"],
        "max_frames": total["max_frames"],
        "hours": round(total["frames"] / FRAME_RATE / 3600, 4), "frame_rate": FRAME_RATE, "splits": per_split,
        "tokens": {"bins": HIST_BINS, "bin_width": code_size / HIST_BINS, "code_size": code_size,
                   "histogram": dict(zip(STREAMS, total["hist"]))},
        "scripts": dict(sorted(total["scripts"].items())), "languages": dict(sorted(total["languages"].items())),
        "lyrics": {"mode": lyrics, "require_vocal": require_vocal, "instrumental": total["instrumental"],
                   "non_canonical": total["non_canonical_lyrics"]},
        "with_prompt": total["with_prompt"], "from_audio": total["from_audio"],
        "rejected": {"total": len(rejected), "by_reason": dict(sorted(by_reason.items())),
                     "lines": [r.as_dict() for r in rejected[:1000]], "file": str(out / REJECTED_NAME)},
        "run": {"seconds": round(seconds, 3), "songs_written": new_songs,
                "songs_per_second": round(new_songs / seconds, 1) if new_songs and seconds > 0 else None,
                "shards_kept": sum(resumed.values()), "shards_written": len(written)},
        "settings": settings,
    }
    if encoded is not None:
        stats["run"]["encode"] = encoded
    write_json_atomic(out / STATS_NAME, stats)
    return stats


def empty_split_notes(stats: dict[str, Any]) -> list[str]:
    """A line per split that received no song (so no folder was written for it), saying why: a small
    catalogue with the default ``--val-fraction`` often puts no song in ``val/``."""
    vf = stats["settings"]["val_fraction"]
    notes = []
    for s in SPLITS:
        if stats["splits"].get(s, {}).get("songs", 0) or not stats["songs"]:
            continue
        if s == "val" and vf <= 0:
            notes.append("val/:      not written (--val-fraction 0)")
        elif s == "val":
            want = max(1.0 / stats["songs"], vf)
            notes.append(f"val/:      not written: none of the {stats['songs']} songs fell in the val split "
                         f"(--val-fraction {vf:g} picks songs by a hash of idx, about {vf * stats['songs']:.2g} "
                         f"expected); pass e.g. --val-fraction {min(0.5, 5 * want):.2g} --overwrite, or validate "
                         "on other shards (data.val=DIR)")
        else:
            notes.append(f"{s}/:    not written: every song fell in the val split (--val-fraction {vf:g})")
    return notes


def format_table(stats: dict[str, Any]) -> str:
    """The printed summary of a stats dict: per-split counts, scripts, languages, token histograms, rejects."""
    bars = " ▁▂▃▄▅▆▇█"
    rows = [f"{'split':<6} {'songs':>9} {'shards':>7} {'hours':>10} {'frames min/max':>16}"]
    for s, d in [*stats["splits"].items(), ("total", None)]:
        if d is None:
            d = {"songs": stats["songs"], "shards": sum(x["shards"] for x in stats["splits"].values()),
                 "hours": stats["hours"], "min_frames": stats["min_frames"], "max_frames": stats["max_frames"]}
        mm = f"{d['min_frames']}/{d['max_frames']}" if d["min_frames"] is not None else "-"
        rows.append(f"{s:<6} {d['songs']:>9} {d['shards']:>7} {d['hours']:>10.3f} {mm:>16}")
    rows.extend(empty_split_notes(stats))
    rows.append("scripts:   " + (", ".join(f"{k} {v}" for k, v in stats["scripts"].items()) or "-"))
    rows.append("languages: " + (", ".join(f"{k} {v}" for k, v in stats["languages"].items()) or "-"))
    lyr = stats["lyrics"]
    rows.append(f"lyrics:    {lyr['instrumental']} instrumental, {lyr['non_canonical']} not in canonical spacing"
                f" (--lyrics {lyr['mode']}); prompts: {stats['with_prompt']}; from audio: {stats['from_audio']}")
    tok = stats["tokens"]
    rows.append(f"tokens ({tok['bins']} bins of {tok['bin_width']:g} codes over [0, {tok['code_size']})):")
    for name, h in tok["histogram"].items():
        top = max(h) or 1
        line = "".join(bars[0 if v == 0 else max(1, round(8 * v / top))] for v in h)
        rows.append(f"  {name:<6} |{line}|")
    rej = stats["rejected"]
    if rej["total"]:
        reasons = ", ".join(f"{k} {v}" for k, v in rej["by_reason"].items())
        rows.append(f"rejected:  {rej['total']} of {stats['lines']} lines ({reasons}) -> {rej['file']}")
    else:
        rows.append(f"rejected:  0 of {stats['lines']} lines")
    run = stats["run"]
    rows.append(f"run:       {run['songs_written']} songs written in {run['seconds']:.2f} s"
                + (f" ({run['songs_per_second']:g} songs/s)" if run["songs_per_second"] else "")
                + f", {run['shards_written']} shards written, {run['shards_kept']} kept from an earlier run")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- CLI
def _shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="JSONL catalogue: idx, tokens|audio|path, gt_lyric|lyric, "
                                                     "descriptions|style, prompt, metadata")
    p.add_argument("--out", required=True, help="output folder: train/, val/, stats.json, rejected.jsonl (a folder holding other data is refused, "
                        "also with --overwrite)")
    p.add_argument("--shard-size", default="2000",
                   help="songs per shard (e.g. 2000, default) or a target size (e.g. 256MB; KB/MB/GB are SI)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of songs in val/, chosen by a hash of idx (default 0.01; 0: no val split)")
    p.add_argument("--code-size", type=int, default=CODE_SIZE, help=f"codes must be in [0, code_size) (default {CODE_SIZE})")
    p.add_argument("--lyrics", choices=("check", "normalize"), default="check",
                   help="check: store lyrics as written; normalize: store the canonical form. Both reject lines "
                        "that break the lyric rules (shard readers refuse such records)")
    p.add_argument("--require-vocal", action="store_true",
                   help="also reject lyrics without a [verse], [chorus] or [bridge] (default: kept, counted)")
    p.add_argument("--root", default=None, help="folder of relative paths (default: the manifest's folder)")
    p.add_argument("--codec", default=None, metavar="CODEC_DIR",
                   help="encode audio lines natively with the released runtime's ckpt/ folder (model_1rvq/, "
                        "model_septoken/); stems from the line's vocal/bgm, else separated")
    p.add_argument("--separator", default=None, metavar="module:function",
                   help="with --codec: vocal separator f(wave [2,N], sample_rate) -> vocals (a class: built once); "
                        "default htdemucs")
    p.add_argument("--separator-ckpt", default=None, metavar="PATH",
                   help="with --codec: htdemucs.pth, a folder holding htdemucs.{pth,yaml}, or the runtime bundle root "
                        "(default: ../third_party/demucs/ckpt beside --codec)")
    p.add_argument("--encode-batch", type=int, default=4, help="with --codec: songs per encoder call (default 4)")
    p.add_argument("--chunk-batch", type=int, default=4,
                   help="with --codec: 40 s chunks per forward pass (default 4; ~1 GB each in fp32)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                   help="with --codec: conv front end and conformer precision (default fp32, as released)")
    p.add_argument("--codec-encoder", default=None, metavar="songgeneration:PATH",
                   help="instead of --codec: tokenise audio lines with your SongGeneration checkout at PATH (needs "
                        "--model-config)")
    p.add_argument("--model-config", default=None, metavar="CONFIG.yaml",
                   help="a released model folder's config.yaml (names the tokenizer checkpoints)")
    p.add_argument("--device", default="auto", help="encoder device (default: this rank's GPU, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out instead of resuming")


def _shards_run(args: argparse.Namespace) -> int:
    def usage(msg: str) -> int:
        print(f"levo-data shards: error: {msg}", file=sys.stderr)
        return 2

    encoder = None
    if args.codec_encoder and args.codec:
        return usage("give --codec CODEC_DIR (the native encoder) or --codec-encoder, not both")
    if not args.codec and (args.separator or args.separator_ckpt):
        return usage("--separator and --separator-ckpt go with --codec CODEC_DIR")
    if args.codec_encoder:
        if not args.model_config:
            return usage("--codec-encoder needs --model-config CONFIG.yaml (a released model folder's config, "
                         "which names the tokenizer checkpoints)")
        if not Path(args.model_config).is_file():
            return usage(f"--model-config {args.model_config}: file not found")

        try:
            encoder = load_encoder(args.codec_encoder, config=args.model_config, device=resolve_device(args.device))
        except EncoderError as e:
            return usage(str(e))
    elif args.model_config:
        return usage("--model-config is only used with --codec-encoder")
    try:
        stats = build_shards(args.manifest, args.out, shard_size=args.shard_size, val_fraction=args.val_fraction,
                             code_size=args.code_size, lyrics=args.lyrics, require_vocal=args.require_vocal,
                             root=args.root, encoder=encoder, encoder_spec=args.codec_encoder, codec=args.codec,
                             separator=args.separator, separator_ckpt=args.separator_ckpt,
                             encode_batch=args.encode_batch, chunk_batch=args.chunk_batch, dtype=args.dtype,
                             device=resolve_device(args.device), overwrite=args.overwrite)
    except UsageError as e:
        return usage(str(e))
    except (OSError, ValueError) as e:
        print(f"levo-data shards: error: {e}", file=sys.stderr)
        return 1
    if "rejected" not in stats:  # an encoding rank (not 0): its share only
        print(json.dumps(stats, indent=1))
        return 0
    print(format_table(stats))
    return 1 if stats["rejected"]["total"] else 0


#: ``levo-data shards`` (part of its command table)
CATALOGUE_COMMANDS: dict[str, Command] = {
    "shards": Command("turn a song catalogue (JSONL manifest of token/audio files, lyrics, styles) into train/val "
                      "song shards; resumable, with stats and rejected lines", _shards_args, _shards_run),
}
