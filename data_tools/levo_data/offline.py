"""LeVo 2's offline preference-data path at scale: ``levo-data sample`` and ``levo-data score``.

    levo-data sample --model EXPORT --prompts P.jsonl|SHARDS --per-prompt N --out CANDS
    levo-data score --scorer SPEC CANDS [--out SCORED]
    levo-data pairs --candidates SCORED --out PAIRS [--dimension OVERALL_KEY]

``sample`` — N songs per prompt from a model export, generated through
:func:`levo_train.rollout.sample_and_score` (batched, KV-cached, one seed per song), written as
song shards ``OUT/rank{r:03d}-{n:05d}.tar``; keys ``{prompt key}-{j}``, meta ``prompt_key``,
``prompt_index``, ``sample_index``, ``seed``, ``sampling`` and ``model`` (fingerprint).

* Prompts: the released JSONL input (``idx``, ``gt_lyric``, ``descriptions``, optional
  ``prompt_audio_path`` / ``auto_prompt_audio_type``), validated and formatted exactly as
  ``levo-infer`` does (its own line parser; lyric findings are errors here, since a shard only
  holds lyrics that follow the released rules), or song/pair shards (each distinct lyric, style
  and prompt once, keyed by its first record's key).
* Ranks: ``RANK``/``WORLD_SIZE`` (torchrun) or ``SLURM_PROCID``/``SLURM_NTASKS`` (srun); rank r
  takes prompts ``i % world == r``, so the songs do not depend on the number of ranks.
* Resume: each rank works in chunks of prompts; a chunk's shard is written to a temp folder and
  renamed into place, then recorded in ``OUT/progress/rank{r:03d}.json``. A rerun skips recorded
  chunks whose shard exists (in any rank's progress: the world size may change) and redoes the
  rest. ``OUT/sample.json`` holds the settings that decide the songs (model fingerprint, prompt
  digest, per-prompt, seed, sampling rules, dtype); a rerun with other settings is refused,
  naming them. The rank that completes the set writes ``OUT/index.json`` and ``OUT/done.json``.
  An ``OUT`` that holds data of another kind (song shards, pairs, scored songs, ...) is refused
  before anything is written (:mod:`levo_data.outputs`).

``score`` — every record of candidate song shards scored by a scorer spec
(:func:`levo_train.scorers.load_scorer`); written as new shards in ``--out`` (same names) or in
place (each shard rewritten atomically), with ``meta["scores"]`` = every dimension and the overall
score, ``meta["score_overall_key"]`` and ``meta["scorer"]``. ``score.json`` in the output folder
records which shards are done (resume per shard).

* Ranks: as ``sample`` (``RANK``/``WORLD_SIZE`` or ``SLURM_PROCID``/``SLURM_NTASKS``); rank r scores
  shards ``i % world == r`` of the candidate list, each into its own output file, and records them in
  ``score-progress/rank{r:03d}.json`` (a one-rank run: in ``score.json`` directly). Each rank locks its
  own lock file. A rank that finds every shard done (in any rank's record: the world size may change
  between runs) merges the records into ``score.json`` and writes ``index.json``, so the result
  equals the one-rank run's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levo_infer import load_model
from levo_infer.checkpoint import resolve_dtype
from levo_infer.commands import Command
from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.jsonio import write_json_atomic as _write_json
from levo_infer.tokens import CODE_SIZE
from levo_train.data.batch import ENDED_KEY
from levo_train.data.cache import settings_file_differences
from levo_train.data.shards import (
    INDEX_NAME,
    SCHEMA_VERSION,
    SONG_FORMAT,
    ShardError,
    ShardWriter,
    iter_raw,
    iter_songs,
    read_index,
    resolve_shards,
)
from levo_train.fingerprint import model_fingerprint
from levo_train.locking import locks_output
from levo_train.prompts import model_frame_limit, read_prompts
from levo_train.reward.model import token_layout_mismatch
from levo_train.rollout import Sampling, check_scores, sample_and_score
from levo_train.scorers import load_scorer

from .errors import guarded
from .outputs import check_output_folder

log = logging.getLogger("levo_data.offline")

SAMPLE_FORMAT = "levo-sample-1"
SETTINGS_NAME = "sample.json"
DONE_NAME = "done.json"
SCORE_NAME = "score.json"
SCORE_PROGRESS = "score-progress"


def write_json_atomic(path: Path, obj: Any) -> None:
    """The pipeline's json files (settings, progress, index, done), keys sorted, written atomically."""
    _write_json(path, obj, sort_keys=True)


