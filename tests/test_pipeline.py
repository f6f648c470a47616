"""LeVo 2's offline path: scorers (weighted, audio adapter, spec strings), ``levo-data sample``
(ranks, resume, settings check), ``levo-data score`` and the pairs/DPO they feed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from levo_data.cli import main as levo_data
from levo_train.data.shards import Song, iter_songs
from levo_train.scorers import AudioScorer, WeightedScorer, load_callable, load_scorer
from levo_train.toy.scorer import ToyOracleScorer
from levo_train.toy.world import TOY_CODE_SIZE, ToyWorld

RANK_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK", "SLURM_LOCALID")


def _toy_songs(n: int = 4) -> list[Song]:
    from levo_train.toy.pairs import toy_candidates

    return toy_candidates(ToyWorld(0), 2, n // 2, seed=1)


# ----------------------------------------------------------------------------- scorers
def test_weighted_scorer_parts_and_dimensions():
    songs = _toy_songs()
    a, b = ToyOracleScorer(0), ToyOracleScorer(1)
    sa, sb = a.score(songs), b.score(songs)
    w = WeightedScorer([("w0", a, 0.75), ("w1", b, 0.25)])
    # every name is shared by both parts, so all are prefixed by the part's label
    assert set(w.dimensions) == {f"{lb}.{d}" for lb in ("w0", "w1") for d in (*a.dimensions, "quality")}
    out = w.score(songs)
    for o, x, y in zip(out, sa, sb):
        assert o["weighted"] == pytest.approx(0.75 * x["quality"] + 0.25 * y["quality"])
        assert o["w0.lyrics"] == x["lyrics"] and o["w1.mix"] == y["mix"]
    per_dim = WeightedScorer({"lyrics": 2.0, "mix": -1.0}, scorer=a, overall="mine")
    assert per_dim.dimensions == (*a.dimensions, "quality") and per_dim.overall == "mine"
    for o, x in zip(per_dim.score(songs), sa):
        assert o["mine"] == pytest.approx(2 * x["lyrics"] - x["mix"]) and o["harmony"] == x["harmony"]
    with pytest.raises(ValueError, match="does not output"):
        WeightedScorer({"loudness": 1.0}, scorer=a)


def _write_module(tmp_path: Path, monkeypatch, name: str, text: str) -> None:
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


class SineCodec:
    """Stand-in codec: every frame of the mixed stream becomes 64 samples of a sine whose pitch is
    the code (stereo, the right channel at half level)."""

    rate = 1600

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def decode(self, tokens, mode="mixed"):
        import torch

        self.calls.append(tuple(tokens.shape))
        b, _, t = tokens.shape
        f = (100.0 + 10.0 * tokens[:, 0, :].double()).repeat_interleave(64, dim=1)  # [B, N]
        phase = torch.cumsum(2 * torch.pi * f / self.rate, dim=1)
        left = torch.sin(phase).float()
        return torch.stack([left, 0.5 * left], dim=1), self.rate


AUDIO_SCORER = '''
import numpy as np

def loudness(wav, sr, song):
    assert wav.dtype == np.float32 and wav.ndim == 2 and wav.shape[0] == 2
    return {"rms": float(np.sqrt((wav ** 2).mean())), "seconds": wav.shape[1] / sr, "frames": song.frames}

def broken(wav, sr, song):
    return {"rms": float("nan")}

not_callable = 3
'''


def test_audio_scorer_with_stand_in_codec(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "lab_audio", AUDIO_SCORER)
    songs = _toy_songs(4)
    songs.append(Song("short", songs[0].tokens[:, :5].copy(), songs[0].lyric, songs[0].style, None))
    codec = SineCodec()
    s = AudioScorer(codec, "lab_audio:loudness", sample_rate=None, dimensions=["rms", "seconds"], batch_size=2)
    out = s.score(songs)
    assert s.dimensions == ("rms", "seconds") and s.overall == "overall"
    for o, song in zip(out, songs):
        assert o["seconds"] == pytest.approx(song.frames * 64 / SineCodec.rate)
        assert o["rms"] == pytest.approx(np.sqrt((1 + 0.25) / 4), rel=0.05)  # sine at levels 1 and 0.5
        assert o["overall"] == pytest.approx((o["rms"] + o["seconds"]) / 2)
    assert all(c[0] <= 2 and c[1] == 3 for c in codec.calls)  # batches of equal length, at most batch_size
    # dimensions from the first result; overall = one of them
    s2 = AudioScorer(SineCodec(), "lab_audio:loudness", sample_rate=None, overall="rms")
    o2 = s2.score(songs[:1])[0]
    assert s2.dimensions == ("seconds", "frames") and o2["rms"] == pytest.approx(out[0]["rms"])
    with pytest.raises(ValueError, match="lab_audio:broken.*'short'|score 'rms' is nan"):
        AudioScorer(SineCodec(), "lab_audio:broken", sample_rate=None).score(songs[-1:])
    try:
        import torchaudio  # noqa: F401
    except ImportError:  # a codec rate other than the one asked for needs torchaudio
        with pytest.raises(ValueError, match="codec decodes at 1600 Hz but the audio scorer wants 48000 Hz"):
            AudioScorer(SineCodec(), "lab_audio:loudness").score(songs[:1])
    # through a spec: audio:MODULE:FUNCTION with a codec factory
    _write_module(tmp_path, monkeypatch, "lab_codec", "from test_pipeline import SineCodec\n"
                  "def make(device='cpu'):\n    return SineCodec()\n")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    spec = load_scorer("audio:lab_audio:loudness", codec="lab_codec:make")
    assert spec.score(songs[:1])[0]["rms"] == pytest.approx(out[0]["rms"])
    with pytest.raises(ValueError, match="need a codec.*--codec CODEC_DIR.*MODULE:FACTORY"):
        load_scorer("audio:lab_audio:loudness")
    # the native decoder: a codec folder in the released layout (tiny) decodes the songs for the scorer
    from codec_fixtures import tiny_flow, write_tiny_codec

    folder = write_tiny_codec(tmp_path / "codec", flow=tiny_flow(0, layers=1))
    native = load_scorer("audio:lab_audio:loudness", codec=str(folder))
    got = native.score(songs[:1])[0]
    assert got["seconds"] == pytest.approx(int(songs[0].frames) / 25, abs=1e-3) and got["rms"] > 0
    with pytest.raises(ValueError, match="--codec .*no model_septoken"):
        load_scorer("audio:lab_audio:loudness", codec=str(tmp_path))


def test_load_callable_and_scorer_specs(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "lab_audio", AUDIO_SCORER)
    _write_module(tmp_path, monkeypatch, "lab_scorers", "from levo_train.toy.scorer import ToyOracleScorer\n"
                  "def make(world_seed=0):\n    return ToyOracleScorer(world_seed + 5)\n"
                  "def bad():\n    return 3\n")
    with pytest.raises(ValueError, match="--fn 'nocolon': expected MODULE:FUNCTION"):
        load_callable("nocolon", setting="--fn")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod_xyz' \\(ModuleNotFoundError"):
        load_callable("no_such_mod_xyz:f", setting="--fn")
    with pytest.raises(ValueError, match="lab_audio has no attribute 'nope'"):
        load_callable("lab_audio:nope", setting="--fn")
    with pytest.raises(ValueError, match="not callable"):
        load_callable("lab_audio:not_callable", setting="--fn")
    assert load_scorer("toy").world.seed == 0 and load_scorer("toy:3").world.seed == 3
    assert load_scorer("toy", world_seed=2).world.seed == 2
    assert load_scorer("callable:lab_scorers:make", world_seed=1).world.seed == 6
    with pytest.raises(ValueError, match="--scorer 'callable:lab_scorers:bad'.*without the Scorer surface"):
        load_scorer("callable:lab_scorers:bad")
    w = load_scorer("weighted:toy=0.5,toy:1=0.5")
    assert isinstance(w, WeightedScorer) and "toy.quality" in w.dimensions and "toy1.quality" in w.dimensions
    cfg = tmp_path / "w.json"
    cfg.write_text(json.dumps({"scorer": "toy", "weights": {"lyrics": 1.0, "structure": 1.0}, "overall": "ls"}))
    wj = load_scorer(f"weighted:{cfg}")
    songs = _toy_songs(2)
    o = wj.score(songs)[0]
    assert o["ls"] == pytest.approx(o["lyrics"] + o["structure"])
    for bad, msg in (("nope:x", "unknown scorer; expected one of: toy"), ("toy:x", "integer world seed"),
                     ("rm:/no/such/export", "reward-model export /no/such/export not found"),
                     ("weighted:toy", "is not SPEC=WEIGHT"), ("weighted:toy=abc", "weight 'abc'")):
        with pytest.raises(ValueError, match=msg) as e:
            load_scorer(bad)
        assert str(e.value).startswith("--scorer")


# ----------------------------------------------------------------------------- sample -> score -> pairs
def _prompts_jsonl(path: Path, n: int) -> Path:
    from levo_train.toy.pairs import toy_prompts

    ps = toy_prompts(ToyWorld(0), n, seed=11, tier=("top", "none"))
    path.write_text("".join(json.dumps({"idx": f"toy {i}", "gt_lyric": p.lyric, "descriptions": p.style}) + "\n"
                            for i, p in enumerate(ps)))
    return path


def _run(args: list[str], capsys) -> tuple[int, dict, str]:
    rc = levo_data(args)
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else {}), cap.err


def _songs(folder: Path) -> dict[str, Song]:
    return {s.key: s for s in iter_songs(folder, code_size=TOY_CODE_SIZE)}


def test_sample_ranks_resume_score_pairs_dpo(tmp_path, toy_sft_export, toy_cache_dir, capsys, monkeypatch):
    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    prompts = _prompts_jsonl(tmp_path / "prompts.jsonl", 10)
    common = ["--model", str(toy_sft_export), "--prompts", str(prompts), "--per-prompt", "4", "--max-frames", "96",
              "--records-per-shard", "8", "--device", "cpu", "--seed", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    rc, res, err = _run(["sample", *common, "--out", str(one), "--batch-size", "64"], capsys)
    assert rc == 0, err
    assert res["complete"] and res["world"] == 1 and res["sampled_now"] == 40
    with capsys.disabled():
        print(f"\nsampling throughput (1 rank, cpu, tiny toy model): {res['songs_per_second']} songs/s")
    songs1 = _songs(one)
    assert len(songs1) + res["empty_dropped"] == 40
    s = songs1["toy_0-2"]
    assert s.meta["prompt_key"] == "toy_0" and s.meta["sample_index"] == 2 and s.meta["sampling"]["max_frames"] == 96
    assert s.style.startswith("[Musicality-very-high]")  # formatted as levo-infer formats descriptions
    assert len(list(one.glob("rank000-*.tar"))) == 5 and (one / "done.json").is_file()
    from levo_infer.config import load_config

    index = json.loads((one / "index.json").read_text())  # the sampling model's tokens, for rm: scorers' check
    assert index["delays"] == list(load_config(toy_sft_export).delays) and index["code_size"] == TOY_CODE_SIZE

    # 2 ranks via srun's variables (rank 1 first: the last finisher writes the index), other batch size
    for r in (1, 0):
        monkeypatch.setenv("SLURM_PROCID", str(r))
        monkeypatch.setenv("SLURM_NTASKS", "2")
        rc, res, err = _run(["sample", *common, "--out", str(two), "--batch-size", "7"], capsys)
        assert rc == 0, err
        assert res["rank"] == r and res["complete"] == (r == 0)
    songs2 = _songs(two)
    assert sorted(songs2) == sorted(songs1)
    for k, a in songs1.items():
        assert np.array_equal(a.tokens, songs2[k].tokens) and a.meta["seed"] == songs2[k].meta["seed"]

    # resume: rank 1's last chunk lost -> only its prompts are sampled again, to the same songs
    last = sorted(two.glob("rank001-*.tar"))[-1]
    lost = {k for k, s in songs2.items() if s.shard == str(last)}
    last.unlink()
    rc, _, err = _run(["score", str(two), "--scorer", "toy", "--out", str(tmp_path / "early")], capsys)
    assert rc == 1 and f"{last} is listed (index.json?) but missing" in err  # no scoring of a partial set
    (two / "done.json").rename(tmp_path / "done.json")
    rc, _, err = _run(["score", str(two), "--scorer", "toy", "--out", str(tmp_path / "early")], capsys)
    assert rc == 1 and "has not finished there (no done.json)" in err
    monkeypatch.setenv("SLURM_PROCID", "1")
    rc, res, err = _run(["sample", *common, "--out", str(two)], capsys)
    assert rc == 0, err
    assert res["sampled_now"] == 4 * len({songs2[k].meta["prompt_index"] for k in lost}) and res["complete"]
    assert res["skipped_prompts"] == 5 - len({songs2[k].meta["prompt_index"] for k in lost})
    again = _songs(two)
    assert sorted(again) == sorted(songs1) and all(np.array_equal(again[k].tokens, songs1[k].tokens) for k in lost)
    # a complete set: nothing to do
    rc, res, _ = _run(["sample", *common, "--out", str(two)], capsys)
    assert rc == 0 and res["sampled_now"] == 0 and res["complete"]
    # changed settings are refused, naming them
    rc, _, err = _run(["sample", *common[:-2], "--seed", "4", "--temperature", "0.9", "--out", str(two)], capsys)
    assert rc == 1 and "sampling.temperature: 1.0 then, 0.9 now" in err and "seed: 3 then, 4 now" in err
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.delenv("SLURM_NTASKS")

    # score -> pairs -> DPO
    scored = tmp_path / "scored"
    rc, _, err = _run(["score", str(two), "--scorer", "bogus", "--out", str(scored)], capsys)
    assert rc == 1 and "levo-data score: error: --scorer 'bogus': unknown scorer" in err
    rc, res, err = _run(["score", str(two), "--scorer", "toy", "--out", str(scored), "--batch-size", "16"], capsys)
    assert rc == 0, err
    assert res["overall"] == "quality" and res["songs_scored"] == len(songs1)
    world = ToyWorld(0)
    for k, sc in _songs(scored).items():
        assert sc.meta["score_overall_key"] == "quality" and sc.meta["prompt_key"] == songs1[k].meta["prompt_key"]
        assert sc.meta["scores"] == pytest.approx(world.score(sc.tokens, sc.lyric, sc.style))
    rc, res, _ = _run(["score", str(two), "--scorer", "toy", "--out", str(scored)], capsys)
    assert rc == 0 and res["shards_skipped"] == res["shards"] and res["songs_scored"] == 0
    rc, _, err = _run(["score", str(two), "--scorer", "toy:1", "--out", str(scored)], capsys)
    assert rc == 1 and "was scored with 'toy'" in err and "--overwrite" in err

    pairs = tmp_path / "pairs"
    rc, res, err = _run(["pairs", "--candidates", str(scored), "--out", str(pairs), "--min-margin", "0.01"], capsys)
    assert rc == 0, err
    assert res["pairs"] >= 3, res
    from levo_train.cli import main as levo_train

    run = tmp_path / "dpo"
    assert levo_train(["recipe=dpo", f"run_dir={run}", f"model.init={toy_sft_export}",
                       f"data.toy.cache_dir={toy_cache_dir}", *TINY, f"data.pairs={pairs}", f"data.pairs_val={pairs}",
                       "data.batch_size=2", "trainer.max_steps=2", "trainer.val_check_interval=1000",
                       "trainer.limit_val_batches=1"]) == 0
    assert (run / "export" / "model.pt").is_file()


def test_score_in_place_and_weighted(tmp_path, tiny_model, capsys):
    """In place: shards rewritten atomically with every dimension; a rerun skips them."""
    from levo_train.data.shards import ShardWriter

    songs = _toy_songs(6)
    d = tmp_path / "cands"
    with ShardWriter(d, code_size=TOY_CODE_SIZE, max_records=4) as w:
        for s in songs:
            w.write_song(s.key, s.tokens, s.lyric, s.style, {"quality": 0.123})
    before = sorted(p.name for p in d.glob("*.tar"))
    rc, res, err = _run(["score", str(d), "--scorer", "weighted:toy=1,toy:1=-1"], capsys)
    assert rc == 0, err
    assert res["songs_scored"] == 6 and res["overall"] == "weighted"
    assert sorted(p.name for p in d.glob("*.tar")) == before and not list(d.glob(".tmp*"))
    a, b = ToyOracleScorer(0), ToyOracleScorer(1)
    for s in iter_songs(d, code_size=TOY_CODE_SIZE):
        assert "quality" not in s.meta and s.meta["score_overall_key"] == "weighted"
        want = a.score([s])[0]["quality"] - b.score([s])[0]["quality"]
        assert s.meta["scores"]["weighted"] == pytest.approx(want)
    rc, res, _ = _run(["score", str(d), "--scorer", "weighted:toy=1,toy:1=-1"], capsys)
    assert rc == 0 and res["shards_skipped"] == 2
    # pairs default to the scorer's overall key
    rc, res, err = _run(["pairs", "--candidates", str(d), "--out", str(tmp_path / "p"), "--min-margin", "0"], capsys)
    assert rc == 0, err
    assert res["dimensions"] == ["weighted"]
    shutil.rmtree(d)


LAB_SCORER = '''
from levo_train.toy.scorer import ToyOracleScorer

MODE = "{mode}"

class Lab:
    name, overall, dimensions = "lab", "overall", ()

    def score(self, songs):
        if MODE == "raise":
            raise RuntimeError("model weights missing\\nsecond line")
        if MODE == "text":
            return [{{"overall": "high"}} for _ in songs]
        return [{{"overall": {value}}} for _ in songs]

def make():
    return Lab()
'''


def test_score_rerun_after_a_fix_and_failing_scorers(tmp_path, capsys, monkeypatch):
    """``levo-data score`` (issue #21 item 8): a scorer that raises or returns non-numbers fails with one
    line naming the scorer and the song(s), leaving no temp folder; after the scorer's code is fixed
    under the same spec, ``--overwrite`` rescores every shard (it used to skip them all)."""
    from levo_train.data.shards import ShardWriter

    songs = _toy_songs(4)
    d, out = tmp_path / "cands", tmp_path / "scored"
    with ShardWriter(d, code_size=TOY_CODE_SIZE, max_records=2) as w:
        for s in songs:
            w.write_song(s.key, s.tokens, s.lyric, s.style, {})
    for mode, needle in (("raise", "RuntimeError: model weights missing second line"),
                         ("text", "score 'overall' is 'high', not a finite number")):
        _write_module(tmp_path, monkeypatch, "lab_fix", LAB_SCORER.format(mode=mode, value=0.25))
        rc, _, err = _run(["score", str(d), "--scorer", "callable:lab_fix:make", "--out", str(out)], capsys)
        line = [x for x in err.splitlines() if "error" in x]
        assert rc != 0 and len(line) == 1 and "callable:lab_fix:make" in line[0] and needle in line[0], err
        assert songs[0].key in line[0] or songs[1].key in line[0], err
        assert not list(out.glob(".tmp*")) and not list(d.glob(".tmp*"))
    _write_module(tmp_path, monkeypatch, "lab_fix", LAB_SCORER.format(mode="ok", value=0.25))
    rc, res, err = _run(["score", str(d), "--scorer", "callable:lab_fix:make", "--out", str(out)], capsys)
    assert rc == 0 and res["songs_scored"] == 4, err
    _write_module(tmp_path, monkeypatch, "lab_fix", LAB_SCORER.format(mode="ok", value=0.75))  # the fixed code
    rc, res, _ = _run(["score", str(d), "--scorer", "callable:lab_fix:make", "--out", str(out)], capsys)
    assert rc == 0 and res["shards_skipped"] == 2  # same spec, no --overwrite: resumed
    rc, res, _ = _run(["score", str(d), "--scorer", "callable:lab_fix:make", "--out", str(out), "--overwrite"], capsys)
    assert rc == 0 and res["songs_scored"] == 4 and res["shards_skipped"] == 0
    assert {s.meta["scores"]["overall"] for s in iter_songs(out, code_size=TOY_CODE_SIZE)} == {0.75}


def test_score_on_two_ranks_equals_one_rank(tmp_path, capsys, monkeypatch):
    """``levo-data score`` under torchrun's RANK/WORLD_SIZE (issue #21 item 5): each rank scores every
    other shard into the shared ``--out`` (its own progress file and lock), and the result -- shards,
    ``index.json``, ``score.json`` -- equals the one-rank run's."""
    import os
    import subprocess

    from levo_train.data.shards import ShardWriter

    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    d = tmp_path / "cands"
    with ShardWriter(d, code_size=TOY_CODE_SIZE, max_records=2) as w:
        for s in _toy_songs(8):
            w.write_song(s.key, s.tokens, s.lyric, s.style, {})
    one, two = tmp_path / "one", tmp_path / "two"
    rc, res, err = _run(["score", str(d), "--scorer", "toy", "--out", str(one)], capsys)
    assert rc == 0 and res["songs_scored"] == 8, err
    cmd = [sys.executable, "-m", "levo_data", "score", str(d), "--scorer", "toy", "--out", str(two), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    shares = [json.loads(o) for o, _ in outs]
    assert [(s["rank"], s["world"], s["shards"], s["songs_scored"]) for s in shares] == [(1, 2, 2, 4), (0, 2, 2, 4)]
    assert any(s["complete"] for s in shares)
    a, b = _songs(one), _songs(two)
    assert sorted(a) == sorted(b)
    for k, s in a.items():
        assert np.array_equal(s.tokens, b[k].tokens) and s.meta == b[k].meta
        assert Path(s.shard).name == Path(b[k].shard).name
    for name in ("index.json", "score.json"):
        assert json.loads((one / name).read_text()) == json.loads((two / name).read_text()), name
    assert not list(two.glob(".tmp*")) and not list(two.glob(".levo*"))
    # a rerun on 2 ranks skips everything, a 1-rank rerun too (the ranks' progress counts)
    rc, res, _ = _run(["score", str(d), "--scorer", "toy", "--out", str(two)], capsys)
    assert rc == 0 and res["shards_skipped"] == 4 and res["songs_scored"] == 0


def test_score_with_a_reward_model_of_other_tokens_is_refused(tmp_path, capsys):
    """``--scorer rm:DIR`` (issue #21 item 8): an RM whose vocabulary or delay pattern differs from the
    candidates' (index.json: ``code_size``, ``delays`` of the model that sampled them) is refused in one
    line naming the RM folder, the candidates and what differs (it used to raise a bare IndexError or
    score silently); a matching RM scores."""
    from conftest import tiny_config

    from levo_train.data.shards import ShardWriter
    from levo_train.reward.model import RewardModel, save_reward_model

    d = tmp_path / "cands"
    with ShardWriter(d, code_size=TOY_CODE_SIZE, max_records=4) as w:
        for s in _toy_songs(4):
            w.write_song(s.key, s.tokens, s.lyric, s.style, {})
    index = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps({**index, "delays": [0, 1, 1]}))  # as levo-data sample records them

    def rm(name: str, **kw) -> Path:
        folder = tmp_path / name
        cfg = tiny_config(lyric_max_len=64, style_max_len=32, **kw)
        save_reward_model(RewardModel(cfg, ("a",), pooling="mean"), folder, {})
        return folder

    for folder, needle in ((rm("rm16", code_size=16, delays=[0, 1, 1]), "code_size=16"),
                           (rm("rm_delays", code_size=TOY_CODE_SIZE, delays=[0, 2, 2]), "delay pattern [0, 2, 2]")):
        rc, _, err = _run(["score", str(d), "--scorer", f"rm:{folder}", "--out", str(tmp_path / "out")], capsys)
        lines = [x for x in err.splitlines() if "error" in x]
        assert rc != 0 and len(lines) == 1 and f"rm:{folder}" in lines[0] and needle in lines[0], err
        assert str(d) in lines[0] and "IndexError" not in err, err
    rc, res, err = _run(["score", str(d), "--scorer", f"rm:{rm('ok', code_size=TOY_CODE_SIZE, delays=[0, 1, 1])}",
                         "--out", str(tmp_path / "out")], capsys)
    assert rc == 0 and res["songs_scored"] == 4, err
