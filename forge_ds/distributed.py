"""Everything about ranks, processes and the environment. The only module that reads environment variables.

One command works under `deepspeed`, `torchrun`, `srun` and alone: we map whichever launcher's variables exist
onto RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* before DeepSpeed looks (alone, DeepSpeed would otherwise go looking
for MPI). Preemption signals, SLURM requeue and the test-only fault points live here too.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from forge_ds.errors import ForgeError

# A collective may legitimately wait this long before training starts (rank 0 tokenizing a corpus, or
# consolidating an export while the others wait); once steps run, a missing peer means it died.
# FORGE_DS_TRAINING_TIMEOUT_S exists so tests can prove both without waiting 45 s; users need not touch it.
SETUP_TIMEOUT = dt.timedelta(minutes=60)
TRAINING_TIMEOUT = dt.timedelta(seconds=float(os.environ.get("FORGE_DS_TRAINING_TIMEOUT_S", "45")))


@dataclass(frozen=True)
class Env:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "deepspeed/torchrun" | "slurm" | "none"
    slurm_job_id: Optional[str]
    slurm_restart_count: int
    hostname: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(cli_local_rank: Optional[int] = None) -> Env:
    """Work out who we are; fill the torch.distributed env:// variables where a launcher left them out."""
    e = os.environ
    slurm_job = e.get("SLURM_JOB_ID")
    restarts = int(e.get("SLURM_RESTART_COUNT", "0") or 0)
    if "RANK" in e and "WORLD_SIZE" in e:
        launcher = "deepspeed/torchrun"
    elif "SLURM_PROCID" in e and "SLURM_STEP_ID" in e and "SLURM_NTASKS" in e:
        # Inside an srun step (the batch shell itself has no SLURM_STEP_ID): one task per rank.
        launcher = "slurm"
        e["RANK"], e["WORLD_SIZE"] = e["SLURM_PROCID"], e["SLURM_NTASKS"]
        e["LOCAL_RANK"] = e.get("SLURM_LOCALID", "0")
        e.setdefault("MASTER_ADDR", "127.0.0.1")
        e.setdefault("MASTER_PORT", str(20000 + int(slurm_job or 0) % 20000))
    else:
        launcher = "none"
        e["RANK"], e["WORLD_SIZE"] = "0", "1"
        e["LOCAL_RANK"] = str(cli_local_rank or 0)
        e.setdefault("MASTER_ADDR", "127.0.0.1")
        e.setdefault("MASTER_PORT", str(_free_port()))
    if "LOCAL_RANK" not in e:  # the deepspeed launcher may pass --local_rank only; the environment wins if both
        e["LOCAL_RANK"] = str(cli_local_rank or 0)
    return Env(rank=int(e["RANK"]), local_rank=int(e["LOCAL_RANK"]), world_size=int(e["WORLD_SIZE"]),
               launcher=launcher, slurm_job_id=slurm_job, slurm_restart_count=restarts,
               hostname=socket.gethostname())


def rank_hint() -> tuple[int, int]:
    """(rank, local rank) from the environment without initialising anything; for error printing."""
    e = os.environ
    in_step = "SLURM_STEP_ID" in e
    rank = e.get("RANK") or (e.get("SLURM_PROCID") if in_step else None) or "0"
    local = e.get("LOCAL_RANK") or (e.get("SLURM_LOCALID") if in_step else None) or "0"
    return int(rank), int(local)


def user_error_speaker() -> Optional[str]:
    """Who prints a user error, and how it is named: "" for rank 0, "rank N on HOST: " for the first rank of each
    other node, None (quiet) for the rest. Under a launcher every rank hits the same bad input and rank 0 says it
    once; the other nodes speak too so that what only one node sees (a path missing there) is never silent."""
    rank, local_rank = rank_hint()
    if rank == 0:
        return ""
    return f"rank {rank} on {socket.gethostname()}: " if local_rank == 0 else None


_process_group_started = False  # set by init(); see end_process


