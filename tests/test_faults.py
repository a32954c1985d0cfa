"""Faults, with real processes: a NaN, a dead or silent rank, a full disk, Ctrl-C / SIGTERM.

Faults are injected with FORGE_DS_FAULT (read only by forge_ds/launch_env.py, parsed by forge_ds/faults.py): `nan_at_step=K` multiplies step K's
loss by NaN; `<point>[@<step>]:<action>[:<rank>]` makes rank <rank> `kill` itself (SIGKILL), `raise`, `sleep<N>` or
cap its file size (`fsize<N>`, writes beyond fail with EFBIG as on a full disk) at a named point of the code.
FORGE_DS_TRAINING_TIMEOUT_S shortens the collective timeout that applies once steps run (45 s otherwise).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ERROR, TINY, base_env, forge, train_losses
from ranks import spawn_ranks

from forge_ds.files import sha256_file

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def prepared(prepared_root) -> Path:
    return prepared_root / "faults-tiny"  # one corpus and vocabulary for every run here: tokenised once


def args(run_dir: Path, corpus: Path, prepared: Path, steps: int, every: int, *extra: str) -> list[str]:
    return ["train", *TINY, f"--training.max_steps={steps}", f"--training.checkpoint_every={every}",
            "--training.eval_every=1000", f"--data.source={corpus}", f"--data.prepared_dir={prepared}",
            f"--output_dir={run_dir}", *extra]


def complete(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.parent.name for p in root.glob("step-*/COMPLETE"))


def manifest_holds(ckpt: Path) -> bool:
    """Every file the checkpoint's manifest lists is there with its size and sha256 (nothing torn, nothing lost)."""
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    return bool(files) and all((ckpt / name).is_file() and (ckpt / name).stat().st_size == want["bytes"]
                               and sha256_file(ckpt / name) == want["sha256"]
                               for name, want in files.items())


# ------------------------------------------------------------------------------------------------ one process

