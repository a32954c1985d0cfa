"""The run-directory lock (forge_ds/runlock.py), with real processes holding it, dying and forking.

The holders are small Python processes that import only forge_ds.runlock (milliseconds to start); the last test
is the promise itself, with real `forge-ds` processes: two `train` runs cannot share a directory, `check` says so,
`export` and `evaluate` read a locked run, and a SIGKILLed run's lock never blocks its resume.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ERROR, ROOT, TINY, base_env, user_error_line
from warm_cli import WarmCli
from forge_ds import runlock
from forge_ds.errors import ForgeError

# Takes the lock on argv[1]; with "fork", forks a child that outlives it (what a data-loader worker does) and
# prints the child's PID; then prints "held" and waits to be killed.
HOLDER = """
import os, sys, time
from forge_ds import runlock
runlock.hold(sys.argv[1])
if sys.argv[2:] == ["fork"]:
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # fork's after-child hooks have run by now: say so, then outlive the parent
        os.write(ready_w, b"x")
        time.sleep(120)
        os._exit(0)
    os.read(ready_r, 1)
    print(child, flush=True)
print("held", flush=True)
time.sleep(120)
"""


def start_holder(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), *extra], cwd=ROOT, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while not lines or lines[-1] != "held":
        line = proc.stdout.readline()
        assert line, f"holder exited {proc.wait()}: {proc.stderr.read()}"
        lines.append(line.strip())
    return proc, lines


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def release_after():
    yield
    runlock.release_unused()  # locks this test process took itself


def test_a_second_holder_fails_at_once_naming_pid_and_host(tmp_path):
    run = tmp_path / "run"
    proc, _ = start_holder(run)
    try:
        started = time.monotonic()
        with pytest.raises(ForgeError) as info:
            runlock.hold(run)
        waited = time.monotonic() - started
        message = str(info.value)
        assert f"in use by another forge-ds run (PID {proc.pid} on {socket.gethostname()}, since " in message
        assert message.startswith(str(run)) and "--output_dir" in message and "\n" not in message
        assert waited < 5, waited  # fails, does not queue behind the holder
        assert runlock.holder(run).startswith(f"PID {proc.pid} on {socket.gethostname()}")
        with pytest.raises(ForgeError) as checked:
            runlock.refuse_if_locked(run)
        assert str(checked.value) == message  # `check` says what `train` would
    finally:
        kill(proc)


def test_a_sigkilled_holder_never_blocks_the_next_run(tmp_path):
    run = tmp_path / "run"
    proc, _ = start_holder(run)
    kill(proc)  # SIGKILL: no handler, no cleanup; the lock file stays behind with its PID in it
    assert str(proc.pid) in (run / runlock.LOCK_NAME).read_text()
    assert runlock.holder(run) is None
    assert runlock.hold(run) == run / runlock.LOCK_NAME
    assert f'"pid": {os.getpid()}' in (run / runlock.LOCK_NAME).read_text()
    assert runlock.hold(run) == run / runlock.LOCK_NAME  # again in the same process: it holds it already
    second = subprocess.run([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, env=base_env(),
                            capture_output=True, text=True, timeout=60)  # this process's lock is a real one
    assert second.returncode == 1 and f"in use by another forge-ds run (PID {os.getpid()} on" in second.stderr


def test_a_forked_child_does_not_keep_a_dead_runs_lock(tmp_path):
    run = tmp_path / "run"
    proc, lines = start_holder(run, "fork")
    child = int(lines[0])
    try:
        kill(proc)
        os.kill(child, 0)  # the child still lives, with its copy of every descriptor but the lock's
        assert runlock.holder(run) is None
        runlock.hold(run)
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_probe_never_holds_the_lock(tmp_path):
    run = tmp_path / "run"
    assert runlock.holder(run) is None and not run.exists()  # and creates nothing
    proc, _ = start_holder(run)
    kill(proc)
    for _ in range(20):
        assert runlock.holder(run) is None
    proc, _ = start_holder(run)  # would fail if a probe had left a lock behind
    kill(proc)


def test_a_failed_run_leaves_no_directory_it_created(tmp_path):
    made, given = tmp_path / "made" / "run", tmp_path / "given"
    given.mkdir()
    (given / "notes.txt").write_text("the user's")
    runlock.hold(made)
    runlock.hold(given)
    assert (made / runlock.LOCK_NAME).is_file() and (given / runlock.LOCK_NAME).is_file()
    runlock.release_unused()
    assert not made.exists() and (tmp_path / "made").is_dir()
    assert sorted(p.name for p in given.iterdir()) == ["notes.txt", runlock.LOCK_NAME]
    assert runlock.holder(given) is None


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ForgeError) as info:
        runlock.hold(tmp_path / "file" / "run")
    assert str(info.value).startswith(f"{tmp_path / 'file' / 'run'}: cannot create the run directory")


def test_a_filesystem_that_refuses_locks_warns_in_one_line_and_goes_on(tmp_path, monkeypatch, capfd):
    # No filesystem here refuses flock (NFS without lockd and some Lustre mounts do): the refusal is simulated
    # with the errno those give.
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    assert runlock.hold(tmp_path / "run") is None
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("forge-ds: warning: ") and "ENOLCK" in err, err
    assert ERROR not in err
    assert runlock.holder(tmp_path / "run") is None


def test_two_trains_into_one_directory_the_second_fails_the_first_is_intact_and_resumes_after_sigkill(
        tmp_path, repetitive_corpus, prepared_root):
    run, out = tmp_path / "run", tmp_path / "first.txt"
    flags = [*TINY, f"--data.source={repetitive_corpus}", f"--data.prepared_dir={prepared_root / 'lock-tiny'}",
             "--training.max_steps=6", "--training.checkpoint_every=2", "--training.eval_every=1000",
             f"--output_dir={run}"]
    cli = WarmCli(base_env())  # warms up while the first run starts
    # The first run pauses in step 4 (steps 1-3 logged, its step-2 checkpoint complete), holding the directory.
    first = subprocess.Popen([sys.executable, "-m", "forge_ds.cli", "train", *flags], cwd=tmp_path,
                             env=base_env({"FORGE_DS_FAULT": "train_step@4:sleep120"}), stdout=open(out, "w"),
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while "step 3/6" not in out.read_text():
            assert first.poll() is None and time.time() < deadline, out.read_text()[-3000:]
            time.sleep(0.2)
        before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "run.lock"}

        second = cli.run(["train", *flags, "--training.learning_rate=1e-3", "--overwrite"], cwd=tmp_path)
        line = user_error_line(second)
        assert f"{run} is in use by another forge-ds run (PID {first.pid} on {socket.gethostname()}, since" in line
        assert second.wall_s < 15 and "forge-ds train:" not in second.stdout  # refused before any work
        assert user_error_line(cli.run(["check", *flags, "--overwrite"], cwd=tmp_path)) == line
        exported = cli.run(["export", str(run), f"--out={tmp_path / 'export'}"], cwd=tmp_path)
        assert exported.returncode == 0, exported.output[-3000:]  # export reads a locked run, never takes it
        evaluated = cli.run(["evaluate", str(run), "--max_batches=1"], cwd=tmp_path)
        assert evaluated.returncode == 0 and "step-00000002" in evaluated.output, evaluated.output[-3000:]
        assert {p: p.read_bytes() for p in before} == before  # nothing of the first run was touched
        assert "learning_rate: 0.003" in (run / "config.yaml").read_text()

        first.kill()  # SIGKILL mid-run: the lock file stays behind, the lock does not
        first.wait()
        assert str(first.pid) in (run / runlock.LOCK_NAME).read_text()
        resumed = cli.run(["train", *flags, "--resume"], cwd=tmp_path, timeout=300)
        assert resumed.returncode == 0, resumed.output[-3000:]
        assert "resumed from step-00000002" in resumed.stdout and (run / "shared_components.pt").is_file()
    finally:
        if first.poll() is None:
            kill(first)
        cli.close()
