"""Song shards: schema, an atomic writer and a validating reader (webdataset tar files).

One record (webdataset sample, members named ``<key>.<ext>``):

=============  ==========================================================================
``tokens.npy`` int16 or int32 ``[3, T]``, T >= 1 (mixed, vocal, bgm), codes in [0, code_size)
``lyric.txt``  utf-8 lyric obeying :mod:`levo_infer.lyrics` rules
``style.txt``  utf-8 style text (may be empty)
``prompt.npy`` optional int16/int32 ``[3, P]``, codes in [0, code_size) or code_size+1 ("none")
``json``       metadata object: ``duration`` (s), ``language``, ``source``, optional ``scores``
               ({dimension: float}), optional ``quality`` (float), anything else
=============  ==========================================================================

EOS (``code_size``) and pad (``code_size + 1``) are never stored in tokens. A shard directory holds
``<prefix>-000000.tar`` ... and an ``index.json`` (shard names and record counts) written on close.
Every validation failure raises :class:`ShardError` naming the shard, the record key and what was
expected vs found.

Integrity: every record the writer writes carries a ``sha256`` member, the digest of its key and
of all its other members (:func:`record_digest`); :func:`iter_raw`, which every reader goes
through, checks it, so a flipped byte in a record is an error naming the shard and the key. The
tar itself must end with its end-of-archive blocks: a shard that is truncated, or whose member
header is corrupt (tarfile would silently stop there), is an error naming the shard, never a
shorter shard. Records without a digest (shards written by another tool) are read, counted as
unverified (``levo-data validate`` reports them) and warned about once per shard.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.jsonio import write_json_atomic as strict_write_json
from levo_infer.lyrics import LyricError, split_sections

__all__ = [
    "INDEX_NAME",
    "OVERALL",
    "SONG_FORMAT",
    "REQUIRED_MEMBERS",
    "ShardError",
    "Song",
    "ShardWriter",
    "SongReader",
    "iter_songs",
    "iter_raw",
    "decode_song",
    "resolve_shards",
    "shard_sizes",
    "read_index",
    "record_digest",
    "DIGEST_MEMBER",
]

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SONG_FORMAT = "levo-songs"
SCHEMA_VERSION = 1
REQUIRED_MEMBERS: tuple[str, ...] = ("tokens.npy", "lyric.txt", "style.txt", "json")
_INT_DTYPES = (np.dtype(np.int16), np.dtype(np.int32))
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
# Fixed, so the same records give byte-identical shards; an int, because a float mtime makes
# tarfile add a PAX header to every member.
_TAR_MTIME = 0
#: the member holding a record's digest (:func:`record_digest`), 64 hex digits
#: the overall score's name: ``scores["overall"]`` in a song's json, the last output of a reward model
OVERALL = "overall"
DIGEST_MEMBER = "sha256"
#: webdataset's metadata members, skipped by readers
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
#: a tar ends with two zero blocks (tarfile pads further, to 10 KiB)
_TAR_END = 1024


class ShardError(ValueError):
    """A shard or record breaks the schema. ``shard`` and ``key`` name where (either may be None)."""

    def __init__(self, message: str, *, shard: str | None = None, key: str | None = None) -> None:
        self.shard = shard
        self.key = key
        where = ""
        if shard is not None:
            where += f"{shard}: "
        if key is not None:
            where += f"record {key!r}: "
        super().__init__(where + message)


@dataclass
class Song:
    """One validated song record. ``tokens``/``prompt`` are int64."""

    key: str
    tokens: np.ndarray
    lyric: str
    style: str
    prompt: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)
    shard: str = ""

    @property
    def frames(self) -> int:
        return int(self.tokens.shape[1])


# ---------------------------------------------------------------------------- validation
def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes, member: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a schema error
        raise ValueError(f"{member} is not a valid .npy array ({e})") from None


def _check_codes(arr: np.ndarray, member: str, *, code_size: int, allow_none: bool) -> np.ndarray:
    """Check dtype/shape/range of a [3, N] code array; return it as int64 (raise ValueError)."""
    if arr.dtype not in _INT_DTYPES:
        raise ValueError(f"{member} has dtype {arr.dtype}, expected int16 or int32")
    if arr.ndim != 2 or arr.shape[0] != 3 or arr.shape[1] < 1:
        raise ValueError(f"{member} has shape {list(arr.shape)}, expected [3, N] with N >= 1")
    return _check_range(arr.astype(np.int64), member, code_size=code_size, allow_none=allow_none)


def _check_range(a: np.ndarray, member: str, *, code_size: int, allow_none: bool) -> np.ndarray:
    bad = (a < 0) | (a >= code_size)
    if allow_none:
        bad &= a != code_size + 1
    if bad.any():
        s, t = (int(x) for x in np.argwhere(bad)[0])
        allowed = f"0 <= code < {code_size}" + (f" or {code_size + 1} (none)" if allow_none else "")
        raise ValueError(
            f"{member} code {int(a[s, t])} at [stream {s}, frame {t}] is out of range, expected {allowed}"
            f" ({int(bad.sum())} bad codes in total)"
        )
    return a


def _check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise ValueError(f"json must be an object, found {type(meta).__name__}")
    if "duration" in meta and not (isinstance(meta["duration"], (int, float)) and meta["duration"] >= 0):
        raise ValueError(f"json duration must be a number >= 0, found {meta['duration']!r}")
    for name in ("language", "source"):
        if name in meta and not isinstance(meta[name], str):
            raise ValueError(f"json {name} must be a string, found {meta[name]!r}")
    scores = meta.get("scores")
    if scores is not None and not (
        isinstance(scores, dict)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values())
    ):
        raise ValueError(f"json scores must map dimension -> number, found {scores!r}")
    q = meta.get("quality")
    if q is not None and not (isinstance(q, (int, float)) and not isinstance(q, bool)):
        raise ValueError(f"json quality must be a number, found {q!r}")
    return meta


def _check_lyric(lyric: str) -> None:
    try:
        split_sections(lyric)
    except LyricError as e:
        raise ValueError(f"malformed lyric.txt: {e}") from None


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"bad key {key!r}: expected letters, digits, '_', '-', '/'-separated parts (no '.')")
    return key


def decode_texts_and_meta(sample: dict[str, Any]) -> tuple[dict[str, str], Any]:
    """Shared members of song and pair records: utf-8 ``lyric.txt``/``style.txt`` (the lyric
    checked against the released rules) and the parsed ``json`` (raises ValueError)."""
    texts = {}
    for m in ("lyric.txt", "style.txt"):
        try:
            texts[m] = sample[m].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{m} is not valid utf-8 ({e})") from None
    _check_lyric(texts["lyric.txt"])
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"json is not valid JSON ({e})") from None
    return texts, meta


def require_members(sample: dict[str, Any], members: Sequence[str], hint: str = "") -> None:
    """Raise ValueError naming the members a raw record lacks (and what it has)."""
    missing = [m for m in members if m not in sample]
    if missing:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"missing {', '.join(missing)} (record has: {', '.join(have) or 'nothing'}){hint}")


def decode_codes(sample: dict[str, Any], member: str, *, code_size: int, allow_none: bool = False) -> np.ndarray:
    """A ``[3, N]`` code member of a raw record, loaded and checked, as int64."""
    return _check_codes(_load_npy(sample[member], member), member, code_size=code_size, allow_none=allow_none)


def decode_prompt(sample: dict[str, Any], *, code_size: int) -> np.ndarray | None:
    """The optional ``prompt.npy`` member (may hold the none code), or None."""
    return decode_codes(sample, "prompt.npy", code_size=code_size, allow_none=True) if "prompt.npy" in sample else None


def record_digest(key: str, members: dict[str, Any]) -> str:
    """sha256 (hex) of a record: its key and a NUL byte, then each member but the digest itself, in
    name order, as its name, NUL, its length in decimal, NUL, its bytes. Written as the record's
    :data:`DIGEST_MEMBER`."""
    h = hashlib.sha256(key.encode("utf-8") + b"\0")
    for ext in sorted(members):
        if ext.startswith("__") or ext == DIGEST_MEMBER:
            continue
        data = members[ext]
        h.update(f"{ext}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def check_intact(sample: dict[str, Any]) -> None:
    """Raise ValueError when :func:`iter_raw` (``keep_corrupt``) marked the record corrupted."""
    if "__corrupt__" in sample:
        raise ValueError(sample["__corrupt__"])


def decode_song(sample: dict[str, Any], *, code_size: int, shard: str | None = None) -> Song:
    """Validate and decode one raw webdataset sample (member bytes keyed by extension)."""
    key = sample.get("__key__")
    shard = shard if shard is not None else sample.get("__url__")
    try:
        check_intact(sample)
        require_members(sample, REQUIRED_MEMBERS)
        tokens = decode_codes(sample, "tokens.npy", code_size=code_size)
        prompt = decode_prompt(sample, code_size=code_size)
        texts, meta = decode_texts_and_meta(sample)
        meta = _check_meta(meta)
    except ValueError as e:
        raise ShardError(str(e), shard=shard, key=key) from None
    return Song(
        key=key,
        tokens=tokens,
        lyric=texts["lyric.txt"],
        style=texts["style.txt"],
        prompt=prompt,
        meta=meta,
        shard=shard or "",
    )


# ---------------------------------------------------------------------------- writing
def write_json_atomic(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    """``obj`` as strict json at ``path``, all or nothing: written to a per-process temp file beside
    it, then renamed (so several ranks may write the same file); NaN/Infinity are refused
    (:func:`levo_infer.jsonio.write_json_atomic`)."""
    strict_write_json(path, obj, sort_keys=sort_keys)


def read_index(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The directory's ``index.json`` (or None when absent)."""
    p = Path(directory) / INDEX_NAME
    if not p.is_file():
        return None
    try:
        index = json.loads(p.read_text())
        for s in index["shards"]:
            str(s["name"]), int(s["records"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(
            f"malformed {INDEX_NAME} ({e}); expected {{'shards': [{{'name', 'records'}}]}}", shard=str(p)
        ) from None
    return index


class ShardWriter:
    """Write validated songs to ``out_dir/<prefix>-NNNNNN.tar`` (``max_records`` per shard).

    Use as a context manager. Each shard is written to ``*.tar.tmp`` and renamed when complete;
    ``index.json`` is written (atomically, merged with other prefixes' entries) on a clean close.
    On an exception the unfinished shard is removed and no index entry is written.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        prefix: str = "songs",
        max_records: int = 2000,
        code_size: int = 16384,
        overwrite: bool = False,
    ) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if not re.match(r"^[A-Za-z0-9_\-]+$", prefix):
            raise ValueError(f"bad prefix {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_records = max_records
        self.code_size = code_size
        self.dtype = np.int16 if code_size + 1 <= np.iinfo(np.int16).max else np.int32
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{prefix}-*.tar"))
        if existing:
            if not overwrite:
                raise FileExistsError(
                    f"{self.out_dir} already holds {prefix}-*.tar shards; pass overwrite=True"
                )
            for p in existing:
                p.unlink()
        self.shards: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._file = None
        self._tar: TarWriter | None = None
        self._count = 0
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def records(self) -> int:
        """Records written so far."""
        return sum(s["records"] for s in self.shards) + self._count

    def _tmp_path(self) -> Path:
        return self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar.tmp"

    def _open(self) -> None:
        self._file = open(self._tmp_path(), "wb")  # noqa: SIM115 - closed in _finish/abort
        self._tar = TarWriter(self._file, encoder=False, mtime=_TAR_MTIME)
        self._count = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        tmp = self._tmp_path()
        name = tmp.name[: -len(".tmp")]
        os.replace(tmp, self.out_dir / name)
        self.shards.append({"name": name, "records": self._count})
        self._tar, self._file, self._count = None, None, 0

    def encode_codes(self, codes: Any, member: str, *, length: str = "T", allow_none: bool = False) -> bytes:
        """An integer ``[3, length]`` code array, range-checked, as ``.npy`` bytes in the shard dtype
        (raises ValueError naming ``member``); ``allow_none``: prompts may hold the none code."""
        arr = np.asarray(codes)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{member} has dtype {arr.dtype}, expected integers")
        if arr.ndim != 2 or arr.shape[0] != 3 or arr.shape[1] < 1:
            raise ValueError(f"{member} has shape {list(arr.shape)}, expected [3, {length}] with {length} >= 1")
        arr64 = _check_range(arr.astype(np.int64), member, code_size=self.code_size, allow_none=allow_none)
        return _npy_bytes(arr64.astype(self.dtype))

    def write_song(
        self,
        key: str,
        tokens: Any,
        lyric: str,
        style: str,
        meta: dict[str, Any] | None = None,
        prompt: Any = None,
    ) -> None:
        """Validate and append one song (raises :class:`ShardError` naming the key on bad input).

        ``meta`` gets defaults ``duration`` = T / 25, ``language``/``source`` = "unknown".
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        where = str(self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar")
        try:
            _check_key(key)
            if key in self._keys:
                raise ValueError("duplicate key")
            sample: dict[str, Any] = {"__key__": key, "tokens.npy": self.encode_codes(tokens, "tokens")}
            if prompt is not None:
                sample["prompt.npy"] = self.encode_codes(prompt, "prompt", length="P", allow_none=True)
            if not isinstance(lyric, str) or not isinstance(style, str):
                raise ValueError("lyric and style must be str")
            _check_lyric(lyric)
            meta = dict(meta or {})
            meta.setdefault("duration", np.shape(tokens)[1] / 25.0)
            meta.setdefault("language", "unknown")
            meta.setdefault("source", "unknown")
            _check_meta(meta)
            sample["lyric.txt"] = lyric.encode("utf-8")
            sample["style.txt"] = style.encode("utf-8")
            sample["json"] = strict_dumps(meta, sort_keys=True).encode("utf-8")
        except (ValueError, TypeError) as e:
            raise ShardError(str(e), shard=where, key=str(key)) from None
        self._append(key, sample)

    def _append(self, key: str, sample: dict[str, Any]) -> None:
        """Write one validated sample with its digest member, rotating to a new shard every
        ``max_records``."""
        if self._tar is None:
            self._open()
        sample[DIGEST_MEMBER] = record_digest(key, sample).encode()
        self._tar.write(sample)
        self._keys.add(key)
        self._count += 1
        if self._count >= self.max_records:
            self._finish()

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write ``index.json``; returns the index."""
        if self._closed:
            return read_index(self.out_dir) or {}
        self._finish()
        self._closed = True
        old = read_index(self.out_dir)
        others = [s for s in (old or {}).get("shards", []) if not s["name"].startswith(self.prefix + "-")]
        shards = sorted(others + self.shards, key=lambda s: s["name"])
        index = {
            "format": SONG_FORMAT,
            "version": SCHEMA_VERSION,
            "code_size": self.code_size,
            "records": sum(int(s["records"]) for s in shards),
            "shards": shards,
        }
        write_json_atomic(self.out_dir / INDEX_NAME, index)
        return index

    def abort(self) -> None:
        """Drop the unfinished shard; completed shards stay, no index is written."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                self._tmp_path().unlink(missing_ok=True)
                self._tar, self._file = None, None
        self._closed = True


# ---------------------------------------------------------------------------- reading
def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from directories (``index.json`` order, else sorted ``*.tar``), tar paths,
    brace patterns (``songs-{000000..000009}.tar``) or globs; a list may mix them."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for s in specs:
        s = os.fspath(s)
        if os.path.isdir(s):
            index = read_index(s)
            if index is not None:
                names = [sh["name"] for sh in index["shards"]]
            else:
                names = sorted(p.name for p in Path(s).glob("*.tar"))
            if not names:
                raise FileNotFoundError(f"no .tar shards in directory {s}")
            out += [os.path.join(s, n) for n in names]
            continue
        if os.path.isfile(s):
            out.append(s)
            continue
        expanded = list(braceexpand.braceexpand(s)) if "{" in s else [s]
        for e in expanded:
            if os.path.isfile(e):
                out.append(e)
            elif any(ch in e for ch in "*?["):
                found = sorted(glob.glob(e))
                if not found:
                    raise FileNotFoundError(f"no shards match {e}")
                out += found
            else:
                raise FileNotFoundError(f"shard {e} not found")
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"shard {missing[0]} is listed (index.json?) but missing")
    return out


def _check_tar_end(f: Any, offset: int, shard: str, last: str | None, n: int) -> None:
    """After tarfile stopped at ``offset``: the rest of the file must be the end-of-archive zero
    blocks. tarfile stops silently at a corrupt member header or at the end of a truncated file;
    either would make the shard look shorter than it is."""
    f.seek(offset)
    zeros = 0
    while block := f.read(1 << 20):
        stripped = block.lstrip(b"\0")
        if stripped:
            at = offset + zeros + len(block) - len(stripped)
            raise ShardError(f"the tar cannot be read past byte {offset} (after {n} member(s), the last "
                             f"{last!r}): the member header there is corrupt, and non-zero data follows at byte "
                             f"{at}; the rest of the shard would be lost", shard=shard)
        zeros += len(block)
    if zeros < _TAR_END:
        raise ShardError(f"the tar ends at byte {offset + zeros} (after {n} member(s), the last {last!r}) without "
                         "its end-of-archive blocks: the shard is truncated", shard=shard)


def _tar_members(shard: str, *, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes or None) of every regular member of a tar in file order (webdataset's
    ``__...__`` metadata skipped), then a check that the archive ended properly
    (:func:`_check_tar_end`). Any tar error is a :class:`ShardError` naming the shard."""
    try:
        with tarfile.open(shard, "r:*") as tf:
            n, last = 0, None
            while (ti := tf.next()) is not None:
                tf.members = []  # keep no header list for a large shard
                n += 1
                last = ti.name
                if not ti.isreg() or _META_MEMBER.match(ti.name):
                    continue
                data = tf.extractfile(ti).read() if read else None  # type: ignore[union-attr]
                if data is not None and len(data) != ti.size:
                    raise tarfile.ReadError(f"member {ti.name!r} has {len(data)} of its {ti.size} bytes")
                yield ti.name, data
            _check_tar_end(tf.fileobj, tf.offset, shard, last, n)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"unreadable tar ({e})", shard=shard) from None


def _count_records(shard: str) -> int:
    """Count records by scanning tar headers (no payload reads)."""
    n, last = 0, None
    for name, _ in _tar_members(shard, read=False):
        key, _ = base_plus_ext(name)
        if key is not None and key != last:
            n += 1
            last = key
    return n


def shard_sizes(shards: Sequence[str]) -> list[int]:
    """Record count per shard: from its directory's ``index.json`` when listed, else by scanning."""
    indexes: dict[str, dict[str, int]] = {}
    sizes = []
    for sh in shards:
        d = os.path.dirname(os.path.abspath(sh))
        if d not in indexes:
            idx = read_index(d)
            indexes[d] = {s["name"]: int(s["records"]) for s in idx["shards"]} if idx else {}
        n = indexes[d].get(os.path.basename(sh))
        sizes.append(n if n is not None else _count_records(sh))
    return sizes


def _group_records(shard: str) -> Iterator[dict[str, Any]]:
    """Members grouped into records by key (consecutive members sharing ``<key>.``), as
    webdataset groups them: ``{"__key__", "__url__", ext: bytes}``."""
    current: dict[str, Any] | None = None
    for name, data in _tar_members(shard):
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": shard}
        if ext in current:
            raise ShardError(f"member {name!r} appears twice in the record", shard=shard, key=key)
        current[ext] = data
    if current is not None:
        yield current


_warned_unsigned: set[str] = set()


def iter_raw(shard: str, *, keep_corrupt: bool = False) -> Iterator[dict[str, Any]]:
    """Undecoded samples of one shard in file order: dicts of member bytes keyed by extension, plus
    ``__key__``, ``__url__`` and ``__verified__`` (the record's digest matched; False for a record
    written without one). A record whose bytes do not match its digest raises :class:`ShardError`
    naming shard and key; with ``keep_corrupt`` it is yielded with the message under ``__corrupt__``
    instead (the decoders raise it, so ``skip_bad`` readers count it as a bad record). A tar that is
    truncated or stops at a corrupt header always raises."""
    signed: bool | None = None  # decided by the shard's first record
    for sample in _group_records(shard):
        key = sample["__key__"]
        digest = sample.pop(DIGEST_MEMBER, None)
        if signed is None:
            signed = digest is not None
            if not signed and shard not in _warned_unsigned:
                _warned_unsigned.add(shard)
                log.warning("%s: its records carry no %s digest (written by another tool, or an older "
                            "levo-train): corrupted bytes inside them cannot be detected", shard, DIGEST_MEMBER)
        problem = None
        if digest is None:
            if signed:
                problem = (f"has no {DIGEST_MEMBER} member, unlike the records before it in this shard: a member "
                           "was lost or renamed (the shard is corrupted)")
        elif digest.decode("ascii", "replace").strip() != record_digest(key, sample):
            members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            problem = (f"its bytes ({members}) do not match the {DIGEST_MEMBER} digest written with it: the shard "
                       "is corrupted")
        sample["__verified__"] = digest is not None and problem is None
        if problem is not None:
            if not keep_corrupt:
                raise ShardError(problem, shard=shard, key=key)
            sample["__corrupt__"] = problem
        yield sample


class SongReader:
    """Iterator over validated :class:`Song` records of one or more shards.

    With ``skip_bad`` bad records are logged (``logging.warning``, same message as the error) and
    counted in ``n_bad`` (messages in ``errors``, first 1000) instead of raising. ``n_good`` counts
    yielded records. An unreadable tar always raises.
    """

    def __init__(self, path: Any, *, code_size: int, skip_bad: bool = False) -> None:
        self.shards = resolve_shards(path)
        self.code_size = code_size
        self.skip_bad = skip_bad
        self.n_good = 0
        self.n_bad = 0
        self.errors: list[str] = []
        self._it = self._gen()

    def _gen(self) -> Iterator[Song]:
        for shard in self.shards:
            for raw in iter_raw(shard, keep_corrupt=self.skip_bad):
                try:
                    song = decode_song(raw, code_size=self.code_size, shard=shard)
                except ShardError as e:
                    if not self.skip_bad:
                        raise
                    self.n_bad += 1
                    if len(self.errors) < 1000:
                        self.errors.append(str(e))
                    log.warning("skipping bad record: %s", e)
                    continue
                self.n_good += 1
                yield song

    def __iter__(self) -> SongReader:
        return self

    def __next__(self) -> Song:
        return next(self._it)


def iter_songs(path: Any, *, code_size: int, skip_bad: bool = False) -> SongReader:
    """Validated songs from shard dir(s) / tar paths / patterns. The returned iterator exposes
    ``n_good``, ``n_bad`` and ``errors`` (see :class:`SongReader`)."""
    return SongReader(path, code_size=code_size, skip_bad=skip_bad)
