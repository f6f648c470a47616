"""Strict JSON: the one writer of every JSON file (and JSON line) levo-infer, levo-train, levo-data
and levo-eval produce.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` for non-finite floats, which is not
JSON (RFC 8259): jq, browsers, Go, Rust and most other readers refuse such a file. Nothing we write
may hold them, and what a non-finite value means decides what happens to it:

* ``nonfinite="error"`` (the default): a non-finite number is a fault upstream (a diverged loss, a
  broken scorer, corrupt reference log-probs). :func:`dumps` refuses it with a
  :class:`NonFiniteJSONError` naming where in the object it sits (``$.scores.overall``), and nothing
  is written. Callers that know a value may be *missing* (no validation ran, a mean over no
  candidates) put ``None`` there themselves (:func:`finite_or_none`).
* ``nonfinite="null"``: for metric reports whose numbers may be undefined by nature (a rank
  correlation of constant predictions, a distance between sets too small to estimate it): written
  as ``null``, JSON's "no value".

Standard library only (levo_infer imports no training stack).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import LevoInferError

NONFINITE_MODES = ("error", "null")


class NonFiniteJSONError(LevoInferError):
    """A value to be written as JSON is NaN or infinite; ``where`` is its path in the object."""

    def __init__(self, value: float, where: str, what: str | None = None) -> None:
        self.value, self.where = value, where
        head = f"{what}: " if what else ""
        super().__init__(f"{head}{value} at {where} is not a finite number (JSON has no NaN/Infinity); refusing "
                         "to write it")


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` when it is a finite number, else None (a value that is missing or undefined)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _walk(obj: Any, where: str, mode: str, what: str | None) -> Any:
    """``obj`` with non-finite floats replaced by None (``null``), or the first one refused (``error``)."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if mode == "null":
            return None
        raise NonFiniteJSONError(obj, where, what)
    if isinstance(obj, dict):
        return {k: _walk(v, f"{where}.{k}", mode, what) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_walk(v, f"{where}[{i}]", mode, what) for i, v in enumerate(obj)]
    return obj


def dumps(obj: Any, *, nonfinite: str = "error", what: str | None = None, **kw: Any) -> str:
    """``json.dumps(obj, **kw)`` that never writes NaN/Infinity (see the module docstring for
    ``nonfinite``); ``what`` names the file or record in the error."""
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={nonfinite!r}: expected one of {NONFINITE_MODES}")
    if nonfinite == "null":
        obj = _walk(obj, "$", "null", what)
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError as e:
        if "JSON compliant" not in str(e):
            raise
        _walk(obj, "$", "error", what)  # raises NonFiniteJSONError naming the place
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through, all or nothing: a per-process temp file beside it,
    fsynced once the ``with`` body (and whatever it wrapped around the file) has finished, then renamed
    over ``path``; on an error the temp file is removed and ``path`` left as it was (several ranks may
    write the same file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) at ``path``, all or nothing (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False, indent: int | None = 1,
                      nonfinite: str = "error", ensure_ascii: bool = True) -> None:
    """``obj`` as strict JSON at ``path``, written atomically (:func:`write_text_atomic`); a
    non-finite value is refused before anything is written (or ``null`` with ``nonfinite="null"``)."""
    text = dumps(obj, nonfinite=nonfinite, what=str(path), sort_keys=sort_keys, indent=indent,
                 ensure_ascii=ensure_ascii)
    write_text_atomic(path, text + "\n")


def jsonl_text(rows: Iterable[Any], *, nonfinite: str = "error", what: str | None = None,
               ensure_ascii: bool = True) -> str:
    """One strict JSON object per line (every line ends with a newline)."""
    return "".join(dumps(r, nonfinite=nonfinite, what=what, ensure_ascii=ensure_ascii) + "\n" for r in rows)


__all__ = ["NONFINITE_MODES", "NonFiniteJSONError", "dumps", "finite_or_none", "jsonl_text", "write_json_atomic",
           "write_text_atomic"]
