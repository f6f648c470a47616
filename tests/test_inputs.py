"""Input handling (issue #18, items 9-12): training on your own shards in every documented form of
``data.train``; output folders of another kind refused; lyrics longer than the lyric conditioner refused
(or truncated on request, with a warning per song); one JSONL reader (``\\n`` only, BOM, line-size
limit) in every tool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from levo_data.cli import main as levo_data
from levo_train.cli import main as levo_train

CODE_SIZE = 64  # the toy model's codes (TINY keeps the toy model config, only smaller)
LYRICS = ["[verse] la da . love night ; [chorus] rock pop", "[intro-short] ; [verse] sun moon ; [outro-short]"]


def write_catalogue(folder: Path, n: int, *, lyric=None, extra=None) -> Path:
    """A manifest of ``n`` tiny songs (token files [3, T] beside it) with per-dimension scores."""
    rng = np.random.default_rng(0)
    (folder / "t").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        np.save(folder / "t" / f"s{i}.npy", rng.integers(0, CODE_SIZE, (3, 12 + i % 5)).astype(np.int16))
        rec = {"idx": f"song-{i}", "tokens": f"t/s{i}.npy", "gt_lyric": LYRICS[i % 2] if lyric is None else lyric(i),
               "descriptions": "pop, happy", "scores": {"melody": float(rng.random()), "mix": float(rng.random()),
                                                       "overall": float(rng.random())}}
        rec.update((extra or {}).get(i, {}))
        lines.append(json.dumps(rec, ensure_ascii=False))
    manifest = folder / "songs.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


@pytest.fixture(scope="module")
def own_shards(tmp_path_factory) -> Path:
    """``levo-data shards`` output of a 48-song catalogue: train/ (4 shards) and val/."""
    d = tmp_path_factory.mktemp("catalogue")
    manifest = write_catalogue(d, 48)
    assert levo_data(["shards", "--manifest", str(manifest), "--out", str(d / "data"), "--shard-size", "10",
                      "--val-fraction", "0.15", "--code-size", str(CODE_SIZE)]) == 0
    assert len(list((d / "data" / "train").glob("*.tar"))) >= 3 and (d / "data" / "val" / "index.json").is_file()
    return d / "data"


def _weights(run: Path, name: str = "model.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / "export" / name, map_location="cpu", weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- item 9: data.train forms
def test_train_on_own_shards_every_documented_form(own_shards, tmp_path):
    """`levo-train recipe=sft|reward data.train=... data.val=DIR` on `levo-data shards` output: a folder,
    a glob, a brace pattern (the same songs: bit-identical weights) and a list (fewer songs: other weights)."""
    train, val = own_shards / "train", own_shards / "val"
    tars = sorted(str(p) for p in train.glob("*.tar"))
    n = len(tars)
    forms = {"folder": str(train), "glob": f"{train}/*.tar", "brace": f"'{train}/train-{{000000..{n - 1:06d}}}.tar'",
             "list": f"[{tars[0]},{tars[1]}]"}
    steps = ["trainer.max_steps=3", "trainer.val_check_interval=1000", "data.batch_size=4"]
    runs = {}
    for name, spec in forms.items():
        runs[name] = tmp_path / f"sft-{name}"
        assert levo_train(["recipe=sft", f"run_dir={runs[name]}", f"data.train={spec}", f"data.val={val}", *TINY,
                           *steps]) == 0, name
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert summary["data"]["val"] == str(val) and summary["val_loss_start"] is not None
    assert json.loads((runs["list"] / "summary.json").read_text())["data"]["train"] == tars[:2]
    sft = {k: _weights(r) for k, r in runs.items()}
    assert _same(sft["folder"], sft["glob"]) and _same(sft["folder"], sft["brace"])
    assert not _same(sft["folder"], sft["list"])

    # reward: the same forms on scored songs (json `scores`), from the SFT export
    init = runs["folder"] / "export"
    rm = {}
    for name, spec in forms.items():
        run = tmp_path / f"rm-{name}"
        assert levo_train(["recipe=reward", f"run_dir={run}", f"model.init={init}", f"data.train={spec}",
                           f"data.val={val}", *TINY, *steps]) == 0, name
        assert json.loads((run / "export" / "reward.json").read_text())
        rm[name] = _weights(run, "reward.pt")
    assert _same(rm["folder"], rm["glob"]) and _same(rm["folder"], rm["brace"])


def test_train_data_setting_errors(own_shards, tmp_path, capsys):
    """A location that names no shard is one usage line naming the setting, before anything is built."""
    for spec, want in ((str(tmp_path / "nowhere"), "not found"), (f"{own_shards}/train/*.nope", "no shards match"),
                       ("[]", "is empty")):
        assert levo_train(["recipe=sft", f"run_dir={tmp_path / 'r'}", f"data.train={spec}", *TINY]) == 2
        err = capsys.readouterr().err
        assert "levo-train: error: data.train" in err and want in err, err


# ----------------------------------------------------------------------------- shared pieces
LIMIT = 24  # lyric positions of the tiny export below
SPECIAL = "a\u2028b\u2029c\u0085d"  # line and paragraph separators, NEL: raw inside JSON strings
BIG = 30 << 20  # a 30 MB line


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A tiny random model (64 codes, word-level text vocabulary, 24 lyric positions) as an export."""
    from conftest import tiny_config

    from levo_infer.checkpoint import save_released
    from levo_infer.model import LeLM

    torch.manual_seed(0)
    m = LeLM(tiny_config(code_size=CODE_SIZE, lyric_max_len=LIMIT))
    m.init_weights(std=0.2)
    folder = tmp_path_factory.mktemp("export") / "export"
    save_released(m, str(folder))
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_lines(path: Path, lines: list, *, bom: bool = False) -> Path:
    """JSONL as levo-infer writes it (ensure_ascii=False: U+2028 etc. raw); str items are written as given."""
    body = "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8"))
    return path


