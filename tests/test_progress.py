"""What a levo-train run prints to a log file (stdout not a terminal): a progress line every
train.progress_every steps with step/total, loss, LR, samples/s and ETA, a line per validation,
Lightning's INFO lines once each, and no colour codes (wandb's closing lines included)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import TINY


def test_a_run_logged_to_a_file_shows_progress_lines_once_and_plain(tmp_path, toy_cache_dir):
    log = tmp_path / "run.log"
    args = [a for a in TINY if not a.startswith(("trainer.enable_progress_bar", "logger="))]
    cmd = [sys.executable, "-m", "levo_train.cli", "recipe=sft", f"run_dir={tmp_path / 'run'}",
           f"data.toy.cache_dir={toy_cache_dir}", *args, "trainer.max_steps=6", "trainer.val_check_interval=6",
           "train.progress_every=2", "logger=wandb"]
    env = {**{k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_QUIET")},
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}  # wandb's own lines shown, as for a user
    with open(log, "w") as f:
        assert subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=300).returncode == 0
    text = log.read_text()
    steps = re.findall(r"^step (\d+)/6 \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| [\d.]+ samples/s \| ETA \d+:\d\d:\d\d$",
                       text, flags=re.M)
    assert steps == ["2", "4", "6"], text[-3000:]
    assert re.search(r"^validation at step 6: val/loss \d+\.\d{4}", text, flags=re.M)
    assert text.count("Seed set to 0") == 1 and text.count("max_steps=6` reached") == 1, text[:2000]
    assert "Epoch 0/" not in text and "\x1b" not in text and "\r" not in text
    assert "levo-train sft: done at step 6" in text and "wandb sync" in text
