"""``python tests/fault_runner.py [levo-train overrides]``: levo-train with one injected fault.

Used by tests/test_faults.py; the fault comes from ``LEVO_FAULT`` (the production code has no
hooks for it: this script wraps two functions before it calls ``levo_train.cli.main``):

* ``step:N:PHASE`` — SIGKILL the whole process group (every rank, like a lost node) at optimizer
  step N: ``start`` when the batch that makes step N starts, ``end`` after its optimizer step and
  the step's callbacks (checkpoint writes included).
* ``write:K:PHASE`` — SIGKILL during the K-th checkpoint write of this process (rank 0 writes):
  ``partial`` after half of the bytes reached the temp file, ``synced`` with the temp file complete
  and fsynced but not yet renamed, ``renamed`` right after the rename (a ``step*.ckpt`` written,
  its ``last.ckpt`` not yet).
* ``enospc:K`` — the K-th checkpoint write fails with "No space left on device" after writing
  part of the temp file (the process is not killed: levo-train must report it).

Lightning re-runs this script for the other DDP ranks, so every rank carries the same wrapper.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
from pathlib import Path

import torch

FAULT = os.environ.get("LEVO_FAULT", "")


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.killpg(os.getpgid(0), signal.SIGKILL)


def install() -> None:
    if not FAULT:
        return
    kind, *rest = FAULT.split(":")
    if kind == "step":
        from lightning.pytorch.callbacks import Callback

        import levo_train.run as run_mod

        n, phase = int(rest[0]), rest[1]

        class KillAtStep(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if phase == "start" and trainer.global_step == n - 1:
                    die()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if phase == "end" and trainer.global_step == n:
                    die()

        build = run_mod.build_trainer

        def build_trainer(cfg, run_dir):
            trainer = build(cfg, run_dir)
            trainer.callbacks.append(KillAtStep())  # after ModelCheckpoint: "end" follows the step's writes
            return trainer

        run_mod.build_trainer = build_trainer
    elif kind in ("write", "enospc"):
        import levo_train.checkpointing as ckio

        k = int(rest[0])
        phase = rest[1] if kind == "write" else "enospc"
        real = ckio.atomic_torch_save
        count = [0]

        def atomic_torch_save(obj, path):
            count[0] += 1
            if count[0] != k:
                return real(obj, path)
            path = Path(path)
            if phase == "renamed":
                real(obj, path)
                die()
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # as atomic_torch_save names it
            try:
                with open(tmp, "wb") as f:
                    if phase == "synced":
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                        die()
                    f.write(data[: len(data) // 2])
                    f.flush()
                    if phase == "partial":
                        die()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            finally:  # what atomic_torch_save does on an error
                tmp.unlink(missing_ok=True)

        ckio.atomic_torch_save = atomic_torch_save
    else:
        raise SystemExit(f"fault_runner: unknown LEVO_FAULT {FAULT!r}")


if __name__ == "__main__":
    install()
    from levo_train.cli import main

    sys.exit(main(sys.argv[1:]))
