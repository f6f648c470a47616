"""The released JSONL song request: one JSON object per line, parsed into a :class:`SongRequest`.

Fields: ``idx`` (the output name), ``gt_lyric``, optional ``descriptions`` and optional
``prompt_audio_path`` (a prompt token file, see :mod:`levo_infer.prompts`, or an audio file with an
encoder) or ``auto_prompt_audio_type`` (needs the released prompt library). ``levo-infer`` reads its
input with it, and training reads prompts with it (:mod:`levo_train.prompts`), so both format a
request the same way. A request that breaks a rule is a :class:`RequestError` naming the rule.

* ``idx`` must be a plain file name (:func:`is_file_name`: no ``/``, ``\\`` or NUL; not ``.`` or
  ``..``), at most :data:`IDX_MAX_BYTES` bytes in UTF-8, and unique in the file.
* Lyrics (:class:`RequestOptions` ``lyrics``, one of :data:`LYRIC_POLICIES`): the model is fed what
  the released ``generate.py`` feeds it, ``gt_lyric`` with double spaces collapsed, whatever the lyric
  checker (:mod:`levo_infer.lyrics`) finds (``check``: a finding is a warning naming the rule, an
  error with ``strict``; ``normalize``: lyrics that pass are fed in their canonical form; ``raw``: no
  check). In ``bgm`` mode the lyric is ``.``, as released. A lyric longer than the model's lyric
  conditioner fails its request, naming both lengths, unless ``truncate_lyrics`` cuts it (with a
  warning for that song).
* Style: :func:`levo_infer.styles.released_style` of ``descriptions`` (the released front end's
  formatting for the model's version and the mode).
* Prompt: ``prompt_audio_path`` relative to the input file's folder when it is not found as given;
  ``auto_prompt_audio_type`` drawn from the library with the song's seed.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LevoInferError
from .jsonl import parse_json_line
from .lyrics import LyricError, normalize_lyrics
from .model import LeLM, LyricTooLong
from .prompts import AUDIO_SUFFIXES, AutoPromptLibrary, PromptError, check_prompt_tokens, load_prompt_tokens
from .styles import released_style

__all__ = ["IDX_MAX_BYTES", "LYRIC_POLICIES", "MAX_NAME_BYTES", "RequestError", "RequestOptions", "SongRequest",
           "check_idx", "is_file_name", "line_idx", "parse_request"]

LYRIC_POLICIES = ("check", "normalize", "raw")
#: Bytes per file name on common filesystems (ext4, xfs, btrfs, zfs).
MAX_NAME_BYTES = 255
#: Longest ``idx`` in UTF-8 bytes: room for the longest suffix and extension levo-infer appends
#: (``_vocal.flac``) and the atomic writer's temp name ``.{name}.tmp{pid}`` (pid up to 10 digits).
IDX_MAX_BYTES = MAX_NAME_BYTES - len("." + "_vocal" + ".flac" + ".tmp") - 10


class RequestError(LevoInferError):
    """A song request (one input line) that cannot be generated; the message names the rule it breaks."""


@dataclass(frozen=True)
class RequestOptions:
    """How requests are read: the output ``mode`` (:data:`levo_infer.tokens.MODES`), the ``lyrics``
    policy (:data:`LYRIC_POLICIES`), ``strict`` (lyric findings fail the request),
    ``truncate_lyrics`` (cut a lyric longer than the model's lyric conditioner, with a warning;
    None: the caller offers no such option, and the error names none) and ``input_dir`` (the input
    file's folder, where a relative ``prompt_audio_path`` is looked up too)."""

    mode: str = "mixed"
    lyrics: str = "check"
    strict: bool = False
    truncate_lyrics: bool | None = False
    input_dir: str | os.PathLike | None = None


@dataclass
class SongRequest:
    """One valid request, ready to generate: its ``line``, ``idx``, the parsed ``item``, the text
    the model is fed (``lyric``, ``style``), its ``seed`` and prompt tokens ``[K, T]`` (or None)."""

    line: int
    idx: str
    item: dict[str, Any]
    lyric: str | None
    style: str | None
    seed: int
    prompt: Any = None  # LongTensor [K, T] or None
    prompt_info: dict[str, Any] | None = None
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def is_file_name(idx: str) -> bool:
    """Whether ``idx`` names a file inside a folder: not empty, no ``/``, ``\\`` or NUL, not ``.`` or
    ``..`` (levo-infer's rule for the idx it writes; levo-eval reads audio by it)."""
    return idx not in ("", ".", "..") and not any(c in idx for c in "/\\\0")


def check_idx(idx: str, seen: dict[str, int]) -> None:
    """:class:`RequestError` unless ``idx`` is a file name (:func:`is_file_name`) of at most
    :data:`IDX_MAX_BYTES` UTF-8 bytes that no earlier line used (``seen``: idx -> line)."""
    if not is_file_name(idx):
        raise RequestError(f"idx {idx!r} cannot be a file name (no '/', '\\' or NUL; not '.' or '..')")
    n_bytes = len(idx.encode("utf-8", "surrogatepass"))
    if n_bytes > IDX_MAX_BYTES:
        raise RequestError(f"idx {idx!r} is {n_bytes} bytes in UTF-8; at most {IDX_MAX_BYTES} bytes fit a file name "
                           f"({MAX_NAME_BYTES} bytes per name, less the suffix, extension and temp-file part levo-infer "
                           "adds): shorten it")
    if idx in seen:
        raise RequestError(f"idx {idx!r} was already used on line {seen[idx]}; outputs would overwrite each other")


def line_idx(line: str) -> str | None:
    """The ``idx`` of a line when it holds one (to name a line that fails), else None."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return str(obj["idx"]) if isinstance(obj, dict) and obj.get("idx") not in (None, "") else None


def _lyric(item: dict[str, Any], where: str, options: RequestOptions, model: LeLM) -> tuple[str, list[str]]:
    """The lyric the model is fed and the warnings about it (see the module docstring)."""
    lyric_warnings: list[str] = []
    if options.mode == "bgm":  # released: instrumental generation ignores the lyric
        lyric = "."
    else:
        lyric_in = item.get("gt_lyric")
        if lyric_in is None:
            raise RequestError(f"{where}: missing 'gt_lyric'")
        if not isinstance(lyric_in, str):
            raise RequestError(f"{where}: 'gt_lyric' must be a string, got {type(lyric_in).__name__}")
        lyric = lyric_in.replace("  ", " ")  # all the released generate.py does before the tokenizer
        if options.lyrics != "raw":
            try:
                canonical = normalize_lyrics(lyric_in, compact=True)
            except LyricError as e:
                if options.strict:
                    raise RequestError(f"{where}: {e}") from e
                lyric_warnings.append(f"{where}: {e}; fed to the model as written, as the released code does "
                                      "(--strict makes this an error)")
            else:
                if options.lyrics == "normalize":
                    lyric = canonical
    truncate = options.truncate_lyrics
    try:
        cut = model.lyric_fit(truncate=bool(truncate)).check(lyric, where, None if truncate is None else
                                                            "--truncate-lyrics")
    except LyricTooLong as e:
        raise RequestError(str(e)) from None
    if cut:
        lyric_warnings.append(cut)
    return lyric, lyric_warnings


def _prompt(song: SongRequest, options: RequestOptions, model: LeLM, library: AutoPromptLibrary | None,
            encoder: Any) -> None:
    """Fill ``song.prompt`` / ``song.prompt_info`` from its ``prompt_audio_path`` or ``auto_prompt_audio_type``."""
    item = song.item
    K, code_size = model.code_depth, model.cfg.lm.code_size
    if item.get("prompt_audio_path") is not None:
        p = Path(str(item["prompt_audio_path"]))
        if not p.is_absolute() and not p.exists() and options.input_dir is not None:
            alt = Path(options.input_dir) / p
            p = alt if alt.exists() else p
        if encoder is not None and p.suffix.lower() in AUDIO_SUFFIXES:
            if not p.is_file():
                raise PromptError(f"prompt_audio_path {p}: file not found")
            try:
                toks = encoder.encode_file(p)[0]
            except LevoInferError as e:  # not audio, no samples, NaN, a refused rate, no separator: this line's
                msg = str(e)
                raise PromptError(f"prompt_audio_path {p}: {msg[len(str(p)) + 2:] if msg.startswith(f'{p}: ') else msg}"
                                  ) from None
            song.prompt = check_prompt_tokens(toks, code_depth=K, code_size=code_size,
                                              source=f"prompt_audio_path {p} (encoded)")
        else:
            song.prompt = load_prompt_tokens(p, code_depth=K, code_size=code_size)
        song.prompt_info = {"source": "prompt_audio_path", "path": str(p), "frames": int(song.prompt.shape[1])}
    elif item.get("auto_prompt_audio_type") is not None:
        kind = item["auto_prompt_audio_type"]
        if not isinstance(kind, str):
            raise PromptError(f"'auto_prompt_audio_type' must be a string, got {type(kind).__name__}")
        if library is None:
            raise PromptError(f"auto_prompt_audio_type {kind!r} needs the released prompt library: pass "
                              "--auto-prompt-file PATH (tools/new_auto_prompt.pt for v2, ckpt/prompt.pt for v1)")
        lyric_in = item.get("gt_lyric")
        toks, info = library.pick(kind, lyric_in if isinstance(lyric_in, str) else None, random.Random(song.seed))
        song.prompt = toks
        song.prompt_info = {"source": "auto_prompt_audio_type", **info, "file": library.source}


def parse_request(n: int, line: str, *, model: LeLM, options: RequestOptions, base_seed: int,
                  seen: dict[str, int], library: AutoPromptLibrary | None = None, encoder: Any = None) -> SongRequest:
    """Validate line ``n`` of a request file and build its :class:`SongRequest` (seed ``base_seed + n -
    1``); :class:`RequestError` naming the broken rule otherwise. ``seen``: idx -> line of the earlier
    requests; ``library``: the auto-prompt library; ``encoder``: encodes audio prompt files."""
    try:
        item = parse_json_line(line)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if not isinstance(item, dict):
        raise RequestError(f"expected a JSON object, got {type(item).__name__}")
    if "idx" not in item or item["idx"] in (None, ""):
        raise RequestError("missing 'idx' (the output name)")
    idx = str(item["idx"])
    check_idx(idx, seen)
    where = f"idx {idx!r}"
    desc = item.get("descriptions")
    if desc is not None and not isinstance(desc, str):
        raise RequestError(f"{where}: 'descriptions' must be a string, got {type(desc).__name__}")
    lyric, lyric_warnings = _lyric(item, where, options, model)
    if item.get("prompt_audio_path") is not None and item.get("auto_prompt_audio_type") is not None:
        raise RequestError(f"{where}: both 'prompt_audio_path' and 'auto_prompt_audio_type' are given; use one "
                           "(the released generator refuses this too)")
    song = SongRequest(n, idx, item, lyric, released_style(desc, model.cfg.version, options.mode), base_seed + n - 1,
                       warnings=lyric_warnings)
    try:
        _prompt(song, options, model, library, encoder)
    except PromptError as e:
        raise RequestError(f"{where}: {e}") from e
    return song
