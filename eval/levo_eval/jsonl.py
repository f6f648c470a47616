"""The JSONL inputs of levo-eval commands: one line loop and its errors for all of them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def jsonl_rows(path: str | os.PathLike, setting: str, error: type[Exception]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of each non-blank line of ``path``; an unreadable file or a
    line that is not JSON raises ``error`` naming ``setting``, the file and the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{setting} {p}: cannot read ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{setting} {p}:{n}: not a JSON line ({e.msg})") from None
        yield n, row
