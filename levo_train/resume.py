"""Where a run continues from: its resume point, the checkpoints of a run folder and the LR
schedule a run stores in every checkpoint.

* :func:`find_resume_checkpoint` picks the checkpoint (``resume=true``: the newest of the run folder
  that loads; ``ckpt_path``: exactly that one) and refuses a fresh start into a folder that holds
  checkpoints. Only the metadata of every checkpoint is read to order them; their bytes are then
  verified newest first, until one passes.
* :func:`check_resume_checkpoint` refuses a checkpoint of another model or other LoRA adapters
  before Lightning's loader fails with pages of shape errors (the method's own check, e.g. DPO's
  reference, comes after: :meth:`levo_train.methods.Method.check_resume`).
* :class:`Schedule` / :func:`resolve_schedule`: a resume continues the run's own schedule.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from levo_infer.config import ModelConfig
from levo_train.checkpointing import verify_checkpoint
from levo_train.data.cache import dict_differences
from levo_train.export import read_checkpoint
from levo_train.lora import LoraSpec
from levo_train.settings import UsageError
from levo_train.slurm import hpc_checkpoints
from levo_train.train.base import warmup_cosine

log = logging.getLogger("levo_train")

#: what every levo-train checkpoint's ``levo`` section holds
LEVO_KEYS = ("samples_seen", "dropout_gen", "rng", "model_config")


@dataclass
class ResumePoint:
    """A checkpoint to continue from, read (``weights_only``) and checked before anything is built."""

    path: str
    step: int
    levo: dict[str, Any]


def read_checkpoint_state(path: str | os.PathLike, *, verify: bool = True) -> ResumePoint:
    """Read a Lightning checkpoint (a file, or a sharded checkpoint folder's metadata) without
    running code (``weights_only=True``) and check it is one of ours and complete; raises
    ``ValueError`` saying what is wrong. ``verify``: check every byte against its checksums first
    (:func:`levo_train.checkpointing.verify_checkpoint`); without, only the metadata is read."""
    ck = read_checkpoint(path, verify=verify)
    st = ck.get("levo")
    if st is None:
        raise ValueError("no `levo` section: not a levo-train checkpoint, cannot resume exactly")
    if not isinstance(st, dict):
        raise ValueError(f"its `levo` section is a {type(st).__name__}, expected a dict with {', '.join(LEVO_KEYS)}")
    missing = [k for k in LEVO_KEYS if k not in st]
    sharded = Path(path).is_dir()  # a folder's weights are in the shards, not in this dict
    if missing or not isinstance(ck.get("global_step"), int) or ("state_dict" not in ck and not sharded):
        what = f"`levo` lacks {missing}" if missing else "no global_step / state_dict"
        raise ValueError(f"incomplete levo-train checkpoint ({what})")
    return ResumePoint(str(path), int(ck["global_step"]), st)


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint of a run folder: ``checkpoints/{last,step*}.ckpt`` and the requeue
    checkpoints ``hpc_ckpt_N.ckpt`` in the run root (temp files excluded); each a file, or a
    folder under a sharding strategy."""
    ck = run_dir / "checkpoints"
    last = [ck / "last.ckpt"] if (ck / "last.ckpt").exists() else []
    return last + sorted(ck.glob("step*.ckpt")) + hpc_checkpoints(run_dir)


def _newest_that_loads(run_dir: Path, found: list[Path]) -> ResumePoint:
    """The highest-step checkpoint of ``found`` whose bytes pass their checksums (metadata of all
    read first, then verified newest first); warnings for the ones skipped, an error when none loads."""
    readable: list[ResumePoint] = []
    failed: list[tuple[Path, ValueError]] = []
    for p in found:
        try:
            readable.append(read_checkpoint_state(p, verify=False))
        except ValueError as e:
            failed.append((p, e))
    best: ResumePoint | None = None
    # the highest step first; at equal steps the one holding work done inside the next step (a semi-online
    # round interrupted at a safe point: levo.partial_step), then the first listed (last.ckpt, a step file, hpc)
    for rp in sorted(readable, key=lambda r: (-r.step, -int(r.levo.get("partial_step") or 0))):
        try:
            verify_checkpoint(rp.path)
        except ValueError as e:
            failed.append((Path(rp.path), e))
            continue
        best = rp
        break
    if best is None:  # one line, with each checkpoint's reason (e.g. the file inside it that was refused)
        why = "; ".join(f"{p.name}: {e}" for p, e in failed[:4])
        raise UsageError(f"resume=true: {run_dir} holds {len(found)} checkpoint(s) but no checkpoint loads ({why}); "
                         "refusing to restart from step 0. Move them away (or use a new run_dir) to start over")
    for p, e in failed:
        print(f"levo-train: warning: {p} cannot be loaded ({e}); skipping it", file=sys.stderr)
    return best


def find_resume_checkpoint(run_dir: Path, *, resume: bool, ckpt_path: str | None) -> ResumePoint | None:
    """Where this run continues from.

    ``resume``: the newest (highest step) checkpoint of ``run_dir`` that loads; one that does not
    load -- unreadable, incomplete, a rank file missing, or bytes that fail their checksums -- is
    skipped with a warning naming it; when checkpoints exist but none loads, an error (never a
    silent restart at step 0). Without any checkpoint, ``ckpt_path`` if given, else a fresh start.
    ``ckpt_path`` alone: exactly that file. Neither, into a run folder that already holds
    checkpoints: an error (a fresh run would mix its checkpoints with the old ones).
    """
    found = run_checkpoints(run_dir)
    if resume and found:
        best = _newest_that_loads(run_dir, found)
        if ckpt_path:
            print(f"levo-train: resume=true and {run_dir} has checkpoints: continuing the run "
                  f"(ckpt_path={ckpt_path} only starts a run)", file=sys.stderr)
        return best
    if ckpt_path:
        p = Path(str(ckpt_path))
        if not p.exists():
            raise UsageError(f"ckpt_path={p}: no such checkpoint file or folder")
        try:
            return read_checkpoint_state(p)
        except ValueError as e:
            raise UsageError(f"ckpt_path={p}: {e}") from None
    if found:
        raise UsageError(f"{run_dir} already holds checkpoints ({', '.join(p.name for p in found[:3])}): pass "
                         "resume=true to continue that run, or choose a new run_dir")
    if resume:
        log.info("resume=true but %s has no checkpoint yet: starting a fresh run", run_dir)
    return None


def check_resume_checkpoint(rp: ResumePoint, model_config: ModelConfig, lora: LoraSpec) -> None:
    """Refuse, before Lightning's loader fails with pages of shape errors, a checkpoint of another
    model config or trained with other LoRA adapters."""
    mc = rp.levo.get("model_config")
    if not isinstance(mc, dict):
        raise UsageError(f"{rp.path}: its `levo.model_config` is a {type(mc).__name__}, expected a dict")
    diff = dict_differences(mc, model_config.to_dict())
    if diff:
        k, have, want = diff[0]
        raise UsageError(f"{rp.path} holds a model with {k}={have!r}, this run builds {k}={want!r} "
                         f"({len(diff)} config field(s) differ): resume with the model.init / model config the run "
                         "was started with, or use a new run_dir")
    lora_then, lora_now = rp.levo.get("lora"), (lora.identity() if lora.enabled else None)
    if lora_then != lora_now:
        raise UsageError(f"{rp.path} was trained with train.lora={lora_then or 'off'}, this run asks for "
                         f"{lora_now or 'off'}: resume with the run's own adapter settings (or use a new run_dir)")


# ----------------------------------------------------------------------------- the LR schedule
@dataclass
class Schedule:
    """The LR schedule of a run (AdamW peak ``lr``, linear warmup, cosine to ``min_lr_ratio`` at
    ``total_steps``); stored in every checkpoint so that a resume continues the same one."""

    lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def lr_at(self, step: int) -> float:
        return self.lr * warmup_cosine(step, warmup=self.warmup_steps, total=self.total_steps,
                                       min_ratio=self.min_lr_ratio)


def _extended(rp: ResumePoint, then: Schedule, max_steps: int) -> UsageError:
    """The error for a resume whose ``trainer.max_steps`` runs past the stored schedule's end."""
    stretched = dataclasses.replace(then, total_steps=max_steps)
    return UsageError(
        f"{rp.path}: the run's LR schedule ends at step {then.total_steps} (optim.total_steps), but "
        f"trainer.max_steps={max_steps} goes past it. Extending a run is explicit: "
        f"optim.total_steps={then.total_steps} goes on at the final LR ({then.lr_at(rp.step):.3g}); "
        f"optim.total_steps={max_steps} stretches the cosine (the LR at step {rp.step} jumps from "
        f"{then.lr_at(rp.step):.3g} to {stretched.lr_at(rp.step):.3g})")


def resolve_schedule(cfg: DictConfig, rp: ResumePoint | None, lora: LoraSpec) -> Schedule:
    """This run's schedule: from ``optim.*`` for a new run (length ``optim.total_steps``, default
    ``trainer.max_steps``; with LoRA the adapters' own LR); on resume the checkpoint's own, so that
    stopping and resuming changes nothing. Going past its end is explicit (``optim.total_steps``);
    other ``optim`` values that contradict the checkpoint are refused (a resume would silently keep
    the old ones)."""
    o, max_steps = cfg.optim, int(cfg.trainer.max_steps)
    asked = int(o.total_steps) if o.get("total_steps") else None
    lr = lora.learning_rate(float(o.lr)) if lora.enabled else float(o.lr)  # LoRA: the adapters' own LR
    new = Schedule(lr, int(o.warmup_steps), asked or max_steps, float(o.min_lr_ratio))
    if rp is None:
        return new
    stored = rp.levo.get("schedule")
    if not isinstance(stored, dict):
        log.warning("%s stores no LR schedule (an older levo-train): using this run's optim settings", rp.path)
        return new
    for k in ("lr", "warmup_steps", "min_lr_ratio"):
        if float(stored[k]) != float(getattr(new, k)):
            raise UsageError(f"{rp.path} was trained with optim.{k}={stored[k]}, this run asks for optim.{k}="
                             f"{getattr(new, k)}: a resume continues the run's own schedule. Drop the override, or "
                             "start a new run from the checkpoint's weights (model.init=RUN/export)")
    then = Schedule(float(stored["lr"]), int(stored["warmup_steps"]), int(stored["total_steps"]),
                    float(stored["min_lr_ratio"]))
    if asked is None:
        if max_steps > then.total_steps:
            raise _extended(rp, then, max_steps)
        return then
    if asked != then.total_steps:
        now = dataclasses.replace(then, total_steps=asked)
        msg = (f"optim.total_steps={asked} changes the run's LR schedule (it ended at step {then.total_steps}): at step "
               f"{rp.step} the LR goes from {then.lr_at(rp.step):.3g} to {now.lr_at(rp.step):.3g}")
        print(f"levo-train: warning: {msg}", file=sys.stderr)
        return now
    return then


__all__ = ["LEVO_KEYS", "ResumePoint", "Schedule", "check_resume_checkpoint", "find_resume_checkpoint",
           "read_checkpoint_state", "resolve_schedule", "run_checkpoints"]
