"""Peak memory of a process tree, sampled from /proc: what a memory limit would have to hold.

Two figures per sample, summed over the process and its descendants from /proc/<pid>/smaps_rollup: Pss (everything
resident, including pages of memory-mapped files, which the kernel can drop and re-read under a limit) and Pss_Anon
(anonymous memory only, which it cannot drop without swap). Proportional set sizes, not RSS: a child that a library
forks (to run `uname`, say) shares its parent's pages, and summed RSS would count them twice. ru_maxrss is no use
for a tree: it is the largest single process's peak.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path


KEYS = ("Pss", "Pss_Anon")


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in KEYS:
                out[key] = int(value.split()[0])
    except (OSError, ValueError):  # ended between listing and reading
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def tree_rss(pid: int) -> dict[str, int]:
    """Bytes resident now in `pid` and its descendants: {'Pss': ..., 'Pss_Anon': ...}."""
    total = dict.fromkeys(KEYS, 0)
    for p in _tree(pid):
        for key, kb in _status_kb(p).items():
            total[key] += kb * 1024
    return total


class PeakSampler:
    """Samples tree_rss(pid) every `interval` seconds on a thread; .peak holds the largest of each figure."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.peak = dict.fromkeys(KEYS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in tree_rss(self.pid).items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, dict[str, int], float]:
    """Run `cmd` to completion; returns (its result, peak tree memory, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    sampler = PeakSampler(proc.pid)
    out, err = proc.communicate()
    peak = sampler.stop()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak, time.monotonic() - started
