"""The aesthetic reward model: ranking metrics against a naive recomputation, the loss with its rank
terms, export -> load -> RewardScorer round trip, `levo-train recipe=reward` end to end on the tiny
toy world (it learns; exact resume), bad-input errors and `levo-eval reward`'s JSON contract."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_config

from levo_train.cli import main
from levo_train.data.shards import ShardError, ShardWriter
from levo_train.reward.metrics import pair_accuracy, ranking_metrics
from levo_train.reward.model import (
    RewardModel,
    RewardModelError,
    RewardScorer,
    load_reward_model,
    save_reward_model,
    truncate_trunk,
)
from levo_train.train.reward import bt_loss, listmle_loss, reward_loss

DIMS = ("lyrics", "structure", "harmony", "mix")


# ----------------------------------------------------------------------------- metrics
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def _kendall_b(p: np.ndarray, t: np.ndarray) -> float:
    conc = disc = tp = tt = 0
    for i, j in itertools.combinations(range(len(p)), 2):
        a, b = np.sign(p[i] - p[j]), np.sign(t[i] - t[j])
        if a == 0 and b == 0:
            continue
        if a == 0:
            tp += 1
        elif b == 0:
            tt += 1
        elif a == b:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tp) * (conc + disc + tt))


def test_ranking_metrics_match_naive_recomputation():
    rng = np.random.default_rng(0)
    t = np.round(rng.random(40), 1)                     # ties in the targets
    p = np.round(t + rng.normal(0, 0.2, 40), 2)
    p[:3] = p[3]                                        # and in the predictions
    m = ranking_metrics(p, t)
    assert m["lcc"] == pytest.approx(np.corrcoef(p, t)[0, 1], abs=1e-6)
    assert m["srcc"] == pytest.approx(np.corrcoef(_ranks(p), _ranks(t))[0, 1], abs=1e-5)
    assert m["ktau"] == pytest.approx(_kendall_b(p, t), abs=1e-5)
    agree = n = 0
    for i, j in itertools.combinations(range(40), 2):
        if abs(t[i] - t[j]) >= 0.05:
            n += 1
            agree += 0.5 if p[i] == p[j] else float(np.sign(p[i] - p[j]) == np.sign(t[i] - t[j]))
    assert pair_accuracy(torch.tensor(p), torch.tensor(t)) == (pytest.approx(agree / n, abs=1e-12), n)
    assert m["pair_acc"] == pytest.approx(agree / n, abs=1e-12)
    perfect = ranking_metrics(t * 2 + 1, t)
    assert perfect["srcc"] == pytest.approx(1.0) and perfect["pair_acc"] == 1.0
    assert math.isnan(ranking_metrics(np.ones(5), np.arange(5.0))["srcc"])


# ----------------------------------------------------------------------------- loss
def test_reward_loss_with_rank_terms():
    torch.manual_seed(0)
    pred = torch.randn(6, 3, requires_grad=True)
    tgt = torch.rand(6, 3)
    # BT: the naive double loop over pairs with margin, per column, averaged over columns
    want = []
    for c in range(3):
        terms = [-torch.nn.functional.logsigmoid(10.0 * (pred[i, c] - pred[j, c]))
                 for i in range(6) for j in range(6) if tgt[i, c] - tgt[j, c] >= 0.1]
        want.append(torch.stack(terms).mean())
    assert bt_loss(pred, tgt, 0.1).item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    # ListMLE: sum over positions of logsumexp(rest) - score, in the true order, / B
    col = []
    for c in range(3):
        s = 10.0 * pred[tgt[:, c].argsort(descending=True), c]
        col.append(sum(torch.logsumexp(s[i:], 0) - s[i] for i in range(6)) / 6)
    assert listmle_loss(pred, tgt).item() == pytest.approx(torch.stack(col).mean().item(), rel=1e-5)
    total, parts = reward_loss(pred, tgt, loss="mse", rank_loss="bt", rank_weight=0.5, rank_margin=0.1)
    assert total.item() == pytest.approx(parts["reg"].item() + 0.5 * parts["rank"].item(), rel=1e-6)
    # the rank term's gradient pushes the truly better song up
    i, j = int(tgt[:, 0].argmax()), int(tgt[:, 0].argmin())
    g, = torch.autograd.grad(bt_loss(pred, tgt, 0.05), pred)
    assert g[i, 0] < 0 < g[j, 0]
    assert bt_loss(pred, torch.zeros(6, 3), 0.05).item() == 0.0  # no pair passes the margin
    with pytest.raises(ValueError, match="reward.rank_loss"):
        reward_loss(pred, tgt, rank_loss="hinge", rank_weight=1.0)


# ----------------------------------------------------------------------------- export round trip
def _songs(n: int, code_size: int = 16, seed: int = 0):
    from levo_train.data.shards import Song

    rng = np.random.default_rng(seed)
    return [Song(f"s{i}", rng.integers(0, code_size, size=(3, int(rng.integers(3, 12)))), "[verse] la da", "rock", None,
                 {"scores": {d: float(rng.random()) for d in DIMS}, "quality": float(rng.random())})
            for i in range(n)]


def test_export_load_scorer_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(num_layers=3, num_layers_sub=2)
    rm = RewardModel(cfg, DIMS, pooling="attn")
    rm.lm.init_weights(std=0.2)
    kept = truncate_trunk(rm.lm, 2, 1)
    assert (kept.lm.num_layers, kept.lm.num_layers_sub) == (2, 1) and len(rm.lm.transformer.model.layers) == 2
    songs = _songs(13)
    rm.eval()
    want = rm.score_songs(songs, batch_size=5)
    save_reward_model(rm, tmp_path / "rm", {"source": "test"})
    sd = torch.load(tmp_path / "rm" / "reward.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    model, info = load_reward_model(tmp_path / "rm")
    assert info["dimensions"] == list(DIMS) and info["pooling"] == "attn" and info["layers"] == 2
    assert model.config.lm.num_layers == 2 and model.config.lm.num_layers_sub == 1
    scorer = RewardScorer(tmp_path / "rm", batch_size=5)
    assert scorer.overall == "overall" and scorer.dimensions == DIMS and scorer.model_config.lm.num_layers == 2
    got = scorer.score(songs)
    assert [sorted(g) for g in got] == [sorted([*DIMS, "overall"])] * len(songs)
    assert torch.equal(torch.tensor([[g[k] for k in (*DIMS, "overall")] for g in got]), want)
    assert scorer.score(songs) == got  # deterministic


def test_bad_exports_are_clear_errors(tmp_path):
    cfg = tiny_config()
    rm = RewardModel(cfg, DIMS)
    save_reward_model(rm, tmp_path / "rm", {})
    with pytest.raises(RewardModelError, match="no such reward-model export"):
        load_reward_model(tmp_path / "nope")
    info = json.loads((tmp_path / "rm" / "reward.json").read_text())
    (tmp_path / "rm" / "reward.json").write_text(json.dumps({**info, "dimensions": ["lyrics", "mix"]}))
    with pytest.raises(RewardModelError, match=r"reward.json: .* but .*checksums.json lists"):
        load_reward_model(tmp_path / "rm")  # an edited file is refused by the export's checksums first
    (tmp_path / "rm" / "checksums.json").unlink()  # an export without them (older levo-train): its own checks
    with pytest.raises(RewardModelError, match=r"lists 2 dimensions .* head has 5 outputs"):
        load_reward_model(tmp_path / "rm")
    (tmp_path / "rm" / "reward.json").write_text("{not json")
    with pytest.raises(RewardModelError, match="reward.json: not valid JSON"):
        load_reward_model(tmp_path / "rm")
    (tmp_path / "rm" / "reward.pt").unlink()
    with pytest.raises(RewardModelError, match="lacks reward.pt"):
        RewardScorer(tmp_path / "rm")


def test_songs_without_scores_name_shard_and_key(tmp_path):
    from levo_train.data.scored import RewardDataModule

    with ShardWriter(tmp_path / "d", code_size=16) as w:
        for s in _songs(3):
            w.write_song(s.key, s.tokens, s.lyric, s.style, s.meta)
        w.write_song("noscores", np.zeros((3, 4), dtype=np.int64), "[verse] la", "rock", {"quality": 0.5})
    dm = RewardDataModule(str(tmp_path / "d"), batch_size=4, code_size=16, dimensions=DIMS, shuffle_buffer=1)
    dm.setup()
    with pytest.raises(ShardError, match=r"noscores.*no `scores`|no `scores`.*noscores") as e:
        next(iter(dm.train_dataloader()))
    assert "songs-000000.tar" in str(e.value)
    dm = RewardDataModule(str(tmp_path / "d"), batch_size=3, code_size=16, dimensions=("lyrics", "tempo"),
                          shuffle_buffer=1)
    dm.setup()
    with pytest.raises(ShardError, match=r"scores.tempo .*reward.dimensions"):
        next(iter(dm.train_dataloader()))


# ----------------------------------------------------------------------------- levo-train recipe=reward
def rm_args(cache: str, init: Path, run_dir: Path, *extra: str) -> list[str]:
    tiny = [o for o in TINY if not o.startswith(("model.config.", "data.batch_size", "data.val_batch_size"))]
    return ["recipe=reward", f"model.init={init}", f"run_dir={run_dir}", f"data.toy.cache_dir={cache}", *tiny,
            "data.toy_reward.n_train_prompts=200", "data.toy_reward.world_renderings=60", "data.toy_reward.n_val=96",
            "data.batch_size=32", "data.val_batch_size=96", "trainer.limit_val_batches=1", "optim.lr=1e-3",
            "optim.warmup_steps=10", *extra]


@pytest.fixture(scope="module")
def rm_run(toy_sft_export, toy_cache_dir, tmp_path_factory) -> Path:
    rd = tmp_path_factory.mktemp("rm") / "run"
    assert main(rm_args(toy_cache_dir, toy_sft_export, rd, "trainer.max_steps=150",
                        "trainer.val_check_interval=150")) == 0
    return rd


def test_reward_recipe_learns_and_exports(rm_run, toy_sft_export):
    s = json.loads((rm_run / "summary.json").read_text())
    m = s["val_metrics"]
    assert s["global_step"] == 150
    assert s["val_loss_end"] < s["val_loss_start"]
    for d in (*DIMS, "overall"):
        for k in ("lcc", "srcc", "ktau", "pair_acc"):
            assert f"val/{d}/{k}" in m
    import csv

    start = next(r for r in csv.DictReader(open(rm_run / "logs" / "metrics.csv")) if r.get("val/overall/srcc"))
    # the tiny policy's held-out songs: the untrained head ranks them at chance, the trained one clearly not
    assert m["val/overall/srcc"] > max(0.25, float(start["val/overall/srcc"]) + 0.15), (start, m)
    assert m["val/overall/pair_acc"] > 0.6, m
    info = json.loads((rm_run / "export" / "reward.json").read_text())
    assert info["dimensions"] == list(DIMS) and info["overall"] == "overall" and info["policy_code_size"] == 64
    from levo_train.fingerprint import model_fingerprint

    assert info["source"] == model_fingerprint(toy_sft_export)


def test_reward_resume_is_exact(toy_sft_export, toy_cache_dir, tmp_path):
    ex = ["trainer.val_check_interval=1000", "reward.layers=1", "checkpoint.every_n_steps=4"]
    assert main(rm_args(toy_cache_dir, toy_sft_export, tmp_path / "a", "trainer.max_steps=8", *ex)) == 0
    assert main(rm_args(toy_cache_dir, toy_sft_export, tmp_path / "b", "trainer.max_steps=4",
                        "optim.total_steps=8", *ex)) == 0
    assert main(rm_args(toy_cache_dir, toy_sft_export, tmp_path / "b", "trainer.max_steps=8",
                        "optim.total_steps=8", "resume=true", *ex)) == 0
    wa = torch.load(tmp_path / "a" / "export" / "reward.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "export" / "reward.pt", weights_only=True)
    assert wa.keys() == wb.keys() and not any("transformer.model.layers.1." in k for k in wa)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_reward_bad_inputs(toy_sft_export, toy_cache_dir, tmp_path, capsys):
    args = rm_args(toy_cache_dir, toy_sft_export, tmp_path / "r", "trainer.max_steps=1")
    assert main([a for a in args if not a.startswith("model.init=")]) == 2
    assert "recipe=reward needs model.init=PATH" in capsys.readouterr().err
    assert main([*args, "reward.dimensions=[lyrics,tempo]"]) == 2
    err = capsys.readouterr().err
    assert "reward.dimensions=['lyrics', 'tempo']" in err and "tempo" in err
    assert main([*args, "reward.layers=9"]) == 2
    assert "reward.layers=9" in capsys.readouterr().err
    assert main([*args, "strategy=deepspeed_zero2"]) == 2
    assert "trains sharded under strategy=fsdp2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- levo-eval reward
def test_levo_eval_reward_json_contract(rm_run, toy_sft_export, capsys, tmp_path):
    from levo_eval.cli import main as eval_main

    argv = ["reward", "--rm", str(rm_run / "export"), "--policy", str(toy_sft_export), "--n", "48", "--seed", "2",
            "--max-frames", "64"]
    assert eval_main(argv) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert eval_main(argv) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert a == b
    assert set(a) == {"overall", *DIMS}
    assert all(set(v) == {"lcc", "srcc", "ktau", "pair_acc"} for v in a.values())
    # --table: the same numbers as a markdown table, one row per target
    assert eval_main([*argv, "--table"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "| target | LCC | SRCC | Kendall τ | pair accuracy |" and len(rows) == 2 + len(a)
    assert rows[2] == (f"| overall | {a['overall']['lcc']:.3f} | {a['overall']['srcc']:.3f} | "
                       f"{a['overall']['ktau']:.3f} | {a['overall']['pair_acc']:.3f} |")
    # an RM scoring a dimension the toy world does not have is refused, naming it
    bad = tmp_path / "bad"
    model, info = load_reward_model(rm_run / "export")
    model.dimensions = ("lyrics", "structure", "harmony", "tempo")
    save_reward_model(model, bad, {})
    assert eval_main(["reward", "--rm", str(bad), "--policy", str(toy_sft_export), "--n", "4"]) == 2
    assert "tempo" in capsys.readouterr().err


# ----------------------------------------------------------------------------- preference pairs (Bradley-Terry)
def test_pair_labels_and_bt_loss_match_naive():
    from levo_train.train.reward import RANK_SCALE, pair_bt_loss, pair_labels

    metas = [{"scores": {"chosen": {"a": 0.9, "b": 0.2, "quality": 0.7}, "rejected": {"a": 0.1, "b": 0.25}}},
             {"scores": {"chosen": {"a": 0.5}, "rejected": {"a": 0.52, "b": 0.9}}}, {}]
    lab = pair_labels(metas, ("a", "b", "overall"), margin=0.05)
    assert lab.tolist() == [[1, 0, 1], [0, 0, 1], [0, 0, 1]]  # b: 0.05 gap counts; a of pair 2: too close
    lab2 = pair_labels(metas, ("a", "b", "overall"), margin=0.04)
    assert lab2.tolist()[0] == [1, -1, 1]
    ch, rj = torch.randn(3, 3), torch.randn(3, 3)
    want = [-math.log(1 / (1 + math.exp(-RANK_SCALE * lab2[i, j].item() * (ch[i, j] - rj[i, j]).item())))
            for i in range(3) for j in range(3) if lab2[i, j] != 0]
    assert pair_bt_loss(ch, rj, lab2).item() == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_reward_recipe_on_preference_pairs(toy_sft_export, toy_cache_dir, tmp_path, capsys):
    """recipe=reward data.pairs=...: Bradley-Terry on pair shards (here toy world pairs, which also
    carry each song's hidden dimension scores): held-out pair accuracy ends well above chance."""
    from levo_data.cli import main as data_main

    pairs = tmp_path / "pairs"
    assert data_main(["pairs", "--toy", "--out", str(pairs), "--n-train", "300", "--n-val", "64"]) == 0
    rd = tmp_path / "rm"
    args = [a for a in rm_args(toy_cache_dir, toy_sft_export, rd, "trainer.max_steps=60",
                               "trainer.val_check_interval=60", f"data.pairs={pairs}")
            if not a.startswith("data.toy_reward.")]
    assert main(args) == 0
    s = json.loads((rd / "summary.json").read_text())
    m = s["val_metrics"]
    assert m["val/overall/pair_acc"] > 0.75, m
    assert {f"val/{d}/pair_acc" for d in DIMS} & set(m)
    assert s["val_loss_end"] < s["val_loss_start"]
    info = json.loads((rd / "export" / "reward.json").read_text())
    assert sorted(info["dimensions"]) == sorted(DIMS)  # from the pairs' json (scores.chosen / .rejected)
    capsys.readouterr()
    assert main([*args[:-1], f"run_dir={tmp_path / 'both'}", f"data.pairs={pairs}", "data.train=x"]) == 2
    assert "not both" in capsys.readouterr().err


def _scaled_shards(folder: Path, songs, lo: float, hi: float) -> Path:
    """``songs`` with every score s written as lo + (hi - lo) * s (a 1-5 or 1-10 rating scale)."""
    with ShardWriter(folder, code_size=16) as w:
        for s in songs:
            sc = {k: lo + (hi - lo) * v for k, v in s.meta["scores"].items()}
            w.write_song(s.key, s.tokens, s.lyric, s.style, {"scores": {**sc, "overall": lo + (hi - lo) *
                                                                        s.meta["quality"]}})
    return folder


def test_scores_on_another_scale_are_normalised_by_score_range(toy_sft_export, toy_cache_dir, tmp_path, capsys):
    """``reward.score_range=[lo,hi]`` (issue #21 item 5): 1-5 ratings train the RM as the same ratings in
    [0, 1] do (targets (s - lo) / (hi - lo); the trained exports equal), and a score outside the range
    is refused naming the setting, the shard and the song."""
    from levo_train.data.scored import RewardDataModule

    songs = _songs(8)
    unit, five = _scaled_shards(tmp_path / "unit", songs, 0.0, 1.0), _scaled_shards(tmp_path / "five", songs, 1.0, 5.0)

    def targets(folder: Path, **kw) -> torch.Tensor:
        dm = RewardDataModule(str(folder), batch_size=8, code_size=16, dimensions=DIMS, shuffle_buffer=1, **kw)
        dm.setup()
        return next(iter(dm.train_dataloader()))["targets"]

    want = torch.tensor([[*s.meta["scores"].values(), s.meta["quality"]] for s in songs], dtype=torch.float32)
    assert torch.allclose(targets(unit), want, atol=1e-6)
    assert torch.allclose(targets(five, score_range=(1.0, 5.0)), want, atol=1e-6)
    with pytest.raises(ShardError, match=r"reward.score_range=\[0.0, 1.0\]") as e:
        targets(five)  # 1-5 ratings under the default [0, 1]
    assert "songs-000000.tar" in str(e.value) and "'s0'" in str(e.value)

    runs = {}
    for name, data, extra in (("unit", unit, []), ("five", five, ["reward.score_range=[1,5]"])):
        runs[name] = tmp_path / f"run-{name}"
        args = rm_args(toy_cache_dir, toy_sft_export, runs[name], f"data.train={data}", "data.val=null",
                       "trainer.max_steps=2", "trainer.val_check_interval=1000", "reward.layers=1", *extra)
        assert main(args) == 0, capsys.readouterr().err
    wa, wb = (torch.load(r / "export" / "reward.pt", weights_only=True) for r in runs.values())
    assert [k for k in wa if not torch.allclose(wa[k], wb[k], atol=1e-6)] == []
    assert main([*args[:-1], "reward.score_range=[5,1]"]) == 2
    assert "reward.score_range=[5.0, 1.0]" in capsys.readouterr().err