# ----------------------------------------------------------------------------- small helpers
def rank_world() -> tuple[int, int]:
    """This process's (rank, world size): torchrun's RANK/WORLD_SIZE, else srun's
    SLURM_PROCID/SLURM_NTASKS, else (0, 1)."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if os.environ.get(r) is not None and os.environ.get(w) is not None:
            try:
                rank, world = int(os.environ[r]), int(os.environ[w])
            except ValueError:
                raise ValueError(f"{r}={os.environ[r]!r} / {w}={os.environ[w]!r} are not integers") from None
            if world < 1 or not 0 <= rank < world:
                raise ValueError(f"{r}={rank} is not in [0, {w}={world})")
            return rank, world
    return 0, 1


def _local_rank() -> int:
    for v in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(v, "").isdigit():
            return int(os.environ[v])
    return 0


def resolve_device(device: str | None) -> str:
    """``auto``/None: this rank's GPU (local rank modulo the GPUs) when CUDA is available, else cpu."""
    if device not in (None, "auto"):
        return str(device)
    if torch.cuda.is_available():
        return f"cuda:{_local_rank() % torch.cuda.device_count()}"
    return "cpu"


# ----------------------------------------------------------------------------- prompts
def prompts_digest(prompts: Sequence[Any]) -> str:
    """sha256 over every prompt's key, lyric, style and audio-prompt tokens, in order."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.key, p.lyric, p.style]).encode())
        if p.prompt is not None:
            h.update(np.ascontiguousarray(p.prompt, dtype=np.int64).tobytes())
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- sample
def _read_progress(out: Path) -> dict[int, dict[str, Any]]:
    progress = {}
    for p in sorted((out / "progress").glob("rank*.json")):
        try:
            progress[int(p.stem[4:])] = json.loads(p.read_text())
        except (ValueError, OSError) as e:
            raise ValueError(f"{p}: unreadable progress file ({e}); remove it to redo that rank's chunks") from e
    return progress


def _done_chunks(out: Path) -> dict[str, dict[str, Any]]:
    """Recorded chunks whose shard exists (or that wrote no song), by name, across all ranks."""
    done = {}
    for prog in _read_progress(out).values():
        for name, c in prog.get("chunks", {}).items():
            if c["records"] == 0 or (out / name).is_file():
                done[name] = c
    return done


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Create ``OUT/sample.json`` (exclusively) or check a rerun's settings against it."""
    path = out / SETTINGS_NAME
    if not path.is_file():
        tmp = out / f".{SETTINGS_NAME}.{os.getpid()}.tmp"
        tmp.write_text(strict_dumps(settings, indent=1, sort_keys=True))
        try:
            os.link(tmp, path)  # atomic create-if-absent: the first rank wins
            return
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    what = settings_file_differences(path, settings)
    if what:
        raise ValueError(f"--out {out} holds samples made with other settings ({what}); rerun with the same "
                         "model, prompts and sampling settings to resume, or write to a new --out")


def _finish_if_complete(out: Path, n_prompts: int, settings: dict[str, Any], code_size: int,
                        delays: Sequence[int]) -> dict[str, Any] | None:
    """Write ``index.json`` (with the sampling model's ``code_size`` and ``delays``, which a reward
    model scoring the songs must share) and ``done.json`` when every prompt is in a finished chunk."""
    done = _done_chunks(out)
    covered = {i for c in done.values() for i in c["prompts"]}
    if len(covered) < n_prompts:
        return None
    shards = sorted(({"name": n, "records": c["records"]} for n, c in done.items() if c["records"] > 0),
                    key=lambda s: s["name"])
    records = sum(s["records"] for s in shards)
    write_json_atomic(out / INDEX_NAME, {"format": SONG_FORMAT, "version": SCHEMA_VERSION, "code_size": code_size,
                                         "delays": [int(d) for d in delays], "records": records, "shards": shards})
    gen_s = sum(c["seconds"] for c in done.values())
    songs = sum(c["records"] + c["empty"] for c in done.values())
    summary = {"out": str(out), "prompts": n_prompts, "songs": records, "empty_dropped": sum(c["empty"] for c in
               done.values()), "shards": len(shards), "generation_seconds": round(gen_s, 2),
               "songs_per_second_per_rank": round(songs / gen_s, 3) if gen_s > 0 else None, "settings": settings}
    write_json_atomic(out / DONE_NAME, summary)
    return summary


