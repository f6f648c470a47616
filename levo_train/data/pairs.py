"""Preference-pair shards: schema, writer, validating reader, builders and the pair DataModule.

One record (webdataset sample) holds one pair sharing its conditions:

================  ===========================================================================
``chosen.npy``    int16/int32 ``[3, Tc]`` codes in [0, code_size) — the preferred song
``rejected.npy``  int16/int32 ``[3, Tr]`` — the other song
``lyric.txt``     shared lyric (released lyric rules)       ``style.txt``  shared style text
``prompt.npy``    optional shared audio prompt ``[3, P]``
``json``          ``dimension`` (what the preference is about), ``scores`` {chosen: {...},
                  rejected: {...}}, ``margin`` (chosen − rejected on ``dimension``), ``origin``
================  ===========================================================================

Reference log-probs (``levo-data ref-logps``) live beside the shards in ``ref_logps.json``:
``{"format": 3, "model": fingerprint, "stream_weights": [...], "logps": {key: [chosen, rejected,
digest]}, "sha256": ...}``. ``digest`` (:func:`pair_digest`) hashes the pair's tokens and conditions:
keys such as ``pair-00000000`` repeat whenever pairs are regenerated, so every batch checks that each
value was computed for the pair it is attached to, and opening a pair folder for writing removes the
file. ``sha256`` (:func:`levo_infer.integrity.json_digest`) covers the rest of the file, so a flipped
digit in a log-prob is refused, not trained on. Pair records carry their digests like song records
(:mod:`levo_train.data.shards`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levo_infer.integrity import json_digest
from levo_infer.jsonio import dumps as strict_dumps
from levo_train.data.batch import collate_songs
from levo_train.data.shards import (
    INDEX_NAME,
    ShardError,
    ShardWriter,
    Song,
    _check_key,
    _check_lyric,
    _check_meta,
    check_intact,
    decode_codes,
    decode_prompt,
    decode_texts_and_meta,
    read_index,
    require_members,
    write_json_atomic,
)

log = logging.getLogger(__name__)

PAIR_FORMAT = "levo-pairs"
PAIR_MEMBERS: tuple[str, ...] = ("chosen.npy", "rejected.npy", "lyric.txt", "style.txt", "json")
REF_LOGPS_NAME = "ref_logps.json"


@dataclass
class Pair:
    """One validated preference pair (codes as int64)."""

    key: str
    chosen: np.ndarray
    rejected: np.ndarray
    lyric: str
    style: str
    prompt: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)
    shard: str = ""


def decode_pair(sample: dict[str, Any], *, code_size: int, shard: str | None = None) -> Pair:
    """Validate and decode one raw pair record (errors name shard, key and expectation)."""
    key = sample.get("__key__")
    shard = shard if shard is not None else sample.get("__url__")
    try:
        check_intact(sample)
        require_members(sample, PAIR_MEMBERS,
                        " (this looks like a song shard, not a pair shard)" if "tokens.npy" in sample else "")
        arrs = {m: decode_codes(sample, m, code_size=code_size) for m in ("chosen.npy", "rejected.npy")}
        prompt = decode_prompt(sample, code_size=code_size)
        texts, meta = decode_texts_and_meta(sample)
        if not isinstance(meta, dict):
            raise ValueError(f"json must be an object, found {type(meta).__name__}")
    except ValueError as e:
        raise ShardError(str(e), shard=shard, key=key) from None
    return Pair(key, arrs["chosen.npy"], arrs["rejected.npy"], texts["lyric.txt"], texts["style.txt"], prompt,
                meta, shard or "")


def _same_prompt(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))


class PairWriter(ShardWriter):
    """Write validated preference pairs (``prefix-NNNNNN.tar`` + ``index.json``, atomic shards)."""

    def __init__(self, out_dir: str | os.PathLike, *, prefix: str = "pairs", **kw: Any) -> None:
        super().__init__(out_dir, prefix=prefix, **kw)
        remove_stale_ref_logps(self.out_dir)  # computed for the pairs this folder held before

    def write_song(self, *a: Any, **k: Any) -> None:  # pragma: no cover - guard
        raise TypeError("PairWriter writes pairs: use write_pair()")

    def write_pair(self, key: str, chosen: Song, rejected: Song, meta: dict[str, Any] | None = None) -> None:
        """Append one pair; ``chosen`` and ``rejected`` must share lyric, style and prompt."""
        where = str(self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar")
        try:
            _check_key(key)
            if key in self._keys:
                raise ValueError("duplicate key")
            diff = [n for n, same in (("lyric", chosen.lyric == rejected.lyric), ("style", chosen.style == rejected.style),
                                      ("prompt", _same_prompt(chosen.prompt, rejected.prompt))) if not same]
            if diff:
                raise ValueError(
                    f"chosen ({chosen.key}) and rejected ({rejected.key}) have different {' and '.join(diff)}: "
                    "a preference pair must share its conditions")
            _check_lyric(chosen.lyric)
            sample: dict[str, Any] = {"__key__": key}
            for name, song in (("chosen", chosen), ("rejected", rejected)):
                sample[f"{name}.npy"] = self.encode_codes(song.tokens, name)
            if chosen.prompt is not None:
                sample["prompt.npy"] = self.encode_codes(chosen.prompt, "prompt", length="P", allow_none=True)
            meta = dict(meta or {})
            _check_meta({k: v for k, v in meta.items() if k != "scores"})
            sample["lyric.txt"] = chosen.lyric.encode("utf-8")
            sample["style.txt"] = chosen.style.encode("utf-8")
            sample["json"] = strict_dumps(meta, sort_keys=True).encode("utf-8")
        except (ValueError, TypeError) as e:
            raise ShardError(str(e), shard=where, key=str(key)) from None
        self._append(key, sample)

    def close(self) -> dict[str, Any]:
        index = super().close()
        if index.get("format") != PAIR_FORMAT:
            index["format"] = PAIR_FORMAT
            write_json_atomic(self.out_dir / INDEX_NAME, index)
        return index


# ----------------------------------------------------------------------------- building pairs
def condition_key(song: Song) -> str:
    """Songs with equal keys share conditions (lyric, style, prompt)."""
    h = hashlib.sha1(song.lyric.encode() + b"\0" + song.style.encode())
    if song.prompt is not None:
        h.update(np.ascontiguousarray(song.prompt).tobytes())
    return h.hexdigest()


def _finite_score(song: Song, dimension: str, value: Any) -> float:
    """A candidate's score as a float; NaN, infinite or non-numeric scores are refused, naming the
    shard, the song and the dimension (a NaN compares false with every margin, so it would pair)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = None
    if v is None or not np.isfinite(v):
        raise ShardError(f"score {dimension!r} is {value!r}, not a finite number: the scorer failed on this song; "
                         "rescore the candidates (levo-data score) or drop the song", shard=song.shard or None,
                         key=song.key)
    return v


