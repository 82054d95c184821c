"""Exclusive use of a run directory: one run at a time."""

from __future__ import annotations

import errno
import fcntl
import os
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
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
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
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
