"""Reference log-probs of preference pairs, precomputed once so a DPO step runs one model.

``ref_logps.json`` beside each pair shard folder holds ``{key: [chosen, rejected, digest]}``:
summed log-probs under the DPO init, computed exactly as the DPO module computes them
(:func:`levo_train.train.logps.pair_logps`: one forward over ``[chosen; rejected]``, shared
conditions, no condition dropout, eval mode, no grad, fp32), and the digest of the pair they were
computed for (:func:`levo_train.data.pairs.pair_digest`); plus the init's fingerprint and the
stream weights. A DPO run with another init or other weights refuses the file, and every batch
refuses an entry whose digest is not its pair's (pairs rewritten after the file was made). ``levo-data
ref-logps`` and ``levo-train recipe=dpo dpo.reference=precomputed`` (on toy pairs) write it.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from levo_infer import load_model
from levo_infer.config import load_config
from levo_infer.model import LeLM, LyricTooLong
from levo_train.data.pairs import (
    REF_LOGPS_FORMAT,
    Pair,
    RefEntry,
    collate_pairs,
    decode_pair,
    pair_digest,
    read_ref_logps,
    write_ref_logps,
)
from levo_train.data.shards import ShardError, iter_raw, resolve_shards
from levo_train.fingerprint import model_fingerprint
from levo_train.train.logps import pair_logps


def pair_dirs(pairs: str | os.PathLike) -> list[Path]:
    """Shard folders of a pair set: ``DIR/train`` (+ ``DIR/val``) when present, else ``DIR``."""
    root = Path(pairs)
    if not root.is_dir():
        raise FileNotFoundError(f"--pairs {root}: no such folder")
    subs = [root / s for s in ("train", "val") if (root / s).is_dir()]
    return subs or [root]


def iter_pairs(folder: str | os.PathLike, *, code_size: int) -> Iterator[Pair]:
    """Validated pair records of every shard of ``folder`` in file order."""
    for sh in resolve_shards(os.fspath(folder)):
        for raw in iter_raw(sh):
            yield decode_pair(raw, code_size=code_size, shard=sh)


def _batches(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def compute_ref_logps(model: LeLM, folder: str | os.PathLike, *, batch_size: int = 16,
                      stream_weights: Sequence[float] | None = None) -> dict[str, RefEntry]:
    """``{key: (chosen, rejected, pair digest)}``: summed reference log-probs of every pair in
    ``folder``, computed by :func:`levo_train.train.logps.pair_logps` (what the DPO module uses) in
    eval mode without gradients."""
    model.eval()
    out: dict[str, RefEntry] = {}
    code_size = model.cfg.lm.code_size
    fit = model.lyric_fit()  # a lyric the model cannot hold is named here, not cut (unless the model truncates)
    for batch_pairs in _batches(iter_pairs(folder, code_size=code_size), batch_size):
        for p in batch_pairs:
            try:
                fit.check(p.lyric, None, None)
            except LyricTooLong as e:
                raise ShardError(str(e), shard=p.shard or None, key=p.key) from None
        batch = collate_pairs(batch_pairs, code_size)
        with torch.no_grad():
            logps, _ = pair_logps(model, batch, stream_weights=stream_weights)
        B = len(batch_pairs)
        vals = logps.double().cpu().tolist()
        for i, p in enumerate(batch_pairs):
            if p.key in out:
                raise ValueError(f"{folder}: pair key {p.key!r} occurs twice; keys must be unique per folder")
            if not (math.isfinite(vals[i]) and math.isfinite(vals[B + i])):
                raise ValueError(f"{folder}: pair {p.key!r} ({p.shard}): the reference model gives it non-finite "
                                 f"log-probs (chosen {vals[i]}, rejected {vals[B + i]}); is the model export "
                                 "diverged (NaN weights)?")
            out[p.key] = (vals[i], vals[B + i], pair_digest(p))
    return out


def _auto_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def ref_logps(pairs: str | os.PathLike, model_path: str | os.PathLike, *, batch_size: int = 16,
              stream_weights: Sequence[float] | None = None, device: str | None = None) -> dict[str, Any]:
    """Write ``ref_logps.json`` beside every shard folder of ``pairs`` (see :func:`pair_dirs`)
    for the export ``model_path`` (fp32, as the DPO module holds the reference)."""
    folders = pair_dirs(pairs)
    mdir = Path(model_path)
    mdir = mdir.parent if mdir.is_file() else mdir
    model = load_model(mdir, device=_auto_device(device), dtype=torch.float32)
    K = model.code_depth
    sw = [1.0] * K if stream_weights is None else [float(w) for w in stream_weights]
    if len(sw) != K:
        raise ValueError(f"--stream-weights has {len(sw)} entries, the model has {K} streams")
    fp = model_fingerprint(mdir)
    res: dict[str, Any] = {"model": str(mdir), "fingerprint": fp, "stream_weights": sw, "folders": {}}
    t0 = time.time()
    for f in folders:
        vals = compute_ref_logps(model, f, batch_size=batch_size, stream_weights=sw)
        path = write_ref_logps(f, fp, vals, sw)
        res["folders"][str(f)] = {"pairs": len(vals), "file": str(path)}
    res["seconds"] = round(time.time() - t0, 2)
    return res


def ensure_ref_logps(folders: Sequence[str | os.PathLike], model_path: str | os.PathLike, *,
                     stream_weights: Sequence[float] | None = None, batch_size: int = 16,
                     device: str | None = None, fingerprint: str | None = None) -> list[Path]:
    """``ref_logps.json`` for every folder in ``folders`` under the export ``model_path``
    (``fingerprint``: its :func:`~levo_train.fingerprint.model_fingerprint`, when the caller has
    it), computed only where missing, of an older format or made with another model or stream
    weights. A lock file per folder makes concurrent callers (DDP ranks) compute it once. Returns
    the folders recomputed."""

    fp = fingerprint or model_fingerprint(model_path)
    K = load_config(model_path).lm.code_depth
    sw = [1.0] * K if stream_weights is None else [float(w) for w in stream_weights]
    model = None
    done: list[Path] = []
    for f in map(Path, folders):
        with open(f / ".ref_logps.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = read_ref_logps(f)
            except ShardError:  # malformed: ours to rewrite
                data = None
            if (data is not None and data.get("format") == REF_LOGPS_FORMAT and data.get("model") == fp
                    and [float(w) for w in data.get("stream_weights") or []] == sw):
                continue
            if model is None:
                model = load_model(model_path, device=_auto_device(device), dtype=torch.float32)
            write_ref_logps(f, fp, compute_ref_logps(model, f, batch_size=batch_size, stream_weights=sw), sw)
            done.append(f)
    return done