def _big_line(idx: str) -> str:
    return json.dumps({"idx": idx, "gt_lyric": "[verse] la", "blob": "x" * BIG})


# ----------------------------------------------------------------------------- item 12: the JSONL reader
def test_jsonl_reader_splits_on_newline_only_bom_crlf_and_line_limit(tmp_path, monkeypatch):
    import tracemalloc

    from levo_infer.jsonl import MAX_LINE_ENV, JsonlError, jsonl_lines, jsonl_rows

    rows = [{"idx": "a", "text": SPECIAL}, {"idx": "b", "text": "x\u2028"}]
    p = tmp_path / "in.jsonl"
    body = (b"\xef\xbb\xbf" + json.dumps(rows[0], ensure_ascii=False).encode() + b"\r\n\n  \t\r\n"
            + json.dumps(rows[1], ensure_ascii=False).encode() + b"\n" + _big_line("big").encode() + b"\n"
            + b"\xff\xfe{}\n" + b'{"idx": "c"}')  # no final newline
    p.write_bytes(body)
    tracemalloc.start()
    got = list(jsonl_lines(p))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, f"the 30 MB line was read into memory ({peak} bytes)"
    assert [n for n, _ in got] == [1, 4, 5, 6, 7]  # blank lines 2-3 skipped but counted
    assert [json.loads(t) for n, t in got if isinstance(t, str)] == [*rows, {"idx": "c"}]
    big, bad = got[2][1], got[3][1]
    assert isinstance(big, JsonlError) and big.reason == "line_too_long" and f"{p}:5: line is longer than" in str(big)
    assert isinstance(bad, JsonlError) and bad.reason == "not_utf8" and str(bad).startswith(f"{p}:6: not UTF-8")
    with pytest.raises(JsonlError, match=r"in.jsonl:5: line is longer than 1048576 bytes \(31457\d+ bytes\)"):
        list(jsonl_rows(p))
    bad_json = _write_lines(tmp_path / "j.jsonl", [*rows, *rows, *rows, "{"])
    with pytest.raises(KeyError, match=r"--lyrics .*j.jsonl:7: not valid JSON"):  # the caller's error type
        list(jsonl_rows(bad_json, "--lyrics", KeyError))
    monkeypatch.setenv(MAX_LINE_ENV, "20")
    assert [type(t) for _, t in jsonl_lines(_write_lines(tmp_path / "s.jsonl", [{"k": 1}, {"k": "x" * 30}]))] == [
        str, JsonlError]


