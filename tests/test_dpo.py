"""Offline DPO end to end: the DPO module against a naive recomputation (loss and gradients),
precomputed vs live reference log-probs, ``levo-data pairs / ref-logps / merge``, SFT -> DPO
through the real CLI on the toy world (metrics improve, export reloads, exact resume), and clear
errors for bad input."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_config

from levo_data.prefs import compute_ref_logps, merge_exports, register
from levo_infer import load_model
from levo_infer.checkpoint import load_weights, save_released
from levo_infer.config import load_config
from levo_infer.model import LeLM
from levo_train.cli import main
from levo_train.data.datamodule import PairDataModule
from levo_train.data.pairs import (
    Pair,
    PairWriter,
    collate_pairs,
    decode_pair,
    read_ref_logps,
)
from levo_train.data.shards import ShardError, ShardWriter, Song, iter_raw
from levo_train.fingerprint import model_fingerprint
from levo_train.train.dpo import DPOModule
from levo_train.train.logps import pair_logps

TOY_PAIRS = ["data.toy_pairs.n_train=200", "data.toy_pairs.n_val=64", "data.toy_pairs.max_frames=48"]
LYRICS = ["[verse] love . night", "[verse] la da ; [chorus] happy . love", "[verse] rock , pop . sad"]


# ----------------------------------------------------------------------------- helpers
def levo_data(args: list[str]) -> int:
    """Run a ``levo-data`` preference subcommand through an argparse parser built with ``register``."""
    p = argparse.ArgumentParser(prog="levo-data")
    register(p.add_subparsers(dest="command", required=True))
    ns = p.parse_args(args)
    return ns.func(ns)


def dpo_args(cache: str, run_dir: Path, init: Path, *extra: str) -> list[str]:
    return ["recipe=dpo", f"run_dir={run_dir}", f"model.init={init}", f"data.toy.cache_dir={cache}", *TINY,
            *TOY_PAIRS, *extra]


def tiny_export(path: Path, seed: int = 0, **cfg_kw) -> Path:
    torch.manual_seed(seed)
    m = LeLM(tiny_config(**cfg_kw))
    m.init_weights(std=0.2)
    save_released(m, path)
    return path


def random_song(rng: np.random.Generator, key: str, lyric: str, style: str, frames: int,
                prompt: np.ndarray | None = None, code_size: int = 16, meta: dict | None = None) -> Song:
    return Song(key, rng.integers(0, code_size, (3, frames)), lyric, style, prompt, meta or {})


def write_tiny_pairs(folder: Path, n: int, seed: int, max_records: int = 5) -> None:
    """``n`` random pairs for :func:`tiny_config` models (code_size 16), some with a prompt."""
    rng = np.random.default_rng(seed)
    with PairWriter(folder, code_size=16, max_records=max_records) as w:
        for i in range(n):
            lyric, style = LYRICS[i % 3], ["rock", "pop , sad", "happy"][i % 3]
            prompt = rng.integers(0, 16, (3, 3)) if i % 2 else None
            c = random_song(rng, f"c{i}", lyric, style, int(rng.integers(3, 11)), prompt)
            r = random_song(rng, f"r{i}", lyric, style, int(rng.integers(3, 11)), prompt)
            w.write_pair(f"p{i:03d}", c, r, {"dimension": "quality", "margin": 0.5, "origin": "test"})


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)




@pytest.fixture(scope="module")
def cache(toy_cache_dir) -> str:
    return toy_cache_dir


@pytest.fixture(scope="module")
def sft_export(toy_sft_export) -> Path:
    """A briefly SFT-trained toy model (the DPO init of the CLI tests)."""
    return toy_sft_export


# ----------------------------------------------------------------------------- gradient check
def naive_logps(model: LeLM, codes: torch.Tensor, lengths: torch.Tensor, cond, weights: list[float]) -> torch.Tensor:
    """Sum of log p over frames + EOS of each song from the full logits of ``model(codes, cond)``."""
    B, K, T = codes.shape
    full = torch.full((B, K, T + 1), model.pad_id, dtype=torch.long)
    for b in range(B):
        L = int(lengths[b])
        full[b, :, :L] = codes[b, :, :L]
        full[b, :, L] = model.eos_id
    logits = model(full, cond)  # [B, K, T+1, V]
    lp = torch.log_softmax(logits.float(), dim=-1)
    V = lp.shape[-1]
    tok = lp.gather(-1, full.clamp(max=V - 1)[..., None]).squeeze(-1)
    valid = torch.arange(T + 1)[None, None, :] <= lengths[:, None, None]
    w = torch.tensor(weights)[None, :, None]
    return (tok * valid * w).sum(dim=(1, 2))


def pair_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        prompt = rng.integers(0, 16, (3, 3))
        c = random_song(rng, f"c{i}", LYRICS[i % 3], "rock , happy", int(rng.integers(3, 12)), prompt)
        r = random_song(rng, f"r{i}", LYRICS[i % 3], "rock , happy", int(rng.integers(3, 12)), prompt)
        pairs.append(Pair(f"p{i}", c.tokens, r.tokens, c.lyric, c.style, prompt, {}))
    return collate_pairs(pairs, 16)


@pytest.mark.parametrize("stream_weights", [None, [1.0, 0.5, 0.0]])
def test_dpo_loss_and_grads_match_naive_separate_scoring(stream_weights):
    torch.manual_seed(0)
    beta = 0.5
    module = DPOModule(tiny_config(), beta=beta, stream_weights=stream_weights)
    module.model.init_weights(std=0.2)
    module.freeze_reference()
    perturb(module.model, seed=1)  # policy != reference
    batch = pair_batch(5, seed=3)
    assert batch["chosen"].shape[2] != batch["rejected"].shape[2] or not torch.equal(
        batch["chosen_lengths"], batch["rejected_lengths"])

    params = [p for p in module.model.parameters() if p.requires_grad]
    loss, metrics = module.dpo_step(batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    # naive: chosen and rejected scored in separate forwards, hand-written sigmoid DPO
    w = stream_weights or [1.0, 1.0, 1.0]
    m, ref = module.model, module.ref
    cond = m.prepare_conditions(batch["lyrics"], batch["styles"], batch["prompts"])
    pc = naive_logps(m, batch["chosen"], batch["chosen_lengths"], cond, w)
    pr = naive_logps(m, batch["rejected"], batch["rejected_lengths"], cond, w)
    with torch.no_grad():
        rc = naive_logps(ref, batch["chosen"], batch["chosen_lengths"], cond, w)
        rr = naive_logps(ref, batch["rejected"], batch["rejected_lengths"], cond, w)
    naive_loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    naive_grads = torch.autograd.grad(naive_loss, params, allow_unused=True, materialize_grads=True)

    assert abs(float(loss.detach()) - float(np.log(2))) > 1e-3  # a real, non-trivial loss
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["rewards/chosen"], (beta * (pc - rc)).mean().detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["rewards/rejected"], (beta * (pr - rr)).mean().detach(), rtol=1e-5, atol=1e-5)
    names = [n for n, p in module.model.named_parameters() if p.requires_grad]
    for n, g, ng in zip(names, grads, naive_grads):  # fp32: tolerance relative to the tensor's scale
        scale = float(ng.abs().max())
        torch.testing.assert_close(g, ng, rtol=1e-4, atol=1e-4 * scale + 1e-9, msg=lambda s, n=n: f"{n}: {s}")
    assert sum(float(ng.abs().sum()) for ng in naive_grads) > 0

    # the gradient reaches every conditioner table
    by_name = dict(zip(names, grads))
    for table in ("condition_provider.conditioners.description.output_proj.weight",
                  "condition_provider.conditioners.description.structure_emb.weight",
                  "condition_provider.conditioners.type_info.output_proj.weight",
                  "condition_provider.conditioners.prompt_audio.emb.0.weight",
                  "condition_provider.conditioners.prompt_audio.emb.1.weight",
                  "condition_provider.conditioners.prompt_audio.EOT_emb"):
        assert by_name[table].abs().sum() > 0, f"no gradient into {table}"
    # and never into the frozen reference
    assert all(not p.requires_grad and p.grad is None for p in module.ref.parameters())


# ----------------------------------------------------------------------------- precomputed reference
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_precomputed_reference_equals_live_reference(tmp_path, loss_type):
    init = tiny_export(tmp_path / "init")
    write_tiny_pairs(tmp_path / "pairs" / "train", 13, seed=1)
    write_tiny_pairs(tmp_path / "pairs" / "val", 4, seed=2)
    # batch size 4 here, 6 below: padding differs, the values must not
    assert levo_data(["ref-logps", "--pairs", str(tmp_path / "pairs"), "--model", str(init),
                      "--batch-size", "4", "--device", "cpu"]) == 0
    fp = model_fingerprint(init)
    for split, n in (("train", 13), ("val", 4)):
        data = read_ref_logps(tmp_path / "pairs" / split)
        assert data is not None and data["model"] == fp and len(data["logps"]) == n
        assert data["stream_weights"] == [1.0, 1.0, 1.0]

    cfg = load_config(init)
    live = DPOModule(cfg, reference="model", loss_type=loss_type)
    load_weights(live.model, init / "model.pt")
    live.freeze_reference()
    pre = DPOModule(cfg, reference="precomputed", loss_type=loss_type)
    load_weights(pre.model, init / "model.pt")
    pre.freeze_reference()  # no-op for precomputed
    assert pre.ref is None
    for m in (live.model, pre.model):
        perturb(m, seed=7)

    dm = PairDataModule(str(tmp_path / "pairs" / "train"), str(tmp_path / "pairs" / "val"), batch_size=6,
                        code_size=16, rank=0, world_size=1, use_ref_logps=True, ref_fingerprint=fp)
    dm.setup("fit")
    batches = [next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))]
    for batch in batches:
        assert "ref_chosen_logps" in batch
        with torch.no_grad():
            loss_live, m_live = live.dpo_step(batch)
            loss_pre, m_pre = pre.dpo_step(batch)
            ref_live, _ = pair_logps(live.ref, batch)
        B = batch["chosen"].shape[0]
        torch.testing.assert_close(batch["ref_chosen_logps"], ref_live[:B], rtol=0, atol=1e-4)
        torch.testing.assert_close(batch["ref_rejected_logps"], ref_live[B:], rtol=0, atol=1e-4)
        torch.testing.assert_close(loss_pre, loss_live, rtol=0, atol=1e-5)
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "drift"):
            torch.testing.assert_close(m_pre[k], m_live[k], rtol=0, atol=1e-5)
        assert float(loss_live) != pytest.approx(float(np.log(2)), abs=1e-4)

    # a batch without reference log-probs is a clear error for reference=precomputed
    bare = {k: v for k, v in batches[0].items() if not k.startswith("ref_")}
    with pytest.raises(ValueError, match="levo-data ref-logps"):
        pre.dpo_step(bare)


def test_ref_logps_stream_weights_and_fingerprint_checks(tmp_path):
    init = tiny_export(tmp_path / "init")
    write_tiny_pairs(tmp_path / "pairs", 4, seed=1)
    assert levo_data(["ref-logps", "--pairs", str(tmp_path / "pairs"), "--model", str(init),
                      "--stream-weights", "1,0.5,0", "--device", "cpu"]) == 0
    data = read_ref_logps(tmp_path / "pairs")
    assert data["stream_weights"] == [1.0, 0.5, 0.0]
    model = load_model(init)
    want = compute_ref_logps(model, tmp_path / "pairs", batch_size=1, stream_weights=[1.0, 0.5, 0.0])
    for k, (c, r, digest) in want.items():
        assert data["logps"][k][:2] == pytest.approx((c, r), abs=1e-4) and data["logps"][k][2] == digest

    def first_batch(**kw):
        dm = PairDataModule(str(tmp_path / "pairs"), batch_size=2, code_size=16, rank=0, world_size=1,
                            use_ref_logps=True, **kw)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    assert "ref_chosen_logps" in first_batch(ref_fingerprint=model_fingerprint(init), ref_stream_weights=[1, 0.5, 0])
    with pytest.raises(ShardError, match="stream weights"):
        first_batch(ref_fingerprint=model_fingerprint(init))
    other = tiny_export(tmp_path / "other", seed=5)
    with pytest.raises(ShardError, match="recompute"):
        first_batch(ref_fingerprint=model_fingerprint(other), ref_stream_weights=[1, 0.5, 0])
    # rebuilding the pairs removes the now stale reference log-probs
    from levo_train.data.pairs import build_pairs

    rng = np.random.default_rng(0)
    songs = [random_song(rng, f"s{i}", LYRICS[0], "rock", 5, meta={"quality": float(i)}) for i in range(3)]
    build_pairs(songs, tmp_path / "pairs", code_size=16)
    assert read_ref_logps(tmp_path / "pairs") is None


def test_stale_reference_logps_of_rewritten_pairs_are_refused(tmp_path):
    """Pair keys repeat whenever pairs are regenerated: reference log-probs computed for the old
    pairs must never be served for new pairs under the same keys (the shards copied over in place,
    as a sync tool would), and a writer that opens the folder removes the old file."""
    import shutil

    init = tiny_export(tmp_path / "init")
    write_tiny_pairs(tmp_path / "pairs", 6, seed=1)
    assert levo_data(["ref-logps", "--pairs", str(tmp_path / "pairs"), "--model", str(init), "--device", "cpu"]) == 0
    write_tiny_pairs(tmp_path / "new", 6, seed=2)  # same keys p000.., other songs
    for tar in (tmp_path / "new").glob("*.tar"):
        shutil.copy(tar, tmp_path / "pairs" / tar.name)
    dm = PairDataModule(str(tmp_path / "pairs"), batch_size=2, code_size=16, rank=0, world_size=1,
                        use_ref_logps=True, ref_fingerprint=model_fingerprint(init))
    dm.setup("fit")
    with pytest.raises(ShardError, match="computed for another pair") as e:
        next(iter(dm.train_dataloader()))
    assert "p00" in str(e.value) and "recompute" in str(e.value)
    # a file without digests (an older levo-train) cannot be tied to its pairs either
    data = json.loads((tmp_path / "pairs" / "ref_logps.json").read_text())
    data["logps"] = {k: v[:2] for k, v in data["logps"].items()}
    data["format"] = 2  # nor a sha256 of its own
    del data["sha256"]
    (tmp_path / "pairs" / "ref_logps.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="without pair digests"):
        next(iter(dm.train_dataloader()))
    # any pair writer opening the folder drops the file
    write_tiny_pairs(tmp_path / "pairs2", 2, seed=3)
    assert levo_data(["ref-logps", "--pairs", str(tmp_path / "pairs2"), "--model", str(init), "--device", "cpu"]) == 0
    with PairWriter(tmp_path / "pairs2", code_size=16, prefix="more"):
        pass
    assert read_ref_logps(tmp_path / "pairs2") is None


# ----------------------------------------------------------------------------- levo-data pairs
def write_candidates(folder: Path, scores: list[list[dict]], seed: int = 0) -> list[list[Song]]:
    """Candidate song shards: group g has len(scores[g]) songs with the given score dicts."""
    rng = np.random.default_rng(seed)
    groups = []
    with ShardWriter(folder, code_size=16, max_records=4) as w:
        for g, group in enumerate(scores):
            songs = []
            for j, sc in enumerate(group):
                s = random_song(rng, f"g{g}-{j}", LYRICS[g % 3], f"rock , g{g}", int(rng.integers(3, 9)),
                                meta={"scores": sc})
                w.write_song(s.key, s.tokens, s.lyric, s.style, s.meta)
                songs.append(s)
            groups.append(songs)
    return groups


def read_pairs(folder: Path, code_size: int = 16) -> list:
    from levo_train.data.shards import resolve_shards

    return [decode_pair(raw, code_size=code_size, shard=sh) for sh in resolve_shards(str(folder))
            for raw in iter_raw(sh)]


def test_pairs_from_candidates_best_vs_worst(tmp_path, capsys):
    scores = [
        [{"a": 0.2, "b": 0.9}, {"a": 0.8, "b": 0.1}, {"a": 0.5, "b": 0.5}],   # a: 1 vs 0; b disagrees
        [{"a": 0.3, "b": 0.3}, {"a": 0.31, "b": 0.2}],                        # margin 0.01 < 0.05
        [{"a": 0.9, "b": 0.9}, {"a": 0.1, "b": 0.2}, {"a": 0.4, "b": 0.4}, {"a": 0.6, "b": 0.6}],  # 0 vs 1
    ]
    groups = write_candidates(tmp_path / "cands", scores)
    assert levo_data(["pairs", "--candidates", str(tmp_path / "cands"), "--out", str(tmp_path / "pa"),
                      "--dimension", "a", "--code-size", "16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 2 and summary["groups"] == 3 and summary["candidates"] == 9
    pairs = read_pairs(tmp_path / "pa")
    got = {(p.meta["chosen_key"], p.meta["rejected_key"]) for p in pairs}
    assert got == {("g0-1", "g0-0"), ("g2-0", "g2-1")}
    for p in pairs:
        g, c, r = int(p.meta["chosen_key"][1]), p.meta["chosen_key"], p.meta["rejected_key"]
        by_key = {s.key: s for s in groups[g]}
        np.testing.assert_array_equal(p.chosen, by_key[c].tokens)
        np.testing.assert_array_equal(p.rejected, by_key[r].tokens)
        assert p.lyric == by_key[c].lyric and p.style == by_key[c].style
        assert p.meta["dimension"] == "a" and p.meta["margin"] >= 0.05
        assert p.meta["scores"]["chosen"]["a"] > p.meta["scores"]["rejected"]["a"]

    # both dimensions required: group 0 (b disagrees) drops out
    assert levo_data(["pairs", "--candidates", str(tmp_path / "cands"), "--out", str(tmp_path / "pab"),
                      "--dimension", "a", "--dimension", "b", "--require-all", "--code-size", "16"]) == 0
    pairs = read_pairs(tmp_path / "pab")
    assert [(p.meta["chosen_key"], p.meta["dimension"]) for p in pairs] == [("g2-0", "a+b")]

    # a dimension the candidates lack: error naming the record
    capsys.readouterr()
    assert levo_data(["pairs", "--candidates", str(tmp_path / "cands"), "--out", str(tmp_path / "pc"),
                      "--dimension", "lyrics", "--code-size", "16"]) == 1
    err = capsys.readouterr().err
    assert "no score for dimension 'lyrics'" in err and "g0-0" in err


def test_pairs_toy_and_from_model(tmp_path, sft_export, capsys):
    assert levo_data(["pairs", "--toy", "--out", str(tmp_path / "toy"), "--n-train", "30", "--n-val", "10"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["source"] == "world" and s["train"]["pairs"] > 10 and s["val"]["pairs"] > 3
    tp = read_pairs(tmp_path / "toy" / "train", code_size=64)
    assert len(tp) == s["train"]["pairs"]
    assert all(p.meta["scores"]["chosen"]["quality"] - p.meta["scores"]["rejected"]["quality"] >= 0.05 for p in tp)
    assert all(p.meta["origin"] == "toy-world" for p in tp)
    # default tiers: top (released-style prompts) and untagged, cycled over the prompts
    assert {p.style.startswith("[Musicality-very-high]") for p in tp} == {True, False}
    assert all(p.style.startswith("[Musicality-very-high]") or "[Musicality" not in p.style for p in tp)

    assert levo_data(["pairs", "--from-model", str(sft_export), "--out", str(tmp_path / "own"), "--n-prompts", "8",
                      "--n-val", "0", "--n-candidates", "3", "--max-frames", "40", "--min-margin", "0.0",
                      "--seed", "3"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["source"] == "model" and s["train"]["candidates"] + s["train"]["empty_samples"] == 24
    assert "val" not in s
    own = read_pairs(tmp_path / "own" / "train", code_size=64)
    assert len(own) == s["train"]["pairs"] >= 1
    from levo_train.toy.world import ToyWorld

    world = ToyWorld(0)
    for p in own:
        assert p.meta["origin"] == "model-samples"
        qc, qr = (world.score(x, p.lyric, p.style)["quality"] for x in (p.chosen, p.rejected))
        assert qc > qr  # re-scoring the stored songs reproduces the preference
    # toy-only: a model of another code size is refused
    other = tiny_export(tmp_path / "tiny16")
    capsys.readouterr()
    assert levo_data(["pairs", "--from-model", str(other), "--out", str(tmp_path / "x"), "--n-prompts", "2"]) == 1
    assert "code_size=16, the toy world 64" in capsys.readouterr().err


def test_toy_pairs_from_the_init_are_cached_per_model(tmp_path, sft_export):
    """recipe=dpo's default pairs: sampled from model.init, cached under the model's fingerprint."""
    from levo_train.toy.pairs import ToyPairSpec, ensure_toy_pairs
    from levo_train.toy.world import ToyWorld

    spec = ToyPairSpec(n_train=12, n_val=4, n_candidates=3, max_frames=40, min_margin=0.0)
    root = tmp_path / "cache"
    a = ensure_toy_pairs(root, spec, model=sft_export)
    done = json.loads((a / "done.json").read_text())
    assert done["source"] == "model" and done["model_fingerprint"] == model_fingerprint(sft_export)
    assert done["train"]["candidates"] + done["train"]["empty_samples"] == 36 and done["val"]["prompts"] == 4
    stamp = (a / "done.json").stat().st_mtime_ns
    assert ensure_toy_pairs(root, spec, model=sft_export) == a
    assert (a / "done.json").stat().st_mtime_ns == stamp  # reused
    world = ToyWorld(0)
    pairs = read_pairs(a / "train", code_size=64)
    assert len(pairs) == done["train"]["pairs"] >= 1
    for p in pairs:
        assert p.meta["origin"] == "model-samples"
        assert p.style.startswith("[Musicality-very-high]") or "[Musicality" not in p.style
        assert world.score(p.chosen, p.lyric, p.style)["quality"] > world.score(p.rejected, p.lyric, p.style)["quality"]
    # another model (or another setting) gets its own pairs, never the cached ones
    m = load_model(sft_export)
    perturb(m, seed=5)
    save_released(m, tmp_path / "other")
    b = ensure_toy_pairs(root, spec, model=tmp_path / "other")
    assert b != a and json.loads((b / "done.json").read_text())["model_fingerprint"] == model_fingerprint(tmp_path / "other")
    w = ensure_toy_pairs(root, ToyPairSpec(source="world", n_train=12, n_val=4), model=sft_export)
    assert w not in (a, b) and read_pairs(w / "train", code_size=64)[0].meta["origin"] == "toy-world"
    # one tier for every prompt, or a list cycled over them (the default: top and untagged)
    top = ensure_toy_pairs(root, ToyPairSpec(source="world", n_train=12, n_val=0, tier="top"))
    assert not (top / "val").exists()
    assert all(p.style.startswith("[Musicality-very-high]") for p in read_pairs(top / "train", code_size=64))
    high = ensure_toy_pairs(root, ToyPairSpec(source="world", n_train=12, n_val=0, tier=["high", "none"]))
    styles = {p.style.split(",")[0] for p in read_pairs(high / "train", code_size=64)}
    assert "[Musicality-high]" in styles and not any(s.startswith("[Musicality-very") for s in styles)
    with pytest.raises(ValueError, match="need the model"):
        ensure_toy_pairs(root, ToyPairSpec(n_train=3, n_val=0))
    with pytest.raises(ValueError, match="source 'nope'"):
        ToyPairSpec(source="nope")


def test_toy_pair_cache_refuses_a_changed_or_misnamed_folder(tmp_path, capsys):
    """Shared cache folders record what they derive from and the digest of every file: a folder
    whose shard changed after the build, or one copied under another set's name, is refused."""
    import shutil

    from levo_train.data.cache import CacheError
    from levo_train.toy.pairs import ToyPairSpec, ensure_toy_pairs

    root = tmp_path / "cache"
    spec = ToyPairSpec(source="world", n_train=12, n_val=4)
    a = ensure_toy_pairs(root, spec)
    prov = json.loads((a / "derived_from.json").read_text())
    assert prov["derived_from"]["spec"]["n_train"] == 12 and "train/pairs-000000.tar" in prov["files"]
    assert ensure_toy_pairs(root, spec) == a  # unchanged: reused
    (a / "train" / "ref_logps.json").write_text("{}")  # files added after the build are not the build's
    assert ensure_toy_pairs(root, spec) == a
    shard = a / "train" / "pairs-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-600] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="pairs-000000.tar changed after the build"):
        ensure_toy_pairs(root, spec)
    # a set copied over another's name (same layout, other inputs)
    other = ToyPairSpec(source="world", n_train=12, n_val=4, seed=1)
    b = ensure_toy_pairs(root, other)
    shutil.rmtree(b)
    shutil.copytree(ensure_toy_pairs(tmp_path / "c2", spec), b)
    with pytest.raises(CacheError, match="was built from spec.seed=0"):
        ensure_toy_pairs(root, other)


