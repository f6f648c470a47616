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
