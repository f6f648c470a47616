"""Slurm preemption: checkpoint and requeue at an optimizer-step boundary, never inside the
signal handler; requeue checkpoints ``RUN_DIR/hpc_ckpt_N.ckpt`` named, found and pruned here."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

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
    from levo_train.strategies import remove_checkpoint_path

    old = [p for p in hpc_checkpoints(run_dir) if p != keep]
    for p in old:
        remove_checkpoint_path(p)  # a file, or a sharded checkpoint's folder
    return old


class SlurmRequeue(Callback):
    """On ``signum`` (USR1 from ``sbatch --signal=USR1@N`` or ``scancel --signal=USR1``) checkpoint
    and requeue the Slurm job — at an optimizer-step boundary, never inside the signal handler.

    The handler only records the signal. After every optimizer step (never between the
    micro-batches of a gradient-accumulation cycle: the data position and the accumulated
    gradients would not match) the ranks agree on it (a 1-element all-reduce), so all of them save
    ``RUN_DIR/hpc_ckpt_N.ckpt`` at the same step; the older requeue checkpoints are then removed,
    rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and every rank leaves with exit status 0. Use
    with ``SLURMEnvironment(auto_requeue=False)`` so Lightning's own (in-handler) save is off.
    """

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self._seen = False
        self._previous: Any = None
        self._last_step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        self._seen = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # (resumed) step: the first boundary is one optimizer step later

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step yet: inside gradient accumulation
            return
        self._last_step = trainer.global_step
        flag = torch.tensor(float(self._seen), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if flag.item() == 0:
            return
        path = trainer.strategy.broadcast(str(next_hpc_path(trainer.default_root_dir)))
        log.info("signal %s: saving %s at step %d and requeueing", self.signum, path, trainer.global_step)
        trainer.save_checkpoint(path, weights_only=False)  # full state for an exact resume
        if trainer.is_global_zero:
            prune_hpc_checkpoints(trainer.default_root_dir, keep=Path(path))
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if trainer.is_global_zero and job:
            rc = subprocess.call(["scontrol", "requeue", job])
            log.info("scontrol requeue %s: %s", job, "done" if rc == 0 else f"failed ({rc})")
        trainer.strategy.barrier("slurm-requeue")
        raise SystemExit(0)  # the job is being requeued: no export, no summary
