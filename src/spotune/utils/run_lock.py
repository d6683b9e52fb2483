"""An exclusive, OS-level lock on a run folder, held for the whole run.

``fcntl.flock`` on ``RUN/.spotune.lock``: the kernel releases it when the holding process ends, however
it ends (``kill -9`` included), so a crashed run never leaves a lock that needs deleting by hand. The
file also records the holder's PID and host, so a refused second run can say who holds the folder.
The lock file itself stays in a folder that holds a run: deleting it would let a process that opened the old
file and one that creates a new one both "hold" the lock. A folder the lock made itself and nothing else
wrote into (a run refused during its setup, after the lock was taken) is removed on release, lock file and
all, so a refused command leaves no empty run folder behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from spotune.errors import SpotuneError

LOCK_FILE = ".spotune.lock"


class RunLockedError(SpotuneError, BlockingIOError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """The held lock of one run folder; :meth:`release` (or process exit) frees it.

    Args:
        folder: the run folder (created if missing).
        command: what holds it (e.g. ``"spotune train"``), written into the lock file for the refusal message.
    Raises:
        RunLockedError: naming the holder's PID when another process holds the folder.
    """

    def __init__(self, folder: str | Path, command: str) -> None:
        self._fd: int | None = None  # set once held; __del__ may run on a lock that never was
        self.folder = Path(folder)
        self._made_folder = not self.folder.exists()  # removed on release if nothing but the lock went into it
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.folder} is in use by {holder}; wait for it to finish (or stop it), or choose another "
                "output_dir"
            ) from None
        except OSError as exc:  # a file system without flock support: say so rather than run unguarded
            os.close(fd)
            raise RunLockedError(f"{self.path}: cannot lock the run folder ({exc}); choose an output_dir on a local disk") from None
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Free the lock (idempotent); the file stays, emptied, for the next run, unless the folder is one this
        lock made and holds nothing else: then the file and the folder go, while the lock is still held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            if self._made_folder:
                self._remove_untouched_folder()
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _remove_untouched_folder(self) -> None:
        try:
            if [p.name for p in self.folder.iterdir()] != [LOCK_FILE]:
                return
            self.path.unlink()
            self.folder.rmdir()  # fails, harmlessly, if a file arrived in between
        except OSError:
            pass

    def __del__(self) -> None:  # a lost reference must not keep the folder locked in a long-lived process
        self.release()


def _read_holder(fd: int) -> str:
    """``process 1234 on host (spotune train, since ...)`` from the lock file, as well as it can be read."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (its PID is not written yet)"
    where = f" on {info['host']}" if info.get("host") and info.get("host") != socket.gethostname() else ""
    what = ", ".join(str(info[k]) if k == "command" else f"since {info[k]}" for k in ("command", "since") if info.get(k))
    return f"process {info['pid']}{where}" + (f" ({what})" if what else "")