def test_init_fingerprint_is_computed_once_per_run(tmp_path, monkeypatch):
    """The init's fingerprint keys the reference log-probs, the resume check and the checkpoint:
    a DPO run (and its resume) hashes each file of the init at most once, and not at all when
    the digests are cached beside the files."""
    from levo_train import fingerprint as fpm

    init = tiny_export(tmp_path / "init")
    write_tiny_pairs(tmp_path / "pairs" / "train", 12, seed=1)
    write_tiny_pairs(tmp_path / "pairs" / "val", 4, seed=2)
    assert levo_data(["ref-logps", "--pairs", str(tmp_path / "pairs"), "--model", str(init), "--device", "cpu"]) == 0
    for side in init.glob(".*.sha256"):
        side.unlink()
    fpm.clear_memo()
    hashed: list[str] = []
    real = fpm._hash_file
    monkeypatch.setattr(fpm, "_hash_file", lambda p: hashed.append(p.name) or real(p))
    run = ["recipe=dpo", f"model.init={init}", f"data.pairs={tmp_path / 'pairs'}", "dpo.reference=precomputed",
           "logger=none", "trainer.enable_progress_bar=false", "data.batch_size=4", "optim.warmup_steps=1",
           "trainer.val_check_interval=1000", "checkpoint.every_n_steps=2", "optim.total_steps=4"]
    assert main([*run, f"run_dir={tmp_path / 'r'}", "trainer.max_steps=2"]) == 0
    assert sorted(hashed) == ["config.yaml", "model.pt"]
    fpm.clear_memo()
    hashed.clear()
    assert main([*run, f"run_dir={tmp_path / 'r'}", "trainer.max_steps=4", "resume=true"]) == 0
    assert hashed == []  # cached beside the files


