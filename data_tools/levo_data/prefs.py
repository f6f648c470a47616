"""Preference-data tools of ``levo-data``: ``pairs``, ``ref-logps`` and ``merge``.

* ``pairs`` — preference-pair shards (schema in :mod:`levo_train.data.pairs`), best vs worst of the
  N candidates of each condition:

  - ``--candidates SHARDS...``: scored candidate *song* shards (``json`` ``scores`` per dimension,
    or a top-level ``quality``). Candidates sharing lyric, style and prompt form one group. Two
    streaming passes (scores first, then only the chosen songs' tokens), so memory holds scores
    and the songs of unfinished pairs, never the whole candidate set.
  - ``--from-model EXPORT``: toy world only — K songs sampled from the model for each toy training
    prompt (top tier tag as released inference asks, and untagged), scored by the hidden scores:
    on-policy pairs, what ``levo-train recipe=dpo`` builds by default (``out/train``, ``out/val``).
  - ``--toy``: the world's own corrupted renderings, scored the same way (off-policy; see
    :mod:`levo_train.toy.pairs` for why plain DPO degrades on them).
* ``ref-logps`` — reference log-probs of every pair under an export, computed exactly as the DPO
  module does (one forward over ``[chosen; rejected]``, shared conditions, no condition dropout,
  eval mode, no grad, fp32), written to ``ref_logps.json`` beside each shard folder with the
  export's fingerprint; ``levo-train recipe=dpo dpo.reference=precomputed`` then runs one model.
* ``merge`` — weight interpolation of exports of one config (LeVo 1: one DPO run per preference
  dimension, then merge): ``Σ w_i θ_i`` computed in fp32 for every tensor.

Each command prints one JSON summary on stdout; errors go to stderr with exit status 1, an ``--out``
that holds data of another kind (:mod:`levo_data.outputs`) exit status 2.
:func:`register` adds the three subcommands to an ``argparse`` sub-parser set; each parser gets
``func`` (``args.func(args)`` returns the exit code).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from levo_infer import load_model
from levo_infer.checkpoint import StateSource, find_weights, resolve_dtype, save_released
from levo_infer.commands import Command, add_commands
from levo_infer.config import config_differences, load_config
from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.tokens import CODE_SIZE
from levo_train.data.pairs import PairWriter, condition_key, pair_meta, select_pair, song_score, song_scores
from levo_train.data.shards import ShardError, Song, decode_song, iter_raw, resolve_shards
from levo_train.locking import locks_output
from levo_train.toy.pairs import ToyPairSpec, write_toy_pairs
from levo_train.train.ref_logps import (  # reference log-probs: the DPO step's own definition
    compute_ref_logps,
    iter_pairs,
    pair_dirs,
    ref_logps,
)

from .errors import guarded
from .offline import candidates_overall_key
from .outputs import check_output_folder

__all__ = ["compute_ref_logps", "iter_pairs", "merge_exports", "pair_dirs", "pairs_from_candidates", "ref_logps",
           "register", "toy_pairs"]

log = logging.getLogger("levo_data.prefs")


# ----------------------------------------------------------------------------- pairs
@locks_output("levo-data pairs", lambda a: [a["out"]])
def pairs_from_candidates(candidates: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                          dimensions: Sequence[str] = ("quality",), require_all: bool = False,
                          min_margin: float = 0.05, code_size: int = CODE_SIZE, records_per_shard: int = 2000,
                          origin: str = "candidates") -> dict[str, Any]:
    """Scored candidate song shards -> best-vs-worst pair shards in ``out``.

    Pass 1 reads every record (validated) and keeps only its condition key and scores; pairs are
    selected per condition group (:func:`levo_train.data.pairs.select_pair`). Pass 2 re-reads the
    shards and writes each pair as soon as both of its songs have been seen.
    """
    dims = [str(d) for d in dimensions]
    if not dims:
        raise ValueError("no preference dimension given")
    check_output_folder(out, "pairs", command="pairs")
    shards = resolve_shards([os.fspath(c) for c in candidates])

    def records() -> Iterator[tuple[int, str, dict[str, Any]]]:
        i = 0
        for sh in shards:
            for raw in iter_raw(sh):
                yield i, sh, raw
                i += 1

    # pass 1: scores only (tokens dropped right away); candidates are named by their stream index,
    # so equal scores resolve by stream order and duplicate keys across folders do no harm
    groups: dict[str, list[Song]] = {}
    n_records = 0
    for i, sh, raw in records():
        song = decode_song(raw, code_size=code_size, shard=sh)
        for d in dims:
            song_score(song, d)  # a missing score fails here, naming shard and key
        light = Song(key=f"{i:012d}", tokens=song.tokens[:, :0], lyric="", style="", prompt=None,
                     meta={"scores": song_scores(song)}, shard=song.shard)
        groups.setdefault(condition_key(song), []).append(light)
        n_records += 1
    if n_records == 0:
        raise ShardError("no candidate records", shard=", ".join(shards))
    wanted: dict[int, tuple[int, str]] = {}  # record index -> (pair index, "chosen"/"rejected")
    margins: list[float] = []
    for gk in sorted(groups):
        sel = select_pair(groups[gk], dims, min_margin, require_all)
        if sel is None:
            continue
        best, worst, margin = sel
        n = len(margins)
        wanted[int(best.key)] = (n, "chosen")
        wanted[int(worst.key)] = (n, "rejected")
        margins.append(margin)

    # pass 2: tokens of the selected songs; write a pair when both halves are in
    pending: dict[int, dict[str, Song]] = {}
    written = 0
    with PairWriter(out, code_size=code_size, max_records=records_per_shard, overwrite=True) as w:
        for i, sh, raw in records():
            if i not in wanted:
                continue
            n, role = wanted[i]
            halves = pending.setdefault(n, {})
            halves[role] = decode_song(raw, code_size=code_size, shard=sh)
            if len(halves) == 2:
                c, r = halves["chosen"], halves["rejected"]
                meta = pair_meta(c, r, margins[n], dimensions=dims, require_all=require_all, origin=origin)
                w.write_pair(f"pair-{written:08d}", c, r, meta)
                written += 1
                del pending[n]
    if pending:  # only if the shards changed between the passes
        raise ShardError(f"{len(pending)} selected pairs were not found again in pass 2 (shards changed?)")
    return {"pairs": written, "groups": len(groups), "candidates": n_records, "dimensions": dims,
            "require_all": require_all, "min_margin": min_margin, "out": str(out)}


@locks_output("levo-data pairs", lambda a: [a["out"]])
def toy_pairs(out: str | os.PathLike, *, world_seed: int = 0, model: str | os.PathLike | None = None,
              device: str | None = None, batch_size: int = 128, **kw: Any) -> dict[str, Any]:
    """Toy pairs into ``out/train`` and ``out/val``: world renderings (``model`` None) or the
    model's own samples, scored by the hidden scores. Keywords are :class:`ToyPairSpec` fields
    (None: the default)."""
    check_output_folder(out, "pairs", command="pairs")
    fields = {k: v for k, v in kw.items() if v is not None}
    spec = ToyPairSpec(source="world" if model is None else "model", **fields)
    stats = write_toy_pairs(out, spec, world_seed=world_seed, model=model, device=device, batch_size=batch_size)
    return {"out": str(out), "model": None if model is None else str(model), **dataclasses.asdict(spec), **stats}


# ----------------------------------------------------------------------------- ref-logps
# ----------------------------------------------------------------------------- merge
def config_difference(a: Any, b: Any) -> str | None:
    """Dotted name and both values of the first differing (compared) config field, or None."""
    diffs = config_differences(a, b)
    if not diffs:
        return None
    name, va, vb = diffs[0]
    return f"{name} ({va!r} vs {vb!r})"


def merge_exports(exports: Sequence[str | os.PathLike], weights: Sequence[float], out: str | os.PathLike, *,
                  normalize: bool = False, dtype: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``out`` = ``Σ w_i · export_i`` (every tensor, computed in fp32) with the first export's
    config. Configs must be identical; weights must match the exports in number and sum to 1
    (``normalize`` divides them by their sum instead). ``dtype``: of the written weights (default:
    the first export's floating dtype)."""
    if len(exports) < 1:
        raise ValueError("merge needs at least one export")
    w = [float(x) for x in weights]
    if len(w) != len(exports):
        raise ValueError(f"--weights has {len(w)} values for {len(exports)} exports; give one weight per export")
    total = sum(w)
    if normalize:
        if abs(total) < 1e-12:
            raise ValueError(f"--normalize: the weights {w} sum to 0")
        w = [x / total for x in w]
    elif abs(total - 1.0) > 1e-6:
        raise ValueError(f"--weights {w} sum to {total:g}, not 1: fix them or pass --normalize")
    folders = [Path(e).parent if Path(e).is_file() else Path(e) for e in exports]
    out = Path(out)
    if any(out.resolve() == f.resolve() for f in folders):
        raise ValueError(f"--out {out} is one of the inputs; write the merge to a new folder")
    check_output_folder(out, "export", command="merge")
    if (out / "model.pt").exists() and not overwrite:
        raise FileExistsError(f"--out {out} already holds model.pt; pass --overwrite to replace it")
    cfgs = [load_config(f) for f in folders]
    for f, c in zip(folders[1:], cfgs[1:]):
        d = config_difference(cfgs[0], c)
        if d is not None:
            raise ValueError(f"{f}: config differs from {folders[0]} in {d}: only exports of the same model "
                             "config can be merged")
    out_dtype = resolve_dtype(dtype) or StateSource(find_weights(folders[0])).floating_dtype() or torch.float32
    acc: dict[str, torch.Tensor] = {}
    base = None
    for i, (f, wi) in enumerate(zip(folders, w)):
        m = load_model(f, dtype=torch.float32, build_tokenizers=False)  # every key checked
        sd = m.state_dict()
        for k, v in sd.items():
            if not v.is_floating_point():
                if i == 0:
                    acc[k] = v.clone()
                elif not torch.equal(acc[k], v):
                    raise ValueError(f"{f}: non-floating tensor {k!r} differs from {folders[0]}; cannot interpolate")
                continue
            t = v.detach().float() * wi
            acc[k] = t if i == 0 else acc[k].add_(t)
        if i == 0:
            base = m
        else:
            del m
    assert base is not None
    base.load_state_dict(acc, strict=True)
    save_released(base, out, dtype=out_dtype)
    return {"out": str(out), "exports": [str(f) for f in folders], "weights": w, "dtype": str(out_dtype),
            "tensors": len(acc)}


