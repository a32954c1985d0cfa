"""Stopping on a signal: SLURM's warning before the time limit or preemption (SIGUSR1), SIGTERM and Ctrl-C set a
flag that the loop reads once per step; every rank then checkpoints together, and under SLURM the job is requeued.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Optional

from forge_ds import launch_env


_stop_signal: Optional[int] = None


def install_stop_handlers() -> None:
    """SIGUSR1 (SLURM's warning before the time limit / preemption), SIGTERM and Ctrl-C set a flag; the loop
    finishes its step, every rank checkpoints together, then we exit. A second Ctrl-C aborts at once."""
    def handler(signum, _frame):
        global _stop_signal
        if _stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if _stop_signal is None:  # the first signal is the reason; SLURM's SIGTERM after a requeue is not
            _stop_signal = signum

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def local_stop_requested() -> bool:
    """This rank got a stop signal; the loop reduces it across ranks so all stop at the same step."""
    return _stop_signal is not None


def stop_signal_number() -> int:
    return int(_stop_signal or 0)


def stop_signal_name() -> str:
    return signal.Signals(_stop_signal).name if _stop_signal is not None else ""


def requeue_slurm_job(env: launch_env.Env) -> bool:
    """Ask SLURM to requeue this job (call after every rank finished its checkpoint: requeue kills the step)."""
    if env.slurm_job_id is None or env.slurm_restart_count >= launch_env.max_self_requeues():
        return False
    result = subprocess.run(["scontrol", "requeue", env.slurm_job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"forge-ds: warning: scontrol requeue failed: {result.stderr.strip()}", file=sys.stderr)
        return False
    return True
