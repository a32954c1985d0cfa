"""The start-up check that every rank sees rank 0's run and prepared-data directories (issue 19)."""

from __future__ import annotations

import subprocess
import sys

from conftest import base_env, free_port

# Each rank passes its own view of the folders, as a node with another working directory or mount would.
RANK_SCRIPT = """
import sys
from pathlib import Path
from forge_ds import distributed, launch_env, shared_dirs
from forge_ds.errors import ForgeError
env = launch_env.detect()
distributed.init("cpu")
root = Path(sys.argv[1])
shared_dirs.check_same_dirs(run=root / "run", prepared_data=root / "prepared")
print("shared: passed", flush=True)
try:
    shared_dirs.check_same_dirs(run=root / "run", prepared_data=root / f"prepared-seen-by-{env.rank}")
    print("private: passed", flush=True)
except ForgeError as exc:
    print(f"private: {exc}", flush=True)
distributed.end_process(0)
"""


def test_a_rank_that_does_not_see_rank_0s_folder_fails_on_every_rank_naming_it(tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=base_env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}))
             for r in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for out, err in outputs:
        assert "shared: passed" in out, err[-2000:]
        assert "private: rank 1 (host " in out and "does not see the prepared_data directory that rank 0 wrote into " \
               f"'{tmp_path / 'prepared-seen-by-0'}': it looks in '{tmp_path / 'prepared-seen-by-1'}'" in out, out + err
    assert not list(tmp_path.rglob(".forge-ds-shared-check-*"))  # rank 0 removes its markers
