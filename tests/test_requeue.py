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


@pytest.fixture
def fake_slurm(monkeypatch):
    """A one-task Slurm job as Lightning's SLURMEnvironment sees it; scontrol is recorded."""
    for k, v in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "levo-test",
                 "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                 "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(k, v)
    calls: list[list[str]] = []
    monkeypatch.setattr(slurm_mod.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    return calls


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