# ----------------------------------------------------------------------------- merge
def test_merge_exports(tmp_path, capsys):
    a, b = tiny_export(tmp_path / "a", seed=1), tiny_export(tmp_path / "b", seed=2)
    assert levo_data(["merge", "--out", str(tmp_path / "self"), "--weights", "0.5,0.5", str(a), str(a)]) == 0
    wa, wb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    ws = torch.load(tmp_path / "self" / "model.pt", weights_only=True)
    assert ws.keys() == wa.keys()
    assert all(torch.equal(ws[k], wa[k]) for k in wa)

    assert levo_data(["merge", "--out", str(tmp_path / "mix"), "--weights", "0.25,0.75", str(a), str(b)]) == 0
    wm = torch.load(tmp_path / "mix" / "model.pt", weights_only=True)
    for k in wa:
        torch.testing.assert_close(wm[k], 0.25 * wa[k].float() + 0.75 * wb[k].float(), rtol=1e-6, atol=1e-7)
    assert load_config(tmp_path / "mix") == load_config(a)
    load_model(tmp_path / "mix")  # a complete, loadable export

    # --normalize: 1,3 == 0.25,0.75
    assert merge_exports([a, b], [1, 3], tmp_path / "norm", normalize=True)["weights"] == [0.25, 0.75]
    wn = torch.load(tmp_path / "norm" / "model.pt", weights_only=True)
    assert all(torch.equal(wn[k], wm[k]) for k in wm)

    capsys.readouterr()
    c = tiny_export(tmp_path / "c", dim=48)
    assert levo_data(["merge", "--out", str(tmp_path / "bad"), "--weights", "0.5,0.5", str(a), str(c)]) == 1
    err = capsys.readouterr().err
    assert "config differs" in err and "lm.dim (32 vs 48)" in err
    with pytest.raises(ValueError, match="2 values for 3 exports"):
        merge_exports([a, b, a], [0.5, 0.5], tmp_path / "bad")
    with pytest.raises(ValueError, match="sum to 1.1"):
        merge_exports([a, b], [0.5, 0.6], tmp_path / "bad")
    with pytest.raises(ValueError, match="one of the inputs"):
        merge_exports([a, b], [0.5, 0.5], a)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- bad input
