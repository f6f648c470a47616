"""Build-once cache folders (toy world, toy pairs): built in a temp folder, renamed into place.

Several processes may ask for the same folder at once (the ranks of a DDP job each run the CLI);
a lock file makes the others wait for the first build instead of repeating it, and the rename
means a crashed build never leaves a partial folder under the final name.

Cache folders are shared (a lab's cache on a network disk, folders copied between people), so
each one records what it was derived from and what it holds: ``derived_from.json`` keeps the
inputs (``derived_from``: the settings, the model fingerprint, the world version ...) and the
sha256 of every file the build wrote. Reusing a folder checks both: one built from other inputs
than its name promises, or whose files changed after the build, is refused with an error naming
the folder and what differs (never used silently). Changed inputs give another folder name (the
callers hash the inputs into it), so they are built anew.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from levo_infer.jsonio import dumps as strict_dumps
from levo_train.fingerprint import file_digest

PROVENANCE = "derived_from.json"


class CacheError(ValueError):
    """A cache folder is incomplete, was built from other inputs, or changed after its build."""


def _files(folder: Path) -> list[str]:
    """Relative paths of the files a build wrote (hidden files such as digest caches excluded)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and p.name != PROVENANCE)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: d}


def dict_differences(have: Any, want: Any) -> list[tuple[str, Any, Any]]:
    """``(dotted key, have's value, want's value)`` for every leaf where two nested dicts differ,
    sorted by key (a key missing on one side reads as None)."""
    a, b = _flat(have), _flat(want)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def settings_file_differences(path: Path, settings: Any) -> str:
    """How the JSON settings stored at ``path`` differ from ``settings`` (compared as they read back
    from JSON): ``"key: a then, b now; ..."`` for the first six, or ``""`` when they agree. A file
    that is not JSON is a ``ValueError`` naming it. Resumable writers (``levo-data sample``,
    ``levo-data shards``) refuse to continue a folder made with other settings through this."""
    try:
        have = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    diffs = dict_differences(have, json.loads(json.dumps(settings)))
    return "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in diffs[:6])


def _normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparison."""
    return json.loads(json.dumps(obj, sort_keys=True))


def write_provenance(folder: Path, derived_from: dict[str, Any]) -> None:
    """Record the inputs of a finished build and the digest of every file it wrote."""
    files = {rel: file_digest(folder / rel) for rel in _files(folder)}
    (folder / PROVENANCE).write_text(strict_dumps({"derived_from": _normal(derived_from), "files": files}, indent=1,
                                                sort_keys=True))


def check_provenance(folder: Path, derived_from: dict[str, Any]) -> None:
    """Refuse a cache folder built from other inputs or changed since (see the module doc)."""
    p = folder / PROVENANCE
    try:
        rec = json.loads(p.read_text())
        have, files = rec["derived_from"], dict(rec["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheError(f"{folder}: no readable {PROVENANCE} ({e}); it was not built by this levo-train or is "
                         "damaged: remove the folder and it is rebuilt") from None
    diff = dict_differences(have, _normal(derived_from))
    if diff:
        k, then, now = diff[0]
        raise CacheError(f"{folder} was built from {k}={then!r}, but {now!r} is asked for under the same name "
                         f"({len(diff)} input(s) differ): the folder was renamed or copied over; remove it and it "
                         "is rebuilt")
    for rel, digest in sorted(files.items()):
        f = folder / rel
        if not f.is_file():
            raise CacheError(f"{folder}: {rel} is missing (it was part of the build); remove the folder to rebuild")
        if file_digest(f) != digest:
            raise CacheError(f"{folder}: {rel} changed after the build (sha256 differs); remove the folder to rebuild")


def build_once(root: str | os.PathLike, name: str, marker: str, build: Callable[[Path], None],
               derived_from: dict[str, Any] | None = None) -> Path:
    """``root/name``, built by ``build(tmp_folder)`` unless it already holds ``marker``.

    ``build`` must write ``marker`` last (it marks a complete build). A folder under the final name
    without ``marker`` is not ours to delete: that is an error naming it. ``derived_from``: the
    inputs of the build, recorded with the file digests and checked on every reuse.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if (final / marker).is_file():
        if derived_from is not None:
            check_provenance(final, derived_from)
        return final
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (final / marker).is_file():  # another process built it while we waited
            if derived_from is not None:
                check_provenance(final, derived_from)
            return final
        if final.exists():
            raise CacheError(f"{final} exists but has no {marker}: not a complete build; remove it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build(tmp)
            if not (tmp / marker).is_file():
                raise RuntimeError(f"building {name} did not write {marker}")
            if derived_from is not None:
                write_provenance(tmp, derived_from)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