def song_score(song: Song, dimension: str) -> float:
    if dimension == "quality" and "quality" in song.meta:
        return _finite_score(song, "quality", song.meta["quality"])
    scores = song.meta.get("scores") or {}
    if dimension not in scores:
        raise ShardError(f"has no score for dimension {dimension!r} (scores: {sorted(scores)})",
                         shard=song.shard or None, key=song.key)
    return _finite_score(song, dimension, scores[dimension])


def select_pair(cands: Sequence[Song], dimensions: Sequence[str], min_margin: float,
                require_all: bool = False) -> tuple[Song, Song, float] | None:
    """Best vs worst of ``cands`` on the first dimension (ties -> None); with ``require_all`` the
    chosen song must beat the rejected one by ``min_margin`` on every listed dimension."""
    if len(cands) < 2:
        return None
    main = dimensions[0]
    ranked = sorted(cands, key=lambda s: (song_score(s, main), s.key))
    best, worst = ranked[-1], ranked[0]
    margin = song_score(best, main) - song_score(worst, main)
    if margin < min_margin or margin <= 0:
        return None
    if require_all:
        gaps = [song_score(best, d) - song_score(worst, d) for d in dimensions]
        if any(g < min_margin or g <= 0 for g in gaps):  # preferred (strictly) on every dimension
            return None
    return best, worst, margin


def song_scores(song: Song) -> dict[str, float]:
    """All scores of a candidate: ``meta["scores"]`` plus the top-level ``quality`` when present."""
    out = {str(k): _finite_score(song, str(k), v) for k, v in (song.meta.get("scores") or {}).items()}
    if "quality" in song.meta and "quality" not in out:
        out["quality"] = _finite_score(song, "quality", song.meta["quality"])
    return out


