"""Semi-online DPO (recipe=sdpo): rounds, the same-samples guard, exact resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from levo_train.cli import main
from levo_train.toy.world import ToyWorld
from levo_train.train.sdpo import rounds_figure

# tiny rounds: 4 optimizer steps per round, 12 prompts x 3 candidates, 20-frame songs
SDPO = ["sdpo.sync_every=4", "sdpo.prompts_per_round=12", "sdpo.per_prompt=3", "sdpo.max_frames=40",
        "sdpo.min_margin=0.0", "data.toy_pairs.n_train=40", "trainer.log_every_n_steps=1", "optim.lr=1e-3",
        "optim.warmup_steps=1"]


def sdpo_args(cache: str, run_dir: Path, init: Path, *extra: str) -> list[str]:
    return ["recipe=sdpo", f"run_dir={run_dir}", f"model.init={init}", f"data.toy.cache_dir={cache}", *TINY, *SDPO,
            *extra]


def test_sdpo_rounds_log_reward_and_hidden_quality_of_the_same_samples(tmp_path, toy_cache_dir, toy_sft_export,
                                                                     capsys):
    """Each round's logged scorer mean and hidden quality are computed on the same candidates:
    recomputed from the saved candidate tokens, both match; the scorer (ranking by the hidden lyrics
    dimension alone, so it differs from the hidden quality) ranks the pairs."""
    rd = tmp_path / "run"
    assert main(sdpo_args(toy_cache_dir, rd, toy_sft_export, "trainer.max_steps=8", "sdpo.save_candidates=true",
                          "reward.scorer=toy", "reward.key=lyrics")) == 0
    rounds = [json.loads(x) for x in (rd / "sdpo" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1] and [r["step"] for r in rounds] == [0, 4]
    world = ToyWorld(0)
    for r in rounds:
        cands = [json.loads(x) for x in (rd / "sdpo" / "candidates" / f"round{r['round']:04d}.jsonl").read_text()
                 .splitlines()]
        assert len(cands) == r["candidates"] == 36 - r["empty_dropped"]  # zero-frame songs dropped, counted
        hidden = [world.score(np.array(c["tokens"], dtype=np.int64).reshape(3, -1), c["lyric"], c["style"])
                  for c in cands]
        assert r["hidden_mean"] == pytest.approx(np.mean([h["quality"] for h in hidden]), abs=1e-9)
        assert [c["oracle"]["quality"] for c in cands] == pytest.approx([h["quality"] for h in hidden])
        mine = [h["lyrics"] for h in hidden]  # the scorer's key, recomputed independently
        assert r["score_mean"] == pytest.approx(np.mean(mine), abs=1e-6)
        assert r["score_mean"] != pytest.approx(r["hidden_mean"])
        assert r["pairs"] >= 1 and r["gen_seconds"] > 0
    assert (rd / "sdpo" / "rounds.png").stat().st_size > 1000
    # the final summary names the round record and its plot; the plot counts whole rounds and draws the
    # oracle's agreement with the scorer's pairs (the reward-hacking guard)
    done = capsys.readouterr().out.split("levo-train sdpo: done at step 8")[1]
    assert f"rounds           {rd / 'sdpo' / 'rounds.jsonl'} (2 rounds; last round 1: oracle agrees on" in done
    assert f"rounds plot      {rd / 'sdpo' / 'rounds.png'}" in done and "train/pairs        accuracy" in done
    fig = rounds_figure(rounds, scorer="toy", oracle="toy")
    ax, agree = fig.axes
    assert [t for t in ax.get_xticks() if rounds[0]["round"] <= t <= rounds[-1]["round"]] == [0.0, 1.0]
    assert [ln.get_label() for ln in agree.get_lines()] == ["oracle agrees with the scorer's pairs (toy)"]
    assert list(agree.get_lines()[0].get_ydata()) == [r["pair_agreement"] for r in rounds]
    metrics = (rd / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "round/hidden_mean" in metrics and "round/score_mean" in metrics and "train/rewards/margins" in metrics


def test_sdpo_exact_resume_across_rounds(tmp_path, toy_cache_dir, toy_sft_export):
    """6 steps + resume to 12 equals 12 straight (rounds at 0, 4, 8; the stop falls mid-round), with
    the reference re-synced every 6 steps (so the reference is state too)."""
    common = ["checkpoint.every_n_steps=3", "optim.total_steps=12", "reward.scorer=toy", "sdpo.ref_sync_every=6"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(sdpo_args(toy_cache_dir, a, toy_sft_export, "trainer.max_steps=12", *common)) == 0
    assert main(sdpo_args(toy_cache_dir, b, toy_sft_export, "trainer.max_steps=6", *common)) == 0
    assert main(sdpo_args(toy_cache_dir, b, toy_sft_export, "trainer.max_steps=12", "resume=true", *common)) == 0
    wa = torch.load(a / "export" / "model.pt", weights_only=True)
    wb = torch.load(b / "export" / "model.pt", weights_only=True)
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    ra = (a / "sdpo" / "rounds.jsonl").read_text().splitlines()
    rb = (b / "sdpo" / "rounds.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(x).items() if "seconds" not in k} for x in rows]  # noqa: E731
    assert strip(ra) == strip(rb) and len(ra) == 3


@pytest.mark.parametrize("extra, needle", [
    (["reward.scorer=toy", "sdpo.sync_every=0"], "sdpo.sync_every=0: expected an optimizer-step interval >= 1"),
    (["reward.scorer=toy", "sdpo.per_prompt=1"], "sdpo.per_prompt=1"),
    ([], "recipe=sdpo needs a reward"),
    (["reward.scorer=callable:no_such_module_xyz:make"], "no_such_module_xyz"),
    (["reward.scorer=toy", "reward.dimensions=[coherence]"], "reward.dimensions=['coherence']"),
    (["reward.scorer=toy", "reward.key=musicality"], "reward.key=musicality"),
    (["reward.scorer=toy", "strategy=deepspeed_zero2"], "trains sharded under strategy=fsdp2"),
])
def test_sdpo_bad_settings_are_named(tmp_path, toy_cache_dir, toy_sft_export, capsys, extra, needle):
    assert main(sdpo_args(toy_cache_dir, tmp_path / "r", toy_sft_export, "trainer.max_steps=1", *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_sdpo_prompts_without_lyrics_are_refused(tmp_path, toy_cache_dir, toy_sft_export, capsys):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"idx": "a", "gt_lyric": "[verse] love night", "descriptions": "rock"}\n'
                 '{"idx": "b", "descriptions": "pop"}\n')
    assert main(sdpo_args(toy_cache_dir, tmp_path / "r", toy_sft_export, "trainer.max_steps=1", "reward.scorer=toy",
                          f"sdpo.prompts={p}")) == 2
    err = capsys.readouterr().err
    assert f"{p}:2" in err and "gt_lyric" in err, err


def test_sdpo_needs_init(tmp_path, toy_cache_dir, capsys):
    assert main(["recipe=sdpo", f"run_dir={tmp_path / 'r'}", "reward.scorer=toy", *TINY]) == 2
    assert "recipe=sdpo needs model.init" in capsys.readouterr().err


def _rm_export(path: Path, dims: list[str], **cfg_kw) -> Path:
    """A tiny (untrained) reward-model export; ``cfg_kw`` sets its trunk config."""
    from conftest import tiny_config

    from levo_train.reward.model import RewardModel, save_reward_model

    torch.manual_seed(0)
    m = RewardModel(tiny_config(**cfg_kw), dims)
    m.lm.init_weights()
    return save_reward_model(m, path, {"source": "test"})


def test_sdpo_reward_model_mismatches_are_named(tmp_path, toy_cache_dir, toy_sft_export, capsys):
    """An RM of another vocabulary than the policy, and an RM whose dimensions are not the ones
    the config expects, are refused before any generation, naming the setting."""
    other_vocab = _rm_export(tmp_path / "rm16", ["lyrics"], code_size=16)
    assert main(sdpo_args(toy_cache_dir, tmp_path / "r1", toy_sft_export, "trainer.max_steps=1",
                          f"reward.ckpt={other_vocab}")) == 2
    err = capsys.readouterr().err
    assert "reward.ckpt" in err and "code_size=16" in err and "code_size=64" in err, err
    rm = _rm_export(tmp_path / "rm64", ["lyrics", "mix"], code_size=64, delays=[0, 4, 4])
    assert main(sdpo_args(toy_cache_dir, tmp_path / "r2", toy_sft_export, "trainer.max_steps=1",
                          f"reward.ckpt={rm}", "reward.dimensions=[lyrics,structure]")) == 2
    err = capsys.readouterr().err
    assert "reward.dimensions=['lyrics', 'structure']" in err and "no ['structure']" in err, err
    assert main(sdpo_args(toy_cache_dir, tmp_path / "r3", toy_sft_export, "trainer.max_steps=1",
                          f"reward.ckpt={rm}", "reward.scorer=toy")) == 2
    assert "not both" in capsys.readouterr().err


class _Scripted:
    """A scorer whose scores spread out (by song key) or are all equal (``flat``)."""

    name, overall, dimensions = "scripted", "overall", ()

    def __init__(self) -> None:
        self.flat = False

    def score(self, songs):
        import zlib

        return [{"overall": 0.5 if self.flat else (zlib.crc32(s.key.encode()) % 97) / 97} for s in songs]


def test_sdpo_round_without_pairs_keeps_the_last_pairs(tiny_cfg):
    from levo_train.rollout import Prompt, Sampling
    from levo_train.train.sdpo import SemiOnlineDPOModule

    scorer = _Scripted()
    m = SemiOnlineDPOModule(tiny_cfg, prompts=[Prompt("[verse] love night", "rock"), Prompt("[verse] la da", "pop")],
                            scorer=scorer, sync_every=2, per_prompt=3, prompts_per_round=2, min_margin=0.01,
                            sampling=Sampling(max_frames=6, batch_size=8), batch_size=2, init_weights=True)
    m.freeze_reference()
    scorer.flat = True
    m.run_round(0)
    with pytest.raises(RuntimeError, match="sdpo.min_margin"):
        m.draw_batch()
    scorer.flat = False
    assert m.run_round(1)["pairs"] == 2
    scorer.flat = True
    assert m.run_round(2)["pairs"] == 0
    batch = m.draw_batch()  # round 1's pairs
    assert batch["chosen"].shape[0] == 2 and len(m.buffer) == 1 and len(m.buffer[0]) == 2


def test_sdpo_with_lora_adapters(tmp_path, toy_cache_dir, toy_sft_export, capsys):
    """Semi-online DPO of a LoRA-adapted policy: rounds generate with the adapters on, the reference is
    the policy with them off; re-syncing a reference copy is refused."""
    rd = tmp_path / "r"
    assert main(sdpo_args(toy_cache_dir, rd, toy_sft_export, "trainer.max_steps=5", "reward.scorer=toy",
                          "train.lora.r=4")) == 0
    assert [json.loads(x)["step"] for x in (rd / "sdpo" / "rounds.jsonl").read_text().splitlines()] == [0, 4]
    assert (rd / "export" / "adapters" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(sdpo_args(toy_cache_dir, tmp_path / "r2", toy_sft_export, "trainer.max_steps=1", "reward.scorer=toy",
                          "train.lora.r=4", "sdpo.ref_sync_every=2")) == 2
    assert "sdpo.ref_sync_every=2" in capsys.readouterr().err


def test_sdpo_resume_refuses_changed_round_settings(tmp_path, toy_cache_dir, toy_sft_export, capsys):
    """The settings that shape rounds are stored in the checkpoint: a resume that asks for others is
    refused naming each (before anything is built); execution settings (generation batch and dtype,
    saving candidates) may change. A run no longer than one round is warned about."""
    rd = tmp_path / "r"
    assert main(sdpo_args(toy_cache_dir, rd, toy_sft_export, "trainer.max_steps=2", "reward.scorer=toy")) == 0
    err = capsys.readouterr().err
    assert "sdpo.sync_every=4 >= trainer.max_steps=2: the run makes one round" in err, err
    assert main(sdpo_args(toy_cache_dir, rd, toy_sft_export, "trainer.max_steps=4", "optim.total_steps=2",
                          "resume=true", "reward.scorer=toy:1", "sdpo.sync_every=2", "sdpo.temperature=0.7")) == 2
    err = capsys.readouterr().err
    for needle in ("sdpo.sync_every: the run has 4, this resume asks for 2", "sdpo.temperature: the run has 1.0",
                   "reward.scorer: the run has 'toy', this resume asks for 'toy:1'", "shape the rounds"):
        assert needle in err, err
    assert "sdpo.max_frames" not in err  # unchanged settings are not named
    assert main(sdpo_args(toy_cache_dir, rd, toy_sft_export, "trainer.max_steps=3", "optim.total_steps=3",
                          "resume=true", "reward.scorer=toy", "sdpo.gen_batch_size=7", "sdpo.gen_dtype=float32",
                          "sdpo.save_candidates=true")) == 0
    assert json.loads((rd / "summary.json").read_text())["global_step"] == 3
