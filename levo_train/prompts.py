"""Prompt records for rollouts: what ``levo-data sample`` and semi-online DPO generate songs for.

* the released JSONL input (``idx``, ``gt_lyric``, ``descriptions``, optional ``prompt_audio_path``
  / ``auto_prompt_audio_type``), validated and formatted exactly as ``levo-infer`` does (the request
  parser :mod:`levo_infer.request`; lyric findings are errors here: shards only hold lyrics that
  follow the released rules), or
* song/pair shards: each distinct lyric, style and prompt once, keyed by its first record's key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from levo_infer.jsonl import JsonlError, jsonl_lines
from levo_infer.lyrics import LyricError, split_sections
from levo_infer.model import LyricTooLong
from levo_infer.prompts import AutoPromptLibrary, PromptError
from levo_infer.request import RequestError, RequestOptions, parse_request
from levo_train.data.pairs import condition_key, decode_pair
from levo_train.data.shards import ShardError, decode_song, iter_raw, resolve_shards
from levo_train.rollout import Prompt

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def _prompt_key(idx: str) -> str:
    return _KEY_BAD.sub("_", idx) or "_"


def prompts_from_jsonl(path: Path, model: Any, *, auto_prompt_file: str | None = None,
                       setting: str = "--prompts") -> list[Prompt]:
    """Prompts of a released-format JSONL file, read by the one JSONL reader and parsed by levo-infer's
    request parser (lyric findings and lyrics longer than the model's lyric conditioner are errors);
    audio prompts cut/padded to the model's prompt length."""
    if not path.is_file():
        raise FileNotFoundError(f"{setting} {path}: not found")
    library = None
    if auto_prompt_file:
        try:
            library = AutoPromptLibrary.load(auto_prompt_file, code_depth=model.code_depth,
                                             code_size=model.cfg.lm.code_size)
        except PromptError as e:
            raise ValueError(f"auto prompt file {auto_prompt_file}: {e}") from e
    options = RequestOptions(mode="mixed", lyrics="check", strict=True, truncate_lyrics=None, input_dir=path.parent)
    P, pad = model.cfg.prompt_frames, model.pad_id
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    keys: dict[str, int] = {}
    try:
        lines = list(jsonl_lines(path))
    except ValueError as e:
        raise ValueError(f"{setting} {e}") from None
    for n, line in lines:
        if isinstance(line, JsonlError):
            raise ValueError(str(line))
        try:
            s = parse_request(n, line, model=model, options=options, base_seed=0, seen=seen, library=library)
        except RequestError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        seen[s.idx] = n
        key = _prompt_key(s.idx)
        if key in keys:
            raise ValueError(f"{path}:{n}: idx {s.idx!r} maps to record key {key!r}, as line {keys[key]} does "
                             "(characters other than letters, digits, '_' and '-' become '_'): rename one")
        keys[key] = n
        prompt = None
        if s.prompt is not None:
            t = s.prompt.numpy().astype(np.int64)[:, :P]
            prompt = np.full((t.shape[0], max(P, 1)), pad, dtype=np.int64)
            prompt[:, :t.shape[1]] = t
        out.append(Prompt(s.lyric, s.style, prompt, key))
    if not out:
        raise ValueError(f"{setting} {path}: no prompt found (the file is empty)")
    return out


def prompts_from_shards(paths: Sequence[str], code_size: int, *, setting: str = "--prompts",
                        lyric_fit: Any = None) -> list[Prompt]:
    """Each distinct (lyric, style, prompt) of song or pair shards once, keyed by its first record;
    ``lyric_fit`` (:meth:`levo_infer.model.LeLM.lyric_fit`): a lyric that does not fit the model is an
    error naming the shard and the key."""
    out: list[Prompt] = []
    seen: set[str] = set()
    keys: dict[str, str] = {}
    for sh in resolve_shards(list(paths)):
        for raw in iter_raw(sh):
            rec = (decode_pair if "chosen.npy" in raw else decode_song)(raw, code_size=code_size, shard=sh)
            ck = condition_key(rec)  # type: ignore[arg-type]
            if ck in seen:
                continue
            seen.add(ck)
            if lyric_fit is not None:
                try:
                    lyric_fit.check(rec.lyric, None, None)
                except LyricTooLong as e:
                    raise ValueError(f"{setting}: {ShardError(str(e), shard=sh, key=rec.key)}") from None
            if rec.key in keys:
                raise ValueError(f"{setting}: record key {rec.key!r} of {sh} is also in {keys[rec.key]} with other "
                                 "conditions; prompt keys must be unique")
            keys[rec.key] = sh
            out.append(Prompt(rec.lyric, rec.style or None, rec.prompt, rec.key))
    if not out:
        raise ValueError(f"{setting} {' '.join(paths)}: the shards hold no record")
    return out


def read_prompts(paths: Sequence[str], model: Any, *, auto_prompt_file: str | None = None,
                 setting: str = "--prompts") -> list[Prompt]:
    """Prompts from one JSONL file or from song/pair shards (dirs, tars, patterns); ``model`` (a
    LeLM) decides style formatting and the audio-prompt length. Errors name ``setting``."""
    if len(paths) == 1 and Path(paths[0]).is_file() and not paths[0].endswith(".tar"):
        return prompts_from_jsonl(Path(paths[0]), model, auto_prompt_file=auto_prompt_file, setting=setting)
    return prompts_from_shards(paths, model.cfg.lm.code_size, setting=setting, lyric_fit=model.lyric_fit(truncate=False))


# ----------------------------------------------------------------------------- frame budgets
#: seconds a lyric's parts take at most, generously (an estimate that cuts a song loses its ending;
#: one that is too long only costs generation time, since a song stops at its EOS)
SECONDS_PER_WORD = 0.6        # a whitespace-separated word
SECONDS_PER_CJK = 0.45        # a CJK character (one syllable each; such lyrics have few spaces)
SECONDS_PER_SENTENCE = 1.0    # the breath between sentences
SECONDS_PER_SECTION = 2.0     # a section's lead-in
#: the instrumental sections, by tag suffix (the released tags' length classes, taken at their upper end)
INSTRUMENTAL_SECONDS = {"short": 10.0, "medium": 20.0, "long": 30.0}
SILENCE_SECONDS = 3.0
#: the estimate times this, rounded up to whole buckets (songs of a bucket share generation batches)
BUDGET_HEADROOM = 1.3
BUDGET_BUCKET_SECONDS = 10.0
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def model_frame_limit(model: Any) -> int:
    """The most frames a song of ``model`` may have: its positions' limit, and the config's
    ``max_dur`` (the released generation bound, 270 s at 25 Hz)."""
    cfg = model.cfg
    return min(int(model.max_frames), max(1, int(round(cfg.max_dur * cfg.frame_rate))))


def lyric_seconds(lyric: str) -> float:
    """A generous estimate of the seconds a song of ``lyric`` (the released lyric format) takes:
    per section a lead-in, per sentence a breath, per word (or CJK character) its singing, and
    ``[intro|inst|outro]-short/medium/long`` and ``[silence]`` their length class's upper end.
    ``ValueError`` (a :class:`~levo_infer.lyrics.LyricError`) for a lyric that breaks the rules."""
    total = 0.0
    for tag, sentences in split_sections(lyric):
        total += SECONDS_PER_SECTION
        if tag == "[silence]":
            total += SILENCE_SECONDS
        elif not sentences:
            total += INSTRUMENTAL_SECONDS.get(tag.rstrip("]").rsplit("-", 1)[-1], INSTRUMENTAL_SECONDS["long"])
        for words in sentences:
            total += SECONDS_PER_SENTENCE
            for w in words:
                n_cjk = len(_CJK.findall(w))
                total += SECONDS_PER_CJK * n_cjk if n_cjk else SECONDS_PER_WORD
    return total


def lyric_frame_budget(lyric: str, *, frame_rate: float, limit: int) -> int:
    """Frames to generate for ``lyric`` at most (``sdpo.max_frames=auto``): :func:`lyric_seconds`
    times :data:`BUDGET_HEADROOM`, rounded up to whole :data:`BUDGET_BUCKET_SECONDS` buckets, at
    most ``limit`` (the model's, :func:`model_frame_limit`). A lyric that cannot be parsed gets
    ``limit``."""
    try:
        seconds = lyric_seconds(lyric)
    except (LyricError, TypeError):
        return int(limit)
    bucket = BUDGET_BUCKET_SECONDS * frame_rate
    frames = math.ceil(seconds * BUDGET_HEADROOM * frame_rate / bucket) * bucket
    return int(max(1, min(int(limit), frames)))


__all__ = ["lyric_frame_budget", "lyric_seconds", "model_frame_limit", "prompts_from_jsonl", "prompts_from_shards",
           "read_prompts"]
