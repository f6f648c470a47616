"""``levo-data encode`` on tiny released-layout codec files: a catalogue of WAV/FLAC songs (given
stems, one stem, a plugged-in separator, other rates, mono) and a folder of songs become ``[3, T]``
token files that ``levo-infer decode`` and ``levo-data shards`` read; bad songs are named one at a
time; a rerun keeps what is done; an encode -> decode -> re-encode round trip (plumbing: random
weights, so the agreement printed is not a quality figure)."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
from codec_fixtures import test_song as song
from codec_fixtures import tiny_flow, write_tiny_codec, write_tiny_encoder

from levo_data.cli import main
from levo_infer.codec.encoder import MIXED_FILE, frames_for

LYRIC = "[intro-short] ; [verse] la da . love night ; [chorus] rock pop"


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    """A codec folder with decoder and encoder tensors (the septoken file holds both, as released)."""
    d = tmp_path_factory.mktemp("codec")
    write_tiny_codec(d, flow=tiny_flow(0, layers=1))
    return write_tiny_encoder(d)


def _wav(path, x: torch.Tensor, sr: int = 48000, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.T.numpy(), sr, **kw)


@pytest.fixture()
def catalogue(tmp_path, monkeypatch):
    """Three songs with lyrics: a (48 kHz, vocal and bgm stems), b (44.1 kHz mono FLAC, vocal stem
    only), c (no stems: the plugged-in separator); d is not audio."""
    src = tmp_path / "songs"
    a, va = song(48000 * 2, 0), song(48000 * 2, 1, 0.4)
    _wav(src / "a.wav", a, subtype="FLOAT")
    _wav(src / "a_vocal.wav", va, subtype="FLOAT")
    _wav(src / "a_bgm.wav", a - va, subtype="FLOAT")
    _wav(src / "b.flac", song(44100 * 3 // 2, 2)[:1], 44100)
    _wav(src / "b_vocal.flac", song(44100 * 3 // 2, 3, 0.3)[:1], 44100)
    _wav(src / "c.wav", song(48000, 4))
    (src / "d.wav").write_text("not audio")
    (tmp_path / "my_sep.py").write_text(textwrap.dedent("""
        def vocals(wave, sample_rate):
            assert sample_rate == 48000 and tuple(wave.shape[:1]) == (2,)
            return wave * 0.25
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    lines = [{"idx": "a", "audio": "a.wav", "vocal": "a_vocal.wav", "bgm": "a_bgm.wav", "gt_lyric": LYRIC,
              "descriptions": "pop", "language": "en"},
             {"idx": "b", "path": "b.flac", "vocal": "b_vocal.flac", "gt_lyric": LYRIC},
             {"idx": "c", "audio": "c.wav", "lyric": LYRIC},
             {"idx": "d", "audio": "d.wav", "gt_lyric": LYRIC}]
    (src / "songs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    yield src / "songs.jsonl", a, va
    sys.modules.pop("my_sep", None)


def test_a_catalogue_becomes_token_files_that_decode_and_shards_read(catalogue, codec, tmp_path, capsys, monkeypatch):
    cat, a, va = catalogue
    out = tmp_path / "tokens"
    args = ["encode", str(cat), "--codec", str(codec), "--out", str(out), "--separator", "my_sep:vocals",
            "--device", "cpu", "--batch", "2"]
    assert main(args) == 1  # d failed, the others were written
    err = capsys.readouterr()
    assert "d.wav: " in err.err and "cannot read it as audio" in err.err
    summary = json.loads(err.out)
    assert (summary["encoded"], summary["failed"], summary["kept"]) == (3, 1, 0)
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["idx"], e["line"]) for e in errors] == [("d", 4)]
    toks = {k: np.load(out / f"{k}.npy") for k in "abc"}
    assert {k: v.shape for k, v in toks.items()} == {"a": (3, 51), "b": (3, frames_for(72000)), "c": (3, 26)}
    assert all(v.dtype == np.int16 for v in toks.values())
    # the file's tokens are the encoder's, for the song as read (a: its own stems)
    from levo_infer.codec import load_encoder

    enc = load_encoder(codec)
    np.testing.assert_array_equal(toks["a"], enc.encode(a[None], va[None], (a - va)[None])[0].numpy())
    c = torch.from_numpy(sf.read(str(cat.parent / "c.wav"), dtype="float32", always_2d=True)[0].T.copy())
    np.testing.assert_array_equal(toks["c"], enc.encode(c[None], 0.25 * c[None], 0.75 * c[None])[0].numpy())
    # a rerun keeps what is done (files untouched) and tries the failed song again
    stamp = {k: os.stat(out / f"{k}.npy").st_mtime_ns for k in "abc"}
    assert main(args) == 1
    again = json.loads(capsys.readouterr().out)
    assert (again["encoded"], again["kept"], again["failed"]) == (0, 3, 1)
    assert stamp == {k: os.stat(out / f"{k}.npy").st_mtime_ns for k in "abc"}
    assert main([*args[:-4], "--dtype", "bf16", "--device", "cpu"]) == 2  # other settings: refused
    assert "other settings (dtype" in capsys.readouterr().err
    # manifest.jsonl feeds levo-data shards as it is; the shards validate
    man = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["idx"] for m in man] == ["a", "b", "c"] and man[0]["tokens"] == "a.npy"
    assert man[0]["descriptions"] == "pop" and "audio" not in man[0] and man[0]["source_audio"].endswith("a.wav")
    shards = tmp_path / "shards"
    assert main(["shards", "--manifest", str(out / "manifest.jsonl"), "--out", str(shards), "--val-fraction", "0"]) == 0
    capsys.readouterr()
    assert main(["validate", str(shards / "train")]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 3
    # levo-infer decode reads the .npy files (one solver step: this checks the reading, not the decoder)
    import levo_infer.cli as icli

    real = icli.load_codec

    def fast(d, dev):
        codec_ = real(d, dev)
        codec_.decoder.steps = 1
        return codec_

    monkeypatch.setattr(icli, "load_codec", fast)
    one = tmp_path / "one"
    one.mkdir()
    (one / "c.npy").write_bytes((out / "c.npy").read_bytes())
    assert icli.main(["decode", str(one), str(tmp_path / "wav"), "--codec", str(codec), "--device", "cpu"]) == 0
    data, sr = sf.read(str(tmp_path / "wav" / "c.flac"))
    assert sr == 48000 and data.shape == (int(26 / 100 * 4 * 48000), 2)


def test_a_folder_of_songs_and_usage_errors(codec, tmp_path, capsys):
    src = tmp_path / "lab"
    _wav(src / "album 1" / "My Song!.wav", song(24000, 5)[:1], 24000)  # mono, 24 kHz
    _wav(src / "x.ogg", song(48000, 6), format="OGG", subtype="VORBIS")
    (src / "notes.txt").write_text("skipped: not an audio suffix")
    _wav(src / "odd.wav", song(1000, 7), 44056)
    out = tmp_path / "tok"
    base = ["encode", str(src), "--codec", str(codec), "--out", str(out), "--device", "cpu",
            "--separator", "levo_infer.codec.dsp:check_waveform"]  # "vocals" = the mix itself: bgm silent
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "odd.wav: " in err and "44056 Hz -> 48000 Hz" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy")) == ["album_1/My_Song_.npy", "x.npy"]
    assert np.load(out / "album_1" / "My_Song_.npy").shape == (3, 26)
    man = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["idx"] for m in man] == ["album_1/My_Song_", "x"] and man[0]["tokens"] == "album_1/My_Song_.npy"
    # usage errors: exit 2, naming what is wrong
    (codec / MIXED_FILE).rename(codec / "moved")
    try:
        assert main([*base[:5], str(tmp_path / "tok2")]) == 2
        assert "no model_1rvq/model_2_fixed.safetensors" in capsys.readouterr().err
    finally:
        (codec / "moved").rename(codec / MIXED_FILE)
    assert main(["encode", str(tmp_path / "nothing"), "--codec", str(codec), "--out", str(out)]) == 2
    assert "no such folder or catalogue" in capsys.readouterr().err
    assert main(["encode", str(src), "--codec", str(codec), "--out", str(tmp_path / "t3"), "--device", "cpu",
                 "--separator-ckpt", str(tmp_path / "nodemucs")]) == 2
    assert "no htdemucs separation model" in capsys.readouterr().err


def test_encode_decode_reencode_round_trip(codec):
    """Plumbing through both directions on the same tiny files: the decoded mix and vocal-mode audio
    re-encode to tokens of the same frame rate (agreement printed; random weights, not a quality figure)."""
    from levo_infer.codec import load_decoder, load_encoder

    enc, dec = load_encoder(codec), load_decoder(codec)
    dec.steps = 2
    x, v = song(48000 * 2, 8), song(48000 * 2, 9, 0.5)
    toks = enc.encode(x[None], v[None], (x - v)[None])
    full, _ = dec.decode(toks, "mixed", generator=torch.Generator().manual_seed(0))
    vocal, _ = dec.decode(toks, "vocal", generator=torch.Generator().manual_seed(0))
    again = enc.encode(full, vocal, full - vocal)
    T = toks.shape[-1]
    assert again.shape[:2] == (1, 3) and abs(again.shape[-1] - T) <= 1
    agree = [float((again[0, r, :T] == toks[0, r]).double().mean()) for r in range(3)]
    print(f"round trip code agreement (mixed, vocal, bgm; tiny random weights): {agree}")
    assert all(0.0 <= a <= 1.0 for a in agree)
