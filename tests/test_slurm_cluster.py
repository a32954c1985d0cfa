"""The local two-node SLURM test cluster (slurm/test_cluster.sh): up, scheduling across both nodes, batch jobs, down.

Needs root and Debian's slurmctld/slurmd/slurm-client/munge packages; skipped otherwise. The cluster runs in its own
state dir (a pytest tmp dir), and the fixture always brings it down, stopping exactly the daemons `up` recorded.
"""

import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "test_cluster.sh"


def _run(cmd, env=None, timeout=60, check=True):
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def _recorded_pids(state: Path) -> dict[str, int]:
    pids = {}
    for line in (state / "pids").read_text().splitlines():
        name, pid = line.split()
        pids[name] = int(pid)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (not ours to reap if the daemon double-forked).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (it starts munged/slurmctld/slurmd and writes /etc/slurm)")
    missing = [b for b in ("sbatch", "srun", "sinfo", "slurmctld", "slurmd", "munged") if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if missing:
        pytest.skip(f"SLURM/munge binaries missing ({', '.join(missing)}): "
                    "apt-get install -y slurmctld slurmd slurm-client munge")
    state = tmp_path_factory.mktemp("slurm_state")
    env = dict(os.environ, FORGE_DS_SLURM_STATE=str(state))
    t0 = time.monotonic()
    try:
        up = _run(["bash", str(SCRIPT), "up"], env=env, timeout=120)
        print(f"test cluster up in {time.monotonic() - t0:.1f}s\n{up.stdout}")
        pids = _recorded_pids(state)
        yield {"state": state, "env": env, "pids": pids}
    finally:
        down = _run(["bash", str(SCRIPT), "down"], env=env, timeout=120, check=False)
        print(down.stdout, down.stderr)
    assert down.returncode == 0, f"down failed:\n{down.stdout}\n{down.stderr}"


def test_sinfo_two_idle_nodes(cluster):
    out = _run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split("\n")
    states = dict(line.split() for line in out if line.strip())
    assert states == {"n1": "idle", "n2": "idle"}


def test_srun_one_task_per_node(cluster):
    out = _run(["srun", "-N2", "-n2", "--time=1", "bash", "-c", 'echo "$SLURMD_NODENAME $SLURM_PROCID"'],
               timeout=60).stdout
    lines = sorted(line for line in out.splitlines() if line.strip())
    assert lines == ["n1 0", "n2 1"], out


def test_sbatch_job_runs_both_ranks(cluster, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --time=1
        srun bash -c 'echo "rank=$SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME"'
        """))
    out_file = tmp_path / "job.out"
    res = _run(["sbatch", "--wait", f"--output={out_file}", f"--chdir={tmp_path}", str(script)], timeout=60)
    assert "Submitted batch job" in res.stdout
    text = out_file.read_text()
    assert "rank=0 of 2 on n1" in text and "rank=1 of 2 on n2" in text, text


def test_down_stops_recorded_daemons(cluster):
    """Last test: `down` (run again by the fixture afterwards, as a no-op) stops every daemon `up` recorded."""
    pids = cluster["pids"]
    assert {"slurmctld", "slurmd-n1", "slurmd-n2"} <= set(pids), pids
    assert all(_alive(p) for p in pids.values()), pids
    _run(["bash", str(SCRIPT), "down"], env=cluster["env"], timeout=120)
    still = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert not still, f"still alive after down: {still}"
    assert _run(["bash", str(SCRIPT), "status"], env=cluster["env"], check=False).returncode != 0
