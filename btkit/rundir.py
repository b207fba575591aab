"""The run directory: one run at a time in it, and a safe way to start over.

Two processes appending to one journal would duplicate every record, so a run holds an exclusive
``flock`` on ``OUT/.lock`` for its whole life. The lock belongs to the open file, so the kernel
releases it when the process dies however it dies (``kill -9`` included): there is never a stale
lock to clean up. The file itself stays and holds the last holder's PID, named in the refusal.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .backends import public_url
from .errors import BtkitError
from .io import atomic_write_json

#: Files a run writes (``--overwrite`` moves these aside).
RUN_FILES = ("candidates.jsonl", "data.jsonl", "data.jsonl.partial", "stats.json", "failures.jsonl", "run.json", "spent.json",
             "shard.json", "manifest.json")


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


class RunDirectory:
    """An open run directory: locked for this run, its ``run.json`` (settings and active time) written first."""

    def __init__(self, out: Path, command: list[str] | None = None):
        self.out = Path(out)
        self.command = command
        self.lock: RunLock | None = None
        #: Active seconds of the invocations before this one (from run.json).
        self.elapsed_before = 0.0
        self._run_json: dict[str, Any] = {}

    def open(self, fingerprint: dict[str, Any], overwrite: bool = False, quiet: bool = False) -> None:
        """Create and lock the directory; move an old run aside under ``--overwrite``; write run.json.

        Nothing is deleted here: a run with other settings stops the run (``--overwrite`` moves its
        files to ``previous-<time>/``), and a resumed run's ``data.jsonl`` is only replaced once its
        finished units were checked against the input.
        """
        create(self.out)
        self.lock = RunLock(self.out).acquire()
        try:
            self._write_run_json(fingerprint, overwrite, quiet)
        except BaseException:
            self.release()
            raise

    def _write_run_json(self, fp: dict[str, Any], overwrite: bool, quiet: bool) -> None:
        run_json = self.out / "run.json"
        old: dict[str, Any] = {}
        if run_json.exists():
            try:
                old = json.loads(run_json.read_text(encoding="utf-8"))
            except ValueError:
                if not overwrite:
                    raise BtkitError(f"{run_json}: damaged (not JSON); pass --overwrite to start over or use another -o") from None
            if old.get("fingerprint") != fp and not overwrite:
                changed = sorted(k for k in set(fp) | set(old.get("fingerprint") or {}) if (old.get("fingerprint") or {}).get(k) != fp.get(k))
                raise BtkitError(
                    f"{self.out} holds a run with different settings (changed: {', '.join(changed)}); "
                    f"pass --overwrite to start over (old files move to {self.out}/previous-<time>/) or use another -o"
                )
        elif any((self.out / n).exists() for n in RUN_FILES) and not overwrite:
            raise BtkitError(f"{self.out} holds run files but no run.json; pass --overwrite to move them aside or use another -o")
        if overwrite:
            backup = move_aside(self.out)
            if backup is not None and not quiet:
                print(f"--overwrite: the previous run's files moved to {backup}", file=sys.stderr)
            old = {}
        self.elapsed_before = float(old.get("elapsed_s") or 0.0)
        self._run_json = {"fingerprint": fp, "command": self.command or redact_argv(sys.argv), "started": old.get("started", time.time()),
                          "elapsed_s": self.elapsed_before}
        # run.json first: a kill from here on leaves a directory that resumes.
        atomic_write_json(run_json, self._run_json)

    def save_elapsed(self, t0: float) -> None:
        """Active time over every invocation, kept in run.json (stats' ``wall_time_s`` covers the whole run)."""
        self._run_json["elapsed_s"] = round(self.elapsed_before + time.monotonic() - t0, 3)
        atomic_write_json(self.out / "run.json", self._run_json)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def redact_argv(argv: list[str]) -> list[str]:
    """The command line for run.json with credential-like values masked (``-B api_key=sk-...``) and
    ``user:password@`` cut from every URL in it (``--base-url http://user:KEY@host/v1``)."""
    # the credential word must end the key name: api_key=, --api-key=, auth_token= are masked, max_tokens= is not
    masked = [re.sub(r"(?i)((?:key|token|secret|password|passwd)=).*", r"\1***", a) for a in argv]
    return [re.sub(r"[A-Za-z][\w+.-]*://\S+", lambda m: public_url(m.group(0)), a) for a in masked]


def public_urls(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as run.json records them: ``user:password@`` cut from every string value that is a URL."""
    return {k: ",".join(public_url(u) for u in v.split(",")) if isinstance(v, str) else v for k, v in options.items()}
