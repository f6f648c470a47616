"""Content fingerprints: what reference log-probs, toy-pair caches and DPO resumes are keyed by.

:func:`file_digest` is the sha256 of every byte of a file, streamed in 8 MiB blocks. Hashing a
10 GB checkpoint takes tens of seconds, so the digest is cached **beside the file** in
``.NAME.sha256`` together with the file's size, mtime, ctime and inode; a cached digest is used
only while all four still match (a rewritten file — even one of the same size — has a new mtime
or inode), otherwise the file is hashed again and the cache rewritten. Where the folder is not
writable (a released checkpoint on shared read-only storage) the cache goes under
``$XDG_CACHE_HOME/levo-train/digests/`` instead. Within one process every digest is also
memoised, so a run pays for each file at most once however many places ask.

:func:`model_fingerprint` combines the digests of an export's ``config.yaml`` and weights file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from levo_infer.integrity import sha256_file
from levo_infer.jsonio import dumps as strict_dumps

log = logging.getLogger(__name__)

#: the files of a model folder that make its identity (weights in either released format)
MODEL_FILES = ("config.yaml", "model.pt", "model.safetensors")

#: how a file is hashed (one definition, shared with the integrity checks; tests count calls)
_hash_file = sha256_file

_memo: dict[tuple[str, tuple[int, ...]], str] = {}


def clear_memo() -> None:
    """Forget the in-process digests (tests; a long-lived process that rewrites files in place)."""
    _memo.clear()


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _sidecars(path: Path) -> list[Path]:
    """Where the digest of ``path`` may be cached: beside it, else in the user cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return [path.with_name(f".{path.name}.sha256"), Path(base) / "levo-train" / "digests" / f"{key}.json"]


def _read_sidecar(side: Path, key: tuple[int, ...]) -> str | None:
    try:
        d = json.loads(side.read_text())
        if [d["size"], d["mtime_ns"], d["ctime_ns"], d["ino"]] == list(key) and len(d["sha256"]) == 64:
            return str(d["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_sidecar(side: Path, key: tuple[int, ...], digest: str) -> bool:
    data = {"size": key[0], "mtime_ns": key[1], "ctime_ns": key[2], "ino": key[3], "sha256": digest}
    tmp = side.with_name(f"{side.name}.tmp{os.getpid()}")
    try:
        side.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(strict_dumps(data))
        os.replace(tmp, side)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of the whole file, from the cache while the file is unchanged (see module doc)."""
    path = Path(path)
    st = path.stat()
    key = _stat_key(st)
    memo_key = (str(path.resolve()), key)
    if memo_key in _memo:
        return _memo[memo_key]
    sides = _sidecars(path)
    digest = next((d for d in (_read_sidecar(s, key) for s in sides) if d is not None), None)
    if digest is None:
        digest = _hash_file(path)
        if _stat_key(path.stat()) == key:  # not rewritten while we read it
            if not any(_write_sidecar(s, key, digest) for s in sides):
                log.debug("could not cache the digest of %s", path)
    _memo[memo_key] = digest
    return digest


def model_fingerprint(folder: str | os.PathLike) -> str:
    """Identity of a model folder (released or an export): sha256 over the digests of its
    ``config.yaml`` and weights file (``model.pt`` / ``model.safetensors``). ``folder`` may also
    be the weights file itself."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    h = hashlib.sha256()
    found = False
    for name in MODEL_FILES:
        p = folder / name
        if p.is_file():
            h.update(f"{name}:{file_digest(p)}\n".encode())
            found = found or name != "config.yaml"
    if not found:
        raise FileNotFoundError(f"{folder}: no model.pt or model.safetensors to fingerprint")
    return h.hexdigest()


__all__ = ["clear_memo", "file_digest", "model_fingerprint"]
