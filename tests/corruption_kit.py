"""Seeded corruption of files, and what the corruption suite asserts of every corrupted copy
(not a test: tests/test_corruption.py, test_fsdp2.py and test_deepspeed.py use it).

:func:`sweep` copies a file or folder, damages one of its files -- a truncation at a random
offset, or one byte xor-ed with a random value at a random offset, alternately -- and reads the
copy through the code path a user's command takes. Each trial must end in one of:

* **refused**: a user-facing error (``ValueError`` / ``OSError`` family: ``ExportError``,
  ``CheckpointError``, ``ShardError`` ...) whose message names the damaged file;
* **unchanged**: the read succeeded and gave exactly what the intact original gives (a flip in
  zip or tar padding, or in a field nothing reads);
* **undetected**: allowed only for files that cannot carry a checksum of ours (released codec
  files, tars written by another tool): the read succeeded with other content, every tensor in it
  finite. The caller says which files may do this, and the count is returned (and printed).

Never: a success with other content (fewer records, other weights) where a checksum exists, or
non-finite weights.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: trials per file kind (the issue asks for at least 20)
N_PER_KIND = 24


def damage(data: bytes, rng: np.random.Generator, trial: int) -> tuple[str, bytes]:
    """Trial ``trial`` of a file: even trials truncate at a random offset, odd ones xor one byte at
    a random offset with a random non-zero value."""
    n = len(data)
    if trial % 2 == 0:
        cut = int(rng.integers(0, n))
        return f"truncated to {cut} of {n} bytes", data[:cut]
    at, x = int(rng.integers(0, n)), int(rng.integers(1, 256))
    b = bytearray(data)
    b[at] ^= x
    return f"byte {at} of {n} xor {x:#04x}", bytes(b)


def same(a: Any, b: Any) -> bool:
    """Deep equality of nested dicts / lists / tensors / arrays (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b) or (a.is_floating_point()
                                                                        and torch.equal(a.isnan(), b.isnan())
                                                                        and torch.equal(a.nan_to_num(), b.nan_to_num()))))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f")))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b


def finite(v: Any) -> bool:
    """No NaN / inf in any floating tensor or array inside ``v``."""
    if isinstance(v, torch.Tensor):
        return not v.is_floating_point() or bool(torch.isfinite(v).all())
    if isinstance(v, np.ndarray):
        return v.dtype.kind != "f" or bool(np.isfinite(v).all())
    if isinstance(v, dict):
        return all(finite(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return all(finite(x) for x in v)
    return True


def sweep(src: Path, targets: Sequence[str], read: Callable[[Path], Any], *, work: Path, seed: int,
          n: int = N_PER_KIND, undetectable: Sequence[str] = (),
          refused_types: tuple[type[BaseException], ...] = (ValueError, OSError)) -> dict[str, int]:
    """Run ``n`` trials per target file (see the module doc); returns outcome counts.

    ``src``: the intact file or folder; ``targets``: the files to damage (relative paths in a
    folder; ``[""]`` for ``src`` itself); ``read(copy)``: what a user's command reads, returning
    comparable content; ``undetectable``: targets allowed to change content without an error."""
    import time

    from levo_infer.integrity import clear_memo

    t0 = time.perf_counter()
    targets, undetectable = [str(t) for t in targets], {str(t) for t in undetectable}
    clear_memo()
    want = read(src)
    assert finite(want)
    counts = {"refused": 0, "unchanged": 0, "undetected": 0}
    for ti, target in enumerate(targets):
        for trial in range(n):
            rng = np.random.default_rng([seed, ti, trial])
            copy = work / f"t{ti}-{trial}"
            if src.is_dir():
                shutil.copytree(src, copy)
            else:
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, copy)
            f = copy / target if target else copy
            what, data = damage(f.read_bytes(), rng, trial)
            f.write_bytes(data)
            label = f"{target or src.name}: {what}"
            try:
                got = read(copy)
            except refused_types as e:
                msg = str(e)
                assert f.name in msg, f"{label}: refused without naming {f.name}: {type(e).__name__}: {msg}"
                counts["refused"] += 1
            else:
                assert finite(got), f"{label}: loaded with non-finite values"
                if same(got, want):
                    counts["unchanged"] += 1
                else:
                    assert target in undetectable, f"{label}: loaded with other content, no error"
                    counts["undetected"] += 1
            shutil.rmtree(copy) if copy.is_dir() else copy.unlink()
    print(f"corruption sweep of {src.name} ({', '.join(t or src.name for t in targets)}): {counts} in "
          f"{time.perf_counter() - t0:.1f} s")
    return counts
