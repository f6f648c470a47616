"""Your own songs in, with only this project installed (issue #23, items 4 and the acceptance test):
``levo-data shards --codec`` turns a catalogue of WAV songs into shards that ``levo-data validate``
accepts and ``levo-train recipe=sft`` trains on (stems from the catalogue where given, else the
runtime bundle's htdemucs; audio prompts cut to 10 s; resumable; the same shards from 2 ranks);
``levo-infer`` encodes an audio ``prompt_audio_path`` natively; bad audio is named one song at a
time on both paths. Tiny released-layout codec files and a tiny random htdemucs, written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from codec_fixtures import save_tiny_lm, tiny_htdemucs, write_released_demucs, write_tiny_encoder
from codec_fixtures import test_song as song
from conftest import TINY

from levo_data.cli import main as levo_data
from levo_infer.codec.dsp import load_stereo_48k
from levo_infer.codec.encoder import MIXED_FILE, frames_for, load_native_encoder
from levo_infer.codec.separate import BUNDLE_DEMUCS, DemucsSeparator, stems
from levo_train.data.shards import iter_songs

pytest.importorskip("demucs_infer")

LYRIC = "[intro-short] ; [verse] la da . love night ; [chorus] rock pop"
RANK_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK", "SLURM_LOCALID")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A runtime bundle: ``ckpt/`` with the encoder's two files, ``third_party/demucs/ckpt/htdemucs.*``."""
    root = tmp_path_factory.mktemp("runtime")
    write_tiny_encoder(root / "ckpt")
    write_released_demucs(root / BUNDLE_DEMUCS, tiny_htdemucs())
    return root


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch):
    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)


def _wav(path: Path, x: torch.Tensor, sr: int = 48000, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.T.numpy(), sr, **kw)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> Path:
    """3 songs with lyrics: a with its vocal and bgm stems, b a 44.1 kHz mono FLAC, c with an audio prompt."""
    d = tmp_path_factory.mktemp("songs")
    a, va = song(48000, 0), song(48000, 1, 0.4)
    _wav(d / "a.wav", a, subtype="FLOAT")
    _wav(d / "a_vocal.wav", va, subtype="FLOAT")
    _wav(d / "a_bgm.wav", a - va, subtype="FLOAT")
    _wav(d / "b.flac", song(44100, 2)[:1], 44100)
    _wav(d / "c.wav", song(36000, 3))
    _wav(d / "ref.wav", song(48000 * 12, 4))  # a 12 s prompt: its first 10 s are encoded
    return _jsonl(d / "songs.jsonl", [
        {"idx": "a", "audio": "a.wav", "vocal": "a_vocal.wav", "bgm": "a_bgm.wav", "gt_lyric": LYRIC, "language": "en"},
        {"idx": "b", "audio": "b.flac", "gt_lyric": LYRIC, "descriptions": "pop"},
        {"idx": "c", "path": "c.wav", "lyric": LYRIC, "prompt_audio_path": "ref.wav"}])


def _two_songs(songs: Path) -> Path:
    """The first two songs of the catalogue (given stems; separated)."""
    path = songs.parent / "two.jsonl"
    path.write_text("".join(songs.read_text().splitlines(keepends=True)[:2]))
    return path


@pytest.fixture(scope="module")
def reference(bundle, songs) -> dict[str, np.ndarray]:
    """The tokens of each song encoded directly: given stems, else htdemucs' vocals and full − vocal."""
    d = songs.parent
    enc = load_native_encoder(bundle / "ckpt")
    sep = DemucsSeparator.from_path(bundle)
    out = {}
    for key, files in {"a": ("a.wav", "a_vocal.wav", "a_bgm.wav"), "b": ("b.flac",), "ref": ("ref.wav",)}.items():
        x = [load_stereo_48k(d / f) for f in files]
        v, b = stems(x[0], *x[1:], separator=sep) if len(x) == 3 else stems(x[0], separator=sep)
        n = 480000 if key == "ref" else x[0].shape[-1]
        out[key] = enc.encode_songs([(x[0][:, :n], v[:, :n], b[:, :n])])[0].numpy()
    return out