# ----------------------------------------------------------------------------- CLI
def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _pairs_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--candidates", nargs="+", metavar="SHARDS", help="scored candidate song shards (dirs, tars, patterns)")
    src.add_argument("--toy", action="store_true", help="toy-world candidates scored by its hidden scores")
    src.add_argument("--from-model", metavar="EXPORT", help="toy world: sample candidates from this export")
    p.add_argument("--out", required=True, help="output folder (--toy/--from-model: gets train/ and val/); a folder holding other data "
                   "than preference pairs is refused")
    p.add_argument("--dimension", action="append", help="preference dimension (repeatable; default: the "
                   "candidates' score_overall_key from levo-data score, else quality)")
    p.add_argument("--require-all", action="store_true",
                   help="chosen must beat rejected by the margin on every listed dimension")
    p.add_argument("--min-margin", type=float, default=None, help="minimum score margin (default 0.05)")
    p.add_argument("--code-size", type=int, default=CODE_SIZE, help="--candidates: codes are in [0, code_size)")
    p.add_argument("--records-per-shard", type=int, default=2000)
    toy = p.add_argument_group("toy world (--toy, --from-model; defaults as levo-train's data.toy_pairs)")
    toy.add_argument("--world-seed", type=int, default=0)
    toy.add_argument("--n-train", "--n-prompts", type=int, default=None, dest="n_train",
                     help="training prompts (default 3000)")
    toy.add_argument("--n-val", type=int, default=None, help="held-out prompts (default 128; 0: no val/)")
    toy.add_argument("--n-candidates", type=int, default=None, help="candidates per prompt (default 4)")
    toy.add_argument("--tier", default=None, help="style tier tag(s) of the prompts, comma-separated ones cycled "
                     "over the prompts (top | none | high | ...; default top,none)")
    toy.add_argument("--seed", type=int, default=None, help="prompt / sampling seed (default 0)")
    fm = p.add_argument_group("--from-model sampling")
    fm.add_argument("--temperature", type=float, default=None)
    fm.add_argument("--top-k", type=int, default=None)
    fm.add_argument("--top-p", type=float, default=None)
    fm.add_argument("--cfg-coef", type=float, default=None, help="default: the model config's")
    fm.add_argument("--max-frames", type=int, default=None, help="default 96")
    fm.add_argument("--batch-size", type=int, default=128)
    fm.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def _pairs_run(args: argparse.Namespace) -> int:
    dims = args.dimension or ["quality"]
    if args.candidates and not args.dimension:  # scored by levo-data score: its overall score
        dims = [candidates_overall_key(args.candidates) or "quality"]
    tier = None if args.tier is None else tuple(t.strip() for t in args.tier.split(","))
    if args.candidates:
        res = pairs_from_candidates(args.candidates, args.out, dimensions=dims, require_all=args.require_all,
                                    min_margin=0.05 if args.min_margin is None else args.min_margin,
                                    code_size=args.code_size, records_per_shard=args.records_per_shard)
    else:
        if len(dims) > 1 or args.require_all:
            raise ValueError("--toy/--from-model build pairs on one --dimension")
        res = toy_pairs(args.out, world_seed=args.world_seed, model=args.from_model, device=args.device,
                        batch_size=args.batch_size, n_train=args.n_train, n_val=args.n_val,
                        n_candidates=args.n_candidates, dimension=dims[0], min_margin=args.min_margin, tier=tier,
                        seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        cfg_coef=args.cfg_coef, max_frames=args.max_frames)
    print(strict_dumps(res, indent=1))
    return 0


