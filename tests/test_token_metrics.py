"""``levo-eval tokens``: the Fréchet distance against closed forms on known Gaussians, the entropy /
repetition / length definitions on hand-made songs, and, on a toy export's samples, a set's
distance to itself ~0 growing as the toy quality falls (hotter sampling, corrupted tokens), through
the API and the command (token files in levo-infer's layout, a shard folder, a reward-model export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from levo_eval.cli import main
from levo_eval.token_metrics import (
    entropy_bits,
    frechet_distance,
    frechet_gaussians,
    length_stats,
    ngram_repeat_rate,
    psd_sqrt,
    repeat_rates,
    rm_embedder,
    stream_stats,
)

DIMS = ("lyrics", "structure", "harmony", "mix")


# ----------------------------------------------------------------------------- Fréchet distance
def _spd(rng: np.random.Generator, f: int) -> np.ndarray:
    a = rng.normal(size=(f, f))
    return a @ a.T + 0.1 * np.eye(f)


def test_frechet_matches_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_gaussians([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)
    rng = np.random.default_rng(0)
    # diagonal (commuting) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2, a, b = rng.normal(size=5), rng.normal(size=5), rng.random(5) + 0.1, rng.random(5) + 0.1
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_gaussians(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # general SPD: tr sqrt(S1 S2) from the (real, positive) eigenvalues of the product, in float64
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    direct = (((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
              - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum())
    got = frechet_gaussians(mu1, s1, mu2, s2)
    assert got == pytest.approx(direct, rel=1e-9)
    assert frechet_gaussians(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)  # symmetric
    r = psd_sqrt(s1)
    np.testing.assert_allclose(r @ r, s1, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(r, r.T)
    # on samples: the fitted Gaussians (mean, unbiased covariance); large samples approach the truth
    x = rng.multivariate_normal(mu1, s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    fit = frechet_gaussians(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert frechet_distance(x, y) == pytest.approx(fit, rel=1e-9)
    assert frechet_distance(x, y) == pytest.approx(direct, rel=0.03)
    # a set against itself: 0, also with fewer samples than dimensions (singular covariance)
    assert frechet_distance(x, x) < 1e-9 * np.trace(s1)
    small = rng.normal(size=(10, 32))
    assert frechet_distance(small, small) < 1e-9
    # a pure shift: |dmu|^2 (the square root of a singular matrix loses ~sqrt(eps) per null direction)
    assert frechet_distance(small, small + 1.0) == pytest.approx(32.0, abs=1e-5)
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(small[:1], small)
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(small, small[:, :5])


# ----------------------------------------------------------------------------- token statistics
def test_entropy_repetition_and_length_definitions():
    assert entropy_bits(np.array([1, 1, 1, 1])) == pytest.approx(2.0)
    assert entropy_bits(np.array([2, 1, 1, 0])) == pytest.approx(1.5)
    assert entropy_bits(np.array([0, 5])) == 0.0 and entropy_bits(np.zeros(3)) == 0.0
    a = np.array([[1, 1, 2, 2], [3, 3, 3, 3], [5, 6, 5, 6]])
    b = np.array([[7], [7], [7]])  # one frame: no (t-1, t) pair
    per_stream, frames = repeat_rates([a, b])
    assert per_stream == pytest.approx([2 / 3, 1.0, 0.0]) and frames == 0.0
    held = np.array([[1, 1, 1, 2], [3, 3, 4, 4], [5, 5, 5, 5]])  # frame 1 repeats frame 0 in every stream
    assert repeat_rates([held])[1] == pytest.approx(1 / 3)
    assert repeat_rates([b]) == ([None, None, None], None)
    st = stream_stats([a, b], code_size=8)
    assert list(st) == ["mixed", "vocal", "bgm"]
    m = st["mixed"]  # codes 1, 1, 2, 2, 7
    assert m["codes_used"] == 3 and m["usage"] == 3 / 8
    p = np.array([2, 2, 1]) / 5
    assert m["entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum()) and m["entropy_norm"] == pytest.approx(
        m["entropy_bits"] / 3)
    assert st["vocal"]["codes_used"] == 2 and st["vocal"]["repeat_rate"] == 1.0
    # n-grams of whole frames: F0 F1 F0 F1 F0 has 4 bigrams, 2 distinct -> 2 of 4 repeat an earlier one
    f0, f1 = np.array([1, 2, 3]), np.array([4, 5, 6])
    song = np.stack([f0, f1, f0, f1, f0], axis=1)
    assert ngram_repeat_rate([song], 2) == pytest.approx(0.5)
    assert ngram_repeat_rate([song], 1) == pytest.approx(3 / 5)
    assert ngram_repeat_rate([song, a], 3) == pytest.approx((1 + 0) / (3 + 2))  # a: 2 distinct windows
    assert ngram_repeat_rate([song], 4) == 0.0  # F0F1F0F1, F1F0F1F0
    assert ngram_repeat_rate([b], 2) is None
    ls = length_stats([10, 20, 30], [20, 20, None], frame_rate=25)
    assert ls["eos_rate"] == 0.5 and ls["eos_known"] == 2 and ls["max_frames"] == [20]  # 10 < 20; 20 hit the cap
    assert ls["frames_mean"] == 20.0 and ls["seconds_mean"] == 0.8 and ls["frames_min"] == 10
    assert length_stats([5], [None])["eos_rate"] is None


# ----------------------------------------------------------------------------- on toy samples
def _write_levo_infer(out: Path, songs, max_frames: int) -> Path:
    """Songs as levo-infer writes them: tokens/<idx>.pt and jsonl/<name>.jsonl records."""
    (out / "tokens").mkdir(parents=True)
    (out / "jsonl").mkdir()
    recs = []
    for i, s in enumerate(songs):
        torch.save(torch.as_tensor(s.tokens, dtype=torch.long), out / "tokens" / f"song{i:03d}.pt")
        recs.append({"idx": f"song{i:03d}", "status": "ok", "lyric": s.lyric, "style": s.style,
                     "frames": s.frames, "settings": {"max_frames": max_frames, "duration": max_frames / 25}})
    (out / "jsonl" / "songs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out / "tokens"


def _corrupt(songs, p: float, seed: int):
    from levo_train.data.shards import Song

    rng = np.random.default_rng(seed)
    out = []
    for s in songs:
        t = s.tokens.copy()
        hit = rng.random(t.shape) < p
        t[hit] = rng.integers(0, 64, int(hit.sum()))
        out.append(Song(s.key, t, s.lyric, s.style, None, {}))
    return out


def test_frechet_on_toy_samples_and_command(toy_sft_export, tmp_path, capsys):
    from levo_train.data.shards import ShardWriter
    from levo_train.reward.model import RewardModel, save_reward_model
    from levo_train.rollout import Sampling, sample_and_score
    from levo_train.toy.pairs import heldout_prompts, load_toy_model
    from levo_train.toy.scorer import ToyOracleScorer

    policy = load_toy_model(toy_sft_export, "cpu")
    oracle = ToyOracleScorer(0)
    prompts = heldout_prompts(oracle.world, 96, seed=0)

    def sample(temperature: float, seed: int):
        cands = sample_and_score(policy, prompts, None, Sampling(temperature=temperature, max_frames=96), seed=seed)
        return [c.song for c in cands]

    def quality(songs) -> float:
        return float(np.mean([s["quality"] for s in oracle.score(songs)]))

    # a reward model on the SFT trunk (its head untrained: the pooled features are the trunk's)
    torch.manual_seed(0)
    rm = RewardModel(policy.cfg, DIMS, lm=policy).eval()
    embed = rm_embedder(rm)
    ref = sample(1.0, 0)
    e_ref = embed(ref)
    assert e_ref.shape == (96, 2 * policy.cfg.lm.dim)
    fd_self = frechet_distance(e_ref, e_ref)
    assert fd_self < 1e-6
    sets = {"T=1.0 (seed 1)": sample(1.0, 1), "T=1.6": sample(1.6, 0), "T=3.0": sample(3.0, 0)}
    temp = {k: (quality(v), frechet_distance(e_ref, embed(v))) for k, v in sets.items()}
    corr = {p: (quality(c), frechet_distance(e_ref, embed(c))) for p in (0.05, 0.2, 0.5)
            for c in [_corrupt(ref, p, 7)]}
    with capsys.disabled():  # shown with -s
        print(f"\nFréchet (RM pooled features, n=96): self {fd_self:.2e}; ref quality {quality(ref):.3f}")
        for k, (q, d) in [*temp.items(), *((f"corrupt {p}", v) for p, v in corr.items())]:
            print(f"  {k}: quality {q:.3f}, Fréchet {d:.3f}")
    for series in (list(temp.values()), list(corr.values())):
        qs, ds = zip(*series)
        assert all(q1 > q2 for q1, q2 in zip(qs, qs[1:])), series  # quality falls ...
        assert all(d1 < d2 for d1, d2 in zip(ds, ds[1:])), series  # ... the distance grows
        assert ds[0] > 100 * max(fd_self, 1e-9)
    assert temp["T=3.0"][1] > 3 * temp["T=1.0 (seed 1)"][1]

    # the command: levo-infer token folders, an RM export, a shard folder
    rm_dir = save_reward_model(rm, tmp_path / "rm", {"source": "test"})
    ref_dir = _write_levo_infer(tmp_path / "ref", ref, 96)
    hot_dir = _write_levo_infer(tmp_path / "hot", sets["T=3.0"], 96)
    out = tmp_path / "report.json"
    assert main(["tokens", "--ref", str(ref_dir), "--gen", str(hot_dir), "--rm", str(rm_dir), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert json.loads(out.read_text()) == res
    assert lines[0].startswith("ref ") and lines[1].startswith("gen ") and "Fréchet" in lines[2]
    assert res["code_size"] == 64 and res["embedding_dim"] == {"rm": 2 * policy.cfg.lm.dim}
    assert res["frechet"]["rm"] == pytest.approx(temp["T=3.0"][1], rel=1e-6)  # same songs, lyrics and styles
    r = res["ref"]
    assert r["n"] == 96 and r["kind"] == "pt" and r["unconditioned"] == 0
    assert r["length"]["eos_rate"] == pytest.approx(np.mean([s.frames < 96 for s in ref]))
    assert r["length"]["frames_mean"] == pytest.approx(np.mean([s.frames for s in ref]))
    assert set(r["rm"]) == {*DIMS, "overall"} and set(r["streams"]) == {"mixed", "vocal", "bgm"}
    assert r["streams"]["bgm"]["entropy_bits"] == pytest.approx(stream_stats([s.tokens for s in ref], 64)["bgm"]
                                                                ["entropy_bits"])
    assert r["rm"]["overall"] == pytest.approx(float(rm.score_songs(ref)[:, -1].mean()), rel=1e-5)
    # a set against itself through the command; a shard folder as a set
    assert main(["tokens", "--ref", str(ref_dir), "--gen", str(ref_dir), "--rm", str(rm_dir)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["frechet"]["rm"] < 1e-6
    kept = [s for s in sets["T=1.0 (seed 1)"] if s.frames]  # shards hold no empty song (EOS first)
    with ShardWriter(tmp_path / "shards", code_size=64) as w:
        for i, s in enumerate(kept):
            w.write_song(f"s{i:03d}", s.tokens, s.lyric, s.style)
    assert main(["tokens", "--ref", str(ref_dir), "--gen", str(tmp_path / "shards"), "--rm", str(rm_dir)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["gen"]["kind"] == "shards" and res["gen"]["length"]["eos_rate"] is None and res["gen"]["n"] == len(kept)
    assert res["frechet"]["rm"] == pytest.approx(frechet_distance(e_ref, embed(kept)), rel=1e-6)

    # without an RM: token metrics only (code size from the shard index); bad inputs
    assert main(["tokens", "--ref", str(tmp_path / "shards"), "--gen", str(hot_dir)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["frechet"] == {} and res["code_size"] == 64 and "rm" not in res["ref"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for i, s in enumerate(ref[:6]):
        torch.save(torch.as_tensor(s.tokens), bare / f"{i}.pt")
    torch.save(torch.as_tensor(ref[0].tokens), bare / "0_vocal.pt")  # --mode separate: skipped
    (bare / "7.pt").write_bytes(b"truncated")
    torch.save(torch.zeros(5), bare / "8.pt")
    assert main(["tokens", "--ref", str(bare), "--gen", str(hot_dir), "--rm", str(rm_dir)]) == 1
    cap = capsys.readouterr()
    res = json.loads(cap.out.strip().splitlines()[-1])
    assert res["ref"]["n"] == 6 and res["ref"]["skipped"] == 1 and res["ref"]["unconditioned"] == 6
    assert "7.pt: cannot be read" in cap.err and "8.pt: holds a torch.float32 tensor of shape [5]" in cap.err
    assert "6 song(s) of" in cap.err and "empty lyric and style" in cap.err
    assert main(["tokens", "--ref", str(ref_dir), "--gen", str(hot_dir), "--code-size", "16"]) == 2
    assert "codes up to" in capsys.readouterr().err
    assert main(["tokens", "--ref", str(tmp_path / "nope"), "--gen", str(hot_dir)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["tokens", "--ref", str(ref_dir), "--gen", str(hot_dir), "--rm", str(tmp_path)]) == 2
    assert "not a reward-model export" in capsys.readouterr().err


# ----------------------------------------------------------------------------- levo-infer output folders
def test_single_stream_modes_leave_out_their_silent_stream_and_an_output_folder_is_read(tmp_path, capsys):
    """A --mode vocal song's file holds bgm = 9670 throughout, a --mode bgm song's vocal = 3142: those
    streams are the silent substitutes levo-infer wrote, not the model's output, and are left out of
    that stream's metrics (the records say the mode); a levo-infer output folder is read through its
    tokens/. Before: the substitute counted as a stream that never changes, and OUT_DIR was refused."""
    rng = np.random.default_rng(0)

    def write_run(out: Path, songs: dict[str, tuple[str, np.ndarray]]) -> None:
        (out / "tokens").mkdir(parents=True)
        (out / "jsonl").mkdir()
        for idx, (_, t) in songs.items():
            torch.save(torch.as_tensor(t, dtype=torch.long), out / "tokens" / f"{idx}.pt")
        (out / "jsonl" / "in.jsonl").write_text("".join(json.dumps(
            {"idx": idx, "status": "ok", "lyric": "[verse] la", "style": "pop",
             "settings": {"mode": mode, "max_frames": 100}}) + "\n" for idx, (mode, _) in songs.items()))

    def song(mode: str, n: int) -> np.ndarray:
        t = rng.integers(0, 50, size=(3, n))
        if mode == "vocal":
            t[2] = 9670
        if mode == "bgm":
            t[1] = 3142
        return t

    mixed = {"v": ("vocal", song("vocal", 40)), "b": ("bgm", song("bgm", 30)), "m": ("mixed", song("mixed", 50))}
    write_run(tmp_path / "run1", mixed)
    write_run(tmp_path / "run2", {"v1": ("vocal", song("vocal", 20)), "v2": ("vocal", song("vocal", 25))})
    assert main(["tokens", "--ref", str(tmp_path / "run1"), "--gen", str(tmp_path / "run2")]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out.strip().splitlines()[-1])
    r, g = res["ref"], res["gen"]
    assert r["path"] == str(tmp_path / "run1" / "tokens") and r["n"] == 3 and r["unconditioned"] == 0
    assert r["substituted"] == {"vocal": 1, "bgm": 1} and "silent code" in r["note"]
    toks = {k: t for k, (_, t) in mixed.items()}
    want = stream_stats([toks["b"], toks["m"], toks["v"]], 16384)  # every stream of every song (the old figures)
    assert r["streams"]["mixed"] == want["mixed"]
    assert r["streams"]["vocal"] == stream_stats([toks["m"], toks["v"]], 16384)["vocal"]  # b's 3142 left out
    assert r["streams"]["bgm"] == stream_stats([toks["b"], toks["m"]], 16384)["bgm"]  # v's 9670 left out
    assert r["streams"]["bgm"]["songs"] == 2 and r["streams"]["bgm"]["codes_used"] < want["bgm"]["codes_used"]
    assert r["frame_repeat_rate"] == repeat_rates([toks["b"], toks["m"], toks["v"]])[1]  # whole frames: all songs
    assert g["substituted"] == {"vocal": 0, "bgm": 2} and g["streams"]["bgm"] == {
        "songs": 0, "codes_used": None, "usage": None, "entropy_bits": None, "entropy_norm": None, "repeat_rate": None}
    assert "silent code" in cap.err and "bgm of 2 song(s)" in cap.out
    # separate-mode extra files alone: <idx>_vocal.pt is vocal output, <idx>_bgm.pt bgm output
    sep = tmp_path / "sep"
    write_run(sep, {"s_vocal": ("", song("vocal", 30)), "s_bgm": ("", song("bgm", 30))})
    (sep / "jsonl" / "in.jsonl").write_text(json.dumps({"idx": "s", "settings": {"mode": "separate"}}) + "\n")
    assert main(["tokens", "--ref", str(sep), "--gen", str(tmp_path / "run1")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ref"]["substituted"] == {"vocal": 1, "bgm": 1}
