"""Non-finite values never pass silently: scores and reference log-probs of NaN/inf are refused,
naming the song or pair (and the scorer), and every JSON we write is strict JSON (no bare
NaN/Infinity). Training steps with a non-finite loss are in test_stops.py."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from payloads import resign_tar

from levo_infer.jsonio import NonFiniteJSONError, dumps, write_json_atomic
from levo_train.data.datamodule import PairDataModule
from levo_train.data.pairs import REF_LOGPS_FORMAT, PairWriter, read_ref_logps
from levo_train.data.shards import ShardError, ShardWriter, Song

LYRIC = "[verse] love . night"


def strict_loads(text: str):
    """json.loads that fails on the NaN/Infinity extension (what jq, JavaScript, Go ... do)."""
    def bad(c: str):
        raise ValueError(f"not JSON: {c}")

    return json.loads(text, parse_constant=bad)


def test_strict_json_writer_refuses_or_nulls_non_finite_values(tmp_path):
    obj = {"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "NaN"}
    with pytest.raises(NonFiniteJSONError, match=r"nan at \$\.a\[1\]"):
        dumps(obj)
    assert strict_loads(dumps(obj, nonfinite="null")) == {"a": [1.0, None], "b": {"c": None}, "d": "NaN"}
    target = tmp_path / "x.json"
    target.write_text('{"old": 1}')
    with pytest.raises(NonFiniteJSONError, match=str(target)):
        write_json_atomic(target, {"loss": float("inf")})
    assert target.read_text() == '{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    # a song whose metadata holds NaN cannot enter a shard (levo-data score, sample, toy data ...)
    with pytest.raises(ShardError, match=r"bad-song.*scores\.overall"):
        with ShardWriter(tmp_path / "s", code_size=16) as w:
            w.write_song("bad-song", np.zeros((3, 4), np.int64), LYRIC, "rock", {"scores": {"overall": math.nan}})


class _NaNScorer:
    """Scores every song 0.5, except the keys in ``bad``: NaN."""

    name, overall, dimensions = "nan-prone", "overall", ("lyrics",)

    def __init__(self, bad: set[str]) -> None:
        self.bad = bad

    def score(self, songs):
        return [{"overall": math.nan if s.key in self.bad else 0.5, "lyrics": 0.5} for s in songs]


def test_nan_scores_are_refused_naming_scorer_and_song(tiny_model):
    from levo_train.rollout import Prompt, Sampling, ScoreError, sample_and_score
    from levo_train.scorers import WeightedScorer

    prompts = [Prompt("[verse] love night", "rock"), Prompt("[verse] la da", "pop")]
    sampling = Sampling(max_frames=4, batch_size=8)
    with pytest.raises(ScoreError, match=r"scorer 'nan-prone': song 's0000001-1': score 'overall' is nan"):
        sample_and_score(tiny_model, prompts, _NaNScorer({"s0000001-1"}), sampling, per_prompt=2)
    weighted = WeightedScorer([(_NaNScorer({"s0000000-0"}), 1.0)])
    with pytest.raises(ScoreError, match="s0000000-0"):
        sample_and_score(tiny_model, prompts, weighted, sampling, per_prompt=2)


def _rewrite_scores(tar: Path, scores: dict[str, str]) -> None:
    """Replace the ``json`` member of the named records by raw text (as an older writer left it)."""
    members = []
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            members.append((m, t.extractfile(m).read()))
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            key, _, ext = m.name.partition(".")
            if ext == "json" and key in scores:
                data = scores[key].encode()
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    resign_tar(tar)  # a writer that digests what it wrote: the NaN must be refused as a score, not as corruption


def test_levo_data_pairs_refuses_nan_scores(tmp_path, capsys):
    from test_dpo import levo_data

    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "cands", code_size=16, max_records=100) as w:
        for j, q in enumerate([0.9, 0.2, 0.5]):
            w.write_song(f"c{j}", rng.integers(0, 16, (3, 5)), LYRIC, "rock", {"scores": {"overall": q}})
    (tar,) = (tmp_path / "cands").glob("*.tar")
    _rewrite_scores(tar, {"c1": '{"duration": 0.2, "language": "en", "source": "x", "scores": {"overall": NaN}}'})
    rc = levo_data(["pairs", "--candidates", str(tmp_path / "cands"), "--out", str(tmp_path / "pairs"),
                    "--dimension", "overall", "--min-margin", "0.05", "--code-size", "16"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "c1" in err and tar.name in err and "'overall'" in err and "not a finite number" in err, err
    assert not list((tmp_path / "pairs").glob("*.tar")) if (tmp_path / "pairs").exists() else True


def _tiny_pairs(folder: Path, n: int = 3) -> None:
    rng = np.random.default_rng(1)
    with PairWriter(folder, code_size=16, max_records=10) as w:
        for i in range(n):
            c = Song(f"c{i}", rng.integers(0, 16, (3, 5)), LYRIC, "rock", None, {})
            r = Song(f"r{i}", rng.integers(0, 16, (3, 6)), LYRIC, "rock", None, {})
            w.write_pair(f"p{i:03d}", c, r, {"dimension": "quality", "margin": 0.5, "origin": "test"})


def test_non_finite_reference_logps_are_refused_naming_the_pair(tmp_path):
    from levo_infer.model import LeLM
    from levo_train.train.ref_logps import compute_ref_logps

    _tiny_pairs(tmp_path / "pairs")
    torch.manual_seed(0)
    model = LeLM(tiny_config())
    model.init_weights(std=0.2)
    good = compute_ref_logps(model, tmp_path / "pairs")
    # what an older levo-train wrote (format 2: no sha256 of its own)
    data = {"format": REF_LOGPS_FORMAT - 1, "model": "fp", "stream_weights": [1.0, 1.0, 1.0],
            "logps": {k: [c, r, d] for k, (c, r, d) in good.items()}}
    data["logps"]["p001"][1] = float("nan")
    # what an older levo-train wrote: Python's json.dumps puts a bare NaN there
    (tmp_path / "pairs" / "ref_logps.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"'p001' are not finite \(chosen .*, rejected nan"):
        read_ref_logps(tmp_path / "pairs")
    dm = PairDataModule(str(tmp_path / "pairs"), batch_size=2, code_size=16, rank=0, world_size=1, use_ref_logps=True)
    with pytest.raises(ShardError, match="p001"):
        dm.setup("fit")
        next(iter(dm.train_dataloader()))
    # computing them with a diverged (NaN) reference model fails naming the pair, nothing is written
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(float("nan"))
    with pytest.raises(ValueError, match=r"pair 'p000'.*non-finite log-probs"):
        compute_ref_logps(model, tmp_path / "pairs")


class _Spread:
    """Scores spread by song key; ``nan``: one candidate gets NaN; ``flat``: all equal (no pairs)."""

    name, overall, dimensions = "spread", "overall", ()

    def __init__(self) -> None:
        self.mode = "spread"

    def score(self, songs):
        import zlib

        out = []
        for i, s in enumerate(songs):
            v = 0.5 if self.mode == "flat" else (zlib.crc32(s.key.encode()) % 97) / 97
            out.append({"overall": math.nan if self.mode == "nan" and i == 1 else v})
        return out


def test_sdpo_round_refuses_nan_scores_and_writes_strict_rounds_jsonl(tmp_path, tiny_cfg):
    from levo_train.rollout import Prompt, Sampling, ScoreError
    from levo_train.train.base import rng_state
    from levo_train.train.sdpo import ROUNDS_NAME, SemiOnlineDPOModule

    scorer = _Spread()
    m = SemiOnlineDPOModule(tiny_cfg, prompts=[Prompt("[verse] love night", "rock"), Prompt("[verse] la da", "pop")],
                            scorer=scorer, sync_every=2, per_prompt=3, prompts_per_round=2, min_margin=0.01,
                            sampling=Sampling(max_frames=6, batch_size=8), batch_size=2, init_weights=True,
                            out_dir=str(tmp_path / "sdpo"))
    m.freeze_reference()
    assert m.run_round(0)["pairs"] == 2
    scorer.mode = "flat"  # a round without pairs: its pair margin is missing (null), not NaN
    assert m.run_round(1)["pair_margin"] is None
    rounds = [strict_loads(line) for line in (tmp_path / "sdpo" / ROUNDS_NAME).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["pair_margin"] is None
    scorer.mode = "nan"
    with pytest.raises(ScoreError, match=r"round 2: scorer 'spread': song 'r0002-.*' is nan"):
        m.run_round(2)
    assert len(m.buffer) == 1 and m.round == 1  # the round's pairs never entered the buffer
    # a checkpoint of an older levo-train stored NaN for the missing value: loaded as null
    ck = {"levo": {"samples_seen": 0, "dropout_gen": m.dropout_gen.get_state(), "rng": rng_state(),
                   "sdpo": {"round": 1, "buffer": m.buffer, "cursor": 0, "ref_synced_at": 0,
                            "history": [{"round": 0, "pair_margin": float("nan")}]}}}
    m.on_load_checkpoint(ck)
    assert m.history == [{"round": 0, "pair_margin": None}]