def pair_meta(best: Song, worst: Song, margin: float, *, dimensions: Sequence[str], require_all: bool,
              origin: str) -> dict[str, Any]:
    """The ``json`` member of a pair built from two scored candidates."""
    meta = {"dimension": "+".join(dimensions) if require_all else dimensions[0], "margin": margin,
            "origin": origin, "scores": {"chosen": song_scores(best), "rejected": song_scores(worst)},
            "chosen_key": best.key, "rejected_key": worst.key}
    if "hidden" in best.meta and "hidden" in worst.meta:  # toy pairs ranked by another scorer: the oracle's view
        meta["hidden"] = {"chosen": best.meta["hidden"], "rejected": worst.meta["hidden"]}
    return meta


def remove_stale_ref_logps(out_dir: str | os.PathLike) -> None:
    """New pairs invalidate reference log-probs computed for the old ones (same keys, other songs)."""
    p = Path(out_dir) / REF_LOGPS_NAME
    if p.is_file():
        p.unlink()


def build_pairs(songs: Iterable[Song], out_dir: str | os.PathLike, *, dimensions: Sequence[str] = ("quality",),
                min_margin: float = 0.05, require_all: bool = False, code_size: int = 16384,
                origin: str = "candidates", records_per_shard: int = 2000) -> dict[str, Any]:
    """Group scored candidates by condition and write best-vs-worst pairs (all songs in memory;
    ``levo-data pairs`` streams shards instead)."""
    groups: dict[str, list[Song]] = {}
    for s in songs:
        groups.setdefault(condition_key(s), []).append(s)
    n = 0
    with PairWriter(out_dir, code_size=code_size, max_records=records_per_shard, overwrite=True) as w:
        for gk in sorted(groups):
            sel = select_pair(groups[gk], dimensions, min_margin, require_all)
            if sel is None:
                continue
            best, worst, margin = sel
            meta = pair_meta(best, worst, margin, dimensions=dimensions, require_all=require_all, origin=origin)
            w.write_pair(f"pair-{n:08d}", best, worst, meta)
            n += 1
    return {"pairs": n, "groups": len(groups), "out": str(out_dir)}


# ----------------------------------------------------------------------------- reference log-probs
REF_LOGPS_FORMAT = 3  # 3: with the file's own sha256
#: one reference entry: (chosen log-prob, rejected log-prob, pair digest or None in old files)
RefEntry = tuple[float, float, "str | None"]


def pair_digest(pair: Pair) -> str:
    """What a reference log-prob was computed for: both songs' codes and the shared lyric, style
    and prompt (not the key, not the json), as 32 hex digits of sha256."""
    h = hashlib.sha256()
    for name, arr in (("chosen", pair.chosen), ("rejected", pair.rejected), ("prompt", pair.prompt)):
        if arr is None:
            h.update(f"{name}:none;".encode())
            continue
        a = np.ascontiguousarray(arr, dtype=np.int64)
        h.update(f"{name}:{a.shape};".encode())
        h.update(a.tobytes())
    for name, text in (("lyric", pair.lyric), ("style", pair.style)):
        b = text.encode("utf-8")
        h.update(f"{name}:{len(b)};".encode())
        h.update(b)
    return h.hexdigest()[:32]


