"""Atomic checkpoint writes and run-folder checkpoint helpers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from levo_infer.checkpoint import atomic_torch_save

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, quota, I/O error); the previous checkpoints are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written file: it writes a temp file in the
    target folder, fsyncs it and renames it over the target (``os.replace`` is atomic). A failed
    write (a full disk) removes the temp file and raises :class:`CheckpointWriteError` naming the
    file and the cause; the checkpoint it would have replaced is untouched.

    Integrity: torch stores a CRC-32 of every zip record (each tensor storage, the pickled rest) in
    the file; a load through this IO checks them all first (:func:`levo_train.export.verify_checkpoint`,
    once per process: the resume vetting has usually done it already), so corrupted bytes are an
    error naming the file, never weights loaded silently."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        from levo_train.export import verify_checkpoint

        verify_checkpoint(path)
        if map_location is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(checkpoint, path)
        except OSError as e:
            kept = "the previous checkpoint under that name is intact" if path.exists() else "no file was left"
            raise CheckpointWriteError(e.errno, f"writing checkpoint {path} failed ({e.strerror or e}); {kept}. "
                                       "Free space (or fix the folder) and continue with resume=true") from e


def clean_stale_temp_files(folder: str | os.PathLike) -> int:
    """Remove temp files (and sharded-checkpoint temp folders) left by a writer that was killed
    mid-write; returns how many. A sharded checkpoint set aside while its replacement was renamed
    in (``.NAME.oldPID``) is put back when the replacement never arrived, removed otherwise."""
    import re

    from levo_train.strategies import remove_checkpoint_path

    n = 0
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp*"):
            remove_checkpoint_path(p)
            n += 1
        for p in folder.glob(".*.old*"):
            m = re.match(r"^\.(.+)\.old\d+$", p.name)
            if m and not (folder / m.group(1)).exists():
                os.replace(p, folder / m.group(1))
                log.warning("restored checkpoint %s (its replacement was never completed)", folder / m.group(1))
            else:
                remove_checkpoint_path(p)
                n += 1
    if n:
        log.warning("removed %d incomplete checkpoint temp file(s) in %s", n, folder)
    return n
