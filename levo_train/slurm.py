"""Slurm preemption: checkpoint and requeue at a step boundary, never inside the signal handler."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("levo_train")


class SlurmRequeue(Callback):
    """On ``signum`` (USR1 from ``sbatch --signal=USR1@N`` or ``scancel --signal=USR1``) checkpoint
    and requeue the Slurm job — at a step boundary, never inside the signal handler.

    The handler only records the signal. After every optimizer step the ranks agree on it (a
    1-element all-reduce), so all of them save ``RUN_DIR/hpc_ckpt_N.ckpt`` at the same step; rank 0
    then runs ``scontrol requeue $SLURM_JOB_ID`` and every rank leaves with exit status 0. Use
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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # inside gradient accumulation: wait for the step
            return
        self._last_step = trainer.global_step
        flag = torch.tensor(float(self._seen), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if flag.item() == 0:
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        log.info("signal %s: saving %s at step %d and requeueing", self.signum, path, trainer.global_step)
        trainer.save_checkpoint(path)
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if trainer.is_global_zero and job:
            rc = subprocess.call(["scontrol", "requeue", job])
            log.info("scontrol requeue %s: %s", job, "done" if rc == 0 else f"failed ({rc})")
        trainer.strategy.barrier("slurm-requeue")
        raise SystemExit(0)  # the job is being requeued: no export, no summary
