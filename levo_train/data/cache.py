"""Build-once cache folders (toy world, toy pairs): built in a temp folder, renamed into place.

Several processes may ask for the same folder at once (the ranks of a DDP job each run the CLI);
a lock file makes the others wait for the first build instead of repeating it, and the rename
means a crashed build never leaves a partial folder under the final name.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_once(root: str | os.PathLike, name: str, marker: str, build: Callable[[Path], None]) -> Path:
    """``root/name``, built by ``build(tmp_folder)`` unless it already holds ``marker``.

    ``build`` must write ``marker`` last (it marks a complete build). A folder under the final name
    without ``marker`` is not ours to delete: that is an error naming it.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if (final / marker).is_file():
        return final
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (final / marker).is_file():  # another process built it while we waited
            return final
        if final.exists():
            raise RuntimeError(f"{final} exists but has no {marker}: not a complete build; remove it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build(tmp)
            if not (tmp / marker).is_file():
                raise RuntimeError(f"building {name} did not write {marker}")
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