def read_ref_logps(pairs_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``ref_logps.json`` of a pair folder (None when there is none), entries as :data:`RefEntry`."""
    p = Path(pairs_dir) / REF_LOGPS_NAME
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
        stored = data.get("sha256")
        if stored is not None and stored != json_digest(data):
            raise ShardError(f"its content does not match the sha256 written with it: {REF_LOGPS_NAME} is corrupted "
                             "(or was edited); recompute it with `levo-data ref-logps`", shard=str(p))
        if stored is None and int(data.get("format", 0)) >= 3:
            raise ShardError(f"has no sha256 (format {data['format']} files carry one): it is corrupted; recompute "
                             "it with `levo-data ref-logps`", shard=str(p))
        if stored is None:
            log.warning("%s: written by an older levo-train without a sha256: its values cannot be verified", p)
        data["logps"] = {str(k): (float(v[0]), float(v[1]), str(v[2]) if len(v) > 2 else None)
                         for k, v in data["logps"].items()}
    except ShardError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ShardError(f"malformed {REF_LOGPS_NAME} ({e}); expected {{'model', 'logps': {{key: [c, r, digest]}}}}",
                         shard=str(p)) from None
    bad = [k for k, (c, r, _) in data["logps"].items() if not (np.isfinite(c) and np.isfinite(r))]
    if bad:
        c, r, _ = data["logps"][bad[0]]
        raise ShardError(f"the reference log-probs of pair {bad[0]!r} are not finite (chosen {c}, rejected {r}; "
                         f"{len(bad)} pair(s) in all): DPO cannot train on them; recompute them with `levo-data "
                         "ref-logps` (a reference model whose log-probs overflow is broken)", shard=str(p))
    return data


def _ref_values(pairs: Sequence[Pair], ref: dict[str, RefEntry]) -> list[RefEntry]:
    """The reference entries of ``pairs``, each checked against the pair's digest."""
    vals = []
    for p in pairs:
        v = ref.get(p.key)
        if v is None:
            raise ShardError(f"no reference log-probs for this record in {REF_LOGPS_NAME}: recompute them with "
                             "`levo-data ref-logps`", shard=p.shard or None, key=p.key)
        if v[2] is None:
            raise ShardError(f"{REF_LOGPS_NAME} was written without pair digests (an older levo-train), so its "
                             "values cannot be tied to these pairs: recompute it with `levo-data ref-logps`",
                             shard=p.shard or None, key=p.key)
        if v[2] != pair_digest(p):
            raise ShardError(f"the reference log-probs in {REF_LOGPS_NAME} were computed for another pair under this "
                             "key (the pair shards were rewritten after `levo-data ref-logps`): recompute them",
                             shard=p.shard or None, key=p.key)
        vals.append(v)
    return vals


def collate_pairs(pairs: Sequence[Pair], code_size: int, ref: dict[str, RefEntry] | None = None) -> dict[str, Any]:
    """Pairs -> batch: ``chosen``/``rejected`` [B,3,T] (pad = code_size+1) with lengths, shared
    conditions, and reference log-probs when ``ref`` is given (each checked by its digest)."""
    def songs(attr: str) -> list[Song]:
        return [Song(p.key, getattr(p, attr), p.lyric, p.style, p.prompt, p.meta, p.shard) for p in pairs]

    c, r = collate_songs(songs("chosen"), code_size), collate_songs(songs("rejected"), code_size)
    batch = {"chosen": c["codes"], "chosen_lengths": c["lengths"], "rejected": r["codes"],
             "rejected_lengths": r["lengths"], "chosen_eos": c["eos"], "rejected_eos": r["eos"], "lyrics": c["lyrics"], "styles": c["styles"],
             "prompts": c["prompts"], "keys": c["keys"], "meta": c["meta"]}
    if ref is not None:
        vals = _ref_values(pairs, ref)
        batch["ref_chosen_logps"] = torch.tensor([v[0] for v in vals], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([v[1] for v in vals], dtype=torch.float32)
    return batch


def write_ref_logps(pairs_dir: str | os.PathLike, fingerprint: str, logps: dict[str, RefEntry],
                    stream_weights: Sequence[float]) -> Path:
    """Write ``ref_logps.json`` (atomically): ``{key: (chosen, rejected, pair digest)}`` under the
    model ``fingerprint`` and the stream weights they were summed with."""
    p = Path(pairs_dir) / REF_LOGPS_NAME
    doc = {"format": REF_LOGPS_FORMAT, "model": fingerprint, "stream_weights": [float(w) for w in stream_weights],
           "logps": {k: [float(c), float(r), str(d)] for k, (c, r, d) in sorted(logps.items())}}
    doc["sha256"] = json_digest(doc)
    write_json_atomic(p, doc)
    return p


__all__ = ["PAIR_FORMAT", "REF_LOGPS_FORMAT", "REF_LOGPS_NAME", "Pair", "PairWriter", "RefEntry",
           "build_pairs", "collate_pairs", "condition_key", "decode_pair", "pair_digest", "pair_meta", "read_ref_logps", "read_index",
           "remove_stale_ref_logps", "select_pair", "song_scores", "write_ref_logps"]
