"""Checkpoint IO: atomic checkpoint files and folders, their completion markers and checksums.

Every checkpoint levo-train writes is complete or absent:

* a one-file checkpoint (``auto`` / ``ddp``) goes through :class:`AtomicCheckpointIO`: a temp file
  beside the target, fsynced, renamed over it;
* a sharded checkpoint folder (FSDP2's DCP folders, DeepSpeed's ZeRO folders, written by
  :mod:`levo_train.strategies`) goes through :func:`save_folder_atomically`: every rank fills a temp
  folder, rank 0 writes the marker :data:`COMPLETE` last and renames the folder into place.

:data:`COMPLETE` lists every file of the folder under ``checksums`` with its size and sha256 (a
torch file: its size and ``zip-crc32``, checked through the CRCs torch stores in it; see
:mod:`levo_infer.integrity`). Every rank hashes its share of the files right after the write;
:func:`verify_checkpoint` checks them all before a checkpoint is resumed or exported, so a lost,
truncated or corrupted rank file makes the checkpoint one that "does not load".
:func:`clean_stale_temp_files` removes what a writer killed mid-write left behind.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import re
import shutil
import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from levo_infer.checkpoint import atomic_torch_save
from levo_infer.integrity import (
    IntegrityError,
    file_entry,
    manifest_entries,
    verify_entries,
    verify_torch_zip,
)
from levo_infer.jsonio import atomic_file
from levo_infer.jsonio import dumps as strict_dumps

log = logging.getLogger(__name__)

#: the marker that makes a sharded checkpoint folder complete; written last, by rank 0
COMPLETE = "levo_complete.json"
#: the non-tensor part of a DCP checkpoint (Lightning's name)
META = "meta.pt"


# ----------------------------------------------------------------------------- streamed torch files
#: the storage class torch's pickle names for each dtype (``torch.save`` writes the same)
_STORAGE = {torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
            torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
            torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage"}
_ALIGN = 64                # torch.save aligns every record's data to 64 bytes (what mmap loads expect)
_WRITE_CHUNK = 64 << 20    # bytes handed to the zip writer at a time


class _Storage:
    """A storage placeholder in the pickle: its persistent id is what ``torch.save`` writes."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """A tensor placeholder pickled as ``torch._utils._rebuild_tensor_v2`` over a :class:`_Storage`."""

    def __init__(self, storage: _Storage, shape: Sequence[int]) -> None:
        self.storage, self.shape = storage, tuple(int(x) for x in shape)

    def __reduce__(self) -> Any:
        stride, acc = [], 1
        for n in reversed(self.shape):
            stride.append(acc)
            acc *= n
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:  # noqa: D102
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> tuple[zipfile.ZipInfo, bool]:
    """A stored (uncompressed) zip entry whose data will start on a :data:`_ALIGN`-byte boundary
    (padding in a local-header extra field, as torch's own writer does)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    start = zf.fp.tell()  # type: ignore[union-attr]
    base = start + 30 + len(name.encode("ascii")) + 4 + (20 if zip64 else 0)
    pad = -base % _ALIGN
    info.extra = struct.pack("<HH", 0x4C56, pad) + b"\0" * pad
    return info, zip64


def write_torch_stream(path: str | os.PathLike, entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                       get: Callable[[str], torch.Tensor]) -> Path:
    """Write a flat ``{name: tensor}`` file that ``torch.load`` (``weights_only``, ``mmap``) reads
    exactly as one ``torch.save`` wrote, without ever holding the dict: ``entries`` (name, shape,
    dtype) are known up front, and each tensor is asked of ``get(name)`` only when its record is
    written, then dropped. Peak memory: one tensor. Atomic (temp file, fsync, rename), records aligned
    as torch aligns them, each with its CRC-32 (:func:`levo_infer.integrity.verify_torch_zip`)."""
    path = Path(path)
    arch = path.stem or "archive"
    refs = {}
    for i, (name, shape, dtype) in enumerate(entries):
        if dtype not in _STORAGE:
            raise ValueError(f"{path}: cannot stream a tensor of dtype {dtype} ({name})")
        numel = 1
        for n in shape:
            numel *= int(n)
        refs[name] = _TensorRef(_Storage(str(i), dtype, numel), shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(refs)
    # the archive closes (its central directory written) before atomic_file fsyncs and renames
    with atomic_file(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        def record(rname: str, data: bytes) -> None:
            info, zip64 = _aligned_info(zf, f"{arch}/{rname}", len(data))
            with zf.open(info, "w", force_zip64=zip64) as w:
                w.write(data)

        record("data.pkl", buf.getvalue())
        record(".format_version", b"1")
        record(".storage_alignment", str(_ALIGN).encode())
        record("byteorder", b"little")
        for name, _shape, dtype in entries:
            ref = refs[name]
            t = get(name)
            if tuple(t.shape) != ref.shape or t.dtype != dtype:
                raise ValueError(f"{path}: {name} is {tuple(t.shape)} {t.dtype}, expected {ref.shape} {dtype}")
            flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            info, zip64 = _aligned_info(zf, f"{arch}/data/{ref.storage.key}", flat.numel())
            with zf.open(info, "w", force_zip64=zip64) as w:
                for a in range(0, flat.numel(), _WRITE_CHUNK):
                    w.write(flat[a:a + _WRITE_CHUNK].numpy().data)
            del t, flat
        record("version", b"3\n")
    return path


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, quota, I/O error); the previous checkpoints are intact."""


class CheckpointCorrupt(ValueError):
    """A checkpoint whose bytes fail their checksums, or a sharded folder that is incomplete (no
    :data:`COMPLETE`); the message names the file. Such a checkpoint "does not load"."""


# ----------------------------------------------------------------------------- files and folders
def remove_checkpoint_path(path: str | os.PathLike) -> None:
    """Remove a checkpoint: a file, or a sharded checkpoint's folder."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_files(folder: str | os.PathLike) -> list[str]:
    """The files of a checkpoint folder (relative paths, sorted), the marker excluded."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def write_complete_marker(folder: str | os.PathLike, *, fmt: str, world_size: int, global_step: Any,
                          checksums: dict[str, Any] | None = None) -> None:
    """Write :data:`COMPLETE` into a checkpoint folder whose ranks have all written (call last).
    ``checksums``: every file's manifest entry (:func:`folder_checksums`); computed here when None."""
    folder = Path(folder)
    files = folder_files(folder)
    if checksums is None:
        checksums = manifest_entries(folder, files)
    marker = {"format": fmt, "world_size": world_size, "global_step": global_step, "files": files,
              "checksums": checksums}
    (folder / COMPLETE).write_text(strict_dumps(marker, indent=1))
    _fsync_dir(folder)


def folder_checksums(strategy: Any, folder: Path) -> dict[str, Any]:
    """Manifest entries of every file of a just-written checkpoint folder: rank 0 lists the files,
    rank r hashes files r, r + W, ... (the large ones are the ranks' own shards), rank 0 gathers."""
    files = strategy.broadcast(folder_files(folder) if strategy.global_rank == 0 else None)
    world, rank = int(strategy.world_size), int(strategy.global_rank)
    mine = {rel: file_entry(folder / rel) for rel in files[rank::world]}
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return mine if world == 1 else {rel: file_entry(folder / rel) for rel in files}
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, mine)
    return {k: v for part in every for k, v in part.items()}


def save_folder_atomically(strategy: Any, filepath: Any, write: Any, *, fmt: str, global_step: Any) -> None:
    """Write a sharded checkpoint folder so that it is either complete or absent: every rank's
    ``write(tmp)`` fills a temp folder beside the target; after a barrier rank 0 writes
    :data:`COMPLETE` (last) and renames the folder into place, replacing an older one of that name
    only then. A failed write removes the temp folder and raises :class:`CheckpointWriteError`;
    the previous checkpoints are intact."""
    path = Path(strategy.broadcast(str(filepath)))
    tmp = path.with_name(f".{path.name}.tmp{strategy.broadcast(os.getpid())}")
    rank0 = strategy.global_rank == 0
    try:
        if rank0:
            remove_checkpoint_path(tmp)
            tmp.mkdir(parents=True)
        strategy.barrier("levo-ckpt-mkdir")
        write(tmp)
        strategy.barrier("levo-ckpt-written")
        checksums = folder_checksums(strategy, tmp)
        if rank0:
            write_complete_marker(tmp, fmt=fmt, world_size=strategy.world_size, global_step=global_step,
                                  checksums=checksums)
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            remove_checkpoint_path(old)
            _fsync_dir(path.parent)
    except OSError as e:
        if rank0:
            remove_checkpoint_path(tmp)
        raise CheckpointWriteError(e.errno, f"writing sharded checkpoint {path} failed ({e.strerror or e}); the "
                                   "previous checkpoints are intact. Free space (or fix the folder) and continue "
                                   "with resume=true") from e
    finally:
        strategy.barrier("levo-ckpt-done")


def clean_stale_temp_files(folder: str | os.PathLike) -> int:
    """Remove temp files (and sharded-checkpoint temp folders) left by a writer that was killed
    mid-write; returns how many. A sharded checkpoint set aside while its replacement was renamed
    in (``.NAME.oldPID``) is put back when the replacement never arrived, removed otherwise."""
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


# ----------------------------------------------------------------------------- integrity
def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every byte of a checkpoint against the checksums written with it; :class:`CheckpointCorrupt`
    naming the file that fails. A file: the CRC-32 of each zip record (every tensor and the pickled
    rest). A folder: every file :data:`COMPLETE` lists is there, with its size and checksum (sha256,
    or a torch file's own CRCs); a marker of an older levo-train without checksums: every file it
    lists is there and its torch files pass their CRCs. Each file is read once per process."""
    p = Path(path)
    try:
        if p.is_file():
            if not verify_torch_zip(p):
                log.warning("%s carries no checksums (torch's legacy format, or saved with CRC-32s turned off): "
                            "its bytes cannot be verified", p)
            return
        marker = p / COMPLETE
        if not marker.is_file():
            raise CheckpointCorrupt(f"incomplete sharded checkpoint: no {COMPLETE} (a rank did not finish writing it)")
        try:
            doc = json.loads(marker.read_text())
            files = doc["files"]
            sums = doc.get("checksums")
            if not isinstance(files, list) or not (sums is None or isinstance(sums, dict)):
                raise TypeError("`files` must be a list, `checksums` an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointCorrupt(f"{marker}: unreadable completion marker ({e})") from None
        if sums is not None:
            verify_entries(p, sums, listed_in=str(marker))
            return
        log.warning("%s: written by an older levo-train without checksums: only the presence of its files and "
                    "the CRC-32s of its torch files are checked", p)
        for rel in files:
            f = p / str(rel)
            if not f.is_file():
                raise IntegrityError(f"{f} is missing: {marker} lists it as part of this checkpoint")
            if f.suffix == ".pt":  # meta.pt, DeepSpeed's *_states.pt: torch.save files
                verify_torch_zip(f)
    except IntegrityError as e:
        raise CheckpointCorrupt(str(e)) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written file: it writes a temp file in the
    target folder, fsyncs it and renames it over the target (``os.replace`` is atomic). A failed
    write (a full disk) removes the temp file and raises :class:`CheckpointWriteError` naming the
    file and the cause; the checkpoint it would have replaced is untouched.

    Integrity: torch stores a CRC-32 of every zip record (each tensor storage, the pickled rest) in
    the file; a load through this IO checks them all first (:func:`verify_checkpoint`, once per
    process: the resume vetting has usually done it already), so corrupted bytes are an error
    naming the file, never weights loaded silently."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
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


__all__ = ["COMPLETE", "META", "AtomicCheckpointIO", "CheckpointCorrupt", "CheckpointWriteError", "write_torch_stream",
           "clean_stale_temp_files", "folder_checksums", "folder_files", "remove_checkpoint_path",
           "save_folder_atomically", "verify_checkpoint", "write_complete_marker"]
