"""One writer per folder: a second levo-train into a run folder, or a second levo-data sample into an
--out folder, is refused at once naming the holder (host and pid); a lock left by a dead process
(a killed job) is taken over; without flock (some network filesystems) a stale lock is taken over
only when its holder is provably gone."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

import levo_train.locking as locking
from levo_train.cli import main
from levo_train.locking import LOCK_NAME, FolderLock, FolderLockedError

HOLD = ("import sys; from levo_train.locking import folder_lock\n"
        "with folder_lock(sys.argv[1], 'levo-train'):\n"
        "    print('held', flush=True); sys.stdin.read()\n")


class Holder:
    """Another process holding a folder's lock (the protocol every levo writer uses) until killed."""

    def __init__(self, folder: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=30)


@pytest.fixture
def holder(tmp_path):
    made: list[Holder] = []

    def make(folder: Path) -> Holder:
        made.append(Holder(folder))
        return made[-1]

    yield make
    for h in made:
        if h.p.poll() is None:
            h.kill()


def test_second_levo_train_into_a_run_folder_is_refused_then_a_dead_holders_lock_is_taken_over(
        tmp_path, toy_cache_dir, holder, capsys, caplog):
    rd = tmp_path / "run"
    h = holder(rd)
    args = ["recipe=sft", f"run_dir={rd}", f"data.toy.cache_dir={toy_cache_dir}", *TINY, "trainer.max_steps=2",
            "trainer.val_check_interval=1000"]
    t0 = time.time()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{rd} is in use by levo-train (host {socket.gethostname()}, pid {h.p.pid}" in err, err
    assert time.time() - t0 < 10 and sorted(p.name for p in rd.iterdir()) == [LOCK_NAME]  # nothing built or written
    h.kill()  # a killed job: its lock file stays, its lock does not
    assert json.loads((rd / LOCK_NAME).read_text())["pid"] == h.p.pid
    assert main(args) == 0
    assert f"took over the lock of levo-train (host {socket.gethostname()}, pid {h.p.pid}" in caplog.text
    assert json.loads((rd / "summary.json").read_text())["status"] == "done"
    assert not (rd / LOCK_NAME).exists()  # released at the end


def test_second_levo_data_sample_into_an_out_folder_is_refused(tmp_path, holder, capsys):
    """Refused before anything is read (the model path does not even exist), naming the holder."""
    from levo_data.cli import main as levo_data

    out = tmp_path / "cands"
    h = holder(out)
    rc = levo_data(["sample", "--model", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "p.jsonl"),
                    "--per-prompt", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"pid {h.p.pid}" in err and "refusing to start a second levo-data sample" in err, err
    h.kill()
    rc = levo_data(["sample", "--model", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "p.jsonl"),
                    "--per-prompt", "2", "--out", str(out)])
    assert rc != 0 and "in use" not in capsys.readouterr().err  # now it fails on the missing model instead
    # ranks of one launch lock one file each: rank 1 is not blocked by rank 0, a second rank 1 is
    with locking.folder_lock(out, "levo-data sample", rank=0, per_rank=True), \
            locking.folder_lock(out, "levo-data sample", rank=1, world=2, per_rank=True):
        with pytest.raises(FolderLockedError, match=rf"levo-data sample \(rank 1 of 2, host \S+, pid {os.getpid()}"):
            with locking.folder_lock(out, "levo-data sample", rank=1, world=2, per_rank=True):
                pass


def test_without_flock_a_stale_lock_is_taken_over_only_when_its_holder_is_gone(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking.fcntl, "flock", no_flock)
    folder = tmp_path / "out"
    lock = FolderLock(folder, "levo-train").acquire()
    assert lock.mode == "file"
    with pytest.raises(FolderLockedError, match=rf"pid {os.getpid()}"):
        FolderLock(folder, "levo-train").acquire()
    lock.release()
    assert not (folder / LOCK_NAME).exists()

    def write(holder: dict) -> None:
        (folder / LOCK_NAME).write_text(json.dumps({"command": "levo-train", "started": "then", **holder}))

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write({"host": socket.gethostname(), "pid": dead.pid})  # this host, a pid that no longer runs
    FolderLock(folder, "levo-train").acquire().release()
    write({"host": socket.gethostname(), "pid": os.getppid(), "pid_start": "1"})  # pid alive, but reused
    FolderLock(folder, "levo-train").acquire().release()
    write({"host": "node-7", "pid": 4242, "slurm_job": "99"})  # another host: cannot tell
    with pytest.raises(FolderLockedError, match=rf"host node-7, pid 4242.*remove {folder / LOCK_NAME}"):
        FolderLock(folder, "levo-train").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "99")  # ... unless it is this very job, requeued
    FolderLock(folder, "levo-train").acquire().release()
