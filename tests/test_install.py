"""forge_ds installed as users install it: a wheel built from this checkout, installed without -e into a fresh venv,
and run from a directory outside the checkout (issue 16).

The venv sees the system's site packages (torch, DeepSpeed: nothing is downloaded) and so also this machine's
editable install of forge_ds; the wheel must shadow it, and every command here asserts it ran the wheel's copy.
PYTHONPATH (tests/ranks.base_env points it at the checkout) is dropped for the same reason.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, TINY, Result, base_env, free_port, user_error_line
from forge_ds import __version__

pytestmark = pytest.mark.multirank

SHIPPED_DS_CONFIGS = sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json"))
SLURM_TEMPLATES = {"srun": "train_shared.sbatch", "deepspeed": "train_shared_deepspeed.sbatch"}
# What a clean checkout would not hold (.gitignore), so the wheel is built from what `pip install git+...` sees.
NOT_IN_A_CLEAN_CHECKOUT = (".git", "build", "dist", "runs", "data", "__pycache__", "*.egg-info", ".pytest_cache")


@dataclass
class Installed:
    venv: Path
    wheel: Path
    outside: Path  # the working directory of every command: not the checkout, not the venv
    prepared: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def package_dir(self) -> Path:
        return venv_site_packages(self.venv) / "forge_ds"

    def run(self, cmd: list, timeout: float = 300) -> Result:
        started = time.time()
        p = subprocess.run([str(c) for c in cmd], cwd=self.outside, env=_outside_env(), capture_output=True,
                           text=True, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr, time.time() - started)

    def forge(self, *args, timeout: float = 300) -> Result:
        """The console script pip wrote into the venv."""
        return self.run([self.venv / "bin" / "forge-ds", *args], timeout)


def _outside_env() -> dict:
    env = base_env()
    env.pop("PYTHONPATH")  # base_env puts the checkout there; here the venv is the whole forge_ds under test
    return env


def _ok(result: Result) -> Result:
    assert result.returncode == 0, result.output[-4000:]
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    src, dist, venv, outside = base / "src", base / "dist", base / "venv", base / "elsewhere"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_IN_A_CLEAN_CHECKOUT))
    # No build isolation: setuptools is already here, and the test must not need the network.
    _ok_proc([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src])
    # No pip in the venv: the system's pip (a system site package) installs into the venv it runs in.
    _ok_proc([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    _see_this_venvs_packages(venv)
    (wheel,) = dist.glob("forge_ds-*.whl")
    # --ignore-installed: pip would otherwise take the system's editable forge_ds (same version) as installed.
    _ok_proc([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
              wheel])
    outside.mkdir()
    return Installed(venv, wheel, outside, base / "prepared")


def _see_this_venvs_packages(venv: Path) -> None:
    """Tests run inside a venv of their own (a developer's .venv) see torch there, but --system-site-packages means
    the base interpreter's: hand the new venv this one's site packages, after its own (the wheel still wins)."""
    if sys.prefix != sys.base_prefix:
        (venv_site_packages(venv) / "outer-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def venv_site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _ok_proc(cmd: list) -> None:
    p = subprocess.run([str(c) for c in cmd], env=_outside_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-4000:])


def _tiny(installed: Installed, *flags: str) -> list[str]:
    """cpu_demo on its embedded corpus (the wheel's copy), at TINY's shape."""
    return ["--config=cpu_demo", *TINY, f"--data.prepared_dir={installed.prepared}", *flags]


def test_wheel_carries_configs_presets_corpus_and_templates_but_no_tests(installed):
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        for name in SHIPPED_DS_CONFIGS:  # the one copy at the top level, byte for byte
            assert whl.read(f"forge_ds/ds_configs/{name}.json") == (ROOT / "ds_configs" / f"{name}.json").read_bytes()
        for template in SLURM_TEMPLATES.values():
            assert whl.read(f"forge_ds/slurm/{template}") == (ROOT / "slurm" / template).read_bytes()
        metadata = whl.read(f"forge_ds-{__version__}.dist-info/METADATA").decode()
        entry_points = whl.read(f"forge_ds-{__version__}.dist-info/entry_points.txt").decode()
    shipped = {f"forge_ds/{p.relative_to(ROOT / 'forge_ds')}" for p in (ROOT / "forge_ds").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert {f"forge_ds/ds_configs/{n}.json" for n in SHIPPED_DS_CONFIGS} <= names
    assert shipped <= names  # every module, preset and corpus file, and __main__.py
    assert {"forge_ds/presets/cpu_demo.yaml", "forge_ds/corpus/pydoc_topics-3.11.7.json.gz",
            "forge_ds/__main__.py"} <= shipped
    strays = [n for n in names if not n.startswith(("forge_ds/", f"forge_ds-{__version__}.dist-info/"))]
    assert strays == []  # no tests/, benchmarks/ (or their results), launchers/
    assert not [n for n in names if n.startswith("forge_ds/slurm/") and not n.endswith(".sbatch")]
    assert "Requires-Python: >=3.10" in metadata and "Description-Content-Type: text/markdown" in metadata
    assert "# forge_ds" in metadata  # the README is the long description
    assert "forge-ds = forge_ds.cli:main" in entry_points


def test_the_wheel_shadows_the_checkout_and_says_where_it_runs_from(installed):
    where = _ok(installed.run([installed.python, "-c", "import forge_ds; print(forge_ds.__file__)"])).stdout.strip()
    assert Path(where) == installed.package_dir / "__init__.py"
    expected = f"forge_ds {__version__} from {installed.package_dir}"
    assert _ok(installed.forge("--version")).stdout.strip() == expected
    assert _ok(installed.run([installed.python, "-m", "forge_ds", "--version"])).stdout.strip() == expected


@pytest.mark.parametrize("ds_name", SHIPPED_DS_CONFIGS)
def test_check_passes_with_every_shipped_deepspeed_config(installed, ds_name):
    stage = json.loads((ROOT / "ds_configs" / f"{ds_name}.json").read_text())["zero_optimization"]["stage"]
    result = _ok(installed.forge("check", *_tiny(installed, f"--deepspeed_config={ds_name}",
                                                 f"--output_dir={installed.outside / 'checked'}")))
    assert f"check passed: device cpu, precision fp32, ZeRO-{stage}, world size 1" in result.stdout
    assert "data: builtin:pydoc" in result.stdout  # the corpus came with the wheel


def test_console_script_trains_and_exports_from_any_directory(installed):
    run_dir = installed.outside / "one"
    trained = _ok(installed.forge("train", *_tiny(installed, "--training.max_steps=2", f"--output_dir={run_dir}")))
    assert f"deepspeed config {installed.package_dir / 'ds_configs' / 'zero2.json'}" in trained.stdout  # the default
    verified = _ok(installed.forge("verify", run_dir / "shared_components.pt"))
    assert verified.stdout.startswith("OK ")
    assert f"forge_ds {__version__} from {installed.package_dir} (rank 0)\n" in (run_dir / "env.txt").read_text()


def test_two_ranks_through_the_documented_launch_command(installed):
    """`deepspeed --num_gpus 2 --module forge_ds train ...` (the README's wheel command), with the venv's python:
    the launcher starts `python -m forge_ds --local_rank=N train ...` on each rank."""
    run_dir = installed.outside / "two"
    result = _ok(installed.run([installed.python, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                                "--master_port", free_port(), "--module", "forge_ds", "train",
                                *_tiny(installed, "--training.max_steps=2", f"--output_dir={run_dir}")]))
    # The launcher's log of each rank's command: the venv's python, the --local_rank before the command.
    assert f"['{installed.python}', '-u', '-m', 'forge_ds', '--local_rank=1', 'train', " in result.output
    assert (run_dir / "shared_components.pt").is_file()
    env_txt = (run_dir / "env.txt").read_text()
    # Each rank reported its own forge_ds (gathered): both ran the wheel's copy.
    assert f"forge_ds {__version__} from {installed.package_dir} (ranks 0-1)\n" in env_txt, env_txt
    assert "world_size 2\n" in env_txt and "launcher deepspeed/torchrun\n" in env_txt


def test_bench_from_a_wheel_says_it_needs_a_checkout(installed):
    line = user_error_line(installed.forge("bench", "--steps=1"))
    assert "forge-ds bench needs a source checkout" in line and str(installed.package_dir) in line


@pytest.mark.parametrize("launcher", sorted(SLURM_TEMPLATES))
def test_slurm_templates_come_with_the_wheel_and_launch_without_a_checkout(installed, launcher):
    printed = _ok(installed.forge("slurm-template", f"--launcher={launcher}")).stdout
    assert printed == (ROOT / "slurm" / SLURM_TEMPLATES[launcher]).read_text()
    launch = "--module forge_ds train" if launcher == "deepspeed" else '"$PYTHON" -m forge_ds train'
    assert launch in printed and "launchers/" not in printed
    assert subprocess.run(["bash", "-n"], input=printed, text=True).returncode == 0
