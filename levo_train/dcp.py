"""Torch distributed-checkpoint (DCP) folders, read without running code from them.

torch's own ``FileSystemReader`` reads a DCP folder's ``.metadata`` with a plain ``pickle.load``,
and its ``DefaultLoadPlanner`` unpickles every non-tensor item of a ``__R_0.distcp`` shard (an
optimizer's ``lr``, ``betas``, ...) with ``torch.load(weights_only=False)``: a crafted folder would
run its payload on every rank that resumes from it, or in ``levo-train export``. Here instead:

* :func:`read_metadata`: ``.metadata`` through :class:`levo_infer.safe_load.RestrictedUnpickler`
  with exactly the classes a DCP metadata file holds (:func:`metadata_globals`), then checked
  (types, shard names inside the folder, byte ranges inside the shards);
* :class:`SafeReader` / :class:`SafePlanner`: torch's reader and planner with those two reads
  replaced (the non-tensor items go through ``weights_only=True``); tensor items torch already
  reads ``weights_only``. Every error is a :class:`~levo_infer.checkpoint.CheckpointError` naming
  the file;
* :func:`check_folder`: all of that up front, without reading a tensor (the metadata, every
  shard's presence and size, every non-tensor item), so that a resume or an export refuses a bad
  folder before anything is built; :func:`load` for the reads themselves (every rank of an FSDP2
  resume, the one process of an export).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import pickle
import re
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as fs
from torch.distributed.checkpoint import metadata as md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.futures import Future

from levo_infer.checkpoint import CheckpointError
from levo_infer.safe_load import REFUSED, error_detail, restricted_unpickle, torch_load

#: DCP's metadata file name (torch's ``_metadata_fn``)
METADATA = ".metadata"
#: the shard files DCP's FileSystemWriter names (one per rank; ``__<rank>_<n>.distcp``)
SHARD_RE = re.compile(r"^__\d+_\d+\.distcp$")


@cache
def metadata_globals() -> dict[tuple[str, str], Any]:
    """Every global a DCP ``.metadata`` pickle of torch 2.x holds: DCP's metadata dataclasses, the
    file reader's storage info, ``torch.Size``, torch's dtypes and layouts, the checkpoint id's path."""
    allowed: dict[tuple[str, str], Any] = {}
    for obj in (md.Metadata, md.TensorStorageMetadata, md.BytesStorageMetadata, md.ChunkStorageMetadata,
                md.TensorProperties, md.MetadataIndex, md.StorageMeta, md._MEM_FORMAT_ENCODING, fs._StorageInfo,
                torch.Size, torch.serialization._get_layout, pathlib.PosixPath, pathlib.PurePosixPath, OrderedDict):
        allowed[(obj.__module__, obj.__name__)] = obj
    for name, obj in vars(torch).items():
        if isinstance(obj, torch.dtype):
            allowed[("torch", name)] = obj
    return allowed


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a torch distributed-checkpoint metadata file: {what}")


def read_metadata(folder: str | os.PathLike) -> Any:
    """``folder/.metadata`` read without running code and checked: the DCP ``Metadata`` whose every
    storage item lies inside a shard file of this folder; :class:`CheckpointError` naming the file."""
    folder = Path(folder)
    p = folder / METADATA
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (every torch distributed checkpoint has one)")
    meta = restricted_unpickle(p, metadata_globals(), error=CheckpointError)
    if not isinstance(meta, md.Metadata):
        raise _bad(p, f"it holds a {type(meta).__name__}")
    items = meta.state_dict_metadata
    if not isinstance(items, dict) or not all(
            isinstance(k, str) and isinstance(v, (md.TensorStorageMetadata, md.BytesStorageMetadata))
            for k, v in items.items()):
        raise _bad(p, "state_dict_metadata is not a mapping of names to tensor / bytes entries")
    for k, v in items.items():
        if isinstance(v, md.TensorStorageMetadata) and not (
                isinstance(v.size, torch.Size) and isinstance(v.properties, md.TensorProperties)
                and isinstance(v.properties.dtype, torch.dtype) and isinstance(v.chunks, list)
                and all(isinstance(c, md.ChunkStorageMetadata) for c in v.chunks)):
            raise _bad(p, f"the entry of {k!r} is malformed")
    storage = meta.storage_data
    if not isinstance(storage, dict):
        raise _bad(p, "no storage_data mapping")
    sizes: dict[str, int] = {}
    for idx, info in storage.items():
        if not isinstance(idx, md.MetadataIndex) or not isinstance(info, fs._StorageInfo):
            raise _bad(p, "storage_data is not a mapping of DCP indices to storage infos")
        name = info.relative_path
        if not isinstance(name, str) or not SHARD_RE.match(name):
            raise _bad(p, f"item {idx.fqn!r} points at {name!r}, not a shard file of this folder (__R_N.distcp)")
        if info.transform_descriptors:
            raise _bad(p, f"item {idx.fqn!r} asks for load transforms {list(info.transform_descriptors)} "
                          "(levo-train never writes any)")
        if name not in sizes:
            shard = folder / name
            if not shard.is_file():
                raise CheckpointError(f"{shard}: missing: {p} lists items in it (a rank's shard was not copied?)")
            sizes[name] = shard.stat().st_size
        off, n = info.offset, info.length
        if not (type(off) is int and type(n) is int and off >= 0 and n >= 0 and off + n <= sizes[name]):
            raise CheckpointError(f"{folder / name}: item {idx.fqn!r} at bytes [{off}, {off}+{n}) lies outside the "
                                  f"file ({sizes[name]} bytes): truncated, or from another checkpoint")
    return meta


