"""The run directory: one run at a time in it, and a safe way to start over.

Two processes appending to one journal would duplicate every record, so a run holds an exclusive
``flock`` on ``OUT/.lock`` for its whole life. The lock belongs to the open file, so the kernel
releases it when the process dies however it dies (``kill -9`` included): there is never a stale
lock to clean up. The file itself stays and holds the last holder's PID, named in the refusal.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from .errors import BtkitError

#: Files a run writes (``--overwrite`` moves these aside).
RUN_FILES = ("candidates.jsonl", "data.jsonl", "data.jsonl.partial", "stats.json", "failures.jsonl", "run.json")


def create(out: Path) -> None:
    """Create the run directory, or stop with one line saying why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BtkitError(f"-o {out}: a file is in the way (a run directory must be a folder)") from None
    except NotADirectoryError:
        raise BtkitError(f"-o {out}: a part of the path is a regular file, not a folder") from None
    except OSError as e:
        raise BtkitError(f"-o {out}: cannot create the run directory ({os.strerror(e.errno) if e.errno else e})") from None
    if not os.access(out, os.W_OK):
        raise BtkitError(f"-o {out}: the run directory is not writable (read-only filesystem or permissions)")


class RunLock:
    """An exclusive, non-blocking OS lock on ``OUT/.lock`` (see the module docstring)."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.fd = -1

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BtkitError(f"{self.path}: cannot create the run lock ({os.strerror(e.errno) if e.errno else e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise BtkitError(f"{self.path.parent} is in use by another btkit run (pid {holder}); "
                             f"wait for it to end, or use another -o") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = -1


def move_aside(out: Path) -> Path | None:
    """Move the run files into a new ``previous-<time>[-N]/`` folder (never overwriting one); return it."""
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        backup = out / (f"previous-{stamp}" if n == 1 else f"previous-{stamp}-{n}")
        try:
            backup.mkdir()
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover (ten thousand overwrites in one second)
        raise BtkitError(f"{out}: too many previous-{stamp}* folders")
    for name in present:
        shutil.move(str(out / name), str(backup / name))
    return backup
