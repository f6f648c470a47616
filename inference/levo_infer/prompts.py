"""Audio prompts for ``levo-infer``: token files and the released auto-prompt library.

* ``prompt_audio_path``: the released generator separates and encodes a 10 s reference recording.
  ``levo-infer`` does the same natively when it has a codec folder with the encoder's files
  (:class:`levo_infer.codec.encoder.PromptEncoder`: htdemucs, then the first 10 s through
  MusicFM + RVQ), or through ``--codec-encoder songgeneration:PATH``. Otherwise the path must name a
  **token file**: ``.pt`` (a tensor, loaded with ``weights_only=True``) or ``.npy`` holding
  integer tokens ``[3, T]`` (or ``[1, 3, T]``) - mixed, vocal, bgm at 25 Hz, codes 0..16383,
  16385 = padding. Only the first 250 frames (10 s) are used. An audio file without an encoder is
  refused with a message saying what to pass.
* ``auto_prompt_audio_type``: picks stored prompt tokens from the released prompt library (a
  separate download: v1 ``ckpt/prompt.pt`` = ``{type: [tokens, ...]}``, v2
  ``tools/new_auto_prompt.pt`` = ``{type: {"en"|"zh": [tokens, ...]}}``, tokens ``[1, 3, 250]``).
  levo-infer reads it from ``--auto-prompt-file``. v2 picks the language from the lyric (``zh``
  when at least 20 % of its characters are CJK ideographs, else ``en``); ``Auto`` picks among all
  types. The pick is drawn from the song's seed, so a run is reproducible.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LevoInferError
from .tokens import CODE_SIZE, STREAMS

# v2 (facts page) and v1 (released generate.py) type names; "Auto" = any stored prompt.
AUTO_PROMPT_TYPES = ("Pop", "Latin", "Rock", "Electronic", "Metal", "Country", "R&B/Soul", "Ballad", "Jazz",
                     "World", "Hip-Hop", "Funk", "Soundtrack", "Auto")
AUTO_PROMPT_TYPES_V1 = ("Pop", "R&B", "Dance", "Jazz", "Folk", "Rock", "Chinese Style", "Chinese Tradition",
                        "Metal", "Reggae", "Chinese Opera", "Auto")
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus", ".aif", ".aiff", ".wma"})
TOKEN_SUFFIXES = frozenset({".pt", ".pth", ".npy"})
_CJK = re.compile(r"[\u4e00-\u9fff]")


class PromptError(LevoInferError):
    """A prompt file or prompt field is unusable; the message says which and why."""


def language_of(text: str | None) -> str:
    """``"zh"`` when at least 20 % of the characters are CJK ideographs, else ``"en"`` (released rule)."""
    if not text:
        return "en"
    return "zh" if len(_CJK.findall(text)) / len(text) >= 0.2 else "en"


def check_prompt_tokens(t: Any, *, code_depth: int = len(STREAMS), code_size: int = CODE_SIZE,
                        source: str = "prompt") -> torch.Tensor:
    """Validate prompt tokens: an integer tensor/array [K, T] or [1, K, T] -> LongTensor [K, T]."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    if not isinstance(t, torch.Tensor):
        raise PromptError(f"{source}: expected a tensor of prompt tokens [{code_depth}, T], got {type(t).__name__}")
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or t.shape[0] != code_depth or t.shape[1] == 0:
        raise PromptError(f"{source}: prompt tokens must be [{code_depth}, T] (mixed, vocal, bgm), got {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise PromptError(f"{source}: prompt tokens must be integers, got {t.dtype}")
    t = t.long()
    pad = code_size + 1
    bad = ((t < 0) | (t >= code_size)) & (t != pad)
    if bool(bad.any()):
        v = int(t[bad][0])
        raise PromptError(f"{source}: prompt token {v} out of range (codes 0..{code_size - 1}, {pad} = padding)")
    return t


def load_prompt_tokens(path: str | os.PathLike, *, code_depth: int = len(STREAMS), code_size: int = CODE_SIZE) -> torch.Tensor:
    """Read a prompt token file (``.pt`` / ``.npy``) -> LongTensor [K, T]; see the module docstring."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        raise PromptError(
            f"prompt_audio_path {p}: this is an audio file; turning audio into prompt tokens needs the audio "
            "encoder, and no codec folder was found: pass --codec CODEC_DIR (the released runtime's ckpt/ with "
            "model_1rvq/ and model_septoken/; the separator htdemucs.pth is looked for in "
            "../third_party/demucs/ckpt/ beside it, or --separator-ckpt PATH), or --codec-encoder "
            "songgeneration:PATH (your SongGeneration checkout encodes it), or a token file: .pt or .npy "
            f"holding integer tokens [{code_depth}, T] (mixed, vocal, bgm at 25 Hz)")
    if not p.is_file():
        raise PromptError(f"prompt_audio_path {p}: file not found")
    if suffix not in TOKEN_SUFFIXES:
        raise PromptError(f"prompt_audio_path {p}: unsupported file type {suffix or '(none)'}; expected a token "
                          f"file .pt or .npy holding integer tokens [{code_depth}, T]")
    try:
        if suffix == ".npy":
            obj: Any = np.load(p, allow_pickle=False)
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, ValueError, RuntimeError, OSError) as e:
        raise PromptError(f"prompt_audio_path {p}: cannot read prompt tokens ({str(e).splitlines()[0]})") from e
    return check_prompt_tokens(obj, code_depth=code_depth, code_size=code_size, source=f"prompt_audio_path {p}")


def _as_list(v: Any, source: str, code_depth: int, code_size: int) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[0] != 1:
        return [check_prompt_tokens(x, code_depth=code_depth, code_size=code_size, source=source) for x in v]
    if isinstance(v, (list, tuple)):
        return [check_prompt_tokens(x, code_depth=code_depth, code_size=code_size, source=f"{source}[{i}]")
                for i, x in enumerate(v)]
    return [check_prompt_tokens(v, code_depth=code_depth, code_size=code_size, source=source)]


class AutoPromptLibrary:
    """Stored prompt tokens by type (and, for v2 files, by lyric language)."""

    def __init__(self, entries: Mapping[str, Mapping[str | None, Sequence[torch.Tensor]]], source: str = "") -> None:
        self.entries = {t: {lang: list(v) for lang, v in by_lang.items()} for t, by_lang in entries.items()}
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike, *, code_depth: int = len(STREAMS), code_size: int = CODE_SIZE
             ) -> AutoPromptLibrary:
        """Read a released prompt library (``ckpt/prompt.pt`` or ``tools/new_auto_prompt.pt``)."""
        p = Path(path)
        if not p.is_file():
            raise PromptError(f"--auto-prompt-file {p}: file not found (the released prompt library is a separate "
                              "download: tools/new_auto_prompt.pt for v2, ckpt/prompt.pt for v1)")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PromptError(f"--auto-prompt-file {p}: cannot read it with weights_only=True (it must hold only "
                              f"dicts/lists of token tensors): {str(e).splitlines()[0]}") from e
        if not isinstance(obj, Mapping) or not obj:
            raise PromptError(f"--auto-prompt-file {p}: expected a dict {{type: tokens}}, got {type(obj).__name__}")
        entries: dict[str, dict[str | None, list[torch.Tensor]]] = {}
        for kind, v in obj.items():
            src = f"--auto-prompt-file {p} [{kind!r}]"
            if isinstance(v, Mapping):
                entries[str(kind)] = {str(lang): _as_list(x, f"{src}[{lang!r}]", code_depth, code_size)
                                      for lang, x in v.items()}
            else:
                entries[str(kind)] = {None: _as_list(v, src, code_depth, code_size)}
        return cls(entries, str(p))

    @property
    def types(self) -> list[str]:
        return sorted(self.entries)

    def check_type(self, kind: str) -> None:
        """Raise :class:`PromptError` unless ``kind`` can be served from this library."""
        if kind in self.entries or (kind == "Auto" and self.entries):
            return
        have = ", ".join(self.types + ([] if "Auto" in self.entries else ["Auto"]))
        if kind in AUTO_PROMPT_TYPES or kind in AUTO_PROMPT_TYPES_V1:
            raise PromptError(f"auto_prompt_audio_type {kind!r}: the prompt library {self.source} has no entry for "
                              f"this type; it has: {have}")
        raise PromptError(f"unknown auto_prompt_audio_type {kind!r}; expected one of: {have}")

    def pick(self, kind: str, lyric: str | None, rng: random.Random) -> tuple[torch.Tensor, dict[str, Any]]:
        """Draw one prompt [K, T] for ``kind``; returns it with {type, language, index} for the record."""
        self.check_type(kind)
        lang = language_of(lyric)
        kinds = [kind] if kind in self.entries else self.types  # "Auto" without its own entry: all types
        pool: list[tuple[str, str | None, int]] = []
        for k in kinds:
            by_lang = self.entries[k]
            if lang in by_lang:
                langs: list[str | None] = [lang]
            elif None in by_lang:  # v1 file: no languages
                langs = [None]
            else:  # no prompt in the lyric's language: any language
                langs = sorted(by_lang, key=str)
            for lg in langs:
                pool += [(k, lg, i) for i in range(len(by_lang[lg]))]
        if not pool:
            raise PromptError(f"auto_prompt_audio_type {kind!r}: the prompt library {self.source} holds no tokens for it")
        k, lg, i = pool[rng.randrange(len(pool))]
        return self.entries[k][lg][i], {"type": k, "language": lg, "index": i}