SONG_LYRIC = "[verse] la da . love night ; [chorus] rock pop"  # 11 tokens


def _infer(capsys, export: Path, src: Path, out: Path, *extra: str) -> tuple[int, str]:
    from levo_infer import cli

    rc = cli.main([str(export), str(src), str(out), "--duration", "0.2", "--seed", "10", "--tokens-only",
                   "--no-progress", *extra])
    return rc, capsys.readouterr().err


def _rows(path: Path) -> list[dict]:
    from levo_infer.jsonl import jsonl_rows

    return [r for _, r in jsonl_rows(path)] if path.exists() else []


def test_levo_infer_and_levo_eval_tokens_keep_every_song(tiny_export, tmp_path, capsys):
    """Raw U+2028 / U+2029 / U+0085 in strings, a BOM, a 30 MB line: every other song is generated with the
    seed of its own line (the same tokens as from an ASCII-escaped copy), the huge line fails alone, and
    levo-eval tokens finds every song's record in levo-infer's output (which holds those characters raw)."""
    lines = [{"idx": "s1", "gt_lyric": SONG_LYRIC, "descriptions": f"pop {SPECIAL}"},
             {"idx": "s2", "gt_lyric": SONG_LYRIC, "note": "x\u2028y"},
             _big_line("huge"),
             {"idx": "s4", "gt_lyric": SONG_LYRIC, "descriptions": "rock\u0085"}]
    raw, out = _write_lines(tmp_path / "in.jsonl", lines, bom=True), tmp_path / "out"
    rc, err = _infer(capsys, tiny_export, raw, out)
    assert rc == 1 and "in.jsonl:3: line is longer than 1048576 bytes" in err, err
    ok = _rows(out / "jsonl" / "in.jsonl")
    assert [(r["idx"], r["line"], r["seed"]) for r in ok] == [("s1", 1, 10), ("s2", 2, 11), ("s4", 4, 13)]
    assert ok[0]["input"]["descriptions"] == f"pop {SPECIAL}" and ok[1]["input"]["note"] == "x\u2028y"
    assert [e["line"] for e in _rows(out / "jsonl" / "in.errors.jsonl")] == [3]
    assert "\u2028" in (out / "jsonl" / "in.jsonl").read_text(encoding="utf-8")  # written raw

    esc = tmp_path / "esc" / "in.jsonl"  # the same songs, ASCII-escaped, no BOM, a short bad line 3
    esc.parent.mkdir()
    esc.write_text("".join(json.dumps(x) + "\n" for x in [lines[0], lines[1], {"idx": "huge"}, lines[3]]))
    rc, _ = _infer(capsys, tiny_export, esc, tmp_path / "esc_out")
    assert rc == 1
    for idx in ("s1", "s2", "s4"):
        a, b = (torch.load(d / "tokens" / f"{idx}.pt", weights_only=True) for d in (out, tmp_path / "esc_out"))
        assert torch.equal(a, b), idx

    from levo_eval.cli import main as levo_eval

    assert levo_eval(["tokens", "--ref", str(out / "tokens"), "--gen", str(tmp_path / "esc_out" / "tokens"),
                      "--code-size", str(CODE_SIZE)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["errors"] == [] and res["ref"]["n"] == 3 and res["ref"]["unconditioned"] == 0
    assert res["gen"]["unconditioned"] == 0


def test_levo_infer_refuses_lyrics_longer_than_the_conditioner(tiny_export, tmp_path, capsys):
    """A lyric over the 24 lyric positions fails its line, naming the song and both lengths; with
    --truncate-lyrics it is cut, with a warning per song -- and two lyrics differing only after the cut
    then make the same song (why it is not silent)."""
    base = "[verse] " + " ".join(["la"] * 30)  # 32 tokens with the start token
    lines = [{"idx": "a", "gt_lyric": base + " love"}, {"idx": "b", "gt_lyric": base + " night"},
             {"idx": "fits", "gt_lyric": SONG_LYRIC}]
    src = _write_lines(tmp_path / "in.jsonl", lines)
    rc, err = _infer(capsys, tiny_export, src, tmp_path / "out")
    assert rc == 1
    assert [r["idx"] for r in _rows(tmp_path / "out" / "jsonl" / "in.jsonl")] == ["fits"]
    bad = _rows(tmp_path / "out" / "jsonl" / "in.errors.jsonl")
    assert [(e["line"], e["error"]) for e in bad] == [
        (n, f"idx {i!r}: the lyric is 33 tokens long, but the model's lyric conditioner holds {LIMIT} (lyric_max_len): "
            f"shorten it, or pass --truncate-lyrics to cut it to its first {LIMIT} tokens") for n, i in ((1, "a"), (2, "b"))]
    assert "in.jsonl:1: idx 'a': the lyric is 33 tokens long" in err

    rc, err = _infer(capsys, tiny_export, src, tmp_path / "cut", "--truncate-lyrics")
    assert rc == 0, err
    ok = _rows(tmp_path / "cut" / "jsonl" / "in.jsonl")
    assert [len(r.get("warnings", [])) for r in ok] == [1, 1, 0] and ok[0]["settings"]["truncate_lyrics"] is True
    assert "cut to its first 24 tokens (--truncate-lyrics)" in ok[0]["warnings"][0]
    assert err.count("warning:") == 2 and "in.jsonl:2: idx 'b': the lyric is 33 tokens long" in err
    songs = []
    for row in lines[:2]:  # each alone, same seed: the cut lyrics make the same song
        one = _write_lines(tmp_path / f"{row['idx']}.jsonl", [row])
        assert _infer(capsys, tiny_export, one, tmp_path / "same", "--truncate-lyrics")[0] == 0
        songs.append(torch.load(tmp_path / "same" / "tokens" / f"{row['idx']}.pt", weights_only=True))
    assert torch.equal(songs[0], songs[1])


def test_training_refuses_lyrics_longer_than_the_conditioner(tmp_path, capsys, caplog):
    """A shard record whose lyric does not fit the model (TINY: 48 lyric positions) stops training with
    its shard and key; data.truncate_lyrics=true trains with one warning for that song (over two epochs);
    data.skip_bad=true skips it."""
    long = "[verse] " + " ".join(["la"] * 60)  # 62 tokens
    manifest = write_catalogue(tmp_path, 12, lyric=lambda i: long if i == 5 else LYRICS[i % 2])
    assert levo_data(["shards", "--manifest", str(manifest), "--out", str(tmp_path / "data"), "--val-fraction", "0",
                      "--code-size", str(CODE_SIZE)]) == 0
    capsys.readouterr()
    args = ["recipe=sft", f"data.train={tmp_path / 'data' / 'train'}", *TINY, "trainer.max_steps=6",
            "data.batch_size=4", "trainer.val_check_interval=1000"]
    assert levo_train([*args, f"run_dir={tmp_path / 'r1'}"]) == 2
    err = capsys.readouterr().err
    assert ("train-000000.tar: record 'song-5': the lyric is 62 tokens long, but the model's lyric conditioner holds "
            "48 (lyric_max_len): shorten it, or pass data.truncate_lyrics=true") in err, err
    caplog.clear()
    assert levo_train([*args, f"run_dir={tmp_path / 'r2'}", "data.truncate_lyrics=true"]) == 0
    cut = [r.getMessage() for r in caplog.records if "lyric is 62 tokens long" in r.getMessage()]
    assert len(cut) == 1 and "record 'song-5'" in cut[0] and "cut to its first 48 tokens" in cut[0], cut
    assert levo_train([*args, f"run_dir={tmp_path / 'r3'}", "data.skip_bad=true"]) == 0


def _sample(capsys, export: Path, prompts: Path, out: Path) -> tuple[int, str]:
    rc = levo_data(["sample", "--model", str(export), "--prompts", str(prompts), "--per-prompt", "2", "--out", str(out),
                    "--max-frames", "4", "--device", "cpu", "--seed", "3"])
    return rc, capsys.readouterr().err


def test_levo_data_sample_reads_bom_separators_and_refuses_long_lines(tiny_export, tmp_path, capsys, monkeypatch):
    """The same prompts raw (BOM, U+2028 / U+2029 / U+0085 in strings) and ASCII-escaped give the same songs
    with the same seeds; a 30 MB line and a lyric over the model's lyric positions are errors naming the line."""
    from levo_train.data.shards import iter_songs

    for v in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(v, raising=False)
    lines = [{"idx": "p1", "gt_lyric": SONG_LYRIC, "descriptions": f"pop {SPECIAL}"},
             {"idx": "p2", "gt_lyric": SONG_LYRIC, "descriptions": "x\u2028y"},
             {"idx": "p3", "gt_lyric": "[verse] la da"}]
    raw = _write_lines(tmp_path / "raw.jsonl", lines, bom=True)
    esc = tmp_path / "esc.jsonl"
    esc.write_text("".join(json.dumps(x) + "\n" for x in lines))
    songs = {}
    for name, src in (("raw", raw), ("esc", esc)):
        rc, err = _sample(capsys, tiny_export, src, tmp_path / name)
        assert rc == 0, err
        songs[name] = {s.key: s for s in iter_songs(tmp_path / name, code_size=CODE_SIZE)}
    assert sorted(songs["raw"]) == sorted(songs["esc"]) == [f"p{i}-{j}" for i in (1, 2, 3) for j in (0, 1)]
    for k, s in songs["raw"].items():
        e = songs["esc"][k]
        assert np.array_equal(s.tokens, e.tokens) and s.meta["seed"] == e.meta["seed"] and s.style == e.style
    assert songs["raw"]["p1-0"].style.endswith(f"pop {SPECIAL}".lower())

    rc, err = _sample(capsys, tiny_export, _write_lines(tmp_path / "big.jsonl", [lines[0], _big_line("b")]),
                      tmp_path / "big")
    assert rc == 1 and "big.jsonl:2: line is longer than 1048576 bytes" in err, err
    too_long = {"idx": "long", "gt_lyric": "[verse] " + " ".join(["la"] * 30)}
    rc, err = _sample(capsys, tiny_export, _write_lines(tmp_path / "long.jsonl", [lines[0], too_long]), tmp_path / "l")
    assert rc == 1 and ("long.jsonl:2: idx 'long': the lyric is 32 tokens long, but the model's lyric conditioner "
                        f"holds {LIMIT} (lyric_max_len): shorten it") in err, err


def test_levo_data_shards_reads_bom_separators_and_rejects_a_huge_line(tmp_path, capsys):
    """A manifest with a BOM, raw separators in metadata and a 30 MB line: every other song is written,
    the huge line is rejected by its line number, the other line numbers are unchanged."""
    from levo_train.data.shards import iter_songs

    manifest = write_catalogue(tmp_path, 6, extra={0: {"note": SPECIAL}, 4: {"note": "x\u2028y"}})
    lines = manifest.read_text(encoding="utf-8").split("\n")[:-1]
    _write_lines(manifest, [*lines[:2], _big_line("huge"), *lines[2:]], bom=True)
    rc = levo_data(["shards", "--manifest", str(manifest), "--out", str(tmp_path / "data"), "--val-fraction", "0",
                    "--code-size", str(CODE_SIZE)])
    err = capsys.readouterr().err
    assert rc == 1 and "songs.jsonl:3: idx 'huge': line_too_long: " not in err and "songs.jsonl:3: line_too_long" in err
    rejected = _rows(tmp_path / "data" / "rejected.jsonl")
    assert [(r["line"], r["reason"]) for r in rejected] == [(3, "line_too_long")]
    songs = {s.key: s for s in iter_songs(tmp_path / "data" / "train", code_size=CODE_SIZE)}
    assert sorted(songs) == [f"song-{i}" for i in range(6)]
    assert songs["song-0"].meta["note"] == SPECIAL and songs["song-4"].meta["note"] == "x\u2028y"


def test_levo_eval_per_reads_bom_and_separators(tmp_path):
    """levo-eval per's lyric and audio lists: a BOM and U+2028 inside a lyric are read (the lyric whole); a
    30 MB line is an error naming the file and the line."""
    from levo_eval.per import PerError, find_audio, read_lyrics

    lyrics = _write_lines(tmp_path / "lyrics.jsonl", [{"idx": "a", "gt_lyric": f"[verse] la {SPECIAL}"},
                                                      {"idx": "b", "gt_lyric": "[verse] da"}], bom=True)
    assert read_lyrics(lyrics) == {"a": f"[verse] la {SPECIAL}", "b": "[verse] da"}
    audio = _write_lines(tmp_path / "audio.jsonl", [{"idx": "a", "path": "a\u2028.wav"}, {"idx": "b", "path": "b.wav"}],
                         bom=True)
    found, extra = find_audio(audio, ["a", "b"])
    assert found == {"a": tmp_path / "a\u2028.wav", "b": tmp_path / "b.wav"} and extra == []
    _write_lines(lyrics, [{"idx": "a", "gt_lyric": "[verse] la"}, _big_line("b")])
    with pytest.raises(PerError, match=r"--lyrics .*lyrics.jsonl:2: line is longer than 1048576 bytes"):
        read_lyrics(lyrics)


# ----------------------------------------------------------------------------- item 10: output folders
def test_writers_refuse_output_folders_of_another_kind(own_shards, tiny_export, tmp_path, capsys):
    """`levo-data sample --out` on a song shard folder used to replace its index.json (48 songs became the
    new ones in every reader). Every writer refuses a folder of another kind with one line (exit 2) naming
    it and what it holds, before writing anything; the shards are byte-identical afterwards."""
    prompts = _write_lines(tmp_path / "prompts.jsonl", [{"idx": "p", "gt_lyric": SONG_LYRIC}])
    train, val = own_shards / "train", own_shards / "val"
    n_train = json.loads((train / "index.json").read_text())["records"]
    before = _tree(own_shards)
    export_before = _tree(tiny_export)
    songs = f"song shards (index.json: {n_train} songs in"
    catalogue = "training shards of levo-data shards (catalogue.json)"
    sample = ["sample", "--model", str(tiny_export), "--prompts", str(prompts), "--per-prompt", "1", "--device", "cpu"]
    cases = [
        ([*sample, "--out", str(train)], train, songs),
        ([*sample, "--out", str(own_shards)], own_shards, catalogue),
        ([*sample, "--out", str(tiny_export)], tiny_export, "a model export (model.pt / config.yaml)"),
        (["score", str(val), "--scorer", "toy", "--out", str(train)], train, songs),
        (["pairs", "--candidates", str(val), "--out", str(train)], train, songs),
        (["pairs", "--toy", "--out", str(own_shards), "--n-train", "2", "--n-val", "0"], own_shards, catalogue),
        (["shards", "--manifest", str(prompts), "--out", str(train), "--overwrite"], train, songs),
        (["toy", "--out", str(own_shards), "--n-train", "4", "--n-val", "2"], own_shards, catalogue),
        (["merge", str(tiny_export), "--weights", "1", "--out", str(train)], train, songs),
    ]
    for argv, folder, what in cases:
        assert levo_data(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: --out {folder} holds {what}" in err and "nothing was written" in err, err
    assert _tree(own_shards) == before and _tree(tiny_export) == export_before

    # their own kind of folder is still theirs: a sample folder resumes, a scored folder is rescored into
    cands = tmp_path / "cands"
    for _ in range(2):
        assert levo_data([*sample, "--out", str(cands), "--max-frames", "4"]) == 0
    assert levo_data(["score", str(cands), "--scorer", "toy", "--out", str(tmp_path / "scored")]) == 0
    assert levo_data(["score", str(cands), "--scorer", "toy", "--out", str(tmp_path / "scored")]) == 0
    assert levo_data([*sample, "--out", str(tmp_path / "scored")]) == 2
    assert "holds scored songs of levo-data score (score.json)" in capsys.readouterr().err