class SafeReader(FileSystemReader):
    """torch's ``FileSystemReader`` with ``.metadata`` read by :func:`read_metadata` and every read
    error naming its shard file. ``read_metadata`` takes no ``rank``: DCP then never falls back to
    per-rank metadata files (levo-train writes none)."""

    def __init__(self, path: str | os.PathLike, metadata: Any = None) -> None:
        super().__init__(path)
        self.folder = Path(path)
        self._metadata = metadata

    def read_metadata(self) -> Any:  # type: ignore[override]
        if self._metadata is None:
            self._metadata = read_metadata(self.folder)
        meta = self._metadata
        if meta.storage_meta is None:
            meta.storage_meta = md.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta

    def read_data(self, plan: Any, planner: Any) -> Future:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except CheckpointError as e:
                raise CheckpointError(f"{self.folder / name}: {e}") from None
            except pickle.UnpicklingError as e:  # a tensor item (torch reads those weights_only itself)
                raise CheckpointError(f"{self.folder / name}: {REFUSED} ({error_detail(e)})") from None
            except Exception as e:  # noqa: BLE001 - a truncated item
                raise CheckpointError(f"{self.folder / name}: cannot read its items ({type(e).__name__}: "
                                      f"{error_detail(e)})") from None
        fut: Future = Future()
        fut.set_result(None)
        return fut


class SafePlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor items are unpickled ``weights_only``: the plain value
    (a float, a tuple, a list of names) is then handed on re-serialized, so torch's own
    ``load_bytes`` only ever sees bytes we wrote from a checked value."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = _load_item(value, read_item.dest_index.fqn)
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def _load_item(value: io.BytesIO, fqn: str) -> Any:
    return torch_load(value, error=CheckpointError, where=f"item {fqn!r}")


def check_folder(folder: str | os.PathLike) -> Any:
    """Everything of a DCP folder that could run code or point elsewhere, checked without reading a
    tensor: :func:`read_metadata` (shards present, byte ranges inside them) and every non-tensor
    item unpickled ``weights_only``. Returns the metadata; :class:`CheckpointError` naming the file."""
    folder = Path(folder)
    meta = read_metadata(folder)
    byte_keys = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, md.BytesStorageMetadata)}
    handles: dict[str, Any] = {}
    try:
        for idx, info in meta.storage_data.items():
            if idx.fqn not in byte_keys:
                continue
            f = handles.get(info.relative_path)
            if f is None:
                f = handles[info.relative_path] = open(folder / info.relative_path, "rb")
            f.seek(info.offset)
            try:
                _load_item(io.BytesIO(f.read(info.length)), idx.fqn)
            except CheckpointError as e:
                raise CheckpointError(f"{folder / info.relative_path}: {e}") from None
    finally:
        for f in handles.values():
            f.close()
    return meta


def load(state: dict[str, Any], folder: str | os.PathLike, *, no_dist: bool = False, metadata: Any = None) -> None:
    """``torch.distributed.checkpoint.load(state, ...)`` from ``folder`` through :class:`SafeReader`
    and :class:`SafePlanner` (collective unless ``no_dist``). ``metadata``: what :func:`check_folder`
    returned for this folder already (a reader of many small pieces checks it once). A failure on
    any rank is the :class:`CheckpointError` naming the file, on every rank."""
    reader = SafeReader(folder, metadata if metadata is not None else check_folder(folder))
    try:
        torch_dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, CheckpointError):
                raise exc from None
        first = next(iter(e.failures.values()))[0]
        raise CheckpointError(f"{folder}: cannot be loaded ({type(first).__name__}: {first})") from None


__all__ = ["METADATA", "SafePlanner", "SafeReader", "check_folder", "load", "metadata_globals", "read_metadata"]
