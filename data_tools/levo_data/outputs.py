"""What a levo-data output folder holds, and the one check every writer makes before it writes.

Each writer resumes or replaces only its own kind of folder (``levo-data shards``: ``catalogue.json``;
``toy``: ``toy_world.json``; ``sample``: ``sample.json``; ``score --out``: ``score.json``; ``pairs``:
pair shards; ``merge``: a model export). A folder that holds data of another kind -- a song shard
folder (``index.json``), shards without an index, a run or an export -- is refused with one line
naming the folder and what it holds, before anything is written: a writer must never delete or
rewrite files it did not write (``levo-data sample --out`` on a song shard folder used to replace its
``index.json``, so every reader then saw only the new songs). An empty or missing folder, or one
holding only unrelated files, is fine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

__all__ = ["KINDS", "FolderContents", "OutputFolderError", "check_output_folder", "folder_contents"]

#: writer kind -> what its folders hold (in messages)
KINDS: dict[str, str] = {
    "catalogue": "training shards of levo-data shards",
    "toy": "the toy world of levo-data toy",
    "candidates": "candidates of levo-data sample",
    "scored": "scored songs of levo-data score",
    "pairs": "preference pairs",
    "export": "a model export",
}
#: marker file -> the kind of folder it marks (checked in this order)
_MARKERS: tuple[tuple[str, str], ...] = (("sample.json", "candidates"), ("catalogue.json", "catalogue"),
                                         ("toy_world.json", "toy"), ("score.json", "scored"))
_EXPORT_FILES = ("model.pt", "model.safetensors", "reward.pt", "config.yaml")


class OutputFolderError(UsageError):
    """An output folder that holds data of another kind (a usage error: exit status 2)."""


@dataclass(frozen=True)
class FolderContents:
    """The kind of data a folder holds (a key of :data:`KINDS`, or ``songs`` / ``shards`` / ``run`` /
    ``levo-infer``) and a description naming the evidence."""

    kind: str
    what: str


def _index_contents(index: Path) -> FolderContents:
    """What an ``index.json`` lists: song or pair shards (counts), or an unreadable index."""
    try:
        data = json.loads(index.read_text())
        fmt, shards = data.get("format"), data["shards"]
        records = sum(int(s["records"]) for s in shards)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return FolderContents("shards", f"shards with an unreadable {index.name}")
    if fmt == "levo-pairs":
        return FolderContents("pairs", f"preference pairs ({index.name}: {records} pairs in {len(shards)} shards)")
    return FolderContents("songs", f"song shards ({index.name}: {records} songs in {len(shards)} shards)")


def folder_contents(path: str | os.PathLike) -> FolderContents | None:
    """What ``path`` holds (see the module docstring); None for a missing or empty folder, or one
    holding nothing levo-data recognises."""
    p = Path(path)
    if not p.exists():
        return None
    if not p.is_dir():
        return FolderContents("file", "a file, not a folder")
    for name, kind in _MARKERS:
        if (p / name).is_file():
            return FolderContents(kind, f"{KINDS[kind]} ({name})")
    found = [n for n in _EXPORT_FILES if (p / n).is_file()]
    if found:
        return FolderContents("export", f"{KINDS['export']} ({' / '.join(found)})")
    if (p / "index.json").is_file():
        return _index_contents(p / "index.json")
    for split in ("train", "val"):
        if (p / split / "index.json").is_file():
            held = _index_contents(p / split / "index.json")
            return FolderContents(held.kind, held.what.replace("(index.json", f"({split}/index.json"))
    tars = [t for d in (p, p / "train", p / "val") if d.is_dir() for t in d.glob("*.tar")]
    if tars:
        where = sorted({t.parent.name + "/" if t.parent != p else "" for t in tars})
        return FolderContents("shards", f"{len(tars)} .tar shards without an index.json (in {', '.join(where) or './'})")
    if (p / "summary.json").is_file() or (p / "checkpoints").is_dir():
        return FolderContents("run", "a levo-train run (summary.json / checkpoints/)")
    if (p / "tokens").is_dir() and (p / "jsonl").is_dir():
        return FolderContents("levo-infer", "levo-infer output (tokens/, jsonl/)")
    return None


def check_output_folder(path: str | os.PathLike, kind: str, *, command: str, flag: str = "--out") -> None:
    """Raise :class:`OutputFolderError` when ``path`` holds data of another kind than ``kind`` (a key
    of :data:`KINDS`) -- before ``command`` writes anything there."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; known: {', '.join(KINDS)}")
    held = folder_contents(path)
    if held is None or held.kind == kind:
        return
    raise OutputFolderError(f"{flag} {path} holds {held.what}, not {KINDS[kind]}: levo-data {command} writes only "
                            f"into a new or empty folder or one of its own, so nothing was written; choose another "
                            f"{flag}")
