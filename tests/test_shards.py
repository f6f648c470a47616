"""Song shard schema: atomic writer, validating reader, precise errors, skip_bad accounting."""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest
from webdataset import TarWriter

from levo_train.data.shards import (
    INDEX_NAME,
    ShardError,
    ShardWriter,
    iter_songs,
    resolve_shards,
    shard_sizes,
)

CS = 64
LYRIC = "[intro-short] ; [verse] a b . c ; [chorus] d e"


def _tokens(t: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CS, size=(3, t))


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    return buf.getvalue()


def _write(tmp_path, n=7, max_records=3, **kw):
    d = tmp_path / "shards"
    with ShardWriter(d, max_records=max_records, code_size=CS, **kw) as w:
        for i in range(n):
            prompt = np.full((3, 5), CS + 1) if i % 3 == 1 else (_tokens(5, 100 + i) if i % 3 == 2 else None)
            w.write_song(
                f"song-{i:03d}",
                _tokens(8 + i, i),
                LYRIC,
                f"pop, {i}",
                {"language": "en", "source": "t"},
                prompt,
            )
    return d


def _raw_tar(path, records):
    """Write a tar by hand (bypassing ShardWriter's validation)."""
    with open(path, "wb") as f, TarWriter(f, encoder=False) as tw:
        for r in records:
            tw.write(r)
    return str(path)


def _good_record(key="k0", **over):
    rec = {
        "__key__": key,
        "tokens.npy": _npy(_tokens().astype(np.int16)),
        "lyric.txt": LYRIC.encode(),
        "style.txt": b"rock",
        "json": json.dumps({"duration": 0.4, "language": "en", "source": "x"}).encode(),
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not None}


def test_roundtrip_index_and_atomic_names(tmp_path):
    d = _write(tmp_path)
    assert sorted(os.listdir(d)) == [INDEX_NAME, "songs-000000.tar", "songs-000001.tar", "songs-000002.tar"]
    index = json.loads((d / INDEX_NAME).read_text())
    assert [s["records"] for s in index["shards"]] == [3, 3, 1] and index["records"] == 7
    assert index["code_size"] == CS
    songs = list(iter_songs(d, code_size=CS))
    assert [s.key for s in songs] == [f"song-{i:03d}" for i in range(7)]
    for i, s in enumerate(songs):
        assert s.tokens.dtype == np.int64 and np.array_equal(s.tokens, _tokens(8 + i, i))
        assert s.lyric == LYRIC and s.style == f"pop, {i}"
        assert s.meta["language"] == "en" and s.meta["duration"] == pytest.approx((8 + i) / 25)
        assert s.shard.endswith(f"songs-{i // 3:06d}.tar")
        if i % 3 == 0:
            assert s.prompt is None
        else:
            assert s.prompt.shape == (3, 5) and s.prompt.dtype == np.int64
    assert songs[1].prompt.max() == CS + 1
    # sizes from the index equal sizes from a scan
    shards = resolve_shards(d)
    os.remove(d / INDEX_NAME)
    assert resolve_shards(d) == shards
    assert shard_sizes(shards) == [3, 3, 1]


def test_writer_abort_leaves_no_partial_files(tmp_path):
    d = tmp_path / "x"
    with pytest.raises(RuntimeError), ShardWriter(d, max_records=2, code_size=CS) as w:
        for i in range(3):
            w.write_song(f"s{i}", _tokens(), LYRIC, "", {})
        raise RuntimeError("crash")
    names = os.listdir(d)
    assert not [n for n in names if n.endswith(".tmp")]
    assert INDEX_NAME not in names
    with pytest.raises(FileExistsError):
        ShardWriter(d, code_size=CS)
    with ShardWriter(d, code_size=CS, overwrite=True) as w:
        w.write_song("s0", _tokens(), LYRIC, "", {})
    assert [s.key for s in iter_songs(d, code_size=CS)] == ["s0"]


def test_writer_validates_input(tmp_path):
    with ShardWriter(tmp_path / "w", code_size=CS) as w:
        w.write_song("ok", _tokens(), LYRIC, "")
        cases = [
            (("bad.key", _tokens(), LYRIC, ""), "bad key"),
            (("ok", _tokens(), LYRIC, ""), "duplicate key"),
            (("k1", _tokens().astype(np.float32), LYRIC, ""), "expected integers"),
            (("k2", _tokens()[:2], LYRIC, ""), "expected [3, T]"),
            (("k3", np.zeros((3, 0), np.int64), LYRIC, ""), "expected [3, T]"),
            (("k4", np.full((3, 4), CS), LYRIC, ""), f"code {CS} at [stream 0, frame 0]"),
            (("k5", _tokens(), "[verse]", ""), "missing_lyrics"),
            (("k5b", _tokens(), "[chorus] a.b.c;d.e.f; [inst-medium]", ""), "missing_tag"),
            (("k6", _tokens(), LYRIC, "", {"scores": {"a": "x"}}), "scores"),
        ]
        for args, needle in cases:
            with pytest.raises(ShardError) as ei:
                w.write_song(*args)
            assert needle in str(ei.value) and repr(args[0]) in str(ei.value)
        with pytest.raises(ShardError, match="prompt"):
            w.write_song("k7", _tokens(), LYRIC, "", {}, prompt=np.full((3, 4), CS))
    # big codebooks are stored as int32
    with ShardWriter(tmp_path / "big", code_size=40000) as w:
        w.write_song("k", np.full((3, 2), 39999), LYRIC, "")
    assert next(iter_songs(tmp_path / "big", code_size=40000)).tokens.max() == 39999


