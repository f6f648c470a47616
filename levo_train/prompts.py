"""Prompt records for rollouts: what ``levo-data sample`` and semi-online DPO generate songs for.

* the released JSONL input (``idx``, ``gt_lyric``, ``descriptions``, optional ``prompt_audio_path``
  / ``auto_prompt_audio_type``), validated and formatted exactly as ``levo-infer`` does (the request
  parser :mod:`levo_infer.request`; lyric findings are errors here: shards only hold lyrics that
  follow the released rules), or
* song/pair shards: each distinct lyric, style and prompt once, keyed by its first record's key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from levo_infer.jsonl import JsonlError, jsonl_lines
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


__all__ = ["prompts_from_jsonl", "prompts_from_shards", "read_prompts"]
