"""`forge-ds slurm-template`: print a SLURM job script, so an installed forge_ds needs no checkout on a cluster.

The templates are the repository's slurm/*.sbatch (shipped in the package as forge_ds/slurm/, see setup.py); they
start the ranks with `python -m forge_ds`, which any environment with forge_ds installed can run.
"""

from __future__ import annotations

from forge_ds.errors import ForgeError
from forge_ds.package import shipped_dir

TEMPLATES = {"srun": "train_shared.sbatch", "deepspeed": "train_shared_deepspeed.sbatch"}


def slurm_template(launcher: str = "srun") -> None:
    """Print a SLURM job script: `forge-ds slurm-template > train.sbatch`, edit its #SBATCH lines, then
    `sbatch train.sbatch`. --launcher=srun (default: one srun task per rank, preemption-safe) or deepspeed
    (DeepSpeed's launcher over ssh)."""
    if launcher not in TEMPLATES:
        raise ForgeError(f"forge-ds slurm-template: unknown --launcher={launcher!r}; "
                         f"use one of: {', '.join(TEMPLATES)}")
    print(read_template(launcher), end="")


def read_template(launcher: str) -> str:
    path = shipped_dir("slurm") / TEMPLATES[launcher]
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ForgeError(f"{path}: cannot read the SLURM template ({e.strerror}); reinstall forge_ds") from None
