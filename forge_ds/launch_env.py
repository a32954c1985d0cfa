"""The launcher environment: who this process is, what it runs on, and every environment variable forge_ds reads.

The only module that reads environment variables (tests' fault points and timeouts too). One command works under
`deepspeed`, `torchrun`, `srun` and alone: we map whichever launcher's variables exist onto
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* before DeepSpeed looks (alone, DeepSpeed would otherwise go looking for MPI).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from forge_ds.errors import ForgeError


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


def training_timeout_s() -> float:
    """How long a collective may wait once steps run. FORGE_DS_TRAINING_TIMEOUT_S exists so tests can prove a dead
    peer is noticed without waiting 45 s; users need not touch it."""
    return float(os.environ.get("FORGE_DS_TRAINING_TIMEOUT_S", "45"))


def max_self_requeues() -> int:
    return int(os.environ.get("FORGE_DS_MAX_REQUEUES", "3"))


def fault_spec() -> str:
    """The test-only fault DSL's text (faults.py parses it)."""
    return os.environ.get("FORGE_DS_FAULT", "")


def node_name() -> str:
    """This host, and the SLURM node when several slurmd share one host (the test cluster): says which node."""
    name = socket.gethostname()
    node = os.environ.get("SLURMD_NODENAME")
    return f"{name}({node})" if node and node != name.split(".")[0] else name


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def set_cuda_arch_list() -> None:
    """Before DeepSpeed JIT-builds an op on a GPU (see deepspeed_safe_arch_list)."""
    os.environ.update(deepspeed_safe_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST")))


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
