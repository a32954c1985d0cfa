"""Spawn `forge-ds` as N real ranks, what a launcher does, and watch each one: its own exit code, output and the
moment it ended.

Every multi-rank test starts its ranks here: conftest.forge waits for them and reports the first failing rank; the
fault and error tests look at each rank (which rank said what, how long rank 0 outlived a dead peer); the
monitoring tests start ranks in the background and wait later. Output goes to files, so no pipe can fill up and
stall a rank while the test waits on another, and a callback may act when a rank ends (e.g. kill a peer left
sleeping, as a launcher would).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    # One intra-op thread per rank: two ranks on two cores otherwise oversubscribe and run ~10x slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra or {})
    return env


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


class Ranks:
    """`python -m forge_ds.cli <args>` as `ranks` processes with env:// variables, started at once; wait() collects."""

    def __init__(self, args: list[str], ranks: int, cwd: Path, env: Optional[dict] = None):
        port = str(free_port())
        self.logs = Path(tempfile.mkdtemp(prefix=f"forge-ranks-{port}-"))  # outside cwd: tests check what runs write
        self.procs, self.files, self.started = [], [], time.time()
        for rank in range(ranks):
            rank_env = base_env({**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                                 "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            out, err = open(self.logs / f"{rank}.out", "w"), open(self.logs / f"{rank}.err", "w")
            self.files += [out, err]
            self.procs.append(subprocess.Popen([sys.executable, "-m", "forge_ds.cli", *args], cwd=cwd,
                                               env=rank_env, stdout=out, stderr=err))

    def wait(self, timeout: float = 240,
             on_exit: Optional[Callable[[int, int, list], None]] = None) -> list[RankResult]:
        """`on_exit(rank, code, procs)` is called as each rank ends. Ranks still alive `timeout` seconds after the
        start are killed (returncode -9)."""
        ended: dict[int, float] = {}
        try:
            while len(ended) < len(self.procs) and time.time() - self.started < timeout:
                for rank, p in enumerate(self.procs):
                    if rank not in ended and p.poll() is not None:
                        ended[rank] = time.time() - self.started
                        if on_exit:
                            on_exit(rank, p.returncode, self.procs)
                time.sleep(0.05)
        finally:
            for rank, p in enumerate(self.procs):
                if p.poll() is None:
                    p.kill()
                    p.wait()
                    ended.setdefault(rank, time.time() - self.started)
            for f in self.files:
                f.close()
        results = [RankResult(r, p.returncode, (self.logs / f"{r}.out").read_text(errors="replace"),
                              (self.logs / f"{r}.err").read_text(errors="replace"), ended[r])
                   for r, p in enumerate(self.procs)]
        shutil.rmtree(self.logs, ignore_errors=True)
        return results


def spawn_ranks(args: list[str], ranks: int, cwd: Path, env: Optional[dict] = None, timeout: float = 240,
                on_exit: Optional[Callable[[int, int, list], None]] = None) -> list[RankResult]:
    return Ranks(args, ranks, cwd, env).wait(timeout, on_exit)
