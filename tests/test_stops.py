"""No run fails silently: a diverging run stops at its first non-finite step (exit 1, the step
named, the last finite checkpoint kept, no export), ``train.nonfinite=skip`` drops such steps
without touching weights or optimizer state, and SIGTERM / SIGINT finish the current optimizer
step, write a resumable checkpoint and exit non-zero — on 1 rank, and on 2 DDP ranks when only
rank 0 gets the signal — after which ``resume=true`` ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from lightning.pytorch.callbacks import Callback

import levo_train.run as run_mod
from levo_train.cli import main
from levo_train.train.lm import LMModule

BASE = ["trainer.val_check_interval=1000", "trainer.log_every_n_steps=1"]


def strict_loads(text: str):
    def bad(c: str):
        raise ValueError(f"not JSON: {c}")

    return json.loads(text, parse_constant=bad)


def sft(cache: str, rd: Path, *extra: str) -> list[str]:
    return ["recipe=sft", f"run_dir={rd}", f"data.toy.cache_dir={cache}", *TINY, *BASE, *extra]


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def all_finite(sd: dict) -> bool:
    return all(torch.isfinite(v).all() for v in sd.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.fixture(scope="module")
def cache(toy_cache_dir) -> str:
    return toy_cache_dir


def test_diverging_run_stops_at_the_first_non_finite_step(tmp_path, cache, capsys):
    """optim.lr=1e4 on the tiny toy SFT: exit 1 at the first non-finite step, named in one line; every
    checkpoint on disk is finite and the newest is the step before; no export; resume=true with a
    sane optim.lr is refused (README: a resume never changes the run's LR), with
    train.nonfinite=skip it goes on, skipping that same step without changing a weight."""
    rd = tmp_path / "div"
    args = sft(cache, rd, "optim.lr=1e4", "trainer.max_steps=50", "checkpoint.every_n_steps=1",
               "checkpoint.keep_last=100")
    assert main(args) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("levo-train: error:")]
    assert len(lines) == 1, err[-3000:]
    step = int(re.search(r"non-finite (?:loss|gradient norm|loss and gradient norm) at step (\d+)", lines[0])[1])
    assert 1 < step < 50 and f"the last finite checkpoint is {rd / 'checkpoints' / 'last.ckpt'} (step {step - 1})" \
        in lines[0]
    assert not (rd / "export").exists()
    summary = strict_loads((rd / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] == step and summary["last_checkpoint_step"] == step - 1
    steps = {}
    for p in sorted((rd / "checkpoints").glob("*.ckpt")):
        ck = ckpt(p)
        assert all_finite(ck["state_dict"]), f"{p.name} holds non-finite weights"
        steps[p.name] = ck["global_step"]
    assert steps == {"last.ckpt": step - 1, **{f"step{s:07d}.ckpt": s for s in range(1, step)}}
    # the last finite checkpoint exports and loads
    assert main(["export", f"run_dir={rd}", f"out={tmp_path / 'exp'}"]) == 0
    from levo_infer import load_model

    assert all_finite(load_model(tmp_path / "exp").state_dict())
    # a resume asking for a sane LR is refused (the schedule is the run's own)
    assert main([*args, "resume=true", "optim.lr=1e-3"]) == 2
    assert "optim.lr=10000.0" in capsys.readouterr().err
    # skip mode: the same step is non-finite again (exact resume) and is skipped
    assert main([*args, "resume=true", "train.nonfinite=skip", f"trainer.max_steps={step}"]) == 0
    summary = strict_loads((rd / "summary.json").read_text())
    assert summary["status"] == "done" and summary["nonfinite_skipped"] == {"count": 1, "steps": [step]}
    before, after = ckpt(rd / "checkpoints" / f"step{step - 1:07d}.ckpt"), ckpt(rd / "checkpoints" / f"step{step:07d}.ckpt")
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert after["lr_schedulers"][0]["last_epoch"] == before["lr_schedulers"][0]["last_epoch"] + 1


def nan_loss_at(monkeypatch, micro_batches: set[int]) -> None:
    """Add NaN to the training loss of the given micro-batches (counted over the run). The added NaN
    is a constant: the gradients stay finite, so only the loss check can see it."""
    real, seen = LMModule.training_step, [0]

    def training_step(self, batch, batch_idx):
        loss = real(self, batch, batch_idx)
        seen[0] += 1
        return loss + torch.tensor(float("nan")) if seen[0] - 1 in micro_batches else loss

    monkeypatch.setattr(LMModule, "training_step", training_step)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_loss_of_one_micro_batch(tmp_path, cache, capsys, monkeypatch, mode):
    """Gradient accumulation 2: a NaN loss in micro-batch 4 (the first half of step 3) stops the run
    before step 3 is applied, or (skip) skips step 3: weights and AdamW state equal step 2's."""
    rd = tmp_path / mode
    nan_loss_at(monkeypatch, {4})
    rc = main(sft(cache, rd, "trainer.max_steps=5", "trainer.accumulate_grad_batches=2", "checkpoint.every_n_steps=1",
                  "checkpoint.keep_last=10", f"train.nonfinite={mode}"))
    err = capsys.readouterr().err
    if mode == "stop":
        assert rc == 1 and "non-finite loss at step 3 (loss nan" in err, err[-2000:]
        assert ckpt(rd / "checkpoints" / "last.ckpt")["global_step"] == 2 and not (rd / "export").exists()
        return
    assert rc == 0, err[-2000:]
    assert strict_loads((rd / "summary.json").read_text())["nonfinite_skipped"] == {"count": 1, "steps": [3]}
    c2, c3, c4 = (ckpt(rd / "checkpoints" / f"step{s:07d}.ckpt") for s in (2, 3, 4))
    assert all(torch.equal(c2["state_dict"][k], c3["state_dict"][k]) for k in c2["state_dict"])
    assert not all(torch.equal(c3["state_dict"][k], c4["state_dict"][k]) for k in c3["state_dict"])
    o2, o3 = c2["optimizer_states"][0]["state"], c3["optimizer_states"][0]["state"]
    assert o2.keys() == o3.keys() and all(torch.equal(o2[i]["exp_avg"], o3[i]["exp_avg"]) for i in o2)
    assert c3["levo"]["samples_seen"] == 3 * 2 * 8  # the data position moved on past the skipped batches


class SignalAt(Callback):
    def __init__(self, k: int, signum: int) -> None:
        self.k, self.signum, self.seen = k, signum, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.k:
            os.kill(os.getpid(), self.signum)
        self.seen += 1


def test_sigint_checkpoints_at_the_step_boundary(tmp_path, cache, capsys, monkeypatch):
    """Ctrl-C in micro-batch 3 (second half of step 2, accumulation 2): the step finishes, last.ckpt
    holds step 2 with the data position of whole cycles, exit 130; the handler is gone afterwards."""
    rd = tmp_path / "run"
    build = run_mod.build_trainer

    def patched(cfg, run_dir):
        trainer = build(cfg, run_dir)
        trainer.callbacks.append(SignalAt(3, signal.SIGINT))
        return trainer

    monkeypatch.setattr(run_mod, "build_trainer", patched)
    before = signal.getsignal(signal.SIGINT)
    assert main(sft(cache, rd, "trainer.max_steps=6", "trainer.accumulate_grad_batches=2")) == 130
    err = capsys.readouterr().err
    assert f"levo-train: stopped by SIGINT at step 2; checkpoint {rd / 'checkpoints' / 'last.ckpt'}; continue with " \
           "the same command plus resume=true" in err, err[-2000:]
    ck = ckpt(rd / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 2 and ck["levo"]["samples_seen"] == 2 * 2 * 8
    assert strict_loads((rd / "summary.json").read_text())["status"] == "stopped"
    assert not (rd / "export").exists()
    assert signal.getsignal(signal.SIGINT) is before


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "levo_train.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_training(p: subprocess.Popen, timeout: float = 120) -> list[str]:
    """Lines up to Lightning's model summary (printed when fit starts)."""
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Trainable params" in line:
            return lines
    raise AssertionError("training never started:\n" + "".join(lines)[-3000:])


def sigterm_during_training(args: list[str], delay: float) -> tuple[int, str]:
    """Run levo-train, SIGTERM its first process ``delay`` s after training started (that process
    alone: DDP ranks it launched do not get it); exit status and output. No process is left over."""
    p = launch(args)
    try:
        head = wait_for_training(p)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
        assert group_gone(p.pid), "a rank is still running after the stop"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, "".join(head) + out


def group_gone(pgid: int, timeout: float = 20) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


STEPS = 30


def test_sigterm_at_a_random_moment_then_resume_is_bit_identical(tmp_path, cache):
    """SIGTERM at a seeded random moment of a toy SFT run (accumulation 2): exit 143 naming the step
    and the checkpoint; resume=true then ends with the weights of the uninterrupted run, bit for bit."""
    rng = random.Random(18)
    args = [f"trainer.max_steps={STEPS}", "trainer.accumulate_grad_batches=2", "checkpoint.every_n_steps=7"]
    assert main(sft(cache, tmp_path / "straight", *args)) == 0
    rd = tmp_path / "stopped"
    rc, out = sigterm_during_training(sft(cache, rd, *args), rng.uniform(0.0, 1.5))
    assert rc == 143, out[-3000:]
    k = int(re.search(r"levo-train: stopped by SIGTERM at step (\d+); checkpoint (\S+); continue with the same "
                      r"command plus resume=true", out)[1])
    assert 0 < k < STEPS
    ck = ckpt(rd / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == k and ck["levo"]["samples_seen"] == k * 2 * 8
    assert not (rd / "export").exists()
    assert main(sft(cache, rd, *args, "resume=true")) == 0
    assert strict_loads((rd / "summary.json").read_text())["resumed_from"]["step"] == k
    wa = torch.load(tmp_path / "straight" / "export" / "model.pt", weights_only=True)
    wb = torch.load(rd / "export" / "model.pt", weights_only=True)
    diff = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not diff, f"stopped at step {k} and resumed: {len(diff)} tensors differ from the uninterrupted run"


def test_sigterm_to_rank_0_alone_stops_both_ddp_ranks(tmp_path, cache):
    """2 DDP ranks, SIGTERM to the launching rank only: the ranks agree at the next step boundary,
    both save and leave (no rank left waiting in a collective), exit 143, and the checkpoint loads."""
    rd = tmp_path / "ddp"
    rc, out = sigterm_during_training(sft(cache, rd, "trainer.max_steps=200", "trainer.devices=2",
                                          "trainer.strategy=ddp", "trainer.accelerator=cpu", "data.batch_size=4"), 1.0)
    assert rc == 143, out[-3000:]
    k = int(re.search(r"stopped by SIGTERM at step (\d+)", out)[1])
    ck = ckpt(rd / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == k and ck["levo"]["samples_seen"] == k * 2 * 4
