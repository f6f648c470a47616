"""The one JSONL reader of every levo tool (levo-infer inputs, levo-data manifests and prompts,
levo-eval lyric / audio / request files, levo-infer's own records).

A line is what ends at ``"\\n"`` (a ``"\\r\\n"`` end is accepted) and nothing else: JSON allows
U+2028, U+2029 and U+0085 raw inside strings (levo-infer writes them so, with ``ensure_ascii=False``),
and ``str.splitlines()`` would break a record there. A UTF-8 byte-order mark at the start of the
file is skipped. Blank lines (JSON whitespace only) are skipped but counted, so line numbers are
the file's. Lines are read one at a time and at most :func:`max_line_bytes` bytes of a line are ever
held: a longer line is an error naming the file and the line, and the rest of it is skipped
unread into memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import LevoInferError

__all__ = ["DEFAULT_MAX_LINE_BYTES", "MAX_LINE_ENV", "JsonlError", "jsonl_lines", "jsonl_rows", "max_line_bytes",
           "parse_json_line"]

#: Bytes one line may hold (without its line end): a song's record is a few kB
DEFAULT_MAX_LINE_BYTES = 1 << 20
#: Environment variable that raises (or lowers) the line-size limit, in bytes
MAX_LINE_ENV = "LEVO_JSONL_MAX_LINE_BYTES"
_BOM = b"\xef\xbb\xbf"
_JSON_WHITESPACE = " \t\r\n"
_SKIP_CHUNK = 1 << 16


class JsonlError(LevoInferError):
    """A JSONL file or line that cannot be read: ``path``, ``line`` (1-based; None for the whole
    file), ``message`` and ``reason`` (``unreadable``, ``line_too_long``, ``not_utf8`` or
    ``invalid_json``); ``str()`` is ``path:line: message``."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str, reason: str = "unreadable") -> None:
        self.path, self.line, self.message, self.reason = str(path), line, message, reason
        super().__init__(f"{self.path}:{line}: {message}" if line is not None else f"{self.path}: {message}")


def max_line_bytes() -> int:
    """The line-size limit: :data:`MAX_LINE_ENV` when set (a positive integer), else 1 MiB."""
    raw = os.environ.get(MAX_LINE_ENV)
    if not raw:
        return DEFAULT_MAX_LINE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_LINE_ENV}={raw!r}: expected a positive number of bytes")
    return value


def jsonl_lines(path: str | os.PathLike, *, max_bytes: int | None = None) -> Iterator[tuple[int, str | JsonlError]]:
    """``(line number, text)`` of each non-blank line of ``path`` (see the module docstring).

    A line over the size limit or not UTF-8 comes as ``(line number, JsonlError)``, not raised,
    so that tools which report a bad line and go on can; the lines after it are read as usual.
    A file that cannot be opened or read raises :class:`JsonlError`."""
    limit = max_line_bytes() if max_bytes is None else int(max_bytes)
    p = Path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 - closed below, also when the caller stops early
    except OSError as e:
        raise JsonlError(p, None, f"cannot read ({e.strerror or e})") from None
    try:
        n = 0
        while True:
            try:
                raw = f.readline(limit + 3)  # the line, "\r\n", and one byte more tells "too long"
            except OSError as e:
                raise JsonlError(p, n + 1, f"cannot read ({e.strerror or e})") from None
            if not raw:
                return
            n += 1
            if n == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            body = raw[:-1] if raw.endswith(b"\n") else raw
            body = body[:-1] if body.endswith(b"\r") else body
            if len(body) > limit:
                size = len(raw)
                while not raw.endswith(b"\n"):  # skip the rest of the line, a chunk at a time
                    raw = f.readline(_SKIP_CHUNK)
                    if not raw:
                        break
                    size += len(raw)
                yield n, JsonlError(p, n, f"line is longer than {limit} bytes ({size} bytes); a song's record is a "
                                          f"few kB: is this the right file? ({MAX_LINE_ENV} raises the limit)", "line_too_long")
                continue
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, JsonlError(p, n, f"not UTF-8 text (byte {body[e.start]:#04x} at byte {e.start + 1} of "
                                          "the line)", "not_utf8")
                continue
            if text.strip(_JSON_WHITESPACE):
                yield n, text
    finally:
        f.close()


def parse_json_line(text: str) -> Any:
    """``json.loads`` of one line; ``ValueError`` saying what is wrong and at which column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None


def jsonl_rows(path: str | os.PathLike, setting: str | None = None, error: type[Exception] = JsonlError, *,
               max_bytes: int | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of each non-blank line. The first bad line (too long, not
    UTF-8, not JSON) or an unreadable file raises ``error`` (default :class:`JsonlError`) with the
    message ``[setting ]path:line: what is wrong``."""
    where = f"{setting} {path}" if setting else str(path)

    def fail(line: int | None, message: str, reason: str = "invalid_json") -> Exception:
        err = JsonlError(where, line, message, reason)
        return err if error is JsonlError else error(str(err))

    try:
        lines = jsonl_lines(path, max_bytes=max_bytes)
        for n, text in lines:
            if isinstance(text, JsonlError):
                raise fail(n, text.message, text.reason)
            try:
                value = parse_json_line(text)
            except ValueError as e:
                raise fail(n, str(e)) from None
            yield n, value
    except JsonlError as e:
        if e.path == where:
            raise
        raise fail(e.line, e.message, e.reason) from None