def test_a_catalogue_of_wav_songs_becomes_shards_that_validate_and_train(bundle, songs, reference, tmp_path,
                                                                          capsys):
    out = tmp_path / "data"
    args = ["shards", "--manifest", str(songs), "--out", str(out), "--codec", str(bundle / "ckpt"), "--device", "cpu",
            "--val-fraction", "0", "--encode-batch", "2"]
    assert levo_data(args) == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["songs"] == 3 and stats["from_audio"] == 3 and stats["with_prompt"] == 1
    assert stats["run"]["encode"]["encoded"] == 4 and stats["settings"]["codec_encoder"] == "native"
    ref = reference
    got = {s.key: s for s in iter_songs(out / "train", code_size=16384)}
    assert sorted(got) == ["a", "b", "c"]
    for k in "ab":  # given stems; separated by the bundle's htdemucs
        np.testing.assert_array_equal(got[k].tokens, ref[k])
    assert got["a"].tokens.shape == (3, frames_for(48000)) and got["c"].tokens.shape == (3, frames_for(36000))
    assert frames_for(480000) == 251 and ref["ref"].shape == (3, 251)  # the released prompt cut
    np.testing.assert_array_equal(got["c"].prompt, ref["ref"][:, :250])
    capsys.readouterr()
    assert levo_data(["validate", str(out / "train")]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 3
    # a rerun keeps the shards and the encoded files (nothing encoded again)
    assert levo_data(args) == 0
    again = json.loads((out / "stats.json").read_text())["run"]
    assert again["shards_kept"] == 1 and again["encode"]["kept"] == 4 and again["encode"]["encoded"] == 0

    from levo_train.cli import main as levo_train

    run = tmp_path / "sft"
    assert levo_train(["recipe=sft", f"run_dir={run}", f"data.train={out / 'train'}", *TINY,
                       "model.config.code_size=16384", "data.batch_size=3", "trainer.max_steps=2",
                       "trainer.val_check_interval=1000"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train"] == str(out / "train") and (run / "export").is_dir()


def test_two_ranks_encode_their_share_and_write_the_same_shards(bundle, songs, reference, tmp_path):
    """torchrun's RANK/WORLD_SIZE: rank 1 encodes every other audio file, rank 0 the rest, waits, and
    writes the shards; the songs equal their direct encoding (as a one-rank run's do)."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "levo_data", "shards", "--manifest", str(_two_songs(songs)), "--out", str(out), "--codec",
           str(bundle / "ckpt"), "--device", "cpu", "--val-fraction", "0", "--encode-batch", "1"]
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    res = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], res
    share = json.loads(res[0][0])
    assert (share["rank"], share["world"], share["this_rank"], share["encoded"]) == (1, 2, 1, 1)
    assert json.loads((out / "stats.json").read_text())["run"]["encode"]["encoded"] == 1
    got = {s.key: s.tokens for s in iter_songs(out / "train", code_size=16384)}
    assert sorted(got) == ["a", "b"] and all(np.array_equal(got[k], reference[k]) for k in got)


def test_bad_songs_are_named_one_at_a_time_in_shards(bundle, tmp_path, capsys):
    d = tmp_path / "bad"
    ok = song(48000, 5)
    _wav(d / "ok.wav", ok)
    _wav(d / "ok_vocal.wav", 0.5 * ok)
    _wav(d / "short_vocal.wav", 0.5 * ok[:, :47000])
    (d / "text.wav").write_text("not audio")
    _wav(d / "empty.wav", torch.zeros(2, 0))
    nan = ok.clone()
    nan[0, 77] = float("nan")
    _wav(d / "nan.wav", nan, subtype="FLOAT")
    _wav(d / "rate.wav", ok[:, :1000], 44056)
    rows = [{"idx": "good", "audio": "ok.wav", "vocal": "ok_vocal.wav", "gt_lyric": LYRIC},
            {"idx": "text", "audio": "text.wav", "gt_lyric": LYRIC},
            {"idx": "empty", "audio": "empty.wav", "gt_lyric": LYRIC},
            {"idx": "nan", "audio": "nan.wav", "gt_lyric": LYRIC},
            {"idx": "rate", "audio": "rate.wav", "gt_lyric": LYRIC},
            {"idx": "stems", "audio": "ok.wav", "vocal": "short_vocal.wav", "bgm": "ok_vocal.wav", "gt_lyric": LYRIC},
            {"idx": "prompt", "audio": "ok.wav", "vocal": "ok_vocal.wav", "gt_lyric": LYRIC,
             "prompt_audio_path": "text.wav"},
            {"idx": "tok", "tokens": "x.npy", "vocal": "ok_vocal.wav", "gt_lyric": LYRIC}]
    man = _jsonl(d / "songs.jsonl", rows)
    out = tmp_path / "out"
    base = ["shards", "--manifest", str(man), "--codec", str(bundle / "ckpt"), "--device", "cpu", "--val-fraction", "0"]
    assert levo_data([*base, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    rej = {r["idx"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert sorted(rej) == ["empty", "nan", "prompt", "rate", "stems", "text", "tok"]
    want = {"text": "text.wav: cannot read it as audio", "empty": "empty.wav: has no samples",
            "nan": "nan.wav: 1 sample(s) are NaN or infinite (first: channel 0, sample 77)",
            "rate": "rate.wav: resampling 44056 Hz", "stems": "the vocal stem holds 47000 samples",
            "prompt": "text.wav: cannot read it as audio", "tok": "stems go with an audio song"}
    for k, words in want.items():
        assert words in rej[k]["error"], (k, rej[k])
        assert f"songs.jsonl:{rej[k]['line']}: idx '{k}'" in err
    assert rej["text"]["reason"] == "encode_failed" and rej["prompt"]["reason"] == "bad_prompt"
    assert [s.key for s in iter_songs(out / "train", code_size=16384)] == ["good"]
    # a codec folder missing a file: a usage error naming it, before anything is encoded
    codec = write_tiny_encoder(tmp_path / "half")
    (codec / MIXED_FILE).unlink()
    assert levo_data([*base[:3], "--codec", str(codec), "--out", str(tmp_path / "o2")]) == 2
    assert "no model_1rvq/model_2_fixed.safetensors" in capsys.readouterr().err
    assert levo_data([*base[:3], "--out", str(tmp_path / "o3")]) == 1  # no encoder: the way out is named
    assert "audio_without_encoder" in (err := capsys.readouterr().err) and "--codec CODEC_DIR" in err


# ----------------------------------------------------------------------------- levo-infer
def test_levo_infer_encodes_an_audio_prompt_natively(bundle, songs, reference, tmp_path, capsys):
    from levo_infer.cli import main

    save_tiny_lm(tmp_path / "lm", prompt_frames=40)
    d = songs.parent
    (tmp_path / "text.wav").write_text("not audio")
    _wav(tmp_path / "nan.wav", torch.full((2, 100), float("nan")), subtype="FLOAT")
    _wav(tmp_path / "rate.wav", song(1000, 6), 44056)
    _wav(tmp_path / "empty.wav", torch.zeros(2, 0))
    src = _jsonl(tmp_path / "in.jsonl", [
        {"idx": "a", "gt_lyric": "[verse] la da", "prompt_audio_path": str(d / "ref.wav")},
        {"idx": "text", "gt_lyric": "[verse] la", "prompt_audio_path": "text.wav"},
        {"idx": "nan", "gt_lyric": "[verse] la", "prompt_audio_path": "nan.wav"},
        {"idx": "rate", "gt_lyric": "[verse] la", "prompt_audio_path": "rate.wav"},
        {"idx": "empty", "gt_lyric": "[verse] la", "prompt_audio_path": "empty.wav"},
        {"idx": "plain", "gt_lyric": "[verse] da"}])
    out = tmp_path / "out"
    args = [str(tmp_path / "lm"), str(src), str(out), "--duration", "0.2", "--seed", "1", "--tokens-only",
            "--no-progress", "--device", "cpu"]
    import levo_infer.request as req

    seen = []
    real = req.check_prompt_tokens

    def spy(t, **kw):
        seen.append(t)
        return real(t, **kw)

    req.check_prompt_tokens = spy
    try:
        assert main([*args, "--codec", str(bundle / "ckpt")]) == 1  # the bad prompts fail their lines alone
    finally:
        req.check_prompt_tokens = real
    err = capsys.readouterr().err
    recs = [json.loads(x) for x in (out / "jsonl" / "in.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in recs] == ["a", "plain"]
    assert recs[0]["prompt"] == {"source": "prompt_audio_path", "path": str(d / "ref.wav"), "frames": 251}
    # the prompt the model saw: the first 10 s of the separated song (the reference encodes it directly)
    np.testing.assert_array_equal(seen[0].numpy(), reference["ref"])
    for line, words in ((2, "text.wav: cannot read it as audio"), (3, "nan.wav: 200 sample(s) are NaN"),
                        (4, "rate.wav: resampling 44056 Hz"), (5, "empty.wav: has no samples")):
        assert f"in.jsonl:{line}: idx" in err and words in err, (line, err)
    capsys.readouterr()
    # no separation model where it is looked for: each audio line says where, and how to pass one
    assert main([*args, "--codec", str(bundle / "ckpt"), "--separator-ckpt", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "no htdemucs separation model: looked for" in err and "--codec-encoder songgeneration:PATH" in err
    # a codec folder missing a file: named
    half = write_tiny_encoder(tmp_path / "half")
    (half / MIXED_FILE).unlink()
    assert main([*args, "--codec", str(half)]) == 1
    assert "no model_1rvq/model_2_fixed.safetensors" in capsys.readouterr().err


def test_rank_0_stops_naming_a_rank_that_failed(bundle, songs, tmp_path):
    """A rank that stops with an error leaves a marker; rank 0, waiting for that rank's share, exits
    naming it (instead of waiting for ever), and what it encoded itself is kept."""
    from levo_data.catalogue import build_shards
    from levo_data.errors import UsageError

    out, man = tmp_path / "out", _two_songs(songs)
    common = dict(codec=bundle / "ckpt", val_fraction=0.0, world=2, report=lambda s: None)
    with pytest.raises(UsageError, match="cannot import module 'no_such_module'"):
        build_shards(man, out, rank=1, separator="no_such_module:vocals", **common)
    with pytest.raises(UsageError, match=r"rank 1 stopped before encoding its songs \(UsageError: --separator"):
        build_shards(man, out, rank=0, separator="no_such_module:vocals", **common)
    assert len(list((out / "encoded").glob("*.npy"))) == 1 and not (out / "train").exists()
