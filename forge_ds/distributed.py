"""Ranks talking to each other: the process group, its timeouts, the few collectives forge_ds uses, and leaving.

Who a process is and what the launcher set lives in launch_env.py (the only reader of environment variables);
stop signals and SLURM requeue in preemption.py; test-only fault points in faults.py.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
import torch.distributed as torch_dist

from forge_ds import launch_env
from forge_ds.errors import ForgeError

# A collective may legitimately wait this long before training starts (rank 0 tokenizing a corpus, or
# consolidating an export while the others wait); once steps run, a missing peer means it died.
SETUP_TIMEOUT = dt.timedelta(minutes=60)
TRAINING_TIMEOUT = dt.timedelta(seconds=launch_env.training_timeout_s())


_process_group_started = False  # set by init(); see end_process


def init(device: str) -> None:
    """Start the process group (gloo on CPU, nccl on GPU) with the long set-up timeout."""
    import deepspeed

    global _process_group_started
    if torch_dist.is_initialized():
        return
    _process_group_started = True
    if device == "cuda":
        torch.cuda.set_device(launch_env.local_rank())
        launch_env.set_cuda_arch_list()
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=SETUP_TIMEOUT, verbose=False)


_timeout = SETUP_TIMEOUT  # what set_timeout last applied (init starts every group with SETUP_TIMEOUT)


def current_timeout() -> dt.timedelta:
    return _timeout


def set_timeout(timeout: dt.timedelta) -> None:
    """Change every group's collective timeout: short while steps run (a silent peer is a dead peer), long
    around set-up, saves and exports (rank 0 may legitimately keep the others waiting)."""
    global _timeout
    _timeout = timeout
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        # Every group, not just the default one: ZeRO reduces gradients on its own data-parallel group (a
        # clone of WORLD with torch's 30-minute default), so a dead peer mid-backward would otherwise hang there.
        try:
            groups = list(torch_dist.distributed_c10d._world.pg_map) or [None]
        except AttributeError:
            groups = [None]
        for group in groups:
            try:
                torch_dist.distributed_c10d._set_pg_timeout(timeout, group)
            except (AttributeError, RuntimeError, ValueError):
                pass  # older torch, or a group this rank is not in: the launchers still kill a job whose rank died


@contextmanager
def long_wait():
    """Saves, evaluation and export may keep some ranks waiting longer than a training step's timeout. Restores
    the timeout it found: during set-up (a resume's load) that is still the long one."""
    previous = current_timeout()
    set_timeout(SETUP_TIMEOUT)
    try:
        yield
    finally:
        set_timeout(previous)


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size(group=None) -> int:
    return torch_dist.get_world_size(group) if torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank (run directory names, decisions only rank 0 may take)."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def collectives_on_host() -> bool:
    """Collectives move host memory (gloo, CPU ranks), so what they gather counts against the machine's RAM."""
    return torch_dist.is_initialized() and torch_dist.get_backend() == "gloo"


def concat_on_main(piece: torch.Tensor, sizes: list[int]) -> Optional[torch.Tensor]:
    """Collective, over host memory (collectives_on_host). Rank r holds `piece`, 1-D with sizes[r] elements; rank 0
    returns all of them concatenated in rank order as one new fp32 CPU tensor, each received straight into its
    place (no staging copy of the whole), the other ranks None."""
    if not is_main():
        if piece.numel():
            torch_dist.send(piece.to(torch.float32).contiguous(), dst=0)
        return None
    out, start = torch.empty(sum(sizes), dtype=torch.float32), 0
    for source, size in enumerate(sizes):
        place = out.narrow(0, start, size)
        if source == 0:
            place.copy_(piece)
        elif size:
            torch_dist.recv(place, src=source)
        start += size
    return out


def gather_object(obj: Any) -> list:
    """Every rank's value, in rank order, on every rank (collective)."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a few floats across ranks (on CPU tensors: gloo; moved to the GPU for nccl)."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return list(values)
    device = "cuda" if torch_dist.get_backend() == "nccl" else "cpu"
    return all_reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device), op).cpu().tolist()


def all_reduce_tensor(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a tensor across ranks where it lives (no host read: on a GPU the reduction is queued behind the
    step)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool) -> bool:
    return all_reduce([1.0 if flag else 0.0], op="max")[0] > 0


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def end_process(code: int) -> None:
    """Exit with `code`; in a process that started a process group, without the interpreter's teardown.

    Such a process now and then aborts in C++ static destructors after all Python code has run ("terminate called
    without an active exception", exit -6): measured here in 4 of 10 two-rank runs that ended on a user error, and
    seen after runs that had finished and written everything, even after destroy_process_group(). The exit code
    is then the abort's, not ours. Everything forge_ds writes is closed by the time a command returns; only the
    standard streams need a flush. Elsewhere (no group: bad input caught early, tests calling main in-process)
    this is a plain SystemExit.
    """
    if not _process_group_started:
        if code:
            raise SystemExit(code)
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(code)


def on_main(fn: Callable[[], Any], share: bool = True) -> Any:
    """Run `fn` on rank 0 only; the others wait, then all get its result or all raise its user error. With
    share=False only rank 0 gets the result (the others None): nothing but the outcome is pickled and sent."""
    outcome, result = None, None
    if is_main():
        try:
            result = fn()
            outcome = ("ok", result if share else None)
        except ForgeError as e:
            outcome = ("error", str(e))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise ForgeError(outcome[1])
    return outcome[1] if share else result


def gather_hostnames() -> list[str]:
    """Collective: every rank must call it."""
    return gather_object(launch_env.node_name())
