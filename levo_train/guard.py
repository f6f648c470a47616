"""What ends a training run early, decided at an optimizer-step boundary by all ranks together.

:class:`StepGuard` (one Lightning callback, added to every ``levo-train`` trainer) checks once per
optimizer step, just before the optimizer applies it:

* **Non-finite loss or gradient.** The loss of every micro-batch of the step (gradient
  accumulation) and the norm of the gradients (the local shards under FSDP2) must be finite. If
  not, ``train.nonfinite=stop`` (the default) ends the run *before* the update: no weight changes,
  no checkpoint is written for that step, so the newest checkpoint is the last finite one;
  :class:`NonFiniteError` names the step (``levo-train`` exits 1). ``train.nonfinite=skip`` drops
  the step's update instead (the gradients are discarded, the optimizer leaves every parameter and
  its state as they were; the step counter, LR schedule and data position move on), counts it and
  reports it in ``summary.json``; more than ``train.nonfinite_max_skips`` skipped steps stop the run
  as ``stop`` does. Under fp16 mixed precision the gradient check is left to the loss scaler, whose
  job it is to skip overflowing steps.
* **Stop signals.** SIGTERM (a container stop, a job eviction, ``scancel``) and SIGINT (Ctrl-C)
  only set a flag in the handler. At the next optimizer-step boundary (never between the
  micro-batches of gradient accumulation) the step is finished, a resumable checkpoint
  ``RUN/checkpoints/last.ckpt`` is written on all ranks, and :class:`RunStopped` ends the run
  (``levo-train`` exits 143 for SIGTERM, 130 for SIGINT, saying how to resume). The same signal a
  second time stops at once, without a checkpoint.
* **Slurm preemption.** Under Slurm, USR1 (``sbatch --signal=USR1@N``, ``scancel --signal=USR1``)
  takes the same path, but writes ``RUN/hpc_ckpt_N.ckpt``, requeues the job
  (:func:`levo_train.slurm.requeue_job`) and exits 0.

The ranks agree through one all-reduce of a small flag vector per optimizer step (a signal may
reach only some ranks; a non-finite loss only one), so all of them stop, skip or go on together
and none waits in a collective the others never enter.

A step that runs long before its update (a semi-online DPO round generates inside the step) adds
safe points of its own: :meth:`StepGuard.agreed_signal` asks the ranks whether to act now, and
:meth:`StepGuard.checkpoint_and_stop` writes the checkpoint (the state of the step's start, plus
what the module saved of the work done inside it) and stops or requeues the same way.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from levo_train.slurm import next_hpc_path, prune_hpc_checkpoints, requeue_job

log = logging.getLogger("levo_train")

NONFINITE_MODES = ("stop", "skip")
#: exit status of a run stopped by a signal: 128 + the signal number, as a shell reports it
STOP_EXIT = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class NonFiniteError(RuntimeError):
    """The loss or gradient norm of an optimizer step is not finite; the step was not applied."""

    def __init__(self, step: int, what: str, detail: str) -> None:
        self.step, self.what, self.detail = step, what, detail
        self.advice = ""  # what to do next (levo_train.run adds where the last finite checkpoint is)
        super().__init__(f"non-finite {what} at step {step} ({detail}); the step was not applied")


class RunStopped(Exception):
    """A stop signal ended the run at an optimizer-step boundary after a resumable checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signame = signal.Signals(signum).name
        self.exit_code = STOP_EXIT.get(signal.Signals(signum), 1)
        super().__init__(f"stopped by {self.signame} at step {step}; checkpoint {checkpoint}")


