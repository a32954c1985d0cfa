"""Packaging that needs code: the metadata lives in pyproject.toml.

The DeepSpeed configs and SLURM templates have one copy each, at the repository root (ds_configs/, slurm/), where
users read and copy them. package_dir maps those folders into the package, so a wheel, `pip install .` and
`pip install git+...` all carry them as forge_ds/ds_configs/ and forge_ds/slurm/ (forge_ds/package.py finds them
in either place). Tests, benchmarks and launchers/ stay out of the wheel: they need a checkout anyway.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["forge_ds", "forge_ds.*"]), "forge_ds.ds_configs", "forge_ds.slurm"],
    package_dir={"forge_ds.ds_configs": "ds_configs", "forge_ds.slurm": "slurm"},
    # slurm/: the job templates only; test_cluster.sh and the README describe a checkout's test cluster.
    package_data={"forge_ds": ["presets/*.yaml", "corpus/*"], "forge_ds.ds_configs": ["*.json"],
                  "forge_ds.slurm": ["*.sbatch"]},
    include_package_data=False,  # only the lists above: with pyproject.toml it would default to True
)