def init(device: str) -> None:
    """Start the process group (gloo on CPU, nccl on GPU) with the long set-up timeout."""
    import deepspeed

    global _process_group_started
    if torch_dist.is_initialized():
        return
    _process_group_started = True
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        os.environ.update(deepspeed_safe_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST")))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=SETUP_TIMEOUT, verbose=False)


def deepspeed_safe_arch_list(arch_list: Optional[str]) -> dict[str, str]:
    """TORCH_CUDA_ARCH_LIST without arch-specific suffixes ("9.0a" -> "9.0"), as an env update (empty if none).

    DeepSpeed 0.19.8 parses each entry as numbers when it JIT-builds an op (FusedAdam on the first GPU run) and
    dies on "9.0a", which CUDA images for Hopper/Blackwell set; the plain architecture builds the same op."""
    if not arch_list:
        return {}
    entries = [e for e in arch_list.replace(";", " ").split() if e]
    cleaned = [re.sub(r"^(\d+\.\d+)[af]", r"\1", e) for e in entries]
    if cleaned == entries:
        return {}
    return {"TORCH_CUDA_ARCH_LIST": ";".join(dict.fromkeys(cleaned))}


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
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
    return t.cpu().tolist()


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


# --- preemption ---------------------------------------------------------------------------------------------------

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


def max_self_requeues() -> int:
    return int(os.environ.get("FORGE_DS_MAX_REQUEUES", "3"))


def requeue_slurm_job(env: Env) -> bool:
    """Ask SLURM to requeue this job (call after every rank finished its checkpoint: requeue kills the step)."""
    if env.slurm_job_id is None or env.slurm_restart_count >= max_self_requeues():
        return False
    result = subprocess.run(["scontrol", "requeue", env.slurm_job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"forge-ds: warning: scontrol requeue failed: {result.stderr.strip()}", file=sys.stderr)
        return False
    return True


# --- test-only fault points ---------------------------------------------------------------------------------------

def fault_point(name: str, step: Optional[int] = None) -> None:
    """FORGE_DS_FAULT=<name>[@<step>]:<action>[:<rank>][,...] makes a real process misbehave at a chosen moment,
    for tests: action `kill` SIGKILLs this process, `raise` raises RuntimeError, `sleep<N>` pauses N seconds,
    `fsize<N>` caps the size of any file this process writes from now on at N bytes (a bigger write fails with
    EFBIG, as on a full disk). `@<step>` fires only where the caller passes that step."""
    spec = os.environ.get("FORGE_DS_FAULT", "")
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        point, _, at = parts[0].partition("@")
        if point != name or len(parts) < 2 or (at and int(at) != step) or (len(parts) > 2 and int(parts[2]) != rank()):
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


def fault_value(name: str) -> Optional[str]:
    """A test-only override value (e.g. a step at which to inject a NaN)."""
    for item in filter(None, os.environ.get("FORGE_DS_FAULT", "").split(",")):
        key, _, value = item.partition("=")
        if key == name:
            return value
    return None


def environment_report(env: Env, hosts: list[str], sources: list[str]) -> str:
    """env.txt: package versions, git revision, hosts (from gather_hostnames, a collective), world size. `sources`:
    every rank's package.source() (a collective too), as the installed metadata may name another forge_ds."""
    import importlib.metadata as md

    from forge_ds import package

    lines = [f"python {sys.version.split()[0]}"]
    for pkg in ("torch", "deepspeed", "datasets", "tokenizers", "tensorboard", "fire"):
        try:
            lines.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            lines.append(f"{pkg} not installed")
    lines += package.sources_report(sources)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    lines.append(f"git {rev or 'unknown'}")
    lines += [f"world_size {env.world_size}", f"launcher {env.launcher}", f"hosts {' '.join(hosts)}"]
    if env.slurm_job_id:
        lines.append(f"slurm_job_id {env.slurm_job_id} restart_count {env.slurm_restart_count}")
    return "\n".join(lines) + "\n"


def gather_hostnames() -> list[str]:
    """Collective: every rank must call it."""
    name = socket.gethostname()
    node = os.environ.get("SLURMD_NODENAME")
    if node and node != name.split(".")[0]:  # several slurmd on one host (the test cluster): say which node
        name = f"{name}({node})"
    return gather_object(name)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pick_device(want: str, setting: str, flag: str) -> str:
    """The device for `want` (auto: cuda when a GPU is visible, else cpu); cuda without a GPU is the user's error.
    `setting` and `flag` name the option in that message: training.device for train, --device for evaluate."""
    if want == "cuda" and not cuda_available():
        raise ForgeError(f"{setting}=cuda but no CUDA GPU is visible; use {flag}=cpu or auto")
    return "cuda" if want == "cuda" or (want == "auto" and cuda_available()) else "cpu"


def bf16_supported(device: str) -> bool:
    return device == "cuda" and torch.cuda.is_bf16_supported()


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
