"""Exclusive use of a run directory: one run at a time."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from mptrain.errors import MptrainError
from mptrain.run.layout import LOCK


class RunDirError(MptrainError):
    """The run directory cannot be used: held by another run, not a directory, not writable."""


class RunLock:
    """An exclusive flock on <run_dir>/.lock, holding the owner's PID.

    The kernel drops the lock when the process ends, kill -9 included, so a stale .lock file never
    blocks a run. The file is removed on release (while still locked), so a refused or finished run
    leaves nothing behind; `acquire` re-checks the inode to tolerate that race.

    A flock belongs to the open file, which a fork shares: a child forked while the lock is held (a DataLoader
    worker) closes its copy at once, so the lock ends with the run's own process, not with its last child. And a
    holder that is no longer alive (killed, the kernel still closing its files) is waited for, briefly.
    """

    DYING_HOLDER_S = 0.5  # a refusal waits this long in any case (a holder killed just now may still look alive)
    DEAD_HOLDER_WAIT_S = 5.0  # how long a lock whose holder has died may take to be dropped by the kernel

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        grace, deadline = time.monotonic() + self.DYING_HOLDER_S, time.monotonic() + self.DEAD_HOLDER_WAIT_S
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise RunDirError(f"cannot use run directory {self.run_dir}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise RunDirError(f"cannot lock run directory {self.run_dir}: {e.strerror}") from None
                # a holder just killed may still look alive for a moment, and once dead, the kernel drops its lock as
                # it closes the process's files: wait a little, longer for one seen dead
                now = time.monotonic()
                if now < deadline and (now < grace or not _alive(holder)):
                    time.sleep(0.05)
                    continue
                raise RunDirError(f"run directory {self.run_dir} is in use by another mptrain run (pid {holder}); "
                                  "wait for it to end or choose another hydra.run.dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it between our open and flock: try again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        _HELD.add(self)
        return self

    def _close_in_child(self) -> None:
        """A forked child's copy of the lock's file closed: the lock is the run's process's alone."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        _HELD.discard(self)


# the locks this process holds (until released, referenced or not): a forked child closes its copies; one fork
# callback for the process, not one per lock, which a long multirun process would pile up
_HELD: set[RunLock] = set()


def _close_held_in_child() -> None:
    for lock in list(_HELD):
        lock._close_in_child()
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _alive(pid: str) -> bool:
    """Whether process `pid` (as the lock file holds it) runs: not gone, not a zombie; True when unknown."""
    try:
        n = int(pid)
        os.kill(n, 0)
    except ValueError:
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        stat = Path(f"/proc/{n}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")  # the state after "(comm)"
