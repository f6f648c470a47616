"""One writer per folder: an exclusive lock on a run folder (``levo-train``) or an output folder
(``levo-data sample``, ``score``, ``shards``).

A second process that would write into a folder that a live process is writing is refused at
once, with the holder named (host, pid, command, start time, Slurm job): two runs into one
``run_dir`` would otherwise interleave checkpoints, and two samplers into one ``--out`` share
their temp folders.

How: ``fcntl.flock`` on ``FOLDER/.levo.lock``, kept open for the writer's lifetime; the file holds
the holder as JSON. The kernel drops the lock when the process dies (a killed job, an OOM kill, a
Slurm requeue), so a lock left behind by a dead process is free and the next writer takes it over
(saying whose it was). Where the filesystem has no ``flock`` (some NFS or Lustre mounts: ENOLCK,
EOPNOTSUPP, ENOSYS) the file itself is the lock (created with ``O_EXCL``) and a stale one is taken
over only when its holder is provably gone: on this host, its pid no longer runs (or now runs
another process: the start time differs); on another host, when it is this very Slurm job (a
requeued job running again). Otherwise the second writer is refused and told which file to remove
once it is sure the holder is dead.

One launch, one holder: the ranks of a multi-process launch share the folder, so only launch rank
0 locks (:func:`launch_rank`); ``levo-data sample``, whose ranks finish independently, locks one
file per rank (``.levo.lock`` for rank 0, ``.levo.rank{r:03d}.lock`` for the others).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from levo_infer.jsonio import dumps as strict_dumps

log = logging.getLogger("levo_train")

LOCK_NAME = ".levo.lock"
#: errno values of a filesystem without flock support (the O_EXCL fallback is used there)
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
#: a lock file whose holder never finished writing it (fallback mode) is stale after this long
UNWRITTEN_STALE_S = 60.0


class FolderLockedError(OSError):
    """Another live process holds the folder's lock; the message names it (an OSError: the folder is busy)."""

    def __init__(self, folder: Path, holder: dict[str, Any] | None, what: str, hint: str = "") -> None:
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder} is in use by {describe_holder(holder)}; refusing to start a second {what} "
                         f"there. Wait for it to finish (or stop it), or use another folder{hint}")


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``levo-train (host h1, pid 42, since 2026-12-01 10:00:00, Slurm job 77)`` (per-rank locks: ``rank 1
    of 4, host ...``), or that it is unknown."""
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process (its lock file names no holder yet)"
    bits = [f"rank {holder['rank']} of {holder.get('world', '?')}"] if "rank" in holder else []
    bits += [f"host {holder.get('host', '?')}", f"pid {holder.get('pid')}"]
    if holder.get("started"):
        bits.append(f"since {holder['started']}")
    if holder.get("slurm_job"):
        bits.append(f"Slurm job {holder['slurm_job']}")
    return f"{holder.get('command', 'a levo process')} ({', '.join(bits)})"


def launch_rank() -> int:
    """This process's rank in its launch as the launcher's environment says (torchrun's ``RANK``,
    srun's ``SLURM_PROCID``, Lightning's re-launched ``LOCAL_RANK``/``NODE_RANK``); 0 for a plain
    process. Only rank 0 of a launch takes the run folder's lock."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) != 0:
            return int(v)
    return 0


