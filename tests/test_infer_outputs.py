"""levo-infer never throws away generated songs (issue #20): a failed audio write keeps the tokens and
records the failure per song, ``--skip-existing`` decodes exactly what is missing and merges the
records, ``levo-infer decode`` reproduces levo-infer's FLACs bit for bit from the records' seeds,
output-name collisions, an input inside the output and unwritable outputs are refused up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from codec_fixtures import save_tiny_lm

from levo_infer import cli
from levo_infer import codec as song_codec

sf = pytest.importorskip("soundfile")


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A tiny LM with the real codebook size (its tokens decode with the tiny codec)."""
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "lm")


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    """The quickstart's smoke-test codec: ``levo-infer random-codec DIR`` (one estimator layer)."""
    folder = tmp_path_factory.mktemp("codec") / "noise"
    assert cli.main(["random-codec", str(folder)]) == 0
    return folder


@pytest.fixture
def fast_codec(monkeypatch):
    """The tiny codec with one solver step (its cost is the 1000-frame window, not what is tested)."""
    real = song_codec.load_codec

    def load(folder, device):
        c = real(folder, device)
        c.decoder.steps = 1
        return c

    return lambda: monkeypatch.setattr(song_codec, "load_codec", load)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(out: Path, name: str = "in") -> tuple[list[dict], list[dict]]:
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []  # noqa: E731
    return read(out / "jsonl" / f"{name}.jsonl"), read(out / "jsonl" / f"{name}.errors.jsonl")


def run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv] + ["--no-progress", "--device", "cpu"])
    return rc, capsys.readouterr().err


def samples(path: Path):
    return sf.read(str(path), dtype="int32")[0]


SONGS = [{"idx": i, "gt_lyric": "[verse] la da", "descriptions": "rock"} for i in ("a", "b", "c")]


def test_audio_failure_keeps_tokens_skip_existing_decodes_the_rest_and_decode_reproduces(
        lm, codec_dir, fast_codec, tmp_path, capsys, monkeypatch):
    fast_codec()
    src = write_jsonl(tmp_path / "in.jsonl", SONGS)
    out = tmp_path / "out"
    real_write = song_codec.write_flac
    calls = []

    def write_then_break(wav, sr, path):  # audios/ becomes unwritable after the first FLAC
        calls.append(Path(path).name)
        n = real_write(wav, sr, path)
        if len(calls) == 1:
            (out / "audios").rename(out / "audios.kept")
            (out / "audios").write_text("not a folder")
        return n

    monkeypatch.setattr(song_codec, "write_flac", write_then_break)
    rc, err = run(capsys, lm, src, out, "--codec", codec_dir, "--duration", "0.4", "--seed", "7",
                  "--batch-size", "3")
    assert rc == 1, err
    assert "audio is noise" in err and err.rstrip().splitlines()[-1].count(str(out / "audios"))
    ok, bad = records(out)
    assert [r["idx"] for r in ok] == ["a", "b", "c"]  # every song keeps its record and its tokens
    assert [r["status"] for r in ok] == ["ok", "audio_failed", "audio_failed"]
    assert all((out / "tokens" / f"{i}.pt").is_file() for i in "abc")
    assert [(e["idx"], e["status"]) for e in bad] == [("b", "audio_failed"), ("c", "audio_failed")]
    assert "--skip-existing" in bad[0]["error"] and ok[1]["audios"] == [] and ok[1]["audio_error"]
    first = (out / "audios.kept" / "a.flac").read_bytes()
    # restore audios/; rerun with another base seed: nothing generated, exactly b and c decoded with their own seeds
    (out / "audios").unlink()
    (out / "audios.kept").rename(out / "audios")
    monkeypatch.setattr(song_codec, "write_flac", real_write)
    monkeypatch.setattr(cli, "generate", lambda *a, **k: pytest.fail("--skip-existing regenerated a song"))
    written = []
    monkeypatch.setattr(song_codec, "write_flac", lambda w, sr, p: written.append(Path(p).name) or real_write(w, sr, p))
    rc, err = run(capsys, lm, src, out, "--codec", codec_dir, "--duration", "0.4", "--seed", "1000",
                  "--skip-existing")
    assert rc == 0, err
    assert written == ["b.flac", "c.flac"] and (out / "audios" / "a.flac").read_bytes() == first
    ok2, bad2 = records(out)
    assert bad2 == [] and [r["status"] for r in ok2] == ["ok"] * 3
    assert [r["seed"] for r in ok2] == [7, 8, 9] == [r["seed"] for r in ok]  # seeds and lyrics kept
    assert [r["lyric"] for r in ok2] == [r["lyric"] for r in ok]
    assert [[Path(p).name for p in r["audios"]] for r in ok2] == [["a.flac"], ["b.flac"], ["c.flac"]]
    assert all(len(r["clipped_samples"]) == 1 for r in ok2)
    # a second mode, then levo-infer decode of both runs: every FLAC bit for bit, seeds from the records
    monkeypatch.undo()
    fast_codec()
    out_s = tmp_path / "out_separate"
    rc, err = run(capsys, lm, src, out_s, "--codec", codec_dir, "--duration", "0.4", "--seed", "3",
                  "--mode", "separate", "--batch-size", "2")
    assert rc == 0, err
    for o, names in ((out, ["a", "b", "c"]), (out_s, [f"{i}{sfx}" for i in "abc" for sfx in ("", "_vocal", "_bgm")])):
        dec = tmp_path / f"dec_{o.name}"
        assert cli.main(["decode", str(o / "tokens"), str(dec), "--codec", str(codec_dir), "--device", "cpu"]) == 0
        assert f"{len(names)} from levo-infer's records" in capsys.readouterr().err
        assert sorted(p.stem for p in dec.glob("*.flac")) == sorted(names)
        for n in names:
            assert (samples(dec / f"{n}.flac") == samples(o / "audios" / f"{n}.flac")).all(), (o.name, n)