def start(cmd_args: list[str], out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forge_ds.cli", *cmd_args], env=base_env(env),
                            stdout=open(out, "w"), stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, out: Path, text: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while text not in out.read_text(errors="replace"):
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{out.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {text!r} after {timeout} s"
        time.sleep(0.1)


class Life:
    """One run's life on one process, each stage a new invocation on the same run directory (a process start costs
    10-20 s here, so each one also proves the previous stage resumable):
    nan      fresh, checkpoints every 2 steps, step 6's loss made NaN  -> exit 3
    sigterm  --resume (from step 4), SIGTERM once step 6 is logged     -> exit 143, checkpoint at its step
    sigint   --resume, Ctrl-C (SIGINT) two steps later                 -> exit 130, checkpoint at its step
    finish   --resume to the end                                        -> exit 0, export written
    The signal stages checkpoint only when stopped (checkpoint_every may change on resume) and slow each step by
    0.4 s, so the signal lands mid-run."""

    STEPS = 14

    def __init__(self, run: Path, corpus: Path, prepared: Path):
        self.run, self.corpus, self.prepared, self.done = run, corpus, prepared, {}

    def args(self, every: int, *extra: str) -> list[str]:
        return args(self.run, self.corpus, self.prepared, self.STEPS, every, *extra)

    def stage(self, name: str):
        order = ["nan", "sigterm", "sigint", "finish"]
        for earlier in order[:order.index(name) + 1]:
            if earlier not in self.done:
                self.done[earlier] = getattr(self, f"_{earlier}")()
        return self.done[name]

    def _nan(self):
        return forge(self.args(2), env={"FORGE_DS_FAULT": "nan_at_step=6"})

    def _stopped(self, sig: signal.Signals, after: int):
        out = self.run.parent / f"{sig.name}.txt"
        proc = start(self.args(1000, "--resume"), out, {"FORGE_DS_FAULT": "after_step:sleep0.4"})
        try:
            wait_for(proc, out, f"step {after}/{self.STEPS}")
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = out.read_text()
        stopped = int(text.split(f"stopped by {sig.name} at step ")[1].split(";")[0]) if "stopped by" in text else None
        return proc.returncode, text, stopped

    def _sigterm(self):
        return self._stopped(signal.SIGTERM, 6)

    def _sigint(self):
        return self._stopped(signal.SIGINT, self.stage("sigterm")[2] + 2)

    def _finish(self):
        return forge(self.args(1000, "--resume"))


@pytest.fixture(scope="module")
def life(tmp_path_factory, repetitive_corpus, prepared) -> Life:
    return Life(tmp_path_factory.mktemp("life") / "run", repetitive_corpus, prepared)


def test_nan_loss_stops_at_that_step_with_exit_3_keeping_the_last_good_checkpoint(life):
    r, run = life.stage("nan"), life.run
    assert r.returncode == 3, r.output[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{ERROR} rank 0: non-finite loss at step 6;") and "step-00000004 is kept" in line
    assert complete(run) == ["step-00000002", "step-00000004"]
    assert not (run / "checkpoints" / "step-00000006").exists()  # step 6 is a checkpoint step: nothing saved
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"
    assert max(train_losses(run)) == 5  # the NaN step was never logged as a result
    assert manifest_holds(run / "checkpoints" / "step-00000004")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_current_step_and_exits_128_plus_signum(life, sig):
    code, text, stopped = life.stage(sig.name.lower())
    assert code == 128 + sig, text[-3000:]
    resumed_from = 4 if sig == signal.SIGTERM else life.stage("sigterm")[2]
    assert f"from step {resumed_from} (resumed from step-{resumed_from:08d})" in text  # the previous stage resumed
    assert stopped is not None and resumed_from + 2 <= stopped < life.STEPS
    ckpt = life.run / "checkpoints" / f"step-{stopped:08d}"
    assert (ckpt / "COMPLETE").is_file() and manifest_holds(ckpt)
    assert (life.run / "checkpoints" / "latest").read_text() == ckpt.name
    assert f"resume with --resume --output_dir={life.run}" in text


def test_after_nan_and_signals_resume_finishes_the_schedule(life):
    r, stopped = life.stage("finish"), life.stage("sigint")[2]
    assert r.returncode == 0, r.output[-3000:]
    assert f"from step {stopped} (resumed from step-{stopped:08d})" in r.stdout
    after = train_losses(life.run)
    assert sorted(after) == list(range(1, life.STEPS + 1)) and all(math.isfinite(v) for v in after.values())
    assert (life.run / "shared_components.pt").is_file()


# ------------------------------------------------------------------------------------------------ disk full

def test_a_full_disk_on_one_rank_while_saving_ends_every_rank_with_one_line_and_the_previous_checkpoint_survives(
        tmp_path, repetitive_corpus, prepared):
    """Saving is collective: rank 1 alone cannot write its ZeRO shard (~160 KB) once its files are capped at 64 KiB
    from step 3 on. Both ranks must agree, exit 2 within seconds (no hang in DeepSpeed's barriers), rank 0 naming
    rank 1's failure, and leave the step-2 checkpoint and `latest` as they were."""
    run = tmp_path / "run"
    results = spawn_ranks(args(run, repetitive_corpus, prepared, 6, 2), 2, tmp_path,
                          {"FORGE_DS_FAULT": "train_step@3:fsize65536:1"}, timeout=240)
    assert [r.returncode for r in results] == [2, 2], results[0].output[-3000:] + results[1].output[-3000:]
    line = results[0].stderr.strip().splitlines()[-1]
    assert line.startswith(f"{ERROR} could not write checkpoint step-00000004 in {run / 'checkpoints'} (rank 1:"), line
    assert "previous checkpoint step-00000002 is intact" in line
    assert ERROR not in results[1].stderr and not any("Traceback" in r.stderr for r in results)
    assert abs(results[0].ended_s - results[1].ended_s) < 30
    assert complete(run) == ["step-00000002"]
    assert not (run / "checkpoints" / "step-00000004").exists()  # the partial save is removed, its space freed
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002"
    assert manifest_holds(run / "checkpoints" / "step-00000002")


# ------------------------------------------------------------------------------------------------ ranks

def peers_outlived(results) -> float:
    return results[0].ended_s - results[1].ended_s


@pytest.mark.parametrize("action", ["kill", "raise"])
def test_when_one_rank_dies_mid_step_the_other_exits_non_zero_within_60_s(action, tmp_path, repetitive_corpus,
                                                                         prepared):
    """Default timeouts: gloo sees the dead peer's sockets close and fails the pending collective at once."""
    results = spawn_ranks(args(tmp_path / "run", repetitive_corpus, prepared, 8, 1000),
                          2, tmp_path, {"FORGE_DS_FAULT": f"train_step@3:{action}:1"}, timeout=240)
    rank0, rank1 = results
    assert rank1.returncode == (-signal.SIGKILL if action == "kill" else 1), rank1.output[-3000:]
    if action == "raise":
        assert "fault point train_step: injected failure" in rank1.stderr
    assert rank0.returncode not in (0, -signal.SIGKILL), rank0.output[-3000:]  # it ended itself, with an error
    assert "step 2/8" in rank0.stdout and "step 3/8" not in rank0.stdout
    print(f"\n[faults] rank 1 {action} at step 3: rank 0 exited {rank0.returncode} {peers_outlived(results):.1f} s "
          "later")
    assert peers_outlived(results) < 60


def test_long_waits_on_rank_0_pass_a_short_step_timeout_but_a_silent_rank_trips_it(tmp_path, repetitive_corpus,
                                                                                   prepared):
    """Under a 5 s step timeout: rank 0 alone prepares the data (8 s) and writes our checkpoint files (8 s) while
    rank 1 waits; those waits run under the long set-up timeout and pass. Then rank 1 hangs in step 3 (alive, its
    sockets open: nothing to notice but silence) and rank 0 gives up after 5 s; the other rank is then killed, as
    a launcher does when one rank exits non-zero."""
    run = tmp_path / "run"

    def kill_the_rest(rank, code, procs):
        for p in procs:
            if p.poll() is None:
                p.kill()

    faults = "prepare_data:sleep8:0,save_after_shards@2:sleep8:0,train_step@3:sleep600:1"
    results = spawn_ranks(args(run, repetitive_corpus, prepared, 8, 2), 2, tmp_path,
                          {"FORGE_DS_TRAINING_TIMEOUT_S": "5", "FORGE_DS_FAULT": faults}, timeout=240,
                          on_exit=kill_the_rest)
    rank0 = results[0]
    assert "step 2/8" in rank0.stdout and complete(run) == ["step-00000002"], rank0.output[-3000:]
    assert "step 3/8" not in rank0.stdout
    assert rank0.returncode not in (0, -signal.SIGKILL), rank0.output[-3000:]  # it ended itself, with an error
    assert "Timed out" in rank0.stderr and "5000ms" in rank0.stderr  # the step timeout, not torch's 30 minutes


def test_the_first_stop_signal_is_the_reason_a_later_one_does_not_replace_it(monkeypatch):
    """Under SLURM the step is cancelled with SIGTERM right after the requeue that SIGUSR1 asked for; the run must
    still report SIGUSR1 (and exit 128+10 outside SLURM, where a second signal may also land)."""
    from forge_ds import preemption

    monkeypatch.setattr(preemption, "_stop_signal", None)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        preemption.install_stop_handlers()
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)
        assert preemption.stop_signal_name() == "SIGUSR1" and preemption.stop_signal_number() == signal.SIGUSR1
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