def slurm_job() -> str | None:
    """``JOB`` or ``ARRAYJOB_TASK`` of the Slurm job this process runs in (None outside Slurm)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; None where /proc does not say)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class FolderLock:
    """The exclusive lock of one folder (see the module docstring): ``acquire()`` or refuse with
    :class:`FolderLockedError`; ``release()`` removes the lock file. A context manager."""

    def __init__(self, folder: str | os.PathLike, what: str, *, name: str = LOCK_NAME,
                 info: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self.info = dict(info or {})
        self.fd: int | None = None
        self.mode: str | None = None  # "flock" or "file" (no flock on this filesystem)

    # -- the holder record ---------------------------------------------------------------
    def holder_record(self) -> dict[str, Any]:
        return {"command": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _proc_start(os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "slurm_job": slurm_job(), "argv": " ".join(sys.argv)[:500], **self.info}

    @staticmethod
    def _read_fd(fd: int) -> dict[str, Any] | None:
        try:
            data = os.pread(fd, 1 << 16, 0)
            holder = json.loads(data.decode("utf-8")) if data.strip() else None
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def read_holder(self) -> dict[str, Any] | None:
        """The holder recorded in the lock file (None: no file, or not written yet)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return self._read_fd(fd)
        finally:
            os.close(fd)

    def _write_holder(self, fd: int) -> None:
        data = (strict_dumps(self.holder_record(), indent=1) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    # -- acquire / release ---------------------------------------------------------------
    def acquire(self) -> FolderLock:
        """Take the lock (creating the folder), or raise :class:`FolderLockedError` at once."""
        if self.fd is not None:
            raise RuntimeError(f"{self.path}: this lock is already held by this object")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # a holder that releases meanwhile removes the file: lock the new one
            existed = self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_fd(fd)
                os.close(fd)
                raise FolderLockedError(self.folder, holder, self.what) from None
            except OSError as e:
                empty = os.fstat(fd).st_size == 0
                os.close(fd)
                if e.errno in NO_FLOCK:
                    if not existed and empty:  # the file this call just created: not a holder's
                        self.path.unlink(missing_ok=True)
                    return self._acquire_file()
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self._read_fd(fd)
            self._write_holder(fd)
            self.fd, self.mode = fd, "flock"
            if previous and previous.get("pid") is not None:
                log.warning("%s: took over the lock of %s, which is gone", self.folder, describe_holder(previous))
            return self
        raise FolderLockedError(self.folder, self.read_holder(), self.what)

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        """Fallback mode: is the holder of an existing lock file provably gone?"""
        if holder is None or "pid" not in holder:
            try:
                return time.time() - self.path.stat().st_mtime > UNWRITTEN_STALE_S
            except FileNotFoundError:
                return True
        if holder.get("host") == socket.gethostname():
            pid = int(holder["pid"])
            if pid == os.getpid():
                return False
            if not _pid_alive(pid):
                return True
            start = _proc_start(pid)
            return bool(holder.get("pid_start") and start and start != holder["pid_start"])  # pid reused
        return bool(slurm_job()) and holder.get("slurm_job") == slurm_job()  # this job, requeued

    def _acquire_file(self) -> FolderLock:
        """The lock without flock: the file created exclusively; a provably stale one replaced."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                holder = self.read_holder()
                if not self._stale(holder):
                    raise FolderLockedError(self.folder, holder, self.what,
                                            f" (this filesystem has no flock: if that process is gone, remove "
                                            f"{self.path})") from None
                log.warning("%s: taking over the stale lock of %s", self.folder, describe_holder(holder))
                self.path.unlink(missing_ok=True)
                continue
            self._write_holder(fd)
            self.fd, self.mode = fd, "file"
            return self
        raise FolderLockedError(self.folder, self.read_holder(), self.what)

    def release(self) -> None:
        """Remove the lock file (ours) and drop the lock; a no-op when not held."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.mode == "file":
                holder = self.read_holder()
                if holder is not None and holder.get("pid") == os.getpid() and \
                        holder.get("host") == socket.gethostname():
                    self.path.unlink(missing_ok=True)
            else:  # still ours while flocked: nobody else can have replaced it
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, *, rank: int = 0, world: int = 1,
                per_rank: bool = False) -> Iterator[FolderLock | None]:
    """Hold ``folder``'s lock for the ``with`` block. ``per_rank``: every rank of the launch locks its
    own file (rank 0 the folder's ``.levo.lock``); otherwise only rank 0 locks and other ranks
    (which belong to the same launch) yield None."""
    if rank != 0 and not per_rank:
        yield None
        return
    name = LOCK_NAME if rank == 0 else f".levo.rank{rank:03d}.lock"
    info = {"rank": rank, "world": world} if per_rank else {}
    with FolderLock(folder, what, name=name, info=info) as lock:
        yield lock


def locks_output(what: str, folders: Callable[[dict[str, Any]], Sequence[str | os.PathLike | None]], *,
                 per_rank: Callable[[dict[str, Any]], tuple[int, int]] | None = None) -> Callable[[Any], Any]:
    """Decorator: the wrapped writer holds the lock of each folder that ``folders(arguments)`` names
    (its bound arguments by name; None entries are skipped) while it runs. ``per_rank(arguments)``
    gives ``(rank, world)`` for writers whose ranks lock one file each (``levo-data sample``)."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            rank, world = per_rank(bound.arguments) if per_rank is not None else (0, 1)
            with contextlib.ExitStack() as stack:
                for f in dict.fromkeys(os.path.abspath(f) for f in folders(bound.arguments) if f is not None):
                    stack.enter_context(folder_lock(f, what, rank=rank, world=world, per_rank=per_rank is not None))
                return fn(*args, **kwargs)

        return wrapper

    return deco


__all__ = ["LOCK_NAME", "FolderLock", "FolderLockedError", "describe_holder", "folder_lock", "launch_rank",
           "locks_output", "slurm_job"]
