"""What a ``levo-train`` run shows while it trains: one progress line (step/total, loss, LR,
samples/s, ETA), redrawn in place on a terminal and written as a plain line every
``train.progress_every`` steps when stdout is a file or a pipe (a Slurm log, ``| tee``), plus one
line per validation. It replaces Lightning's bar (``Epoch 0/-2`` on a step-bounded run, metric names
cut to fit, nothing in a file until the end).

:func:`quiet_lightning_logging` keeps Lightning's INFO lines to one copy each (Lightning's
``lightning`` logger has its own console handler and also propagates to the root handler that
``levo-train`` sets up) and drops its advertising tip.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import torch
from lightning.pytorch.callbacks.progress import ProgressBar

__all__ = ["StepProgress", "format_eta", "quiet_lightning_logging"]


def format_eta(seconds: float | None) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    return str(timedelta(seconds=int(round(seconds))))


def _value(v: Any) -> float | None:
    try:
        x = float(v.item() if isinstance(v, torch.Tensor) else v)
    except (TypeError, ValueError):
        return None
    return x if x == x and abs(x) != float("inf") else None


class StepProgress(ProgressBar):
    """Lightning's progress-bar slot filled with optimizer-step lines: ``step 120/1000 | loss 3.9841 |
    lr 1.20e-04 | 41.3 samples/s | ETA 0:03:12``. ``batch_size``: songs (or pairs) per rank and
    micro-batch (the rate counts batch × ranks × accumulation per optimizer step); ``every``: steps
    between plain lines when ``stream`` is not a terminal. Rank 0 prints; the others stay quiet."""

    def __init__(self, batch_size: int, every: int = 50, stream: TextIO | None = None) -> None:
        super().__init__()
        self.batch_size, self.every = int(batch_size), max(1, int(every))
        self.samples_per_step = self.batch_size
        self.stream = stream
        self._enabled = True
        self._last_step = -1
        self._t0: float | None = None
        self._step0 = 0
        self._width = 0

    # -- the ProgressBar interface -----------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    @property
    def tty(self) -> bool:
        isatty = getattr(self.out, "isatty", None)
        return bool(isatty and isatty())

    def _say(self, text: str, *, inline: bool = False) -> None:
        if not self._enabled or not self.trainer.is_global_zero:
            return
        if inline:  # redrawn in place on a terminal
            pad = max(0, self._width - len(text))
            self.out.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            if self._width:
                self.out.write("\r" + " " * self._width + "\r")
                self._width = 0
            self.out.write(text + "\n")
        self.out.flush()

    # -- lines ------------------------------------------------------------------------
    def total_steps(self) -> int | None:
        t = self.trainer
        if t.max_steps is not None and t.max_steps > 0:
            return int(t.max_steps)
        try:
            n = t.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - an endless loader: unknown
            return None
        return int(n) if n != float("inf") else None

    def line(self, step: int, now: float | None = None) -> str:
        """The progress line at optimizer step ``step``."""
        t = self.trainer
        total = self.total_steps()
        metrics = t.callback_metrics
        loss = _value(metrics.get("train/loss"))
        opt = t.optimizers[0] if t.optimizers else None
        lr = float(opt.param_groups[0]["lr"]) if opt is not None else None
        now = time.perf_counter() if now is None else now
        done = step - self._step0
        elapsed = now - self._t0 if self._t0 is not None else 0.0
        rate = done * self.samples_per_step / elapsed if done > 0 and elapsed > 0 else None
        eta = (total - step) * elapsed / done if total is not None and done > 0 and elapsed > 0 else None
        parts = [f"step {step}/{total if total is not None else '?'}",
                 f"loss {loss:.4f}" if loss is not None else "loss -",
                 f"lr {lr:.2e}" if lr is not None else "lr -",
                 f"{rate:.1f} samples/s" if rate is not None else "- samples/s",
                 f"ETA {format_eta(eta)}"]
        return " | ".join(parts)

    # -- hooks ------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._t0, self._step0, self._last_step = time.perf_counter(), int(trainer.global_step), int(trainer.global_step)
        self.samples_per_step = self.batch_size * int(trainer.world_size) * int(trainer.accumulate_grad_batches)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:  # inside gradient accumulation
            return
        self._last_step = step
        total = self.total_steps()
        if self.tty:
            self._say(self.line(step), inline=True)
        elif step % self.every == 0 or step == total:
            self._say(self.line(step))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        vals = {k: _value(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        shown = [f"{k} {v:.4f}" for k, v in vals.items() if v is not None and k.count("/") == 1][:6]
        if shown:
            self._say(f"validation at step {trainer.global_step}: " + ", ".join(shown))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._width:
            self._say(self.line(int(trainer.global_step)))


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet_lightning_logging() -> None:
    """Each Lightning INFO line once (its own console handler, not also the root's) and no tip."""
    lg = logging.getLogger("lightning")
    lg.propagate = False
    for h in lg.handlers:
        if not any(isinstance(f, _DropTip) for f in h.filters):
            h.addFilter(_DropTip())
    for name in ("lightning.pytorch", "lightning.fabric"):
        sub = logging.getLogger(name)
        sub.propagate = True  # up to "lightning", which prints once
        for h in list(sub.handlers):
            sub.removeHandler(h)