def test_random_codec_is_labelled_noise_and_loads(codec_dir, capsys):
    from codec_fixtures import tiny_flow, tiny_vae

    from levo_infer.codec import load_decoder
    from levo_infer.codec.decoder import Decoder

    assert "noise" in (codec_dir / "NOISE.txt").read_text().lower()
    assert cli.main(["random-codec", str(codec_dir)]) == 2  # never over an existing codec
    assert "already holds a codec" in capsys.readouterr().err
    d = load_decoder(codec_dir)  # the same modules the tests' tiny codec is made of
    direct = Decoder(flow=tiny_flow(0, layers=1), vae=tiny_vae(0))
    for name, t in direct.flow.state_dict().items():
        assert torch.equal(t, d.flow.state_dict()[name]), name
    cli.load_codec(codec_dir, "cpu")
    assert "random codec" in capsys.readouterr().err


def test_n_song_token_file_decodes_every_song(tmp_path, capsys, monkeypatch):
    seen = []

    class FakeCodec:
        sample_rate = 48000

        def decode(self, tokens, seed=None):
            seen.append((tuple(tokens.shape), seed))
            return torch.full((2, 480 * tokens.shape[-1]), 0.01 * (seed + 1))

        def decode_batch(self, tokens, seeds):
            return [self.decode(t, s) for t, s in zip(tokens, seeds)]

    monkeypatch.setattr(cli, "load_codec", lambda folder, device: FakeCodec())
    src = tmp_path / "toks"
    src.mkdir()
    torch.save(torch.zeros(2, 3, 5, dtype=torch.long), src / "pair.pt")
    torch.save(torch.zeros(3, 4, dtype=torch.long), src / "single.pt")
    assert cli.main(["decode", str(src), str(tmp_path / "o"), "--codec", "x", "--seed", "10"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["pair_0.flac", "pair_1.flac", "single.flac"]
    assert seen == [((3, 5), 10), ((3, 5), 11), ((3, 4), 12)]


def test_output_name_collisions_are_refused_naming_both_lines(lm, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"idx": "a", "gt_lyric": "[verse] la"},
                                              {"idx": "a_vocal", "gt_lyric": "[verse] da"},
                                              {"idx": "B", "gt_lyric": "[verse] la"},
                                              {"idx": "b", "gt_lyric": "[verse] da"}])
    out = tmp_path / "sep"
    rc, err = run(capsys, lm, src, out, "--mode", "separate", "--duration", "0.2", "--seed", "0", "--tokens-only")
    assert rc == 1
    ok, bad = records(out)
    assert [r["idx"] for r in ok] == ["a", "B"]
    assert [e["line"] for e in bad] == [2, 4]
    assert "'a_vocal'" in bad[0]["error"] and "line 1" in bad[0]["error"] and "line 2" in bad[0]["error"]
    assert "only in case" in bad[1]["error"] and "line 3" in bad[1]["error"]
    # in mixed mode a and a_vocal do not collide
    rc, err = run(capsys, lm, src, tmp_path / "mix", "--duration", "0.2", "--seed", "0", "--tokens-only")
    assert rc == 1 and [e["line"] for e in records(tmp_path / "mix")[1]] == [4]


def test_input_inside_the_output_and_unwritable_outputs_are_refused_before_the_model_loads(
        lm, codec_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    (out / "jsonl").mkdir(parents=True)
    src = write_jsonl(out / "jsonl" / "x.jsonl", SONGS)
    before = src.read_bytes()
    rc, err = run(capsys, lm, src, out, "--tokens-only")
    assert rc == 2 and "lies in" in err and src.read_bytes() == before
    # a song whose output would overwrite a prompt file of this run fails; the song reading it runs
    monkeypatch.undo()
    o4 = tmp_path / "o4"
    (o4 / "tokens").mkdir(parents=True)
    prompt = o4 / "tokens" / "p.pt"
    torch.save(torch.randint(0, 100, (3, 5)), prompt)
    before = prompt.read_bytes()
    src = write_jsonl(tmp_path / "p.jsonl", [{"idx": i, "gt_lyric": "[verse] la", "prompt_audio_path": str(prompt)}
                                             for i in ("p", "q")])
    rc, err = run(capsys, lm, src, o4, "--tokens-only", "--duration", "0.2", "--seed", "0")
    assert rc == 1 and prompt.read_bytes() == before and (o4 / "tokens" / "q.pt").is_file()
    (bad,) = records(o4, "p")[1]
    assert bad["idx"] == "p" and "is the prompt_audio_path of line 1" in bad["error"]
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    src = write_jsonl(tmp_path / "in.jsonl", SONGS)
    (tmp_path / "file").write_text("")
    rc, err = run(capsys, lm, src, tmp_path / "file", "--tokens-only")
    assert rc == 2 and "not writable" in err
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "audios").write_text("")  # only the audio folder is broken: found before the model loads
    rc, err = run(capsys, lm, src, tmp_path / "o2", "--codec", codec_dir)
    assert rc == 2 and str(tmp_path / "o2" / "audios") in err
    bad_codec = tmp_path / "bad_codec"
    shutil.copytree(codec_dir, bad_codec)
    (bad_codec / "vae" / "stable_audio_1920_vae.json").write_text("{")
    rc, err = run(capsys, lm, src, tmp_path / "o3", "--codec", bad_codec)
    assert rc == 2 and "--codec" in err and not (tmp_path / "o3").exists()
