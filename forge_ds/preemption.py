"""Stopping on a signal: SLURM's warning before the time limit or preemption (SIGUSR1), SIGTERM and Ctrl-C set a
flag that the loop reads once per step; every rank then checkpoints together, and under SLURM the job is requeued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from forge_ds import launch_env


_stop_signal: Optional[int] = None
# What a first Ctrl-C means depends on what the process is doing (see `phase`):
#   "step"   training: the step finishes, every rank checkpoints, then the run exits (also SIGTERM/SIGUSR1);
#   "poll"   an evaluation: it checks the flag between batches and every rank stops within seconds;
#   "abort"  anything else (start-up, the final export, offline commands): stop now (KeyboardInterrupt).
_phase = "abort"
_WHAT_NEXT = {"step": "finishing this step, then saving a checkpoint (Ctrl-C again to quit at once)",
              "poll": "stopping the evaluation within seconds, then saving a checkpoint (Ctrl-C again to quit at "
                      "once)"}


def install_stop_handlers() -> None:
    """SIGUSR1 (SLURM's warning before the time limit / preemption), SIGTERM and Ctrl-C set a flag that the loop
    and the evaluation read; a Ctrl-C outside them stops at once. A second Ctrl-C exits at once, whatever the
    phase: nothing is left half-written where a later run would trust it (files are renamed into place, a
    checkpoint counts only with its COMPLETE marker)."""
    def handler(signum, _frame):
        global _stop_signal
        if _stop_signal is not None and signum == signal.SIGINT:
            _say("second Ctrl-C: exiting now")
            os._exit(128 + signal.SIGINT)
        if _stop_signal is None:  # the first signal is the reason; SLURM's SIGTERM after a requeue is not
            _stop_signal = signum
        if signum == signal.SIGINT and _phase == "abort":
            raise KeyboardInterrupt  # the CLI says it in one line, with what to do next
        if signum == signal.SIGINT:
            _say(f"Ctrl-C: {_WHAT_NEXT[_phase]}")

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Within the block a first Ctrl-C means `name` ("step", "poll" or "abort"; see _WHAT_NEXT)."""
    global _phase
    previous, _phase = _phase, name
    try:
        yield
    finally:
        _phase = previous


def _say(line: str) -> None:
    # Every rank gets the terminal's Ctrl-C; the first rank of each node speaks, so the user reads one line.
    if launch_env.rank_hint()[1] == 0:
        print(f"forge-ds: {line}", file=sys.stderr, flush=True)


def local_stop_requested() -> bool:
    """This rank got a stop signal; the loop reduces it across ranks so all stop at the same step."""
    return _stop_signal is not None


def stop_signal_number() -> int:
    return int(_stop_signal or 0)


def stop_signal_name() -> str:
    return signal_name(_stop_signal) if _stop_signal is not None else ""


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def requeue_slurm_job(env: launch_env.Env) -> bool:
    """Ask SLURM to requeue this job (call after every rank finished its checkpoint: requeue kills the step)."""
    if env.slurm_job_id is None or env.slurm_restart_count >= launch_env.max_self_requeues():
        return False
    result = subprocess.run(["scontrol", "requeue", env.slurm_job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"forge-ds: warning: scontrol requeue failed: {result.stderr.strip()}", file=sys.stderr)
        return False
    return True