def _ref_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, help="pair folder (with train/ and val/, or the shards themselves)")
    p.add_argument("--model", required=True, metavar="EXPORT", help="the DPO init export (config.yaml + model.pt)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per forward")
    p.add_argument("--stream-weights", type=_floats, default=None, metavar="A,B,C",
                   help="per-stream weights, as train.stream_weights of the DPO run (default all 1)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def _ref_run(args: argparse.Namespace) -> int:
    res = ref_logps(args.pairs, args.model, batch_size=args.batch_size, stream_weights=args.stream_weights,
                    device=args.device)
    print(strict_dumps(res, indent=1))
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("exports", nargs="+", help="export folders of the same model config")
    p.add_argument("--out", required=True, help="folder of the merged export")
    p.add_argument("--weights", required=True, type=_floats, metavar="W1,W2,...", help="one weight per export")
    p.add_argument("--normalize", action="store_true", help="divide the weights by their sum")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the first export's)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")


def _merge_run(args: argparse.Namespace) -> int:
    res = merge_exports(args.exports, args.weights, args.out, normalize=args.normalize, dtype=args.dtype,
                        overwrite=args.overwrite)
    print(strict_dumps(res, indent=1))
    return 0


#: preference-data subcommands of ``levo-data`` (part of its command table)
PREF_COMMANDS: dict[str, Command] = {
    "pairs": Command("build preference-pair shards (best vs worst of N per prompt) from scored candidates, "
                     "the toy world, or a toy model's own samples", _pairs_args, guarded(_pairs_run)),
    "ref-logps": Command("precompute reference log-probs of pair shards (ref_logps.json beside them)", _ref_args,
                         guarded(_ref_run)),
    "merge": Command("interpolate the weights of exports of one config into a new export", _merge_args,
                     guarded(_merge_run)),
}


def register(subparsers: Any) -> None:
    """Add ``pairs``, ``ref-logps`` and ``merge`` to ``subparsers`` (from ``add_subparsers``); each
    parser sets ``command`` and ``func`` (``args.func(args)`` -> exit code)."""
    for name, p in add_commands(subparsers, PREF_COMMANDS, help_as_description=True).items():
        p.set_defaults(func=PREF_COMMANDS[name].run, command=name)
