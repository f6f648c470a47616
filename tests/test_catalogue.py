"""``levo-data shards`` (levo_data.catalogue): a JSONL catalogue of 1,000 tiny songs (plus bad lines of every
kind) -> train/val shards that the shard reader and the datamodule read back unchanged; a deterministic hash
split; bad lines reported by line number; a hard-killed run resumes to byte-identical shards; audio lines
tokenised by a stand-in SongGeneration checkout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from levo_data.catalogue import CRASH_ENV, build_shards, script_of, split_of
from levo_data.cli import main
from levo_data.errors import UsageError
from levo_train.data.shards import iter_songs, read_index

CS = 16384
N_SONGS = 1000
SHARD = 100
VAL = 0.2
LYRICS = [
    ("[intro-short] ; [verse] la da . love night ; [chorus] rock pop", "latin"),
    ("[verse] 你好 世界 . 晚安 ; [outro-short]", "cjk"),
    ("[inst-long]", "none"),
    ("[verse]  hello   世界 . ok 你好 ; [chorus] 我爱 you", "mixed"),
]
GOOD_LYRIC = LYRICS[0][0]


def _good_line(i: int, rng: np.random.Generator, d: Path) -> tuple[str, dict]:
    """One good manifest line (formats, optional fields and metadata vary with i) and what must be read back."""
    key = f"album{i % 7}/song-{i}" if i % 11 == 0 else f"song-{i}"
    T = int(rng.integers(1, 30))
    tokens = rng.integers(0, CS, (3, T))
    tokens[:, 0] = [0, CS - 1, i % CS]  # the range edges are valid codes
    dtype = (np.int16, np.int32, np.int64, np.uint16)[i % 4]
    rec: dict = {"idx": key}
    if i % 50 == 0:
        torch.save(torch.from_numpy(tokens.astype(np.int32)), d / f"t{i}.pt")
        rec["tokens"] = f"t/t{i}.pt"
    else:
        stored = tokens.astype(dtype)[None] if i % 13 == 0 else tokens.astype(dtype)  # [1,3,T] is accepted
        np.save(d / f"t{i}.npy", stored)
        rec["path" if i % 3 == 0 else "tokens"] = f"t/t{i}.npy"
    lyric, script = LYRICS[i % len(LYRICS)]
    rec["gt_lyric" if i % 2 else "lyric"] = lyric
    style = "" if i % 5 == 0 else f"pop, {('happy', 'sad', 'dark')[i % 3]}, female vocal"
    if style:
        rec["descriptions" if i % 2 else "style"] = style
    prompt = None
    if i % 9 == 0:
        prompt = rng.integers(0, CS, (3, 12))
        prompt[1, 3] = CS + 1  # the "none" code is allowed in prompts
        np.save(d / f"p{i}.npy", prompt.astype(np.int16))
        rec["prompt"] = f"t/p{i}.npy"
    extra = {"genre": ("pop", "rock")[i % 2], "n": i}
    if i % 4 == 0:
        extra.update(language="en", scores={"overall": i / 1000}, duration=123.5)
    rec.update(extra)
    return json.dumps(rec, ensure_ascii=False), {"tokens": tokens, "lyric": lyric, "style": style, "prompt": prompt,
                                                 "extra": extra, "script": script, "T": T}


def _bad_lines(d: Path) -> list[tuple[str, str, str | None]]:
    """(line text, reason, lyric rule) of every kind of bad line."""
    np.save(d / "float.npy", np.zeros((3, 5), np.float32))
    torch.save(torch.zeros(3, 5), d / "float.pt")
    np.save(d / "two.npy", np.zeros((2, 5), np.int32))
    np.save(d / "empty.npy", np.zeros((3, 0), np.int32))
    np.save(d / "high.npy", np.full((3, 5), CS, np.int32))
    np.save(d / "neg.npy", np.full((3, 5), -1, np.int32))
    np.save(d / "ok.npy", np.ones((3, 5), np.int32))
    np.save(d / "badprompt.npy", np.full((3, 5), CS + 7, np.int32))
    (d / "garbage.npy").write_bytes(b"this is not an npy file")
    ok = {"tokens": "t/ok.npy", "gt_lyric": GOOD_LYRIC}

    def j(**kw):
        return json.dumps({**ok, **kw})

    return [
        ('{"idx": "b-json", "tokens": ', "invalid_json", None),
        ("[1, 2, 3]", "not_an_object", None),
        (json.dumps(ok), "missing_idx", None),
        (j(idx="bad.key"), "bad_idx", None),
        (j(idx="song-3"), "duplicate_idx", None),
        (json.dumps({"idx": "b-nosrc", "gt_lyric": GOOD_LYRIC}), "no_source", None),
        (j(idx="b-missing", tokens="t/nope.npy"), "missing_file", None),
        (j(idx="b-garbage", tokens="t/garbage.npy"), "unreadable", None),
        (j(idx="b-float", tokens="t/float.npy"), "bad_dtype", None),
        (j(idx="b-floatpt", tokens="t/float.pt"), "bad_dtype", None),
        (j(idx="b-two", tokens="t/two.npy"), "bad_shape", None),
        (j(idx="b-empty", tokens="t/empty.npy"), "bad_shape", None),
        (j(idx="b-high", tokens="t/high.npy"), "out_of_range", None),
        (j(idx="b-neg", tokens="t/neg.npy"), "out_of_range", None),
        (j(idx="b-notag", gt_lyric="verse la la"), "bad_lyric", "missing_tag"),
        (j(idx="b-unknown", gt_lyric="[verse] la ; [intro] da"), "bad_lyric", "unknown_tag"),
        (j(idx="b-prompt", prompt="t/badprompt.npy"), "bad_prompt", None),
        (json.dumps({"idx": "b-audio", "audio": "t/song.wav", "gt_lyric": GOOD_LYRIC}), "audio_without_encoder", None),
        (j(idx="b-meta", duration="long"), "bad_meta", None),
    ]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """The 1,000-song manifest (bad lines spread through it) and one uninterrupted run over it."""
    root = tmp_path_factory.mktemp("catalogue")
    d = root / "t"
    d.mkdir()
    rng = np.random.default_rng(0)
    bad_specs = _bad_lines(d)
    lines: list[str] = []
    good: dict[str, dict] = {}
    bad: dict[int, tuple[str, str | None]] = {}
    order: list[str] = []
    for i in range(N_SONGS):
        text, exp = _good_line(i, rng, d)
        lines.append(text)
        key = json.loads(text)["idx"]
        good[key] = {**exp, "line": len(lines)}
        order.append(key)
        if i % 45 == 20 and bad_specs:  # a bad line after every 45th song, the last ones near the end
            text, reason, rule = bad_specs.pop(0)
            lines.append(text)
            bad[len(lines)] = (reason, rule)
        if i == 500:
            lines.append("   ")  # blank lines are not records and not errors
    manifest = root / "songs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    assert not bad_specs
    out = root / "out"
    said: list[str] = []
    stats = build_shards(manifest, out, shard_size=SHARD, val_fraction=VAL, report=said.append)
    return {"root": root, "manifest": manifest, "out": out, "good": good, "bad": bad, "order": order,
            "stats": stats, "said": said}


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.parent.name in ("train", "val") or p.name == "rejected.jsonl"}


def test_every_song_reads_back_unchanged(catalogue):
    out, good, stats = catalogue["out"], catalogue["good"], catalogue["stats"]
    assert stats["songs"] == N_SONGS and stats["rejected"]["total"] == len(catalogue["bad"])
    songs = {s.key: s for s in iter_songs([out / "train", out / "val"], code_size=CS)}
    assert set(songs) == set(good)
    for key, exp in good.items():
        s = songs[key]
        np.testing.assert_array_equal(s.tokens, exp["tokens"], err_msg=key)
        assert s.lyric == exp["lyric"] and s.style == exp["style"], key
        if exp["prompt"] is None:
            assert s.prompt is None, key
        else:
            np.testing.assert_array_equal(s.prompt, exp["prompt"], err_msg=key)
        assert {k: s.meta[k] for k in exp["extra"]} == exp["extra"], key
        assert s.meta["script"] == exp["script"], key
        if "duration" not in exp["extra"]:
            assert s.meta["duration"] == exp["T"] / 25 and s.meta["language"] == "unknown"
    # shards: at most SHARD songs, all but the last full, records in manifest order
    for split in ("train", "val"):
        sizes = [sh["records"] for sh in read_index(out / split)["shards"]]
        assert all(n == SHARD for n in sizes[:-1]) and 0 < sizes[-1] <= SHARD
        keys = [s.key for s in iter_songs(out / split, code_size=CS)]
        assert keys == [k for k in catalogue["order"] if split_of(k, VAL) == split]
    frames = sum(e["T"] for e in good.values())
    assert stats["frames"] == frames and stats["hours"] == round(frames / 25 / 3600, 4)
    assert all(sum(h) == frames for h in stats["tokens"]["histogram"].values())
    want_scripts: dict[str, int] = {}
    for e in good.values():
        want_scripts[e["script"]] = want_scripts.get(e["script"], 0) + 1
    assert stats["scripts"] == want_scripts
    assert stats["lyrics"]["instrumental"] == want_scripts["none"]
    assert stats["with_prompt"] == sum(e["prompt"] is not None for e in good.values())
    assert json.loads((out / "stats.json").read_text())["songs"] == N_SONGS


def test_split_is_a_stable_hash_of_idx_and_disjoint(catalogue):
    out, good = catalogue["out"], catalogue["good"]
    train = {s.key for s in iter_songs(out / "train", code_size=CS)}
    val = {s.key for s in iter_songs(out / "val", code_size=CS)}
    assert not train & val and train | val == set(good)
    for key in good:  # the rule, restated: sha256 of "levo-split:" + idx as a fraction of 2^64
        h = int.from_bytes(hashlib.sha256(f"levo-split:{key}".encode()).digest()[:8], "big")
        assert (key in val) == (h / 2**64 < VAL)
    assert 150 < len(val) < 250
    assert split_of("song-1", 0.0) == "train" and {split_of(k, 0.999999) for k in list(good)[:50]} == {"val"}
    assert catalogue["stats"]["splits"]["val"]["songs"] == len(val)


def test_the_datamodule_reads_the_shards_as_they_are(catalogue):
    from levo_train.data.datamodule import SongDataModule

    out, good = catalogue["out"], catalogue["good"]
    dm = SongDataModule(train=str(out / "train"), val=str(out / "val"), batch_size=64, shuffle_buffer=50,
                        code_size=CS)
    dm.setup()
    n_train = dm.samples_per_epoch
    seen: list[str] = []
    for batch in dm.train_dataloader():
        seen += batch["keys"]
        if len(seen) >= n_train:
            break
    assert sorted(seen[:n_train]) == sorted(k for k in good if split_of(k, VAL) == "train")
    val_keys = []
    for batch in dm.val_dataloader():
        for b, key in enumerate(batch["keys"]):
            T = int(batch["lengths"][b])
            np.testing.assert_array_equal(batch["codes"][b, :, :T].numpy(), good[key]["tokens"])
            assert batch["lyrics"][b] == good[key]["lyric"]
            val_keys.append(key)
    assert sorted(val_keys) == sorted(k for k in good if split_of(k, VAL) == "val")


def test_bad_lines_are_reported_with_line_numbers(catalogue):
    out, bad, said = catalogue["out"], catalogue["bad"], catalogue["said"]
    rows = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["line"]: (r["reason"], r.get("rule")) for r in rows} == bad
    assert [r["line"] for r in rows] == sorted(bad)
    assert len({reason for reason, _ in bad.values()}) == 15  # every kind appears
    for line, (reason, _) in bad.items():
        assert any(s.startswith(f"{catalogue['manifest']}:{line}: ") and reason in s for s in said), line
    dup = next(r for r in rows if r["reason"] == "duplicate_idx")
    assert f"line {catalogue['good']['song-3']['line']}" in dup["error"]
    stats = catalogue["stats"]
    assert stats["rejected"]["by_reason"]["out_of_range"] == 2
    assert {r["line"] for r in stats["rejected"]["lines"]} == set(bad)


def test_a_killed_run_resumes_to_the_same_shards(catalogue, tmp_path):
    ref, out = catalogue["out"], tmp_path / "out"
    cmd = [sys.executable, "-m", "levo_data", "shards", "--manifest", str(catalogue["manifest"]), "--out", str(out),
           "--shard-size", str(SHARD), "--val-fraction", str(VAL)]
    env = {**os.environ, CRASH_ENV: "3", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 86, p.stderr  # hard exit: nothing cleaned up
    assert sorted(x.name for x in (out / "progress").iterdir()) == [f"train-00000{i}.json" for i in range(3)]
    assert list((out / ".partial").rglob("*.tar.tmp"))  # a half-written shard
    assert not (out / "train" / "index.json").exists() and not (out / "stats.json").exists()
    # as if killed between renaming shard 2 into place and recording it: its tar is not trusted
    (out / "progress" / "train-000002.json").unlink()
    said: list[str] = []
    stats = build_shards(catalogue["manifest"], out, shard_size=SHARD, val_fraction=VAL, report=said.append)
    n_shards = len(list(ref.glob("*/*.tar")))
    assert stats["run"]["shards_kept"] == 2 and stats["run"]["shards_written"] == n_shards - 2
    assert not (out / ".partial").exists()
    assert _files(out) == _files(ref)  # byte for byte, the rejected lines included
    def same(st):
        return json.loads(json.dumps({k: v for k, v in st.items() if k != "run"}).replace(str(out), str(ref)))

    assert same(stats) == same(catalogue["stats"])
    # a rerun of a complete run writes nothing and changes nothing
    again = build_shards(catalogue["manifest"], out, shard_size=SHARD, val_fraction=VAL, report=said.append)
    assert again["run"]["shards_written"] == 0 and again["rejected"]["total"] == len(catalogue["bad"])
    assert _files(out) == _files(ref)
    with pytest.raises(UsageError, match="val_fraction"):
        build_shards(catalogue["manifest"], out, shard_size=SHARD, val_fraction=0.5, report=said.append)


def _small_manifest(d: Path, n: int = 30, T: int = 400) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        np.save(d / f"s{i}.npy", rng.integers(0, CS, (3, T)).astype(np.int16))
        lines.append(json.dumps({"idx": f"s{i}", "tokens": f"s{i}.npy", "gt_lyric": LYRICS[i % 4][0]}))
    (d / "m.jsonl").write_text("\n".join(lines) + "\n")
    return d / "m.jsonl"


def test_cli_exit_codes_size_target_and_lyric_options(tmp_path, capsys):
    m, out = _small_manifest(tmp_path), tmp_path / "out"
    base = ["shards", "--manifest", str(m), "--out", str(out)]
    assert main([*base, "--shard-size", "30KB", "--val-fraction", "0"]) == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "rejected:  0 of 30 lines" in printed
    tars = sorted((out / "train").glob("*.tar"))
    assert len(tars) > 2 and all(t.stat().st_size <= 30_000 for t in tars) and not (out / "val").exists()
    assert sum(x["records"] for x in read_index(out / "train")["shards"]) == 30
    # other settings are refused (usage error), --overwrite starts afresh
    assert main([*base, "--shard-size", "30KB", "--val-fraction", "0.5"]) == 2
    assert "val_fraction" in capsys.readouterr().err
    assert main([*base, "--val-fraction", "0.5", "--overwrite", "--lyrics", "normalize"]) == 0
    songs = list(iter_songs([out / "train", out / "val"], code_size=CS))
    assert len(songs) == 30 and {s.lyric for s in songs if s.key == "s3"} == {
        "[verse] hello 世界 . ok 你好 ; [chorus] 我爱 you"}  # normalize stores the canonical form
    assert "[verse] 你好 世界 . 晚安 ; [outro-short]" in {s.lyric for s in songs}
    # --require-vocal rejects the instrumental lyrics, naming the rule; exit status 1
    assert main([*base, "--overwrite", "--require-vocal"]) == 1
    err = capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(3, 31, 4)) and {r["rule"] for r in rows} == {"no_vocal_section"}
    assert f"{m}:3: idx 's2': bad_lyric" in err
    # usage errors
    assert main(["shards", "--manifest", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert main([*base, "--codec-encoder", "songgeneration:/x"]) == 2
    assert "--model-config" in capsys.readouterr().err
    assert main([*base, "--shard-size", "lots"]) == 2
    (tmp_path / "foreign" / "train").mkdir(parents=True)
    (tmp_path / "foreign" / "train" / "x.tar").write_bytes(b"")
    assert main(["shards", "--manifest", str(m), "--out", str(tmp_path / "foreign")]) == 2
    assert script_of(["привет", "мир"]) == "other" and script_of(["안녕", "こんにちは"]) == "cjk"


STANDIN_BUILDERS = '''
import torch


class Tokenizer:
    def __init__(self, sep):
        self.sep = sep

    def encode(self, *wavs):  # 1920 samples per frame; codes: frame index + a per-track offset
        T = wavs[0].shape[-1] // 1920
        codes = [torch.arange(T).expand(w.shape[0], 1, T) + int(w[0, 0, 0]) * 1000 for w in wavs]
        return (codes[0], codes[1]) if self.sep else (codes[0], None)


def get_audio_tokenizer_model(checkpoint, cfg):
    return Tokenizer("sep" in checkpoint)
'''

STANDIN_GENERATE = '''
import os

import torch


class Separator:
    def run(self, path):  # one frame per byte of the file; tracks told apart by their value
        n = 1920 * os.path.getsize(path)
        return torch.zeros(2, n), torch.ones(2, n), torch.full((2, n), 2.0)
'''


@pytest.fixture()
def checkout(tmp_path):
    from codec_fixtures import standin_checkout

    yield from standin_checkout(tmp_path, STANDIN_BUILDERS, STANDIN_GENERATE,
                                "audio_tokenizer_checkpoint: mixed.safetensors\n"
                                "audio_tokenizer_checkpoint_sep: sep.safetensors\n")


def test_audio_lines_are_tokenised_by_the_codec_encoder(checkout, tmp_path, capsys):
    root, cfg = checkout
    d = tmp_path / "cat"
    d.mkdir()
    (d / "a1.wav").write_bytes(b"x" * 37)
    (d / "a2.flac").write_bytes(b"x" * 20)
    (d / "ref.wav").write_bytes(b"x" * 300)
    np.save(d / "t1.npy", np.ones((3, 4), np.int16))
    lines = [{"idx": "a1", "audio": "a1.wav", "gt_lyric": GOOD_LYRIC, "descriptions": "rock"},
             {"idx": "a2", "path": "a2.flac", "gt_lyric": GOOD_LYRIC, "prompt_audio_path": "ref.wav"},
             {"idx": "t1", "tokens": "t1.npy", "gt_lyric": GOOD_LYRIC}]
    m = d / "m.jsonl"
    m.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    base = ["shards", "--manifest", str(m), "--out", str(out), "--val-fraction", "0"]
    assert main(base) == 1  # without an encoder the audio lines are bad lines naming the way out
    err = capsys.readouterr().err
    assert f"{m}:1: idx 'a1': audio_without_encoder" in err and "--codec-encoder songgeneration:PATH" in err
    assert [s.key for s in iter_songs(out / "train", code_size=CS)] == ["t1"]
    enc = ["--codec-encoder", f"songgeneration:{root}", "--model-config", str(cfg), "--device", "cpu"]
    assert main([*base, *enc, "--overwrite"]) == 0, capsys.readouterr().err
    songs = {s.key: s for s in iter_songs(out / "train", code_size=CS)}
    assert list(songs) == ["a1", "a2", "t1"]
    for key, T in (("a1", 37), ("a2", 20)):
        want = np.arange(T)[None] + np.array([[0], [1000], [2000]])  # mixed, vocal, bgm
        np.testing.assert_array_equal(songs[key].tokens, want)
        assert songs[key].meta["duration"] == T / 25
    assert songs["a1"].style == "rock" and songs["a1"].prompt is None
    assert songs["a2"].prompt.shape == (3, 250)  # an audio prompt keeps its first 10 s
    stats = json.loads((out / "stats.json").read_text())
    assert stats["from_audio"] == 2 and stats["settings"]["codec_encoder"] == f"songgeneration:{root}"


def test_a_small_catalogue_without_val_songs_says_so(tmp_path, capsys):
    """Five songs at the default --val-fraction 0.01: no song falls in val/, and the summary says so
    (it used to print nothing about the missing folder)."""
    m, out = _small_manifest(tmp_path, n=5, T=50), tmp_path / "out"
    assert main(["shards", "--manifest", str(m), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not (out / "val").exists()
    assert "val/:      not written: none of the 5 songs fell in the val split" in printed and "--val-fraction" in printed
