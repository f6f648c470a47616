"""``levo-eval audio-score``: the built-in scorer's definitions (BS.1770 K-weighting and gated
loudness against the standard's reference values, RMS, clipping, silence, duration), user scorers
through the one loader shared with the audio-domain reward scorer, and bad inputs named."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from levo_eval.audio_score import BUILTIN, basic, integrated_loudness, k_weighting
from levo_eval.cli import main

SR = 48000


def _sine(seconds: float, amp: float = 1.0, sr: int = SR, freq: float = 997.0) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)


def _write_module(tmp_path: Path, monkeypatch, name: str, text: str) -> None:
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- definitions
def test_k_weighting_and_loudness_match_bs1770_reference_values():
    (b1, a1), (b2, a2) = k_weighting(48000)
    # the coefficients BS.1770-4 lists for 48 kHz
    np.testing.assert_allclose(b1, [1.53512485958697, -2.69169618940638, 1.19839281085285], atol=1e-9)
    np.testing.assert_allclose(a1, [1.0, -1.69065929318241, 0.73248077421585], atol=1e-9)
    np.testing.assert_allclose(b2, [1.0, -2.0, 1.0])
    np.testing.assert_allclose(a2, [1.0, -1.99004745483398, 0.99007225036621], atol=1e-9)
    # a 0 dBFS 997 Hz sine in one channel reads -3.01 LUFS, in both channels 0 LUFS; -20 dB: -23.01
    s = _sine(5.0)
    for sr in (48000, 44100):
        s = _sine(5.0, sr=sr)
        assert integrated_loudness(np.stack([s, 0 * s]), sr) == pytest.approx(-3.01, abs=0.02)
        assert integrated_loudness(np.stack([s, s]), sr) == pytest.approx(0.0, abs=0.02)
        assert integrated_loudness(0.1 * s[None], sr) == pytest.approx(-23.01, abs=0.02)
    # gating: 400 ms blocks every 100 ms; the silent blocks of a 4 s gap fall below the absolute gate,
    # the blocks straddling an edge hold the sine's power times the share of the block it fills
    s = _sine(3.0, 0.1)
    gapped = np.concatenate([s, np.zeros(4 * SR), s])[None]
    starts = np.arange(0, 10.0 - 0.4 + 1e-9, 0.1)
    share = (np.clip(3.0 - starts, 0, 0.4) + np.clip(starts + 0.4 - 7.0, 0, 0.4)) / 0.4
    want = integrated_loudness(s[None], SR) + 10 * math.log10(share[share > 1e-6].mean())
    assert integrated_loudness(gapped, SR) == pytest.approx(want, abs=0.01)
    assert want < integrated_loudness(s[None], SR) - 0.1  # (a plain mean over all blocks would be ~2.2 dB lower)
    assert integrated_loudness(np.zeros((2, SR)), SR) == -70.0  # silence: the floor, finite


def test_basic_scorer_definitions():
    s = _sine(2.0).astype(np.float32)
    r = basic(np.stack([s, s]), SR)
    assert set(r) == {"rms_dbfs", "peak_dbfs", "loudness_lufs", "clip_ratio", "silence_ratio", "duration_s"}
    assert r["rms_dbfs"] == pytest.approx(20 * math.log10(math.sqrt(0.5)), abs=1e-3)  # -3.01
    assert r["duration_s"] == 2.0 and r["silence_ratio"] == 0.0
    # a full-scale sine touches |x| >= 0.999 near its peaks: the share of such samples, by hand
    assert r["clip_ratio"] == pytest.approx(float((np.abs(s) >= 0.999).mean()))
    # hard clipping: every sample of a square wave at full scale; half silence: half the 50 ms frames
    sq = np.sign(_sine(1.0)).astype(np.float32)
    half = np.concatenate([np.zeros(SR, np.float32), 0.5 * s[:SR]])
    r2 = basic(np.stack([sq, sq]), SR)
    assert r2["clip_ratio"] == pytest.approx((np.abs(sq) >= 0.999).mean()) and r2["clip_ratio"] > 0.99
    r3 = basic(half[None], SR, requested_s=4.0, expected_s=1.5)
    assert r3["silence_ratio"] == pytest.approx(0.5, abs=0.03)
    assert r3["duration_ratio"] == pytest.approx(0.5) and r3["length_error_s"] == pytest.approx(0.5)
    r4 = basic(np.zeros((2, 0), np.float32), SR)  # empty audio: finite floors
    assert r4 == {"rms_dbfs": -120.0, "peak_dbfs": -120.0, "loudness_lufs": -70.0, "clip_ratio": 0.0,
                  "silence_ratio": 1.0, "duration_s": 0.0}


# ----------------------------------------------------------------------------- the command
LAB = '''
import numpy as np

def two(wav, sr):
    return {"energy": float((wav.astype(np.float64) ** 2).mean()), "channels": wav.shape[0]}

def three(wav, sr, song):
    return {"seconds": wav.shape[1] / sr, "has_song": float(song is not None)}

def as_list(wav, sr):
    return [1.0]

def nan_for_short(wav, sr):
    return {"x": float("nan") if wav.shape[1] < sr else 1.0}

def boom(wav, sr):
    raise RuntimeError("model weights missing")
'''


def _audio_dir(tmp_path: Path) -> Path:
    d = tmp_path / "audios"
    d.mkdir()
    sf.write(d / "a.flac", np.stack([_sine(2.0, 0.5)] * 2, axis=1), SR)        # stereo flac
    sf.write(d / "b.wav", _sine(0.5, 0.25, sr=16000), 16000, subtype="PCM_16")          # mono wav at 16 kHz
    sf.write(d / "c_vocal.flac", np.stack([_sine(1.0, 0.1)] * 2, axis=1), SR)  # separate-mode name
    (d / "broken.flac").write_bytes(b"not audio at all")
    (d / "notes.txt").write_text("ignored")
    return d


def test_audio_score_command(tmp_path, capsys):
    d = _audio_dir(tmp_path)
    req = tmp_path / "songs.jsonl"
    recs = [{"idx": "a", "duration": 4.0}, {"idx": "c", "frames": 25, "settings": {"duration": 2.0}}]
    req.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "res" / "scores.json"
    assert main(["audio-score", "--audio", str(d), "--requested", str(req), "--out", str(out)]) == 1
    cap = capsys.readouterr()
    res = json.loads(cap.out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == res
    assert res["scorers"] == [BUILTIN] and res["n_files"] == 4 and res["n_ok"] == 3
    assert sorted(res["files"]) == ["a.flac", "b.wav", "c_vocal.flac"]
    # the unreadable file fails alone, named
    assert [e["file"] for e in res["errors"]] == ["broken.flac"] and "cannot read audio" in res["errors"][0]["error"]
    assert "broken.flac" in cap.err
    a, b, c = (res["files"][k][BUILTIN] for k in ("a.flac", "b.wav", "c_vocal.flac"))
    assert a["duration_s"] == pytest.approx(2.0) and a["duration_ratio"] == pytest.approx(0.5)
    assert a["rms_dbfs"] == pytest.approx(-3.01 - 6.02, abs=0.01) and a["loudness_lufs"] == pytest.approx(-6.02, abs=0.05)
    assert b["duration_s"] == pytest.approx(0.5) and "duration_ratio" not in b  # no record for b
    # c_vocal matches idx c: 25 frames -> output_samples(25) = 48000 samples = 1.0 s
    assert c["duration_ratio"] == pytest.approx(0.5) and c["length_error_s"] == pytest.approx(0.0, abs=1e-9)
    assert res["no_request"] == ["b.wav"]
    means = res["mean"][BUILTIN]
    assert means["duration_s"] == pytest.approx((2.0 + 0.5 + 1.0) / 3)
    assert means["duration_ratio"] == pytest.approx(0.5) and res["n"][BUILTIN]["duration_ratio"] == 2


def test_user_scorers_through_the_shared_loader(tmp_path, monkeypatch, capsys):
    """One ``module:function`` serves ``levo-eval audio-score`` and the audio-domain reward scorer."""
    import torch

    from levo_train.data.shards import Song
    from levo_train.scorers import load_scorer

    _write_module(tmp_path, monkeypatch, "lab_aesthetics", LAB)
    d = _audio_dir(tmp_path)
    (d / "broken.flac").unlink()
    argv = ["audio-score", "--audio", str(d), "--scorer", "lab_aesthetics:two", "--scorer", "lab_aesthetics:three",
            "--scorer", "basic"]
    assert main(argv) == 0
    res = _last_json(capsys)
    assert res["scorers"] == ["lab_aesthetics:two", "lab_aesthetics:three", BUILTIN] and res["errors"] == []
    a = res["files"]["a.flac"]
    assert a["lab_aesthetics:two"] == {"energy": pytest.approx(0.125, rel=1e-3), "channels": 2.0}
    assert a["lab_aesthetics:three"] == {"seconds": 2.0, "has_song": 0.0}  # no song in audio-score
    assert res["files"]["b.wav"]["lab_aesthetics:two"]["channels"] == 1.0

    class Codec:  # stand-in: each frame -> 480 samples of a 0.5 sine, stereo
        def decode(self, tokens, mode="mixed"):
            n = tokens.shape[-1] * 480
            w = 0.5 * torch.sin(2 * torch.pi * 997 * torch.arange(n) / SR)
            return w.expand(tokens.shape[0], 2, n).clone(), SR

    songs = [Song("s0", np.zeros((3, 100), np.int64), "[verse] la", "pop", None)]
    for spec, want in (("lab_aesthetics:two", {"energy": 0.125}), ("lab_aesthetics:three", {"has_song": 1.0}),
                       (BUILTIN, {"duration_s": 1.0})):
        got = load_scorer(f"audio:{spec}", codec=Codec()).score(songs)[0]
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-3), (spec, got)


def test_bad_scorers_are_named(tmp_path, monkeypatch, capsys):
    _write_module(tmp_path, monkeypatch, "lab_aesthetics", LAB)
    d = _audio_dir(tmp_path)
    (d / "broken.flac").unlink()
    assert main(["audio-score", "--audio", str(d), "--scorer", "no_such_lab.models:songeval"]) == 2
    err = capsys.readouterr().err
    assert "no_such_lab.models:songeval" in err and "cannot import module 'no_such_lab.models'" in err
    assert main(["audio-score", "--audio", str(d), "--scorer", "lab_aesthetics:missing"]) == 2
    assert "lab_aesthetics has no attribute 'missing'" in capsys.readouterr().err
    assert main(["audio-score", "--audio", str(d), "--scorer", "lab_aesthetics:as_list", "--scorer",
                 "lab_aesthetics:nan_for_short", "--scorer", "lab_aesthetics:boom"]) == 1
    cap = capsys.readouterr()
    res = json.loads(cap.out.strip().splitlines()[-1])
    errs = {(e["file"], e["scorer"]): e["error"] for e in res["errors"]}
    assert len(errs) == 3 + 1 + 3  # as_list and boom on every file, nan only on the short b.wav
    assert "returned list [1.0], expected a non-empty {dimension: score} dict" in errs[("a.flac", "lab_aesthetics:as_list")]
    nan = errs[("b.wav", "lab_aesthetics:nan_for_short")]
    assert "b.wav: scorer lab_aesthetics:nan_for_short: score 'x' is nan" in nan
    assert "raised RuntimeError: model weights missing" in errs[("c_vocal.flac", "lab_aesthetics:boom")]
    assert res["files"]["a.flac"] == {"lab_aesthetics:nan_for_short": {"x": 1.0}}  # the good result is kept
    assert "a.flac: scorer lab_aesthetics:boom" in cap.err
    # folder and --requested problems: exit status 2, named
    assert main(["audio-score", "--audio", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["audio-score", "--audio", str(empty)]) == 2
    assert "no *.wav / *.flac files" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"idx": "a", "duration": 3}\n{"idx": "b"}\n')
    assert main(["audio-score", "--audio", str(d), "--requested", str(bad)]) == 2
    assert "bad.jsonl:2: idx 'b' has neither `duration`" in capsys.readouterr().err
