"""Test-only fault points: make a real process misbehave at a chosen moment (die, raise, sleep, hit a file-size
limit), so the tests can prove what a user would see. Each point is one line in the code it lives in; without
FORGE_DS_FAULT set (launch_env.fault_spec) it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional

from forge_ds import launch_env


def point(name: str, step: Optional[int] = None) -> None:
    """FORGE_DS_FAULT=<name>[@<step>]:<action>[:<rank>][,...] makes a real process misbehave at a chosen moment,
    for tests: action `kill` SIGKILLs this process, `raise` raises RuntimeError, `sleep<N>` pauses N seconds,
    `fsize<N>` caps the size of any file this process writes from now on at N bytes (a bigger write fails with
    EFBIG, as on a full disk). `@<step>` fires only where the caller passes that step."""
    spec = launch_env.fault_spec()
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        where, _, at = parts[0].partition("@")
        if where != name or len(parts) < 2 or (at and int(at) != step) or (len(parts) > 2 and int(parts[2]) != _rank()):
            continue
        action = parts[1]
        if action == "kill":
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "raise":
            raise RuntimeError(f"fault point {name}: injected failure")
        elif action.startswith("sleep"):
            time.sleep(float(action[5:]))
        elif action.startswith("fsize"):
            import resource

            # CPython ignores SIGXFSZ, so the write itself fails (OSError EFBIG) instead of the process dying.
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(action[5:]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def value(name: str) -> Optional[str]:
    """A test-only override value (e.g. a step at which to inject a NaN)."""
    for item in filter(None, launch_env.fault_spec().split(",")):
        key, _, text = item.partition("=")
        if key == name:
            return text
    return None


def _rank() -> int:
    import torch.distributed as torch_dist

    return torch_dist.get_rank() if torch_dist.is_initialized() else 0
