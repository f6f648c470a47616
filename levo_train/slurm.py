"""Slurm preemption: requeue checkpoints ``RUN_DIR/hpc_ckpt_N.ckpt`` named, found and pruned here,
and the job requeued. The signal itself (USR1) is handled with the stop signals, at an
optimizer-step boundary and never inside the handler, by :class:`levo_train.guard.StepGuard`."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

from levo_train.checkpointing import remove_checkpoint_path

log = logging.getLogger("levo_train")

#: a requeue checkpoint (Lightning's name); temp files of a killed write (``.hpc_ckpt_3.ckpt.tmp123``) never match
HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def hpc_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The requeue checkpoints of a run folder, by version (oldest first)."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("hpc_ckpt_*.ckpt") if (m := HPC_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def next_hpc_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/hpc_ckpt_N.ckpt`` with N one above the highest complete one (1 for the first)."""
    have = hpc_checkpoints(run_dir)
    n = int(HPC_NAME.match(have[-1].name).group(1)) + 1 if have else 1  # type: ignore[union-attr]
    return Path(run_dir) / f"hpc_ckpt_{n}.ckpt"


def prune_hpc_checkpoints(run_dir: str | os.PathLike, keep: Path) -> list[Path]:
    """Remove the requeue checkpoints older than ``keep`` (just written, complete); returns them."""
    old = [p for p in hpc_checkpoints(run_dir) if p != keep]
    for p in old:
        remove_checkpoint_path(p)  # a file, or a sharded checkpoint's folder
    return old


def requeue_job() -> int | None:
    """``scontrol requeue`` this Slurm job (an array task as ``JOB_TASK``); the exit status, or None
    outside Slurm. Called by rank 0 of a run that saved its requeue checkpoint
    (:class:`levo_train.guard.StepGuard`)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return None
    rc = subprocess.call(["scontrol", "requeue", job])
    log.info("scontrol requeue %s: %s", job, "done" if rc == 0 else f"failed ({rc})")
    return rc