def test_pair_writer_rejects_different_conditions(tmp_path):
    rng = np.random.default_rng(0)
    c = random_song(rng, "c", LYRICS[0], "rock", 5)
    with PairWriter(tmp_path / "p", code_size=16) as w:
        for other, what in ((random_song(rng, "r", LYRICS[1], "rock", 5), "lyric"),
                            (random_song(rng, "r", LYRICS[0], "pop", 5), "style"),
                            (random_song(rng, "r", LYRICS[0], "rock", 5, prompt=np.zeros((3, 3), np.int64)), "prompt")):
            with pytest.raises(ShardError) as e:
                w.write_pair("p0", c, other)
            msg = str(e.value)
            assert f"different {what}" in msg and "must share its conditions" in msg and "'p0'" in msg
        # codes are checked as the song writer checks them: integers, [3, T], in range
        for bad, what in ((c.tokens.astype(np.float32), "dtype float32, expected integers"),
                          (c.tokens[:2], "shape [2, 5], expected [3, T]"),
                          (c.tokens + 16, "out of range")):
            with pytest.raises(ShardError, match=r"chosen (has|code)") as e:
                w.write_pair("p1", dataclasses.replace(c, tokens=bad), random_song(rng, "r", LYRICS[0], "rock", 5))
            assert what in str(e.value)
        w.write_pair("p0", c, random_song(rng, "r", LYRICS[0], "rock", 7))  # shared conditions are fine


