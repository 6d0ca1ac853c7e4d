"""One process per run folder: an exclusive ``flock`` on ``OUT_DIR/.lock``.

The kernel drops the lock when its process ends, however it ends (kill -9 included), so a crash never
leaves a stale lock. Only rank 0 of a multi-process run holds it: the workers of one job share their
folder. The file also holds who took the lock (pid, command line, start time), so a second process is
refused naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from rampup.errors import ConfigError

LOCK = ".lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


class RunLock:
    """Held from :meth:`acquire` until :meth:`release` or the process's end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK
        self._fd: int | None = None
        self.created = False

    def acquire(self) -> RunLock:

        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(
                f"train.out_dir {self.folder} is a file, not a folder; choose another "
                "train.out_dir (or name) for the run"
            )
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(
                f"cannot create the run folder {self.folder} ({e.strerror}); choose a writable train.out_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use() from None
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed the file between our open and our lock: take the new one
            os.close(fd)
            return self.acquire()
        info = {
            "pid": os.getpid(),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _in_use(self) -> ConfigError:
        return ConfigError(
            f"{self.folder} is in use by another rampup process ({_holder(self.path)}); "
            "one process trains a run folder at a time: wait for it to finish (or stop it: it "
            "checkpoints on SIGTERM) and then --resume, or give this run another "
            "name / train.out_dir"
        )

    def release(self, *, undo: bool = False) -> None:
        """Let go and remove the lock file (a process that opened it meanwhile sees it gone and retries);
        with ``undo`` (a run refused before it wrote anything) also the folder if taking the lock created it
        and nothing else is in it. A killed process leaves the file, unlocked: the next one takes it."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        if undo:
            if self.created:
                try:
                    self.folder.rmdir()
                except OSError:  # something else is in it now
                    pass
        os.close(self._fd)  # closing the descriptor drops the lock
        self._fd = None

    def __del__(self) -> None:
        if sys.meta_path is None:  # interpreter shutdown: modules are torn down; the OS drops the lock with the process
            return
        try:
            self.release()
        except (AttributeError, TypeError):  # a module global already cleared during shutdown
            pass
