"""SlurmRequeue in a real Lightning run (in process, a Slurm job simulated by its environment):
the requeue checkpoint is written at an optimizer-step boundary — never between the micro-batches
of a gradient-accumulation cycle — and the run resumed from it ends bit-identical to one that was
never interrupted; killed writes leave no version gap, and older requeue checkpoints are pruned.
The real-cluster requeue is in test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY
from lightning.pytorch.callbacks import Callback

import levo_train.cli as cli
import levo_train.run as run_mod
import levo_train.slurm as slurm_mod
from levo_train.slurm import hpc_checkpoints, next_hpc_path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toycache"))


def args(cache: str, rd: Path, *extra: str) -> list[str]:
    return ["recipe=sft", f"run_dir={rd}", f"data.toy.cache_dir={cache}", *TINY, "trainer.max_steps=5",
            "optim.total_steps=5", "trainer.val_check_interval=1000", "checkpoint.every_n_steps=1000",
            "trainer.accumulate_grad_batches=2", *extra]


class SignalAt(Callback):
    """Send SIGUSR1 to this process when micro-batch ``k`` (counted over the whole run) starts."""

    def __init__(self, k: int) -> None:
        self.k, self.seen = k, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.k:
            os.kill(os.getpid(), signal.SIGUSR1)
        self.seen += 1


def fake_slurm_job(monkeypatch, job_id: str) -> list[list[str]]:
    """A one-task Slurm job as Lightning's SLURMEnvironment sees it; returns the scontrol calls, recorded."""
    for k, v in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "levo-test",
                 "SLURM_JOB_ID": job_id, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                 "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(k, v)
    calls: list[list[str]] = []
    monkeypatch.setattr(slurm_mod.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    return calls


@pytest.fixture
def fake_slurm(monkeypatch):
    return fake_slurm_job(monkeypatch, "4242")


def with_signal_at(monkeypatch, k: int) -> None:
    build = run_mod.build_trainer

    def patched(cfg, run_dir):
        trainer = build(cfg, run_dir)
        trainer.callbacks.append(SignalAt(k))
        return trainer

    monkeypatch.setattr(run_mod, "build_trainer", patched)


def export_weights(rd: Path) -> dict[str, torch.Tensor]:
    return torch.load(rd / "export" / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory) -> Path:
    rd = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main(args(cache, rd)) == 0
    return rd


@pytest.mark.parametrize("k, step", [(0, 1), (3, 2)])
def test_requeue_saves_at_a_step_boundary_and_resumes_exactly(tmp_path, cache, straight, fake_slurm, monkeypatch,
                                                              k, step):
    """Signal at micro-batch ``k`` (0: the very first, mid-cycle; 3: the second half of cycle 2):
    the requeue checkpoint is at the end of that accumulation cycle."""
    rd = tmp_path / "run"
    with_signal_at(monkeypatch, k)
    with pytest.raises(SystemExit) as e:
        cli.main(args(cache, rd))
    assert e.value.code == 0
    assert fake_slurm == [["scontrol", "requeue", "4242"]]
    (hpc,) = hpc_checkpoints(rd)
    ck = torch.load(hpc, weights_only=True)
    assert ck["global_step"] == step
    assert ck["levo"]["samples_seen"] == step * 2 * 8  # whole cycles of 2 micro-batches of 8 songs
    monkeypatch.undo()
    assert cli.main(args(cache, rd, "resume=true")) == 0
    assert json.loads((rd / "summary.json").read_text())["resumed_from"] == {"path": str(hpc), "step": step}
    wa, wb = export_weights(straight), export_weights(rd)
    diff = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not diff, f"resumed run differs from the uninterrupted one: {diff[:5]}"


def test_killed_requeue_writes_leave_no_version_gap_and_old_ones_are_pruned(tmp_path, cache, fake_slurm,
                                                                            monkeypatch):
    rd = tmp_path / "run"
    rd.mkdir()
    # a requeue-checkpoint write killed mid-way (temp file of pid 14243): not a version
    (rd / ".hpc_ckpt_1.ckpt.tmp14243").write_bytes(b"partial")
    assert next_hpc_path(rd).name == "hpc_ckpt_1.ckpt"
    with_signal_at(monkeypatch, 1)
    with pytest.raises(SystemExit):
        cli.main(args(cache, rd))
    assert [p.name for p in hpc_checkpoints(rd)] == ["hpc_ckpt_1.ckpt"]
    assert not list(rd.glob(".*tmp*")), "the killed write's temp file was left behind"
    # the requeued job: preempted again, later
    monkeypatch.undo()
    fake = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "levo-test", "SLURM_JOB_ID": "4242",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    for key, v in fake.items():
        monkeypatch.setenv(key, v)
    monkeypatch.setattr(slurm_mod.subprocess, "call", lambda cmd: 0)
    with_signal_at(monkeypatch, 3)
    with pytest.raises(SystemExit):
        cli.main(args(cache, rd, "resume=true"))
    assert [p.name for p in hpc_checkpoints(rd)] == ["hpc_ckpt_2.ckpt"], "older requeue checkpoints are pruned"
    assert torch.load(rd / "hpc_ckpt_2.ckpt", weights_only=True)["global_step"] == 3


# ----------------------------------------------------------------------------- during a semi-online round
# 2 rounds (steps 0 and 4) of 12 prompts x 3 candidates, generated 2 prompts (6 songs) per batch: a
# round has 6 safe points; step checkpoints at step 4, where round 1 starts (the tie a resume must break)
SDPO = ["recipe=sdpo", "reward.scorer=toy", "sdpo.sync_every=4", "sdpo.prompts_per_round=12", "sdpo.per_prompt=3",
        "sdpo.max_frames=40", "sdpo.min_margin=0.0", "sdpo.gen_batch_size=6", "sdpo.save_candidates=true",
        "data.toy_pairs.n_train=40", "optim.lr=1e-3", "optim.warmup_steps=1", "trainer.max_steps=8",
        "optim.total_steps=8", "checkpoint.every_n_steps=4"]


def sdpo_args(cache: str, rd: Path, init: Path, *extra: str) -> list[str]:
    return [*SDPO, f"run_dir={rd}", f"model.init={init}", f"data.toy.cache_dir={cache}", *TINY, *extra]


def count_generation(monkeypatch, *, signal_at: int | None = None, signum: int = signal.SIGUSR1) -> dict[str, int]:
    """Count the prompts each round generates (by key prefix); with ``signal_at``, send ``signum`` to this
    process while the round's ``signal_at``-th generation batch (counted over the run) is generated."""
    import levo_train.train.sdpo as sdpo_mod

    real, seen, calls = sdpo_mod.sample_and_score, {}, [0]

    def wrapped(model, prompts, scorer, sampling, **kw):
        calls[0] += 1
        if calls[0] == signal_at:
            os.kill(os.getpid(), signum)  # the handler only sets a flag: this batch finishes
        seen[kw["key_prefix"]] = seen.get(kw["key_prefix"], 0) + len(kw["prompt_indices"])
        return real(model, prompts, scorer, sampling, **kw)

    monkeypatch.setattr(sdpo_mod, "sample_and_score", wrapped)
    return seen


@pytest.fixture(scope="module")
def sdpo_straight(toy_cache_dir, toy_sft_export, tmp_path_factory):
    """The uninterrupted run with the given extra overrides (each run once)."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(*extra: str) -> Path:
        if extra not in runs:
            rd = tmp_path_factory.mktemp("sdpo-straight") / "run"
            assert cli.main(sdpo_args(toy_cache_dir, rd, toy_sft_export, *extra)) == 0
            runs[extra] = rd
        return runs[extra]

    return get


def rounds(rd: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if "seconds" not in k}
            for x in (rd / "sdpo" / "rounds.jsonl").read_text().splitlines()]


FSDP2_1 = ("strategy=fsdp2", "trainer.devices=1", "trainer.accelerator=cpu")


@pytest.mark.parametrize("signum, at, step, extra", [(signal.SIGUSR1, 8, 4, ()), (signal.SIGTERM, 2, 0, ()),
                                                     (signal.SIGUSR1, 2, 0, FSDP2_1)])
def test_signal_during_a_round_checkpoints_inside_it_and_resumes_exactly(tmp_path, toy_cache_dir, toy_sft_export,
                                                                         sdpo_straight, monkeypatch, signum, at, step,
                                                                         extra):
    """A requeue (USR1 under Slurm) or stop (SIGTERM) signal while a round generates: the round stops at
    its next safe point (after the current generation batch), the checkpoint holds the step's start and
    the candidates generated so far, and the resume generates only the rest of that round; the run ends
    bit-identical to the uninterrupted one (weights, every round's candidates and statistics). Under
    FSDP2 (a sharded checkpoint) in round 0, before the optimizer's first step: the resume starts from
    a fresh optimizer too (torch's optimizer state dict would otherwise give it a fake first step)."""
    rd = tmp_path / "run"
    straight = sdpo_straight(*extra)
    if signum == signal.SIGUSR1:
        requeued = fake_slurm_job(monkeypatch, "4243")
    count_generation(monkeypatch, signal_at=at, signum=signum)
    if signum == signal.SIGUSR1:
        with pytest.raises(SystemExit) as e:
            cli.main(sdpo_args(toy_cache_dir, rd, toy_sft_export, *extra))
        assert e.value.code == 0 and requeued == [["scontrol", "requeue", "4243"]]
        (ck,) = hpc_checkpoints(rd)
    else:
        assert cli.main(sdpo_args(toy_cache_dir, rd, toy_sft_export, *extra)) == 143
        ck = rd / "checkpoints" / "last.ckpt"
        assert json.loads((rd / "summary.json").read_text())["status"] == "stopped"
    assert ck.is_dir() == bool(extra)  # FSDP2: a sharded checkpoint folder
    saved = torch.load(ck / "meta.pt" if ck.is_dir() else ck, weights_only=True)
    partial = saved["levo"]["sdpo"]["partial"]
    assert saved["global_step"] == step and partial["round"] == step // 4
    assert len(partial["candidates"]) == 2 * 2 * 3  # two batches of 2 prompts x 3 candidates, then the safe point
    assert saved["levo"]["partial_step"] == 12
    monkeypatch.undo()
    seen = count_generation(monkeypatch)
    assert cli.main(sdpo_args(toy_cache_dir, rd, toy_sft_export, *extra, "resume=true")) == 0
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["resumed_from"] == {"path": str(ck), "step": step}  # the partial round, not step0000004.ckpt
    interrupted = f"r{step // 4:04d}-"
    assert seen[interrupted] == 12 - 4  # only the prompts the interrupted round had not generated yet
    wa, wb = export_weights(straight), export_weights(rd)
    assert not [n for n in wa if not torch.equal(wa[n], wb[n])], "the resumed run differs from the uninterrupted one"
    assert rounds(rd) == rounds(straight)
    for r in (0, 1):
        name = Path("sdpo") / "candidates" / f"round{r:04d}.jsonl"
        assert (rd / name).read_text() == (straight / name).read_text()
