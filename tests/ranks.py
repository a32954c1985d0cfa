"""Spawn `forge-ds` as N real ranks and watch each one: its own exit code, output and the moment it ended.

conftest.forge reports the first failing rank; the fault and error tests need more: which rank said what, that
rank 1 stayed quiet, how long rank 0 outlived a dead peer. Output goes to files (no pipe can fill up and stall a
rank), and a callback may act when a rank ends (e.g. kill a peer left sleeping, as a launcher would).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from conftest import base_env, free_port


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str
    ended_s: float  # seconds after the start

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def spawn_ranks(args: list[str], ranks: int, cwd: Path, env: Optional[dict] = None, timeout: float = 240,
                on_exit: Optional[Callable[[int, int, list], None]] = None) -> list[RankResult]:
    """Run `python -m forge_ds.cli <args>` as `ranks` processes with env:// variables; `on_exit(rank, code,
    procs)` is called as each one ends. Processes still alive at `timeout` are killed (returncode -9)."""
    port = str(free_port())
    logs = Path(tempfile.mkdtemp(prefix=f"forge-ranks-{port}-"))  # outside cwd: tests also check what runs write
    procs, files = [], []
    started = time.time()
    for rank in range(ranks):
        rank_env = base_env({**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        out, err = open(logs / f"{rank}.out", "w"), open(logs / f"{rank}.err", "w")
        files += [out, err]
        procs.append(subprocess.Popen([sys.executable, "-m", "forge_ds.cli", *args], cwd=cwd, env=rank_env,
                                      stdout=out, stderr=err))
    ended: dict[int, float] = {}
    try:
        while len(ended) < ranks and time.time() - started < timeout:
            for rank, p in enumerate(procs):
                if rank not in ended and p.poll() is not None:
                    ended[rank] = time.time() - started
                    if on_exit:
                        on_exit(rank, p.returncode, procs)
            time.sleep(0.05)
    finally:
        for rank, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
                ended.setdefault(rank, time.time() - started)
        for f in files:
            f.close()
    results = [RankResult(r, p.returncode, (logs / f"{r}.out").read_text(errors="replace"),
                          (logs / f"{r}.err").read_text(errors="replace"), ended[r]) for r, p in enumerate(procs)]
    shutil.rmtree(logs, ignore_errors=True)
    return results
