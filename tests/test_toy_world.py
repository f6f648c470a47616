"""The toy song world: conditions determine tokens, a hidden quality function scores them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from levo_infer.lyrics import STRUCTURE_TAGS, normalize_lyrics, split_sections
from levo_train.data.cache import CacheError
from levo_train.data.shards import iter_songs
from levo_train.toy.world import (
    DIMENSIONS,
    GENRES,
    LENGTH_BAND,
    LYRIC_WORDS,
    MOODS,
    TIERS,
    TOY_CODE_SIZE,
    ToyWorld,
    ensure_toy_dataset,
    style_text,
    toy_dataset_name,
    write_toy_dataset,
)


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(0)


@pytest.fixture(scope="module")
def songs(world):
    return world.make_dataset(2000, np.random.default_rng(123))


@pytest.fixture(scope="module")
def conds(world):
    rng = np.random.default_rng(7)
    return [world.sample_condition(rng) for _ in range(60)]


def test_vocabulary(world):
    vocab = world.vocabulary()
    assert len(vocab) == len(set(vocab))
    for tok in ["<unk>", ".", ",", ";", *LYRIC_WORDS, *GENRES, *MOODS]:
        assert tok in vocab
    assert not any(t.startswith("[") for t in vocab)
    assert 20 <= len(LYRIC_WORDS) <= 40


def test_conditions_use_real_lyric_format(world, conds):
    for c in conds:
        assert normalize_lyrics(c.lyric) == c.lyric
        assert all(tag in STRUCTURE_TAGS for tag, _ in split_sections(c.lyric))
        assert c.style_base == f"{c.genre}, {c.mood}"
    assert style_text("rock, sad", "high") == "[Musicality-high], rock, sad"
    assert style_text("rock, sad", "top") == "[Musicality-very-high], rock, sad"
    assert style_text("rock, sad", "none") == style_text("rock, sad", None) == "rock, sad"
    assert style_text("rock, sad", "[Musicality-low]") == "[Musicality-low], rock, sad"
    with pytest.raises(ValueError):
        style_text("rock", "great")


def test_clean_songs_score_one_and_per_zero(world, conds):
    for c in conds:
        tokens = world.render(c, {}, np.random.default_rng(0))
        assert tokens.shape[0] == 3 and 20 <= tokens.shape[1] <= 75
        assert tokens.min() >= 0 and tokens.max() < TOY_CODE_SIZE
        s = world.score(tokens, c.lyric, c.style("high"))
        assert all(s[d] == 1.0 for d in DIMENSIONS) and s["quality"] == 1.0
        assert world.per(tokens, c.lyric) == 0.0


def test_conditions_determine_tokens(world, conds):
    a, b = conds[0], conds[1]
    ta = world.render(a, {}, np.random.default_rng(0))
    assert np.array_equal(ta, world.render(a, {}, np.random.default_rng(99)))  # clean: no randomness
    # another lyric is scored badly on lyrics; another genre badly on harmony
    assert world.score(ta, b.lyric, a.style_base)["lyrics"] < 0.5
    other = next(g for g in GENRES if g != a.genre)
    assert world.score(ta, a.lyric, f"{other}, {a.mood}")["harmony"] < 0.2
    other_mood = next(m for m in MOODS if m != a.mood)
    assert world.score(ta, a.lyric, f"{a.genre}, {other_mood}")["harmony"] < 0.2


@pytest.mark.parametrize("dim", DIMENSIONS)
def test_each_corruption_lowers_its_own_dimension(world, conds, dim):
    rng = np.random.default_rng(1)
    lo, hi = LENGTH_BAND
    drops, in_band = [], 0
    for c in conds[:40]:
        tokens = world.render(c, {dim: 0.3}, rng)
        s = world.score(tokens, c.lyric, c.style_base)
        assert s[dim] < 1.0, (dim, c.lyric)
        # the other dimensions stay exact; a word or section edit that takes the song out of its
        # lyric's length band scales every dimension by the same length factor
        ratio = tokens.shape[1] / world.expected_length(c.lyric)
        factor = min(1.0, ratio / lo, hi / ratio)
        in_band += factor == 1.0
        assert all(s[o] == pytest.approx(factor, abs=1e-12) for o in DIMENSIONS if o != dim), (dim, s, ratio)
        drops.append(1.0 - s[dim])
        if dim == "lyrics":
            assert world.per(tokens, c.lyric) > 0
    assert np.mean(drops) > 0.1
    assert in_band >= 32
    # higher rates hurt more
    worse = [world.score(world.render(c, {dim: 0.9}, rng), c.lyric, c.style_base)[dim] for c in conds[:40]]
    assert np.mean(worse) < 1.0 - np.mean(drops)


def test_score_is_robust(world, conds):
    c = conds[0]
    clean = world.render(c, {}, np.random.default_rng(0))
    style = c.style_base
    rng = np.random.default_rng(0)
    cases = {
        "truncated": clean[:, : clean.shape[1] // 2],
        "one_frame": clean[:, :1],
        "empty": clean[:, :0],
        "overlong": np.concatenate([clean, clean], axis=1),
        "random": rng.integers(0, TOY_CODE_SIZE, size=(3, 60)),
        "out_of_range": np.full((3, 40), TOY_CODE_SIZE + 1),
        "negative": -np.ones((3, 10), dtype=np.int64),
        "huge": rng.integers(-(10**9), 10**9, size=(3, 300)),
    }
    for name, toks in cases.items():
        s = world.score(toks, c.lyric, style)
        assert set(s) == {*DIMENSIONS, "quality"}
        assert all(0.0 <= v <= 1.0 for v in s.values()), (name, s)
        assert s["quality"] == pytest.approx(np.mean([s[d] for d in DIMENSIONS]))
        assert world.per(toks, c.lyric) >= 0
    assert world.score(cases["truncated"], c.lyric, style)["quality"] < 1.0
    assert world.score(cases["overlong"], c.lyric, style)["lyrics"] < 1.0
    for name in ("random", "out_of_range", "negative", "huge", "empty"):
        assert world.score(cases[name], c.lyric, style)["quality"] < 0.1, name
    # random tokens, many draws: low on every dimension
    rand = [world.score(rng.integers(0, TOY_CODE_SIZE, size=(3, 50)), c.lyric, style) for _ in range(20)]
    assert max(r["quality"] for r in rand) < 0.15
    # torch tensors are accepted; bad shapes are a clear error
    assert world.score(torch.from_numpy(clean), c.lyric, style)["quality"] == 1.0
    with pytest.raises(ValueError, match=r"\[3, T\]"):
        world.score(clean[:2], c.lyric, style)
    # missing style words: harmony judged against any genre/mood
    assert world.score(clean, c.lyric, "")["harmony"] == 1.0
    assert world.score_many([(clean, c.lyric, style)] * 3) == [world.score(clean, c.lyric, style)] * 3


def test_dataset_meta_and_grading(songs):
    keys = [k for k, *_ in songs]
    assert len(set(keys)) == len(keys)
    clean = 0
    for _key, tokens, lyric, style, meta in songs:
        assert tokens.shape[0] == 3 and 20 <= tokens.shape[1] <= 75
        assert meta["duration"] == tokens.shape[1] / 25
        assert meta["language"] == "toy" and meta["source"] == "toy-world"
        assert set(meta["scores"]) == set(DIMENSIONS) and meta["tier"] in TIERS
        assert meta["quality"] == pytest.approx(np.mean(list(meta["scores"].values())), abs=1e-5)
        assert normalize_lyrics(lyric) == lyric
        if style.startswith("["):
            assert style.startswith(f"[Musicality-{meta['tier']}], ")
        if not meta["corruption"]:
            clean += 1
            assert meta["quality"] == 1.0 and meta["per"] == 0.0
        for dim in meta["corruption"]:
            assert meta["scores"][dim] < 1.0
    assert 0.05 < clean / len(songs) < 0.5
    frames = [t.shape[1] for _, t, *_ in songs]
    assert min(frames) < 30 and max(frames) > 60  # durations vary


def test_meta_scores_match_score(world, songs):
    for _key, tokens, lyric, style, meta in songs[:100]:
        s = world.score(tokens, lyric, style)
        for d in DIMENSIONS:
            assert s[d] == pytest.approx(meta["scores"][d], abs=1e-5)


def test_tier_tracks_musical_dims_not_lyrics(songs):
    rank = np.array([len(TIERS) - 1 - TIERS.index(m["tier"]) for *_, m in songs], dtype=float)
    dims = {d: np.array([m["scores"][d] for *_, m in songs]) for d in DIMENSIONS}
    corr = {d: np.corrcoef(rank, v)[0, 1] for d, v in dims.items()}
    assert corr["harmony"] > 0.5 and corr["mix"] > 0.3
    assert np.corrcoef(rank, (dims["harmony"] + dims["mix"]) / 2)[0, 1] > 0.8
    assert abs(corr["lyrics"]) < 0.1 and abs(corr["structure"]) < 0.1
    # lyric errors are common at every tier, so the top tier leaves headroom
    top = rank == len(TIERS) - 1
    assert top.mean() > 0.2
    assert np.mean(dims["lyrics"][top] < 0.8) > 0.25
    q = np.array([m["quality"] for *_, m in songs])
    assert q[top].mean() < 0.95


def test_same_seed_same_data(world):
    a = world.make_dataset(50, np.random.default_rng(5), key_prefix="x")
    b = ToyWorld(0).make_dataset(50, np.random.default_rng(5), key_prefix="x")
    for sa, sb in zip(a, b):
        assert sa[0] == sb[0] and np.array_equal(sa[1], sb[1]) and sa[2:] == sb[2:]
    c = world.make_dataset(50, np.random.default_rng(6), key_prefix="x")
    assert any(not np.array_equal(sa[1], sc[1]) for sa, sc in zip(a, c))
    # another world seed is another world (different code assignment)
    other = ToyWorld(1)
    cond = world.heldout_conditions(1, seed=0)[0]
    assert not np.array_equal(world.render(cond), other.render(cond))


def test_heldout_conditions_disjoint(world, songs):
    held = world.heldout_conditions(200, seed=3)
    assert [c.lyric for c in held] == [c.lyric for c in world.heldout_conditions(200, seed=3)]
    assert [c.lyric for c in held] != [c.lyric for c in world.heldout_conditions(200, seed=4)]
    train_lyrics = {lyric for _, _, lyric, _, _ in songs}
    assert not train_lyrics & {c.lyric for c in held}
    for c in held[:20]:
        assert world.score(world.render(c), c.lyric, c.style())["quality"] == 1.0


def test_write_and_ensure_toy_dataset(tmp_path, world):
    out = tmp_path / "toy"
    summary = write_toy_dataset(out, seed=0, n_train=300, n_val=40, records_per_shard=128)
    assert summary["train"]["count"] == 300 and summary["val"]["count"] == 40
    assert sorted(os.listdir(out / "train")) == ["index.json", *(f"songs-{i:06d}.tar" for i in range(3))]
    info = json.loads((out / "toy_world.json").read_text())
    assert info["seed"] == 0 and info["rules"]["code_size"] == TOY_CODE_SIZE
    assert info["train"]["mean_quality_clean"] == 1.0
    assert info["train"]["mean_quality"] < info["train"]["mean_quality_clean"]
    read = list(iter_songs(out / "train", code_size=TOY_CODE_SIZE))
    assert len(read) == 300
    for song in read[:50]:
        s = world.score(song.tokens, song.lyric, song.style)
        assert s["quality"] == pytest.approx(song.meta["quality"], abs=1e-5)
    val_keys = {s.key for s in iter_songs(out / "val", code_size=TOY_CODE_SIZE)}
    assert not val_keys & {s.key for s in read}

    root = tmp_path / "cache"
    (root / f".{toy_dataset_name(0, 100, 10)}.tmp-crashed").mkdir(parents=True)  # a crashed build
    path = ensure_toy_dataset(root, seed=0, n_train=100, n_val=10)
    assert path.name == toy_dataset_name(0, 100, 10) and (path / "toy_world.json").is_file()
    stamp = (path / "toy_world.json").stat().st_mtime_ns
    assert ensure_toy_dataset(root, seed=0, n_train=100, n_val=10) == path
    assert (path / "toy_world.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in root.iterdir() if ".tmp-" in p.name and "crashed" not in p.name]
    # same seed -> byte-identical shards
    again = ensure_toy_dataset(tmp_path / "cache2", seed=0, n_train=100, n_val=10)
    for name in ("songs-000000.tar", "index.json"):
        assert (again / "train" / name).read_bytes() == (path / "train" / name).read_bytes()
    # the folder records what it was built from and every file's digest: a changed shard, or a
    # data set copied under another one's name, is refused (never trained on silently)
    prov = json.loads((path / "derived_from.json").read_text())
    assert prov["derived_from"]["n_train"] == 100 and "train/songs-000000.tar" in prov["files"]
    shard = path / "train" / "songs-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1  # inside the first record's data
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="songs-000000.tar changed after the build"):
        ensure_toy_dataset(root, seed=0, n_train=100, n_val=10)
    import shutil

    shutil.copytree(again, root / toy_dataset_name(0, 100, 11))
    with pytest.raises(CacheError, match="n_val=10"):
        ensure_toy_dataset(root, seed=0, n_train=100, n_val=11)
    # a directory under the final name without toy_world.json is never used
    (root / toy_dataset_name(1, 100, 10)).mkdir()
    with pytest.raises(CacheError, match="not a complete build; remove it"):
        ensure_toy_dataset(root, seed=1, n_train=100, n_val=10)


def test_cli_toy_and_validate(tmp_path, capsys):
    from levo_data.cli import COMMANDS, main

    assert {"toy", "validate"} <= set(COMMANDS)
    out = tmp_path / "t"
    assert main(["toy", "--out", str(out), "--seed", "2", "--n-train", "120", "--n-val", "16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["count"] == 120 and "dims_clean" in summary["train"]
    assert main(["toy", "--out", str(out), "--n-train", "10", "--n-val", "2"]) == 1  # no silent overwrite
    assert "already holds" in capsys.readouterr().err
    assert main(["validate", str(out / "train"), str(out / "val"), "--code-size", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 136 and report["bad"] == 0
    # the default code size (16384) accepts toy codes; a smaller one names the first bad code
    assert main(["validate", str(out / "train")]) == 0
    capsys.readouterr()
    assert main(["validate", str(out / "train"), "--code-size", "8"]) == 1
    err = capsys.readouterr().err
    assert "songs-000000.tar" in err and "train-0000000" in err and "0 <= code < 8" in err


@pytest.mark.slow
def test_full_size_toy_dataset_is_fast(tmp_path):
    import time

    t0 = time.perf_counter()
    summary = write_toy_dataset(tmp_path / "full", seed=0)  # 20k train + 512 val
    assert time.perf_counter() - t0 < 30
    assert summary["train"]["count"] == 20000


def _slow_build(root: str, log: str) -> None:
    """One of two racing processes asking build_once for the same folder (see below)."""
    import time

    from levo_train.data.cache import build_once

    def build(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (tmp / "data.txt").write_text("x")
        (tmp / "done").write_text("ok")

    build_once(root, "thing", "done", build)


def test_build_once_builds_once_for_racing_processes(tmp_path):
    """DDP ranks each run the CLI: the second waits on the lock and reuses the first's build."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path / "c"), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1
    assert (tmp_path / "c" / "thing" / "data.txt").read_text() == "x"
    assert not [p for p in (tmp_path / "c").iterdir() if ".tmp-" in p.name]

    from levo_train.data.cache import build_once

    def broken(tmp):
        (tmp / "half").write_text("")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(tmp_path / "c", "other", "done", broken)
    assert not (tmp_path / "c" / "other").exists()
    assert not [p for p in (tmp_path / "c").iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------- length-aware scores (issue 9, item 10)
@pytest.fixture(scope="module")
def held(world):
    """Eight held-out conditions plus the first held-out one with a [silence] section."""
    pool = world.heldout_conditions(400, seed=11)
    with_silence = next(c for c in pool if "[silence]" in c.lyric)
    return [*pool[:8], with_silence]


def _degenerate_songs(world: ToyWorld, clean: np.ndarray) -> dict[str, np.ndarray]:
    """Songs that are not songs: what a collapsed model emits."""
    n = clean.shape[1]
    silence = np.stack([world.mix_code(np.zeros(n, np.int64), np.full(n, 48)), np.zeros(n, np.int64),
                        np.full(n, 48)])
    cases = {"one_frame": clean[:, :1], "silence": silence, "eos_only": np.zeros((3, 0), np.int64)}
    for code in (0, 1, 2, 5, 7, 8, 20, 33, 47, 48, 63):  # every stream the same code, at the clean length
        cases[f"code_{code}"] = np.full((3, n), code, dtype=np.int64)
    return cases


def test_degenerate_songs_score_low_on_every_dimension(world, held):
    """A 1-frame song, silence, one repeated code or EOS only scores <= 0.07 on EVERY dimension
    (per-frame shares used to give harmony and mix 1.0 to a 1-frame song: quality 0.515)."""
    for c in held:
        clean = world.render(c)
        style = c.style()
        assert world.score(clean, c.lyric, style) == {**dict.fromkeys(DIMENSIONS, 1.0), "quality": 1.0}
        for name, toks in _degenerate_songs(world, clean).items():
            s = world.score(toks, c.lyric, style)
            assert all(s[d] <= 0.07 for d in DIMENSIONS), (name, c.lyric, s)
            assert s["quality"] <= 0.05, (name, c.lyric, s)


def test_truncated_and_overlong_songs_score_in_proportion(world, held):
    """A song cut to its first quarter keeps at most about a quarter of any dimension; a clean song
    followed by a long tail of junk, silence, a held frame, a repeated code or itself scores low on
    every dimension (a longer song than its lyric asks for is penalised too)."""
    lo, _hi = LENGTH_BAND
    rng = np.random.default_rng(3)
    for c in held:
        clean = world.render(c)
        style, n = c.style(), clean.shape[1]
        assert world.expected_length(c.lyric) == n
        cut = world.score(clean[:, : n // 4], c.lyric, style)
        assert all(cut[d] <= 0.25 / lo + 1e-9 for d in DIMENSIONS), (c.lyric, cut)
        # more of the song never scores less on the per-frame dimensions
        parts = [world.score(clean[:, : n * k // 4], c.lyric, style) for k in (1, 2, 3, 4)]
        for d in ("harmony", "mix", "quality"):
            assert all(a[d] <= b[d] for a, b in zip(parts, parts[1:])), (d, parts)
        tails = {
            "junk": rng.integers(0, TOY_CODE_SIZE, size=(3, 4 * n)),
            "silence": np.repeat(_degenerate_songs(world, clean)["silence"][:, :1], 4 * n, axis=1),
            "held_last_frame": np.repeat(clean[:, -1:], 4 * n, axis=1),
            "itself": np.tile(clean, (1, 4)),
            **{f"code_{k}": np.full((3, 4 * n), k) for k in (0, 2, 9, 40)},
        }
        for name, tail in tails.items():
            s = world.score(np.concatenate([clean, tail], axis=1), c.lyric, style)
            assert all(s[d] <= 0.3 for d in DIMENSIONS), (name, c.lyric, s)


def test_silence_counts_only_where_the_lyric_has_it(world, held):
    """bgm silence is harmonious only in [silence] sections (a longer [silence], as structure errors
    make it, is still harmonious); silence elsewhere counts for neither harmony nor mix."""
    c = held[-1]
    assert "[silence]" in c.lyric
    clean = world.render(c)
    style = c.style()
    sil = np.flatnonzero(clean[2] == 48)
    assert len(sil) == 2
    frame = clean[:, sil[:1]]
    longer = np.concatenate([clean[:, : sil[-1] + 1], np.repeat(frame, 6, axis=1), clean[:, sil[-1] + 1 :]], axis=1)
    s = world.score(longer, c.lyric, style)
    assert s["harmony"] == 1.0 and s["mix"] == 1.0 and s["structure"] < 1.0
    # the same silence without a [silence] section in the lyric: 2 bad frames for harmony and mix
    other = next(o for o in held if "[silence]" not in o.lyric)
    oc = world.render(other)
    k = oc.shape[1] // 2
    gap = np.concatenate([oc[:, :k], np.repeat(frame, 2, axis=1), oc[:, k:]], axis=1)
    s = world.score(gap, other.lyric, other.style())
    assert s["harmony"] < 1.0 and s["mix"] < 1.0


def test_dataset_songs_lie_within_the_length_band(world, songs):
    lo, hi = LENGTH_BAND
    for _key, tokens, lyric, _style, _meta in songs:
        assert lo <= tokens.shape[1] / world.expected_length(lyric) <= hi