def test_pair_shard_without_rejected(tmp_path, capsys):
    import io

    write_tiny_pairs(tmp_path / "good", 2, seed=0)
    shard = tmp_path / "bad" / "pairs-000000.tar"
    shard.parent.mkdir()
    src = next(iter(iter_raw(str(tmp_path / "good" / "pairs-000000.tar"))))
    with tarfile.open(shard, "w") as tf:
        for ext in ("chosen.npy", "lyric.txt", "style.txt", "json"):
            info = tarfile.TarInfo(f"broken-1.{ext}")
            info.size = len(src[ext])
            tf.addfile(info, io.BytesIO(src[ext]))
    raw = next(iter(iter_raw(str(shard))))
    with pytest.raises(ShardError) as e:
        decode_pair(raw, code_size=16)
    msg = str(e.value)
    assert str(shard) in msg and "'broken-1'" in msg and "missing rejected.npy" in msg
    # the same error through levo-data ref-logps
    init = tiny_export(tmp_path / "init")
    assert levo_data(["ref-logps", "--pairs", str(tmp_path / "bad"), "--model", str(init), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "missing rejected.npy" in err and "broken-1" in err and "pairs-000000.tar" in err


def test_dpo_cli_errors(tmp_path, cache, sft_export, capsys):
    # no model.init: says what to pass
    assert main(["recipe=dpo", f"run_dir={tmp_path / 'a'}", f"data.toy.cache_dir={cache}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "model.init=PATH" in err and "recipe=sft" in err

    # an export of another model size (code_size 16) as the init of toy DPO
    small = tiny_export(tmp_path / "small")
    assert main([a for a in dpo_args(cache, tmp_path / "b", small) if not a.startswith("model.config.")]) == 2
    err = capsys.readouterr().err
    assert "code_size=16" in err and "64 codes" in err

    # model.config overrides that contradict the init's own config are refused, not ignored
    assert main(dpo_args(cache, tmp_path / "b1", sft_export, "model.config.dim=48")) == 2
    err = capsys.readouterr().err
    assert "lm.dim=32" in err and "model.config.dim=48" in err and "init" in err

    # a bad toy-pair setting
    assert main(dpo_args(cache, tmp_path / "b2", sft_export, "data.toy_pairs.source=nope")) == 2
    err = capsys.readouterr().err
    assert "data.toy_pairs" in err and "'nope'" in err and "model" in err and "world" in err

    # toy pairs that no prompt passes: says which knobs to turn
    assert main(dpo_args(cache, tmp_path / "b3", sft_export, "data.toy_pairs.source=world",
                         "data.toy_pairs.min_margin=2.0")) == 2
    err = capsys.readouterr().err
    assert "min_margin=2.0" in err and "n_candidates" in err

    # unknown loss type
    assert main(dpo_args(cache, tmp_path / "c", sft_export, "dpo.loss_type=nope")) == 2
    err = capsys.readouterr().err
    assert "unknown DPO loss_type 'nope'" in err and "sigmoid" in err and "ipo" in err

    # precomputed reference log-probs of another model
    assert levo_data(["pairs", "--toy", "--out", str(tmp_path / "pairs"), "--n-train", "24", "--n-val", "8"]) == 0
    assert levo_data(["ref-logps", "--pairs", str(tmp_path / "pairs"), "--model", str(sft_export),
                      "--device", "cpu"]) == 0
    m = load_model(sft_export)
    perturb(m, seed=3)
    save_released(m, tmp_path / "other")
    capsys.readouterr()
    assert main(dpo_args(cache, tmp_path / "d", tmp_path / "other", f"data.pairs={tmp_path / 'pairs'}",
                         "dpo.reference=precomputed", "trainer.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert "ref_logps.json" in err and "computed with model" in err and "recompute" in err

    # precomputed without ref_logps.json: says how to make them
    (tmp_path / "pairs" / "val" / "ref_logps.json").unlink()
    assert main(dpo_args(cache, tmp_path / "e", sft_export, f"data.pairs={tmp_path / 'pairs'}",
                         "dpo.reference=precomputed", "trainer.max_steps=2")) == 2
    assert "levo-data ref-logps" in capsys.readouterr().err


# ----------------------------------------------------------------------------- SFT -> DPO through the CLI
def metric_rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def test_sft_then_dpo_improves_pair_metrics(tmp_path, cache, sft_export):
    rd = tmp_path / "dpo"
    # world-rendered pairs on overall quality (random corruptions): a signal a tiny SFT model picks up
    # in 20 steps (its own samples' best-vs-worst differences do not generalise that fast)
    assert main(dpo_args(cache, rd, sft_export, "data.toy_pairs.dimension=quality", "data.toy_pairs.source=world",
                         "trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.log_every_n_steps=1",
                         "optim.lr=2e-4", "optim.warmup_steps=2")) == 0
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["global_step"] == 20
    rows = metric_rows(rd)
    val = [r for r in rows if "val/rewards/margins" in r]
    start, end = val[0], val[-1]
    assert start["val/rewards/margins"] == 0 and start["val/loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert summary["val_metrics"]["val/rewards/margins"] == pytest.approx(end["val/rewards/margins"], rel=1e-5)
    assert end["val/rewards/margins"] > 0.05, end
    assert end["val/rewards/accuracies"] > 0.6 > start["val/rewards/accuracies"], (start, end)
    assert end["val/loss"] < start["val/loss"] - 0.02
    assert "val/drift" in end and "val/rewards/chosen" in end and "val/rewards/rejected" in end
    train = [r for r in rows if "train/rewards/margins" in r]
    assert len(train) == 20

    def mean(rs, k):
        return sum(r[k] for r in rs) / len(rs)

    for k in ("train/rewards/margins", "train/rewards/accuracies"):
        assert mean(train[-5:], k) > mean(train[:5], k), k
    assert mean(train[-5:], "train/loss") < mean(train[:5], "train/loss")

    # the export reloads, and DPO moved the weights away from the SFT init
    model = load_model(rd / "export")
    w_sft = torch.load(sft_export / "model.pt", weights_only=True)
    w_dpo = torch.load(rd / "export" / "model.pt", weights_only=True)
    assert any(not torch.equal(w_sft[k], w_dpo[k]) for k in w_sft)
    assert model.cfg == load_config(sft_export)


def test_dpo_precomputed_reference_on_toy_pairs(tmp_path, cache, sft_export, capsys):
    """dpo.reference=precomputed on the default toy pairs: their reference log-probs are computed
    once under model.init (beside the cached pairs) and reused by later runs. The final summary gives
    the held-out pair accuracy and margin, losses rounded."""
    common = ["dpo.reference=precomputed", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "data.toy_pairs.n_train=40", "data.toy_pairs.n_val=16", "data.toy_pairs.min_margin=0.0"]
    assert main(dpo_args(cache, tmp_path / "a", sft_export, *common)) == 0
    done = capsys.readouterr().out.split("levo-train dpo: done at step 2")[1]
    assert re.search(r"val/pairs +accuracy \d\.\d{3} .*, margin -?\d+\.\d{4} ", done), done
    assert re.search(r"val/loss +\d+\.\d{4} -> \d+\.\d{4}\n", done) and not re.search(r"\d\.\d{5}", done), done
    data = json.loads((tmp_path / "a" / "summary.json").read_text())["data"]
    files = [Path(data[s]) / "ref_logps.json" for s in ("train", "val")]
    for f in files:
        ref = json.loads(f.read_text())
        assert ref["model"] == model_fingerprint(sft_export) and ref["stream_weights"] == [1.0, 1.0, 1.0]
    n_train = len(read_pairs(Path(data["train"]), code_size=64))
    assert len(json.loads(files[0].read_text())["logps"]) == n_train
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main(dpo_args(cache, tmp_path / "b", sft_export, *common)) == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps  # reused, not recomputed
    ck = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert not any(k.startswith("ref.") for k in ck["state_dict"])


def test_dpo_without_held_out_pairs(tmp_path, cache, sft_export, recwarn):
    """data.toy_pairs.n_val=0: no validation set, the run trains and exports all the same. The frozen
    reference is in eval mode on purpose: Lightning's warning about it is not shown."""
    rd = tmp_path / "noval"
    assert main(dpo_args(cache, rd, sft_export, "data.toy_pairs.source=world", "data.toy_pairs.n_val=0",
                         "trainer.max_steps=3", "trainer.val_check_interval=2")) == 0
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["data"]["val"] is None and summary["val_loss_start"] is None
    assert (rd / "export" / "model.pt").is_file()
    assert not [w for w in recwarn if "in eval mode" in str(w.message)]


def test_dpo_exact_resume(tmp_path, cache, sft_export):
    common = ["trainer.val_check_interval=1000", "trainer.limit_val_batches=1", "checkpoint.every_n_steps=4",
              "optim.total_steps=8", "optim.lr=1e-3", "optim.warmup_steps=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(dpo_args(cache, a, sft_export, "trainer.max_steps=8", *common)) == 0
    assert main(dpo_args(cache, b, sft_export, "trainer.max_steps=4", *common)) == 0
    ck = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert not any(k.startswith("ref.") for k in ck["state_dict"])  # the reference is rebuilt from model.init
    assert main(dpo_args(cache, b, sft_export, "trainer.max_steps=8", "resume=true", *common)) == 0
    assert json.loads((b / "summary.json").read_text())["global_step"] == 8
    wa = torch.load(a / "export" / "model.pt", weights_only=True)
    wb = torch.load(b / "export" / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"


def test_dpo_resume_refuses_another_init(tmp_path, cache, sft_export, capsys):
    """The frozen reference is rebuilt from model.init on resume: another init (same size) or a
    model of another size is refused before anything is built or loaded."""
    common = ["trainer.val_check_interval=1000", "trainer.limit_val_batches=1", "trainer.max_steps=2",
              "optim.lr=1e-3", "optim.warmup_steps=1", "data.toy_pairs.source=world"]
    rd = tmp_path / "run"
    assert main(dpo_args(cache, rd, sft_export, *common)) == 0
    m = load_model(sft_export)
    perturb(m, seed=7)
    save_released(m, tmp_path / "other")
    capsys.readouterr()
    assert main(dpo_args(cache, rd, tmp_path / "other", *common, "resume=true", "trainer.max_steps=4")) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and "pass the original init" in err and str(tmp_path / "other") in err
    # an init of another width: names the differing field instead of pages of shape errors
    cfg = load_config(sft_export)
    wide = LeLM(dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, dim=48)))
    wide.init_weights()
    save_released(wide, tmp_path / "w48")
    args = [a for a in dpo_args(cache, rd, tmp_path / "w48", *common, "resume=true", "trainer.max_steps=4")
            if not a.startswith("model.config.")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a model with lm.dim=32, this run builds lm.dim=48" in err and "new run_dir" in err


def test_dpo_cli_precomputed_matches_live_reference(tmp_path, cache, sft_export):
    pairs = tmp_path / "pairs"
    assert levo_data(["pairs", "--toy", "--out", str(pairs), "--n-train", "40", "--n-val", "8"]) == 0
    assert levo_data(["ref-logps", "--pairs", str(pairs), "--model", str(sft_export), "--batch-size", "5",
                      "--device", "cpu"]) == 0
    common = [f"data.pairs={pairs}", "trainer.max_steps=4", "trainer.val_check_interval=1000",
              "trainer.limit_val_batches=1", "optim.lr=1e-3", "optim.warmup_steps=1"]
    live, pre = tmp_path / "live", tmp_path / "pre"
    assert main(dpo_args(cache, live, sft_export, *common)) == 0
    assert main(dpo_args(cache, pre, sft_export, "dpo.reference=precomputed", *common)) == 0
    wl = torch.load(live / "export" / "model.pt", weights_only=True)
    wp = torch.load(pre / "export" / "model.pt", weights_only=True)
    for k in wl:
        torch.testing.assert_close(wp[k], wl[k], rtol=0, atol=2e-5, msg=lambda s, k=k: f"{k}: {s}")
    ck = torch.load(pre / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert not any(k.startswith("ref.") for k in ck["state_dict"])
