"""Crafted files for the no-code-execution tests: a pickle payload that creates a marker file when
unpickled, planted into each kind of file a user can hand us.

Each ``plant_*`` keeps the file loadable by the unchecked reader it targets (``torch.load`` with
``weights_only=False``, ``pickle.load``): were the payload unpickled, the marker would appear and
the load would go on. The originals read here are our own test files (trusted).

A hostile user controls every file of what they hand us, the checksums included: each ``plant_*``
re-signs what it changed (:func:`resign`: the folder's ``checksums.json`` or completion marker, a
shard record's ``sha256`` member), so the defence under test is the loader's own, not the digest
that would otherwise refuse the edited file first.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch


def resign(path: Path) -> None:
    """Make the checksums that cover ``path`` match its new bytes, as an attacker would: the
    ``checksums.json`` of its folder (an export, a reward export, adapters) or the completion
    marker of the sharded checkpoint folder it lies in (DCP, ZeRO). Nothing when none covers it."""
    import json

    from levo_infer.integrity import MANIFEST, clear_memo, manifest_entries, write_manifest
    from levo_train.checkpointing import COMPLETE

    path = Path(path)
    for folder in [path if path.is_dir() else path.parent, *path.parents]:
        if (folder / MANIFEST).is_file():
            doc = json.loads((folder / MANIFEST).read_text())
            write_manifest(folder, doc["files"])
            break
        if (folder / COMPLETE).is_file():
            marker = json.loads((folder / COMPLETE).read_text())
            if "checksums" in marker:
                marker["checksums"] = manifest_entries(folder, marker["checksums"])
            (folder / COMPLETE).write_text(json.dumps(marker, indent=1))
            break
    clear_memo()


def resign_tar(tar: Path) -> None:
    """Recompute the ``sha256`` member of every record of a webdataset shard that has one."""
    import tarfile

    from levo_train.data.shards import DIGEST_MEMBER, record_digest

    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]  # type: ignore[union-attr]
    records: dict[str, dict[str, bytes]] = {}
    for m, data in members:
        key, _, ext = m.name.partition(".")
        if data is not None:
            records.setdefault(key, {})[ext] = data
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            key, _, ext = m.name.partition(".")
            if ext == DIGEST_MEMBER:
                data = record_digest(key, records[key]).encode()
                m.size = len(data)
            t.addfile(m, io.BytesIO(data) if data is not None else None)


class Payload:
    """Unpickles to ``Path(marker).touch()``: code from the file ran."""

    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def payload_bytes(marker: str | Path) -> bytes:
    """A ``torch.save`` of the payload alone (what a DCP non-tensor item holds)."""
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    return buf.getvalue()


def plant_in_torch_file(path: Path, marker: str | Path) -> None:
    """Rewrite a ``torch.save`` dict file with the payload as one more entry of its ``data.pkl``."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    obj = dict(obj) if isinstance(obj, dict) else {"original": obj}
    obj["__payload__"] = Payload(marker)
    torch.save(obj, path)
    resign(path)


def plant_in_dcp_metadata(folder: Path, marker: str | Path) -> None:
    """Pickle the payload into a DCP ``.metadata`` (in ``storage_meta.modules``): torch's reader
    would run it and return valid metadata."""
    p = folder / ".metadata"
    with open(p, "rb") as f:
        md = pickle.load(f)
    md.storage_meta.modules = [Payload(marker)]
    p.write_bytes(pickle.dumps(md))
    resign(p)


def plant_in_dcp_shard(folder: Path, marker: str | Path, shard: str, *, key: str | None = None) -> str:
    """Move one item of a DCP folder into shard file ``shard`` (appended there) as the payload and
    point ``.metadata`` at it. The item is a non-tensor one (an optimizer's ``lr``: DCP's planner
    unpickles those with ``weights_only=False``) unless ``key`` names another; returns its name."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    p = folder / ".metadata"
    with open(p, "rb") as f:
        md = pickle.load(f)
    if key is None:
        key = next(k for k, v in md.state_dict_metadata.items()
                   if isinstance(v, BytesStorageMetadata) and k.endswith(".lr"))
    idx = next(i for i in md.storage_data if i.fqn == key)
    target = folder / shard
    data = payload_bytes(marker)
    info = md.storage_data[idx]
    info.relative_path, info.offset, info.length = shard, target.stat().st_size, len(data)
    with open(target, "ab") as f:
        f.write(data)
    p.write_bytes(pickle.dumps(md))
    resign(p)
    return key


YAML_PAYLOADS = {
    "eval_bomb": "${eval:9**9**9}",
    "env": "${oc.env:HOME}",
    "abs_yaml": "${load_yaml:/etc/hostname}",
    "escaping_yaml": "${load_yaml:../../secret.yaml}",
    "nested_name": "${${name}:HOME}",
}


def plant_in_yaml(path: Path, key: str, value: str) -> None:
    """Set dotted ``key`` of a YAML config file to the raw string ``value`` (a resolver call)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    OmegaConf.update(cfg, key, value, force_add=True)
    path.write_text(OmegaConf.to_yaml(cfg))
    resign(path)


def python_object_yaml(marker: str | Path) -> str:
    """A YAML document that PyYAML's unsafe loader would turn into a call creating the marker."""
    return f"lm: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"


def payload_npy(marker: str | Path) -> bytes:
    """A ``.npy`` of an object array holding the payload (``np.load(allow_pickle=True)`` would run it)."""
    import numpy as np

    arr = np.empty(1, dtype=object)
    arr[0] = Payload(marker)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def plant_in_shard(tar: Path, member_suffix: str, marker: str | Path) -> str:
    """Replace the first ``*.<member_suffix>`` member of a webdataset shard with :func:`payload_npy`
    (same member name, same record); returns the member's name."""
    import tarfile

    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]  # type: ignore[union-attr]
    name = next(m.name for m, _ in members if m.name.endswith("." + member_suffix))
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            if m.name == name:
                data = payload_npy(marker)
                m.size = len(data)
            t.addfile(m, io.BytesIO(data) if data is not None else None)
    resign_tar(tar)
    return name