def _sample_rank(a: dict[str, Any]) -> tuple[int, int]:
    return (int(a["rank"]), int(a["world"])) if a["rank"] is not None and a["world"] is not None else rank_world()


def _scored_folders(a: dict[str, Any]) -> list[str]:
    """Where ``levo-data score`` writes: ``--out``, else the folders of the candidate shards (in place)."""
    if a["out"] is not None:
        return [os.fspath(a["out"])]

    try:
        return sorted({os.path.dirname(os.path.abspath(s)) for s in resolve_shards(list(a["candidates"]))})
    except (ShardError, OSError, ValueError):
        return []  # score_candidate_shards reports unusable candidates itself


# every rank of a launch locks its own files (they finish independently); a second launch is refused
@locks_output("levo-data sample", lambda a: [a["out"]], per_rank=_sample_rank)
def sample_candidate_shards(model_path: str, prompt_paths: Sequence[str], out: str | os.PathLike, *,
                            per_prompt: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                            cfg_coef: float | None = None, max_frames: int | None = None, compat: bool = False,
                            batch_size: int = 64, seed: int = 0, device: str | None = None, dtype: str | None = None,
                            records_per_shard: int = 1000, auto_prompt_file: str | None = None,
                            rank: int | None = None, world: int | None = None) -> dict[str, Any]:
    """Sample ``per_prompt`` songs per prompt into candidate shards under ``out`` (this rank's part,
    resumable; see the module docstring). Returns this rank's summary (and the set's when it
    completed it)."""
    if per_prompt < 1:
        raise ValueError(f"--per-prompt must be >= 1, got {per_prompt}")
    out = Path(out)
    check_output_folder(out, "candidates", command="sample")  # before anything is loaded or written
    if rank is None or world is None:
        rank, world = rank_world()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype) if dtype not in (None, "auto") else (torch.float32 if dev == "cpu" else None)
    model = load_model(model_path, device=dev, dtype=dt).eval()
    cfg = model.cfg
    code_size = cfg.lm.code_size
    frames_cap = model_frame_limit(model)
    max_frames = frames_cap if max_frames is None else max_frames
    if not 1 <= max_frames <= model.max_frames:
        raise ValueError(f"--max-frames {max_frames}: the model has room for 1 to {model.max_frames} frames")
    prompts = read_prompts(prompt_paths, model, auto_prompt_file=auto_prompt_file, setting="--prompts")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg_coef, max_frames=max_frames,
                        compat=compat, batch_size=batch_size)
    rules = {"temperature": temperature, "top_k": top_k, "top_p": top_p,
             "cfg_coef": cfg.cfg_coef if cfg_coef is None else cfg_coef, "max_frames": max_frames, "compat": compat}
    settings = {"format": SAMPLE_FORMAT, "model_fingerprint": model_fingerprint(model_path),
                "prompts": {"count": len(prompts), "digest": prompts_digest(prompts)}, "per_prompt": per_prompt,
                "seed": seed, "sampling": rules, "dtype": str(model.dtype).removeprefix("torch."),
                "code_size": code_size}
    out.mkdir(parents=True, exist_ok=True)
    (out / "progress").mkdir(exist_ok=True)
    check_settings(out, settings)
    prog_path = out / "progress" / f"rank{rank:03d}.json"
    mine = _read_progress(out).get(rank, {})
    chunks: dict[str, dict[str, Any]] = dict(mine.get("chunks", {}))
    done = _done_chunks(out)
    lost = sorted(n for n in chunks if n not in done)
    for n in lost:  # recorded, but the shard is gone: redo its prompts
        log.warning("%s: recorded chunk %s is missing; sampling its prompts again", out, n)
        del chunks[n]
    covered = {i for c in done.values() for i in c["prompts"]}
    pending = [i for i in range(rank, len(prompts), world) if i not in covered]
    if pending:  # the set is not complete (any more): no index/done marker may claim it is
        for stale in (DONE_NAME, INDEX_NAME):
            (out / stale).unlink(missing_ok=True)
    chunk_prompts = max(1, records_per_shard // per_prompt)
    number = 1 + max((int(n.split("-")[1].split(".")[0]) for n in chunks), default=-1)
    fingerprint = settings["model_fingerprint"]
    t_start = time.perf_counter()
    new_songs = 0
    for start in range(0, len(pending), chunk_prompts):
        idx = pending[start:start + chunk_prompts]
        name = f"rank{rank:03d}-{number:05d}.tar"
        t0 = time.perf_counter()
        cands = sample_and_score(model, prompts, None, sampling, per_prompt=per_prompt, seed=seed, prompt_indices=idx)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tmp_dir = out / f".tmp-{name[:-4]}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        kept = [c for c in cands if c.frames >= 1]
        if kept:
            with ShardWriter(tmp_dir, prefix="songs", max_records=len(kept) + 1, code_size=code_size) as w:
                for c in kept:
                    p = prompts[c.prompt_index]
                    meta = {"prompt_key": p.key, "prompt_index": c.prompt_index, "sample_index": c.sample_index,
                            "seed": c.seed, "sampling": rules, "model": fingerprint, "source": "sample",
                            # false: cut at --max-frames without EOS (scored without an appended EOS)
                            ENDED_KEY: bool(c.song.meta.get(ENDED_KEY, True))}
                    w.write_song(f"{p.key}-{c.sample_index}", c.song.tokens, c.song.lyric, c.song.style, meta,
                                 c.song.prompt)
            os.replace(tmp_dir / "songs-000000.tar", out / name)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        chunks[name] = {"prompts": idx, "records": len(kept), "empty": len(cands) - len(kept),
                        "seconds": round(seconds, 3)}
        write_json_atomic(prog_path, {"rank": rank, "world": world, "chunks": chunks, "done": False})
        new_songs += len(cands)
        number += 1
        log.info("rank %d: %s: %d prompts, %d songs in %.1f s", rank, name, len(idx), len(cands), seconds)
    wall = time.perf_counter() - t_start
    write_json_atomic(prog_path, {"rank": rank, "world": world, "chunks": chunks, "done": True})
    res: dict[str, Any] = {"out": str(out), "rank": rank, "world": world, "device": dev,
                           "prompts_this_rank": len(range(rank, len(prompts), world)), "sampled_now": new_songs,
                           "skipped_prompts": len(range(rank, len(prompts), world)) - len(pending),
                           "seconds": round(wall, 2),
                           "songs_per_second": round(new_songs / wall, 3) if new_songs and wall > 0 else None}
    summary = _finish_if_complete(out, len(prompts), settings, code_size, cfg.delays)
    res["complete"] = summary is not None
    if summary is not None:
        res["songs_total"] = summary["songs"]
        res["empty_dropped"] = summary["empty_dropped"]
    return res


# ----------------------------------------------------------------------------- score
def _check_reward_model_tokens(scorer: Any, spec: str, shards: Sequence[str], code_size: int) -> None:
    """A reward-model scorer (``rm:DIR``) must read the candidates' tokens: their vocabulary (the
    ``code_size`` they are read with) and, where their ``index.json`` records it (``levo-data
    sample`` does), the delay pattern of the model that sampled them. One line naming both otherwise."""
    rm_cfg = getattr(scorer, "model_config", None)
    if rm_cfg is None:
        return
    for d in dict.fromkeys(os.path.dirname(os.path.abspath(s)) for s in shards):
        idx = read_index(d) or {}
        where = os.path.join(d, INDEX_NAME) if idx else shards[0]
        what = token_layout_mismatch(rm_cfg, f"the candidates ({where})", code_size=code_size,
                                     delays=idx.get("delays"))
        if what:
            raise ValueError(f"--scorer {spec}: {what}; score them with a reward model trained on the tokens of the "
                             "model that sampled them")


def _code_size_of(shards: Sequence[str], given: int | None) -> int:
    if given is not None:
        return given

    for d in dict.fromkeys(os.path.dirname(os.path.abspath(s)) for s in shards):
        idx = read_index(d)
        if idx and "code_size" in idx:
            return int(idx["code_size"])
    return CODE_SIZE


def _score_records(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every score record of an output folder: ``score.json`` and the ranks' ``score-progress/rank*.json``."""
    found = []
    for p in [folder / SCORE_NAME, *sorted((folder / SCORE_PROGRESS).glob("rank*.json"))]:
        if p.is_file():
            try:
                rec = json.loads(p.read_text())
                rec["scorer"], rec["shards"]  # noqa: B018 -- the two keys every record has
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{p}: unreadable score record ({e}); remove it to rescore its shards") from e
            found.append((p, rec))
    return found


def _scored_entries(folder: Path, ident: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Shards of ``folder`` recorded as scored by ``ident`` whose file exists, across every rank's record."""
    return {n: e for _, rec in _score_records(folder) if rec["scorer"] == ident
            for n, e in rec["shards"].items() if (folder / n).is_file()}


@locks_output("levo-data score", _scored_folders, per_rank=_sample_rank)
def score_candidate_shards(candidates: Sequence[str], scorer_spec: str, *, out: str | os.PathLike | None = None,
                           batch_size: int = 64, device: str | None = None, code_size: int | None = None,
                           world_seed: int = 0, codec: str | None = None, overwrite: bool = False,
                           rank: int | None = None, world: int | None = None) -> dict[str, Any]:
    """Score every record of candidate song shards (see the module docstring); resumable per shard,
    split over ranks (this rank scores its share)."""
    if rank is None or world is None:
        rank, world = rank_world()
    for c in candidates:  # a levo-data sample folder must be complete (else *.tar is only a part of it)
        if (Path(c) / SETTINGS_NAME).is_file() and not (Path(c) / DONE_NAME).is_file():
            raise ValueError(f"{c}: levo-data sample has not finished there (no {DONE_NAME}); rerun the sample "
                             "command (it resumes) before scoring")
    shards = resolve_shards(list(candidates))
    if out is not None and Path(out).resolve() not in {Path(s).parent.resolve() for s in shards}:
        check_output_folder(out, "scored", command="score")  # (--out = the candidates' folder: in place)
    cs = _code_size_of(shards, code_size)
    dev = resolve_device(device)
    scorer = load_scorer(scorer_spec, device=dev, world_seed=world_seed, setting="--scorer", codec=codec,
                         batch_size=batch_size)
    _check_reward_model_tokens(scorer, scorer_spec, shards, cs)
    ident = {"spec": scorer_spec, "name": scorer.name, "overall": scorer.overall}
    names = [os.path.basename(s) for s in shards]
    if out is not None:
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"two candidate shards are named {dup}; --out keeps shard names, so score each folder "
                             "into its own --out")
        targets = {s: Path(out) / n for s, n in zip(shards, names)}
        Path(out).mkdir(parents=True, exist_ok=True)
    else:
        targets = {s: Path(s) for s in shards}
    mine = {s: t for i, (s, t) in enumerate(targets.items()) if i % world == rank}
    # one progress record per output folder and rank (one rank: score.json itself)
    folders = sorted({t.parent for t in targets.values()})
    progress: dict[Path, dict[str, Any]] = {}
    prog_path: dict[Path, Path] = {}
    for f in folders:
        for _, rec in _score_records(f):
            prev = rec["scorer"]
            if prev != ident and not overwrite:
                raise ValueError(f"{f} was scored with {prev['spec']!r} ({prev['name']}), not {scorer_spec!r}: pass "
                                 "--overwrite to rescore its shards, or write to a new --out")
        if overwrite:  # rescore every shard, also under the same spec (e.g. after fixing the scorer's code)
            if world == 1:
                shutil.rmtree(f / SCORE_PROGRESS, ignore_errors=True)
            done = {}
            if out is not None:  # the set is being rescored: no index may claim it is done
                (f / INDEX_NAME).unlink(missing_ok=True)
        else:
            done = _scored_entries(f, ident)
        if not (f / SCORE_NAME).is_file() or (overwrite and world == 1):  # marks the folder as scored output
            write_json_atomic(f / SCORE_NAME, {"scorer": ident, "shards": {}})
        if world > 1:
            (f / SCORE_PROGRESS).mkdir(exist_ok=True)
            prog_path[f] = f / SCORE_PROGRESS / f"rank{rank:03d}.json"
        else:
            prog_path[f] = f / SCORE_NAME
        progress[f] = {"scorer": ident, "shards": done}
    t0 = time.perf_counter()
    n_scored = n_skipped = 0
    sums: dict[str, float] = {}
    for src, dst in mine.items():
        prog = progress[dst.parent]
        if dst.name in prog["shards"] and dst.is_file():
            n_skipped += 1
            continue
        tmp_dir = dst.parent / f".tmp-score-{dst.stem}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        n = 0
        try:  # a failing scorer leaves no temp folder behind
            with ShardWriter(tmp_dir, prefix="songs", max_records=10**9, code_size=cs) as w:
                batch = []
                reader = iter_songs(src, code_size=cs)

                def flush(batch: list[Any], src: str = src) -> None:
                    try:
                        scores = scorer.score(batch)
                        check_scores(scorer, scores, len(batch), batch)
                    except Exception as e:  # one line naming the scorer and the songs
                        msg = " ".join(str(e).split()) or type(e).__name__
                        keys = ", ".join(repr(s.key) for s in batch[:3]) + (" ..." if len(batch) > 3 else "")
                        where = "" if any(s.key in msg for s in batch) else f" (scoring songs {keys} of {src})"
                        raise ValueError(f"--scorer {scorer_spec} ({scorer.name}){where}: {type(e).__name__}: {msg}"
                                         ) from None
                    for song, sc in zip(batch, scores):
                        meta = dict(song.meta)
                        meta.pop("quality", None)  # a top-level quality would shadow the new scores
                        meta["scores"] = {str(k): float(v) for k, v in sc.items()}
                        meta["score_overall_key"] = scorer.overall
                        meta["scorer"] = scorer.name
                        for k, v in meta["scores"].items():
                            sums[k] = sums.get(k, 0.0) + v
                        w.write_song(song.key, song.tokens, song.lyric, song.style, meta, song.prompt)

                for song in reader:
                    batch.append(song)
                    if len(batch) >= batch_size:
                        flush(batch)
                        n += len(batch)
                        batch = []
                if batch:
                    flush(batch)
                    n += len(batch)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        if n:
            os.replace(tmp_dir / "songs-000000.tar", dst)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        prog["shards"][dst.name] = {"source": os.path.abspath(src), "records": n}
        write_json_atomic(prog_path[dst.parent], prog)
        n_scored += n
    complete = _finish_scoring(targets, ident, out, cs) if world > 1 or out is not None else True
    secs = time.perf_counter() - t0
    return {"out": str(out) if out is not None else "in place", "rank": rank, "world": world, "complete": complete,
            "scorer": scorer.name, "overall": scorer.overall,
            "dimensions": list(scorer.dimensions), "shards": len(mine), "shards_skipped": n_skipped,
            "songs_scored": n_scored, "seconds": round(secs, 2),
            "songs_per_second": round(n_scored / secs, 2) if n_scored and secs > 0 else None,
            "mean_scores": {k: round(v / n_scored, 6) for k, v in sums.items()} if n_scored else {},
            "pairs_hint": f"levo-data pairs --candidates ... --dimension {scorer.overall}"}


def _finish_scoring(targets: dict[str, Path], ident: dict[str, Any], out: str | os.PathLike | None, cs: int) -> bool:
    """When every target shard is recorded as scored (by any rank): merge the records of each output
    folder into its ``score.json`` and write ``--out``'s ``index.json``; True then, else False (other
    ranks still score)."""
    folders = sorted({t.parent for t in targets.values()})
    entries = {f: _scored_entries(f, ident) for f in folders}
    if any(t.name not in entries[t.parent] for t in targets.values()):
        return False
    for f in folders:
        write_json_atomic(f / SCORE_NAME, {"scorer": ident, "shards": entries[f]})
    if out is not None:
        shard_list = [{"name": t.name, "records": entries[t.parent][t.name]["records"]}
                      for t in targets.values() if entries[t.parent][t.name]["records"] > 0]
        write_json_atomic(Path(out) / INDEX_NAME, {"format": SONG_FORMAT, "version": SCHEMA_VERSION, "code_size": cs,
                                                   "records": sum(s["records"] for s in shard_list),
                                                   "shards": shard_list})
    return True


def candidates_overall_key(candidates: Sequence[str]) -> str | None:
    """``score_overall_key`` of the first candidate record (what ``levo-data score`` wrote), or None."""
    try:
        first = resolve_shards(list(candidates))[0]
        raw = next(iter(iter_raw(first)), None)
        key = json.loads(raw["json"]).get("score_overall_key") if raw and "json" in raw else None
    except (OSError, ValueError, KeyError, IndexError, AttributeError):
        return None  # the pairs command reports unreadable candidates itself
    return str(key) if key else None


# ----------------------------------------------------------------------------- CLI
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="EXPORT", help="model folder (config.yaml + model.pt)")
    p.add_argument("--prompts", required=True, nargs="+", metavar="JSONL|SHARDS",
                   help="released-format JSONL (idx, gt_lyric, descriptions, ...) or song/pair shards")
    p.add_argument("--per-prompt", type=int, required=True, help="songs per prompt")
    p.add_argument("--out", required=True, help="candidate folder (rank shards, progress/, index.json); a folder holding other data is refused")
    s = p.add_argument_group("sampling (decide the songs; a resumed run must keep them)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--top-p", type=float, default=0.0, help="0 = off")
    s.add_argument("--cfg-coef", type=float, default=None, help="default: the model config's")
    s.add_argument("--max-frames", type=int, default=None,
                   help="frames per song at most (25 per second; default: the config's max_dur)")
    s.add_argument("--compat", action="store_true", help="the released sampling rules (top-k/temperature on "
                   "codebook 0 only, greedy vocal/bgm, repetition penalty)")
    s.add_argument("--seed", type=int, default=0, help="base seed; each song has its own seed from it")
    s.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 (default: fp32 on CPU, the checkpoint's "
                   "on GPU)")
    r = p.add_argument_group("runtime (free to change on resume)")
    r.add_argument("--batch-size", type=int, default=64, help="songs per generation batch")
    r.add_argument("--device", default="auto", help="default: this rank's GPU (LOCAL_RANK/SLURM_LOCALID), else cpu")
    r.add_argument("--records-per-shard", type=int, default=1000,
                   help="songs per chunk shard (the resume unit), rounded to whole prompts")
    r.add_argument("--auto-prompt-file", default=None, help="released prompt library for auto_prompt_audio_type")


def _sample_run(args: argparse.Namespace) -> int:
    res = sample_candidate_shards(args.model, args.prompts, args.out, per_prompt=args.per_prompt,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  cfg_coef=args.cfg_coef, max_frames=args.max_frames, compat=args.compat,
                                  batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
                                  records_per_shard=args.records_per_shard, auto_prompt_file=args.auto_prompt_file)
    print(strict_dumps(res, indent=1))
    return 0


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("candidates", nargs="+", help="candidate song shards (dirs, tars, patterns)")
    p.add_argument("--scorer", required=True, metavar="SPEC",
                   help="toy | toy:SEED | rm:EXPORT_DIR | audio:MODULE:FUNCTION (with --codec) | "
                        "callable:MODULE:FACTORY | weighted:SPEC=W,SPEC=W,... | weighted:FILE.json")
    p.add_argument("--out", default=None, help="write scored shards here (default: rewrite the inputs in place); a folder holding other "
                        "data than scored songs is refused")
    p.add_argument("--batch-size", type=int, default=64, help="songs per scorer call")
    p.add_argument("--device", default="auto", help="default: cuda when available, else cpu")
    p.add_argument("--code-size", type=int, default=None, help=f"default: the candidates' index.json, else {CODE_SIZE}")
    p.add_argument("--world-seed", type=int, default=0, help="toy world of the 'toy' scorer")
    p.add_argument("--codec", default=None, metavar="MODULE:FACTORY", help="audio: scorers: the codec factory")
    p.add_argument("--overwrite", action="store_true", help="rescore shards scored with another scorer")


def _score_run(args: argparse.Namespace) -> int:
    res = score_candidate_shards(args.candidates, args.scorer, out=args.out, batch_size=args.batch_size,
                                 device=args.device, code_size=args.code_size, world_seed=args.world_seed,
                                 codec=args.codec, overwrite=args.overwrite)
    print(strict_dumps(res, indent=1))
    return 0


#: offline-pipeline subcommands of ``levo-data`` (part of its command table)
OFFLINE_COMMANDS: dict[str, Command] = {
    "sample": Command("sample N candidate songs per prompt from a model export into song shards (ranks from "
                      "torchrun/srun, resumable)", _sample_args, guarded(_sample_run)),
    "score": Command("score candidate song shards with a scorer spec (toy, rm:EXPORT, audio:..., weighted:...), "
                     "resumable per shard", _score_args, guarded(_score_run)),
}

__all__ = ["OFFLINE_COMMANDS", "candidates_overall_key", "check_settings", "prompts_digest", "rank_world", "read_prompts",
           "sample_candidate_shards", "score_candidate_shards"]