class StepGuard(Callback):
    """Non-finite checks and stop/requeue signals at optimizer-step boundaries (module docstring).

    ``nonfinite``: ``stop`` | ``skip``; ``max_skips``: skipped steps allowed in all (``skip``);
    ``requeue_signal``: the Slurm preemption signal (None outside Slurm)."""

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, nonfinite: str = "stop", max_skips: int = 20, requeue_signal: int | None = None) -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"train.nonfinite={nonfinite!r}: expected one of {', '.join(NONFINITE_MODES)}")
        self.nonfinite, self.max_skips = nonfinite, int(max_skips)
        self.requeue_signal = requeue_signal
        self.skipped_steps: list[int] = []
        self.last_saved_step: int | None = None  # the newest checkpoint this session wrote
        self._seen: set[int] = set()
        self._previous: dict[int, Any] = {}
        self._active = False
        self._bad_loss: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []  # the micro-batch losses of the current optimizer step
        self._act: int | None = None

    @property
    def signals(self) -> tuple[int, ...]:
        return self.STOP_SIGNALS + ((self.requeue_signal,) if self.requeue_signal is not None else ())

    # -- signal handling ------------------------------------------------------------------
    def _handler(self, signum: int, frame: Any) -> None:
        if not self._active:  # left installed after the run (e.g. by Lightning's teardown): default action
            self._default(signum)
            return
        if signum in self._seen and signum != self.requeue_signal:
            os.write(2, f"\nlevo-train: {signal.Signals(signum).name} again: stopping now, without a "
                        "checkpoint\n".encode())
            self._default(signum)
            return
        self._seen.add(signum)
        what = "checkpointing and requeueing" if signum == self.requeue_signal else \
            "finishing the current optimizer step, writing a checkpoint and stopping (send it again to stop at once)"
        os.write(2, f"\nlevo-train: {signal.Signals(signum).name} received: {what}\n".encode())

    @staticmethod
    def _default(signum: int) -> None:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def install(self) -> None:
        """Route the stop (and requeue) signals to this guard (main thread only; idempotent)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.signals:
            current = signal.getsignal(s)
            if s not in self._previous:
                self._previous[s] = current
            signal.signal(s, self._handler)
        self._active = True

    def restore(self) -> None:
        """Put back the handlers found before the first :meth:`install` (idempotent: call it again after
        Lightning's teardown, which re-installs the handlers it found when fit started)."""
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its own SIGTERM handler after on_fit_start (it exits 0 without a
        # checkpoint, and broadcasts from inside the handler): ours replaces it for the training loop
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and getattr(connector, "received_sigterm", False):
            self._seen.add(signal.SIGTERM)
            connector.received_sigterm = False
        self.install()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore()

    # -- non-finite checks ------------------------------------------------------------------
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()  # stays on the device: one sync per optimizer step, below
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        self._losses.append(loss)

    @staticmethod
    def grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """The 2-norm of this rank's gradients (local shards of sharded ones); None without any."""
        grads = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    grads.append(g.to_local() if hasattr(g, "to_local") else g)
        grads = [g for g in grads if g.numel()]
        if not grads:
            return None
        norms = torch._foreach_norm(grads)
        return torch.linalg.vector_norm(torch.stack([n.float().to(grads[0].device) for n in norms]))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        dev = pl_module.device
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None  # fp16: the scaler skips overflows
        norm = None if scaled else self.grad_norm(optimizer)
        flags = torch.zeros(2 + len(self.signals), device=dev)
        if self._bad_loss is not None:
            flags[0] = self._bad_loss.to(dev).float()
        if norm is not None:
            flags[1] = (~torch.isfinite(norm)).to(dev).float()
        for i, s in enumerate(self.signals):
            flags[2 + i] = float(s in self._seen)
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        got = flags.tolist()  # the one host sync of the check
        losses, self._losses, self._bad_loss = self._losses, [], None
        if got[0] or got[1]:
            step = trainer.global_step + 1
            what = " and ".join(w for w, bad in (("loss", got[0]), ("gradient norm", got[1])) if bad)
            here = []
            if losses:  # this rank's first non-finite micro-batch loss, else its last one
                shown = [float(x.float().mean()) for x in losses]
                here.append(f"loss {next((v for v in shown if not math.isfinite(v)), shown[-1]):.4g}")
            if norm is not None:
                here.append(f"gradient norm {float(norm):.4g}")
            detail = ", ".join(here) + (f" on rank {trainer.global_rank}" if trainer.world_size > 1 else "")
            if self.nonfinite == "skip" and len(self.skipped_steps) < self.max_skips:
                optimizer.zero_grad(set_to_none=True)  # no parameter has a gradient: AdamW leaves all as they are
                self.skipped_steps.append(step)
                log.warning("non-finite %s at step %d (%s): step skipped (%d of at most %d, train.nonfinite=skip)",
                            what, step, detail, len(self.skipped_steps), self.max_skips)
            else:
                if self.nonfinite == "skip":
                    detail += f"; {len(self.skipped_steps)} steps skipped already, train.nonfinite_max_skips=" \
                              f"{self.max_skips}"
                raise NonFiniteError(step, what, detail)
        seen = [s for i, s in enumerate(self.signals) if got[2 + i]]
        if seen:  # a stop signal wins over a requeue
            self._act = next((s for s in self.STOP_SIGNALS if s in seen), seen[0])

    # -- safe points inside a step ---------------------------------------------------------
    def agreed_signal(self, trainer: L.Trainer) -> int | None:
        """The stop or requeue signal every rank acts on now, or None: for a safe point *inside* an
        optimizer step, before its update (between the generation batches of a semi-online DPO
        round), where the state is still that of the step's start. Under several ranks a collective
        (one all-reduce of the flags): every rank must call it at the same points."""
        if not self.signals:
            return None
        flags = torch.tensor([float(s in self._seen) for s in self.signals], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        seen = [s for s, f in zip(self.signals, flags.tolist()) if f]
        if not seen:
            return None
        return next((s for s in self.STOP_SIGNALS if s in seen), seen[0])  # a stop signal wins over a requeue

    # -- acting on a signal, after the step ------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._act is None:
            return
        signum, self._act = self._act, None
        self.checkpoint_and_stop(trainer, signum)

    def checkpoint_and_stop(self, trainer: L.Trainer, signum: int) -> None:
        """Act on ``signum`` on every rank: the requeue signal writes ``RUN/hpc_ckpt_N.ckpt``, requeues
        the job and exits 0; a stop signal writes ``checkpoints/last.ckpt`` and raises
        :class:`RunStopped`. Called at a safe point: the end of an optimizer step, or
        :meth:`agreed_signal`'s inside one (the checkpoint then resumes that step from its start,
        with whatever the module saved of the work done inside it)."""
        if signum == self.requeue_signal:
            path = trainer.strategy.broadcast(str(next_hpc_path(trainer.default_root_dir)))
            log.info("signal %s: saving %s at step %d and requeueing", signum, path, trainer.global_step)
            trainer.save_checkpoint(path, weights_only=False)  # full state for an exact resume
            if trainer.is_global_zero:
                prune_hpc_checkpoints(trainer.default_root_dir, keep=Path(path))
                requeue_job()
            trainer.strategy.barrier("slurm-requeue")
            raise SystemExit(0)  # the job is being requeued: no export, no summary
        path = str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
        log.info("%s: saving %s at step %d and stopping", signal.Signals(signum).name, path, trainer.global_step)
        trainer.save_checkpoint(path, weights_only=False)
        trainer.strategy.barrier("levo-stop")
        raise RunStopped(signum, trainer.global_step, path)

    # -- state ------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.last_saved_step = int(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = [int(s) for s in state_dict.get("skipped_steps", [])]


__all__ = ["NONFINITE_MODES", "STOP_EXIT", "NonFiniteError", "RunStopped", "StepGuard"]
