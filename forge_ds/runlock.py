"""One run per run directory: rank 0 of `train` holds an exclusive lock on `<run dir>/run.lock` for its whole life.

Two runs into one directory used to both finish with exit 0, their configs, exports and metrics mixed. The lock is
`flock(2)`, not a file that exists or not: the kernel drops it when its holder dies however it dies (SIGKILL, OOM,
a crashed node's NFS lease), so a stale lock file never blocks a resume. The file's content (PID, host, start
time) only names the holder in the error line. Read-only commands (`evaluate`, `sample`, `verify`) and `export`
never take it; `check` asks `holder()`, which never holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from forge_ds.errors import ForgeError

LOCK_NAME = "run.lock"
# What filesystems without lock support answer (NFS without lockd, some Lustre mounts: ENOLCK / ENOSYS).
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
# `holder()` probes with a shared lock for microseconds: a `train` starting in that instant retries this long
# before it calls the directory taken.
_PROBE_GRACE_S = 0.5

# (fd, run dir, whether this process created the directory) of every lock this process holds. Kept here, not
# left to the caller: closing the last descriptor of the file releases the lock.
_held: list[tuple[int, Path, bool]] = []


def _close_in_forked_child() -> None:
    # A forked child (data-loader workers, tokenizer pools) shares the lock through its copy of the descriptor and
    # would keep the directory locked after the run dies. Closing the copy leaves the parent's lock as it is.
    for fd, _, _ in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


def hold(run_dir: Path) -> Optional[Path]:
    """Take `run_dir`'s lock until this process ends, creating the directory. Raises ForgeError naming the PID and
    host of the run that holds it. Returns the lock file, or None where the filesystem refuses locks (after a
    one-line warning: the run goes on unprotected rather than not at all)."""
    run_dir, path = Path(run_dir), Path(run_dir) / LOCK_NAME
    if any(held == run_dir for _, held, _ in _held):
        return path  # this process holds it already (setup called twice in one process, as a benchmark may)
    created = False
    for _ in range(20):  # another process may remove the directory it created, between our steps: start again
        created = created or not run_dir.exists()
        fd = _open_lock_file(run_dir, path)
        if fd is None:
            continue
        try:
            locked = _lock_exclusive(fd, run_dir, path)
        except BaseException:
            os.close(fd)
            raise
        if not locked:  # kept open all the same: release_unused then tidies up a directory made for nothing
            _held.append((fd, run_dir, created))
            return None
        if _still_linked(fd, path):
            _write_holder(fd)
            _held.append((fd, run_dir, created))
            return path
        os.close(fd)  # we locked a file its last holder had just removed: lock the one now at `path`
    raise ForgeError(f"{run_dir}: could not take the run directory's lock ({LOCK_NAME} kept changing); "
                     "is another program removing this directory?")


def _open_lock_file(run_dir: Path, path: Path) -> Optional[int]:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        return None  # removed by the run that had created it, between our mkdir and open
    except OSError as e:
        raise ForgeError(f"{run_dir}: cannot create the run directory or its lock file ({e.strerror}); choose a "
                         "writable --output_dir") from None


def _lock_exclusive(fd: int, run_dir: Path, path: Path) -> bool:
    """True once locked; False where the filesystem refuses locks (warned). ForgeError while another holds it."""
    deadline = time.monotonic() + _PROBE_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ForgeError(in_use_message(run_dir, _read_holder(path))) from None
            time.sleep(0.05)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            print(f"forge-ds: warning: {run_dir}: the filesystem refuses file locks ({errno.errorcode[e.errno]}); "
                  "a second run into this directory would not be stopped, start only one", file=sys.stderr,
                  flush=True)
            return False


def _still_linked(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _write_holder(fd: int) -> None:
    # Written in place, then cut to length: a reader sees the previous holder's line or ours, never an empty file.
    line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode() + b"\n"
    try:
        os.pwrite(fd, line, 0)
        os.ftruncate(fd, len(line))
    except OSError:
        pass  # a full disk: the lock holds all the same, only a second run's message cannot name us


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        return f"PID {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return "a process that has not recorded its PID and host yet"


def in_use_message(run_dir: Path, who: str) -> str:
    return (f"{run_dir} is in use by another forge-ds run ({who}); wait for it to end or stop it, or choose "
            "another --output_dir")


def holder(run_dir: Path) -> Optional[str]:
    """'PID 123 on node3, since …' while a process holds `run_dir`'s lock, else None (also where locks are
    refused). Never holds the lock: a shared lock taken and dropped at once, which `hold` waits out."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no run has taken this directory (or we cannot read it, and nor could a run)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _read_holder(path)
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the probe's shared lock, if it got one


def refuse_if_locked(run_dir: Path) -> None:
    """`forge-ds check`: the line `train` would fail with, while another run holds the directory."""
    who = holder(run_dir)
    if who is not None:
        raise ForgeError(in_use_message(Path(run_dir), who))


def release_unused() -> None:
    """Release this process's locks. A directory it created for the run and left holding nothing but the lock file
    is removed: a run that failed on bad input leaves nothing behind. Unlinked before unlocked, so a run waiting
    for this one locks a fresh file (`hold` checks it locked the file still at the path)."""
    while _held:
        fd, run_dir, created = _held.pop()
        try:
            if [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                (run_dir / LOCK_NAME).unlink()
                if created:
                    run_dir.rmdir()
        except OSError:
            pass  # someone else wrote into it meanwhile: theirs now
        finally:
            os.close(fd)
