from setuptools import find_packages, setup

# torch is pinned only from below: a GPU user installs their CUDA build first; on CPU the README installs the
# CPU wheel explicitly so pip never pulls a multi-GB CUDA build to satisfy this line.
setup(
    name="forge_ds",
    version="0.1.0",
    description="DeepSpeed harness for ModularForge Phase 1: train the shared components at cluster scale",
    packages=find_packages(include=["forge_ds", "forge_ds.*"]),
    package_data={"forge_ds": ["presets/*.yaml", "ds_configs/*.json", "corpus/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "deepspeed>=0.19.8,<0.20",
        "datasets>=3.0",
        "tokenizers>=0.19",
        "tensorboard>=2.15",
        "fire>=0.6",
        "pydantic>=2.5",
        "pyyaml>=6.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "psutil>=5.9",
    ],
    extras_require={"test": ["pytest>=8.0"]},
    entry_points={"console_scripts": ["forge-ds=forge_ds.cli:main"]},
)