@pytest.mark.parametrize(
    "over, needles",
    [
        (
            {"tokens.npy": _npy(np.full((3, 4), 70, np.int16))},
            ["code 70 at [stream 0, frame 0]", "0 <= code < 64"],
        ),
        (
            {"tokens.npy": _npy(np.array([[1, 2], [3, 4], [5, -1]], np.int32))},
            ["code -1 at [stream 2, frame 1]"],
        ),
        ({"tokens.npy": _npy(np.full((3, 4), CS, np.int16))}, ["code 64"]),  # EOS is never stored
        ({"tokens.npy": _npy(np.zeros((3, 4), np.float32))}, ["dtype float32", "expected int16 or int32"]),
        ({"tokens.npy": _npy(np.zeros((3, 4), np.int8))}, ["dtype int8", "expected int16 or int32"]),
        ({"tokens.npy": _npy(np.zeros((3, 4), np.int64))}, ["dtype int64", "expected int16 or int32"]),
        ({"tokens.npy": _npy(np.zeros((2, 4), np.int16))}, ["shape [2, 4]", "expected [3, N]"]),
        ({"tokens.npy": _npy(np.zeros((3, 0), np.int16))}, ["shape [3, 0]"]),
        ({"tokens.npy": b"not an npy"}, ["tokens.npy is not a valid .npy"]),
        ({"tokens.npy": None}, ["missing tokens.npy", "record has: json, lyric.txt, style.txt"]),
        ({"lyric.txt": None}, ["missing lyric.txt"]),
        ({"json": None}, ["missing json"]),
        (
            {"lyric.txt": b"[verse] a ; [intro-short] la"},
            ["malformed lyric.txt", "section 2", "lyrics_in_instrumental"],
        ),
        ({"lyric.txt": b"hello"}, ["malformed lyric.txt", "missing_tag"]),
        # released inputs levo-infer runs with a warning stay errors in training data
        ({"lyric.txt": b"[chorus] a.b.c;d.e.f; [inst-medium]"}, ["malformed lyric.txt", "section 2", "missing_tag"]),
        ({"lyric.txt": b"\xff\xfe"}, ["lyric.txt is not valid utf-8"]),
        ({"json": b"[1, 2]"}, ["json must be an object"]),
        ({"json": b"{"}, ["json is not valid JSON"]),
        ({"prompt.npy": _npy(np.full((3, 4), CS, np.int16))}, ["prompt.npy code 64", f"or {CS + 1} (none)"]),
    ],
)
def test_reader_errors_name_shard_key_and_expectation(tmp_path, over, needles):
    path = _raw_tar(tmp_path / "bad-000000.tar", [_good_record("good0"), _good_record("badrec", **over)])
    it = iter_songs(path, code_size=CS)
    assert next(it).key == "good0"
    with pytest.raises(ShardError) as ei:
        next(it)
    msg = str(ei.value)
    assert "bad-000000.tar" in msg and "'badrec'" in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert ei.value.key == "badrec" and ei.value.shard == path


def test_skip_bad_counts_and_logs(tmp_path, caplog):
    recs = [_good_record("g0"), _good_record("b1", **{"tokens.npy": None}), _good_record("g2")]
    recs.append(_good_record("b3", **{"tokens.npy": _npy(np.full((3, 2), 99, np.int16))}))
    path = _raw_tar(tmp_path / "s-000000.tar", recs)
    with caplog.at_level(logging.WARNING):
        reader = iter_songs(path, code_size=CS, skip_bad=True)
        keys = [s.key for s in reader]
    assert keys == ["g0", "g2"]
    assert reader.n_bad == 2 and reader.n_good == 2
    assert "'b1'" in reader.errors[0] and "missing tokens.npy" in reader.errors[0]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "carry no sha256 digest" in logged[0]  # a tar written by another tool: said once
    logged = [m for m in logged if "skipping bad record" in m]
    assert len(logged) == 2 and "'b3'" in logged[1] and "code 99" in logged[1]


def test_resolve_patterns_and_missing(tmp_path):
    d = _write(tmp_path, n=9, max_records=3)
    all3 = [str(d / f"songs-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(str(d)) == all3
    assert resolve_shards(str(d / "songs-{000000..000001}.tar")) == all3[:2]
    assert resolve_shards(str(d / "songs-*.tar")) == all3
    assert resolve_shards([all3[2], str(d / "songs-000000.tar")]) == [all3[2], all3[0]]
    assert sum(1 for _ in iter_songs(str(d / "songs-{000001..000002}.tar"), code_size=CS)) == 6
    with pytest.raises(FileNotFoundError):
        resolve_shards(str(d / "nope.tar"))
    with pytest.raises(FileNotFoundError):
        resolve_shards(str(tmp_path / "empty*.tar"))
    os.remove(all3[1])
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_shards(str(d))  # index.json lists it


@pytest.mark.parametrize("where", ["mid_data", "mid_header", "at_header"])
def test_truncated_tar_is_an_error(tmp_path, where):
    import tarfile

    d = _write(tmp_path, n=3, max_records=3)
    path = d / "songs-000000.tar"
    with tarfile.open(path) as tf:
        last = list(tf)[-1]  # song-002.tokens.npy
    cut = {"mid_data": last.offset_data + 50, "mid_header": last.offset + 100, "at_header": last.offset}[
        where
    ]
    path.write_bytes(path.read_bytes()[:cut])
    # either tar reading fails or the cut record lacks members: never a silent short read
    with pytest.raises(ShardError, match="songs-000000.tar"):
        list(iter_songs(path, code_size=CS))
