"""Run a command as N ranks of one job on this machine, as a launcher would: env:// variables, one process each.

Every benchmark that starts forge_ds processes (bench.py, quality.py, export_memory.py) goes through `run_ranks`, so
a rank sees the same environment whichever benchmark started it: the caller's, minus any launcher or SLURM variables
the caller was itself started with (a benchmark run inside an allocation must not join that job's ranks), plus the
checkout on PYTHONPATH (a bare machine without `pip install -e .` still imports forge_ds) and the HF hub offline.

(Not named ranks.py: tests/ranks.py is importable as `ranks` in a pytest process, and a test that loaded a benchmark
in-process would get the wrong module.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Ranks:
    codes: list[int]  # each rank's exit code; negative: killed by that signal
    outputs: list[str]  # each rank's stdout and stderr, in the order it wrote them

    @property
    def ok(self) -> bool:
        return not any(self.codes)

    def user_error(self) -> str | None:
        """The message of the `forge-ds: error:` line of a job that ended on a user error (each failed rank exited
        2), else None."""
        from forge_ds.errors import USER_ERROR_PREFIX

        if self.ok or any(code not in (0, 2) for code in self.codes):
            return None
        return next((line[len(USER_ERROR_PREFIX):] for out in self.outputs for line in out.splitlines()
                     if line.startswith(USER_ERROR_PREFIX)), None)

    def failure(self, lines: int = 30) -> str:
        """The exit codes and the last lines of the first rank that failed (rank 0's if none did)."""
        rank = next((r for r, code in enumerate(self.codes) if code), 0)
        tail = "\n".join(self.outputs[rank].splitlines()[-lines:])
        return f"exit codes {self.codes}; rank {rank}'s last lines:\n{tail}"


def job_env(omp_threads: int | None = None) -> dict[str, str]:
    """The environment every rank starts from (rank variables not yet set)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)})
    if omp_threads:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    return env


def run_ranks(cmd: list[str], ranks: int, cwd: Path | None = None, omp_threads: int | None = None,
              echo: bool = False, log: Path | None = None) -> Ranks:
    """Run `cmd` as `ranks` processes and wait for all of them.

    One process gets no rank variables (forge_ds then runs as a lone process, as when started by hand). Each
    process's output is drained by its own thread, so no rank can stall on a full pipe while another is waited on.

    Args:
        omp_threads: OMP_NUM_THREADS for every rank (two ranks on two cores oversubscribe without it).
        echo: copy rank 0's output to this process's stdout as it comes.
        log: write every rank's output to this file, other ranks' lines prefixed `[rank N]`.
    """
    from forge_ds.launch_env import _free_port

    base = job_env(omp_threads)
    port = str(_free_port())
    procs = []
    for rank in range(ranks):
        env = dict(base)
        if ranks > 1:
            env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, errors="replace"))
    outputs: list[list[str]] = [[] for _ in procs]
    lock = threading.Lock()  # one log file, one writer at a time

    def drain(rank: int, stream, sink) -> None:
        for line in stream:
            outputs[rank].append(line)
            if echo and rank == 0:
                sys.stdout.write(line)
                sys.stdout.flush()
            if sink:
                with lock:
                    sink.write(line if rank == 0 else f"[rank {rank}] {line}")
                    sink.flush()

    with open(log, "w") if log else contextlib.nullcontext() as sink:
        readers = [threading.Thread(target=drain, args=(r, p.stdout, sink), daemon=True) for r, p in enumerate(procs)]
        for reader in readers:
            reader.start()
        try:
            codes = [p.wait() for p in procs]
        finally:  # interrupted (Ctrl-C): no rank is left running on its own
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for reader in readers:
                reader.join()
    return Ranks(codes, ["".join(lines) for lines in outputs])
