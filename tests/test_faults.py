"""Fault injection: training killed anywhere resumes to the same weights, bit for bit.

A toy SFT and a toy DPO run, on 1 and on 2 DDP ranks, are SIGKILLed (the whole process group, as
a lost node) five times each at seeded random points — at a step's start or end, and during
checkpoint writes: half-written temp file, complete but not renamed, renamed before its
``last.ckpt`` — and resumed with ``resume=true`` after every kill. After each kill every
checkpoint on disk must load; at the end the export must equal an uninterrupted run's bit for bit,
and no partial or temp file may be left. A full disk during a checkpoint write is a clear error
that leaves the previous checkpoint intact. The faults are injected by ``tests/fault_runner.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY

from levo_train.cli import main
from levo_train.resume import run_checkpoints

RUNNER = Path(__file__).with_name("fault_runner.py")
STEPS, EVERY = 18, 3
KILLS = ("write:partial", "write:synced", "write:renamed", "step:start", "step:end")


def launch(args: list[str], fault: str | None = None, timeout: float = 240) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LEVO_FAULT", None)
    if fault:
        env["LEVO_FAULT"] = fault
    p = subprocess.Popen([sys.executable, str(RUNNER), *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        try:  # other ranks of a failed or timed-out run
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, out


def loadable_steps(rd: Path) -> dict[str, int]:
    """Every checkpoint of the run folder, loaded (weights_only), by name -> step."""
    out = {}
    for p in run_checkpoints(rd):
        ck = torch.load(p, map_location="cpu", weights_only=True)
        out[p.name] = int(ck["global_step"])
    return out


def temp_files(rd: Path) -> list[str]:
    return sorted(str(p.relative_to(rd)) for p in rd.rglob("*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def cache(toy_cache_dir) -> str:
    return toy_cache_dir


def overrides(recipe: str, ranks: int, cache: str, init: Path) -> list[str]:
    out = [f"recipe={recipe}", f"data.toy.cache_dir={cache}", *TINY, f"trainer.max_steps={STEPS}",
           f"checkpoint.every_n_steps={EVERY}", "trainer.val_check_interval=8", "trainer.limit_val_batches=1",
           "optim.lr=1e-3", "checkpoint.keep_last=3"]
    if recipe == "dpo":
        out += [f"model.init={init}", "data.toy_pairs.source=world", "data.toy_pairs.n_train=96",
                "data.toy_pairs.n_val=16"]
    if ranks > 1:
        out += [f"trainer.devices={ranks}", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
    return out


@pytest.mark.parametrize("recipe, ranks", [("sft", 1), ("dpo", 1), ("sft", 2), ("dpo", 2)])
def test_killed_anywhere_resumes_bit_identical(tmp_path, cache, toy_sft_export, recipe, ranks):
    rng = random.Random(f"{recipe}-{ranks}")
    base = overrides(recipe, ranks, cache, toy_sft_export)
    rc, out = launch([*base, f"run_dir={tmp_path / 'straight'}"])
    assert rc == 0, out[-3000:]

    rd = tmp_path / "killed"
    args = [*base, f"run_dir={rd}", "resume=true"]
    history = []
    for kind in rng.sample(KILLS, len(KILLS)):
        steps = loadable_steps(rd) if rd.exists() else {}
        done = max(steps.values(), default=0)
        if kind.startswith("step") and done < STEPS:
            fault = f"step:{rng.randint(done + 1, min(STEPS, done + 2 * EVERY))}:{kind.split(':')[1]}"
        else:  # step + last.ckpt at every interval still to come, then the final last.ckpt
            kind = kind if kind.startswith("write") else "write:renamed"  # all steps done: only the final write
            writes = 2 * len(range(done + EVERY - done % EVERY, STEPS + 1, EVERY)) + 1
            fault = f"write:{rng.randint(1, min(writes, 4))}:{kind.split(':')[1]}"
        rc, out = launch(args, fault)
        assert rc == -signal.SIGKILL, f"{fault}: the run was not killed (exit {rc})\n{out[-3000:]}"
        steps = loadable_steps(rd) if rd.exists() else {}  # every checkpoint on disk loads
        history.append((fault, done, max(steps.values(), default=0)))
    rc, out = launch(args)
    assert rc == 0, f"final resume failed after {history}\n{out[-3000:]}"
    assert json.loads((rd / "summary.json").read_text())["global_step"] == STEPS
    assert not temp_files(rd), f"left behind: {temp_files(rd)} ({history})"
    assert all(s <= STEPS for s in loadable_steps(rd).values())
    wa = torch.load(tmp_path / "straight" / "export" / "model.pt", weights_only=True)
    wb = torch.load(rd / "export" / "model.pt", weights_only=True)
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{len(diff)} tensors differ from the uninterrupted run after kills {history}: {diff[:4]}"
    print(f"{recipe} x{ranks}: kills (fault, step before, newest checkpoint after): {history}")


def test_full_disk_during_a_checkpoint_write(tmp_path, cache, capsys):
    """The 3rd write (step 6's step file; every checkpoint step writes a step file, then
    last.ckpt) fails for lack of space: a clear error, exit 1, last.ckpt of step 3 intact, no temp file;
    after space is freed, resume=true finishes the run."""
    rd = tmp_path / "run"
    args = [f"run_dir={rd}", *overrides("sft", 1, cache, Path()), "trainer.max_steps=9", "resume=true"]
    rc, out = launch(args, "enospc:3")
    assert rc == 1, out[-3000:]
    assert "No space left on device" in out and "levo-train: error: writing checkpoint" in out
    assert "Traceback" not in out
    assert loadable_steps(rd) == {"last.ckpt": 3, "step0000003.ckpt": 3}
    assert not temp_files(rd)
    assert main([*args]) == 0
    assert json.loads((rd / "summary.json").read_text())["resumed_from"]["step"] == 3
