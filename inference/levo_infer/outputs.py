"""What ``levo-infer`` writes and reads back: its output folders (checked before the model loads),
its song records (``jsonl/<input>.jsonl``: the seed of every token file), and audio decoded in
groups of songs with the same window count.

Kept apart from the command line so that ``levo-infer`` (generation), ``levo-infer decode`` and a
``--skip-existing`` rerun share one reading of the records and one decode loop.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .codec import song_groups
from .errors import LevoInferError
from .jsonl import JsonlError, jsonl_rows

__all__ = ["OutputError", "check_writable", "decode_in_groups", "inside", "read_records", "record_seeds"]


class OutputError(LevoInferError):
    """An output folder that cannot be written, or a records file that cannot be read."""


def check_writable(folder: Path) -> None:
    """Make ``folder`` (and its parents) and create and remove a file in it; :class:`OutputError`
    naming the folder when that fails, so a run finds an unwritable output before its model loads.
    Folders it made are removed again (a run that stops early leaves no empty folders)."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".levo-infer-probe", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        detail = e.strerror or f"{type(e).__name__}: {e}"
        raise OutputError(f"output folder {folder} is not writable: {detail}") from None
    finally:
        for p in made:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved, so links and ``..`` count)."""
    p, f = path.resolve(), folder.resolve()
    return p == f or f in p.parents


def read_records(path: Path) -> list[dict[str, Any]]:
    """The song records of one records file (``[]`` when there is none); :class:`OutputError` naming
    the file and line when a line is not a JSON object."""
    if not path.is_file():
        return []
    rows = []
    try:
        for n, row in jsonl_rows(path):
            if not isinstance(row, dict) or not isinstance(row.get("idx"), str):
                raise OutputError(f"{path}:{n}: not a levo-infer song record (a JSON object with an 'idx')")
            rows.append(row)
    except JsonlError as e:
        raise OutputError(str(e)) from None
    return rows


def record_seeds(records_dir: Path) -> dict[str, int]:
    """Token file name -> the seed its song was generated (and its audio decoded) with, from the
    records levo-infer wrote in ``records_dir`` (``*.jsonl``, not ``*.errors.jsonl``; a newer file's
    record wins where two name the same token file)."""
    seeds: dict[str, int] = {}
    files = [p for p in records_dir.glob("*.jsonl") if not p.name.endswith(".errors.jsonl")] \
        if records_dir.is_dir() else []
    for path in sorted(files, key=lambda p: p.stat().st_mtime):
        for rec in read_records(path):
            if isinstance(rec.get("seed"), int) and isinstance(rec.get("tokens"), list):
                for t in rec["tokens"]:
                    seeds[Path(str(t)).name] = rec["seed"]
    return seeds


def decode_in_groups(codec: Any, tokens: Sequence[Any], seeds: Sequence[int | None],
                     batch_size: int) -> Iterator[tuple[int, Any]]:
    """``(i, waveform or the exception that stopped it)`` for each song ``tokens[i]`` ``[3, T]``,
    decoded with ``seeds[i]`` by ``codec``: up to ``batch_size`` songs with the same window count at
    once (:func:`~levo_infer.codec.song_groups`; the same audio as one at a time). A group that fails
    is decoded again one song at a time, so a bad song (or one too long for the memory) fails alone."""
    for group in song_groups([int(t.shape[-1]) for t in tokens], batch_size):
        if len(group) > 1:
            try:
                wavs = codec.decode_batch([tokens[i] for i in group], [seeds[i] for i in group])
            except Exception:  # noqa: BLE001 - one at a time below, so that a bad song fails alone
                wavs = None
            if wavs is not None:
                yield from zip(group, wavs)
                continue
        for i in group:
            try:
                yield i, codec.decode(tokens[i], seed=seeds[i])
            except Exception as e:  # noqa: BLE001 - reported by the caller for this song alone
                yield i, e
