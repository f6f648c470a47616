"""``levo-eval toy`` / ``compare``: reproducible numbers that match a naive recomputation, and a
comparison that scores every export on the same conditions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from levo_eval.cli import main, toy_samples
from levo_infer import load_model
from levo_infer.checkpoint import save_released
from levo_train.toy.world import ToyWorld


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_toy_eval_is_reproducible_and_matches_recomputation(toy_sft_export, capsys):
    argv = ["toy", "--ckpt", str(toy_sft_export), "--n", "24", "--seed", "3", "--batch-size", "10", "--max-frames", "40"]
    a, b = run_json(capsys, argv), run_json(capsys, argv)
    for k in ("quality", "quality_se", "per", "per_se", "mean_frames"):
        assert a[k] == b[k], k
    assert a["n"] == 24 and a["tier"] == "top"
    # the same songs, scored again by hand: mean and standard error of the hidden quality and PER
    samples = toy_samples(str(toy_sft_export), n=24, seed=3, batch_size=10, max_frames=40)
    world = ToyWorld(0)
    conds = world.heldout_conditions(24, 3)
    assert [s["lyric"] for s in samples] == [c.lyric for c in conds]
    assert all(s["style"].startswith("[Musicality-very-high]") for s in samples)
    q = np.array([s["scores"]["quality"] for s in samples])
    per = np.array([s["per"] for s in samples])
    assert a["quality"] == pytest.approx(q.mean(), abs=1e-12)
    assert a["quality_se"] == pytest.approx(q.std(ddof=1) / math.sqrt(24), abs=1e-12)
    assert a["per"] == pytest.approx(per.mean(), abs=1e-12)
    assert 0 <= a["quality"] <= 1 and 0 <= a["per"] <= 1
    none = run_json(capsys, [*argv, "--tier", "none"])
    assert none["tier"] == "none"


def test_compare_same_conditions_and_deltas(toy_sft_export, tmp_path, capsys):
    import torch

    m = load_model(toy_sft_export)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_released(m, tmp_path / "other")
    res = run_json(capsys, ["compare", "--base", str(toy_sft_export), "--ckpt", str(toy_sft_export),
                            str(tmp_path / "other"), "--n", "16", "--seed", "2", "--max-frames", "40"])
    same, other = res["ckpts"]
    assert same["quality"] == res["base"]["quality"]
    assert same["vs_base"]["quality"]["delta"] == 0 and same["vs_base"]["quality"]["paired_se"] == 0
    d = other["vs_base"]["quality"]
    assert d["delta"] == pytest.approx(other["quality"] - res["base"]["quality"], abs=1e-12)
    comb = math.hypot(other["quality_se"], res["base"]["quality_se"])
    assert d["z"] == pytest.approx(d["delta"] / comb, rel=1e-9)
    assert other["vs_base"]["per"]["delta"] == pytest.approx(other["per"] - res["base"]["per"], abs=1e-12)
    # the same comparison as a markdown table: base row first, then one row per export with its deltas
    assert main(["compare", "--base", str(toy_sft_export), "--ckpt", str(tmp_path / "other"), "--n", "16", "--seed",
                 "2", "--max-frames", "40", "--table"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("tier top, n = 16, seed 2")
    assert lines[-2].startswith(f"| {toy_sft_export} | {res['base']['quality']:.3f} ± ")
    assert lines[-1].startswith(f"| {tmp_path / 'other'} | {other['quality']:.3f} ± ") and " SE)" in lines[-1]
    # both tiers, each compared on its own: a JSON list (top, then none), or one table per tier
    both = main(["compare", "--base", str(toy_sft_export), "--ckpt", str(tmp_path / "other"), "--n", "16", "--seed",
                 "2", "--max-frames", "40", "--tier", "both"])
    assert both == 0
    top, none = json.loads(capsys.readouterr().out)
    assert (top["tier"], none["tier"]) == ("top", "none") and top["ckpts"][0]["quality"] == other["quality"]
    assert main(["compare", "--base", str(toy_sft_export), "--ckpt", str(tmp_path / "other"), "--n", "16", "--seed",
                 "2", "--max-frames", "40", "--tier", "top", "none", "--table"]) == 0
    heads = [x.split(",")[0] for x in capsys.readouterr().out.splitlines() if x.startswith("tier ")]
    assert heads == ["tier top", "tier none"]
