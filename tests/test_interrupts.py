"""Ctrl-C is honoured in every phase, with real processes and real signals.

During training the first Ctrl-C finishes the step and checkpoints (tests/test_faults.py). Here: during an
evaluation every rank agrees to stop within seconds and the run checkpoints; during the final export the export is
abandoned (all three files or none) and the line says how to write it later; a second Ctrl-C exits at once; an
offline `forge-ds evaluate` shows progress and stops on Ctrl-C. Slow phases are made slow with fault points
(`eval_batch:sleepN`, `export_before_write:sleepN`, `after_step:sleepN`), so the signal lands inside them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ERROR, TINY, base_env, read_metrics
from ranks import Ranks

pytestmark = pytest.mark.multirank


def args(run: Path, corpus: Path, prepared: Path, steps: int, *extra: str) -> list[str]:
    # val_fraction 0.5: an evaluation of a dozen batches, each made slow by the fault point.
    return ["train", *TINY, f"--training.max_steps={steps}", "--training.checkpoint_every=1000",
            "--data.val_fraction=0.5", f"--data.source={corpus}", f"--data.prepared_dir={prepared}",
            f"--output_dir={run}", *extra]


def start(cmd: list[str], out: Path, fault: str) -> subprocess.Popen:
    # SIGINT as a terminal's foreground job has it: a suite started in the background of a non-interactive shell
    # (`.ci/run &`) inherits it ignored, and a program that does not install its own handler keeps it so.
    return subprocess.Popen([sys.executable, "-m", "forge_ds.cli", *cmd], env=base_env({"FORGE_DS_FAULT": fault}),
                            stdout=open(out, "w"), stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def signal_and_time(proc: subprocess.Popen, *signals: signal.Signals, gap: float = 0.0) -> float:
    """Seconds from the first signal until the process ended."""
    sent = time.time()
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(gap)
    proc.wait(timeout=120)
    return time.time() - sent


@pytest.fixture(scope="module")
def prepared(prepared_root) -> Path:
    return prepared_root / "interrupts-tiny"


@pytest.fixture(scope="module")
def stopped_in_eval(tmp_path_factory, repetitive_corpus, prepared):
    """Ctrl-C while the step-2 evaluation runs (3 s a batch): the run it leaves, its output and its timing."""
    run = tmp_path_factory.mktemp("eval") / "run"
    out = run.parent / "out.txt"
    proc = start(args(run, repetitive_corpus, prepared, 6, "--training.eval_every=2"), out, "eval_batch:sleep3")
    wait_until(proc, lambda: "step 2/6" in out.read_text(), "step 2")
    time.sleep(1.0)  # inside the evaluation's first batch
    elapsed = signal_and_time(proc, signal.SIGINT)
    return run, proc.returncode, out.read_text(), elapsed


def test_ctrl_c_during_an_evaluation_stops_it_within_seconds_and_checkpoints(stopped_in_eval):
    run, code, text, elapsed = stopped_in_eval
    assert code == 130, text[-3000:]
    # A dozen batches of 3 s would take over 30 s; the evaluation stops at the next batch, then the step-2
    # checkpoint is written (exempt from the 5 s, but small here).
    assert elapsed < 15, f"{elapsed:.1f} s after Ctrl-C"
    assert "forge-ds: Ctrl-C: stopping the evaluation within seconds" in text
    assert "stopped by SIGINT at step 2; checkpoint saved; resume with --resume" in text
    assert "Traceback" not in text
    assert (run / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert not any("val/loss" in m for m in read_metrics(run))  # an unfinished evaluation is not a result


def test_offline_evaluate_shows_progress_and_stops_on_ctrl_c(stopped_in_eval, tmp_path):
    run = stopped_in_eval[0]
    out = tmp_path / "evaluate.txt"
    proc = start(["evaluate", str(run)], out, "eval_batch:sleep3")
    wait_until(proc, lambda: "evaluate:" in out.read_text(), "a progress bar")
    try:
        elapsed = signal_and_time(proc, signal.SIGINT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running 120 s after SIGINT; its output:\n{out.read_text()[-3000:]}") from None
    text = out.read_text()
    assert proc.returncode == 130 and elapsed < 5, (elapsed, text[-3000:])
    assert "forge-ds: stopped by Ctrl-C" in text and "Traceback" not in text


def test_ctrl_c_during_the_export_abandons_it_and_says_how_to_export_later(tmp_path, repetitive_corpus, prepared):
    run, out = tmp_path / "run", tmp_path / "out.txt"
    proc = start(args(run, repetitive_corpus, prepared, 2), out, "export_before_write:sleep60")
    final = run / "checkpoints" / "step-00000002" / "COMPLETE"
    wait_until(proc, final.is_file, "the final checkpoint")
    time.sleep(1.0)  # past the checkpoint, inside the export
    elapsed = signal_and_time(proc, signal.SIGINT)
    text = out.read_text()
    assert proc.returncode == 130 and elapsed < 5, (elapsed, text[-3000:])
    line = text.strip().splitlines()[-1]
    assert line.startswith("forge-ds: stopped by Ctrl-C during the export") and f"forge-ds export {run}" in line
    assert "Traceback" not in text
    assert not list(run.glob("shared_components*")) and not list(run.glob(".*tmp*"))  # none half-written
    exported = subprocess.run([sys.executable, "-m", "forge_ds.cli", "export", str(run)], env=base_env(),
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (run / "export-step-00000002" / "shared_components.pt").is_file()


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path, repetitive_corpus, prepared):
    run, out = tmp_path / "run", tmp_path / "out.txt"
    proc = start(args(run, repetitive_corpus, prepared, 50), out, "after_step:sleep5")
    wait_until(proc, lambda: "step 1/50" in out.read_text(), "step 1")
    elapsed = signal_and_time(proc, signal.SIGINT, signal.SIGINT, gap=0.5)
    text = out.read_text()
    assert proc.returncode == 130 and elapsed < 3, (elapsed, text[-3000:])  # not after the 5 s step
    assert "forge-ds: second Ctrl-C: exiting now" in text and "Traceback" not in text


def test_ctrl_c_on_one_rank_during_an_evaluation_stops_every_rank(tmp_path, repetitive_corpus, prepared):
    """ZeRO-3's forwards are collective: a rank that stopped evaluating alone would hang the others."""
    run = tmp_path / "run"
    ranks = Ranks(args(run, repetitive_corpus, prepared, 6, "--training.eval_every=2", "--deepspeed_config=zero3"),
                  2, tmp_path, {"FORGE_DS_FAULT": "eval_batch:sleep3"})
    log0 = ranks.logs / "0.out"
    wait_until(ranks.procs[0], lambda: "step 2/6" in log0.read_text(), "step 2", timeout=300)
    time.sleep(1.0)
    ranks.procs[1].send_signal(signal.SIGINT)  # only rank 1 is told
    sent = time.time()
    results = ranks.wait(timeout=300)
    assert all(r.returncode == 130 for r in results), [(r.rank, r.returncode, r.output[-1500:]) for r in results]
    assert max(r.ended_s for r in results) - (sent - ranks.started) < 20
    assert "stopped by SIGINT at step 2" in results[0].stdout
    assert (run / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert ERROR not in results[0].stderr + results[1].stderr


def test_eta_counts_the_evaluations_still_to_come(tmp_path):
    from forge_ds.metrics import Metrics

    m = Metrics(tmp_path, tmp_path / "tb", enabled=False, total_steps=10, start_step=0, log_every=1,
                tokens_per_step=1, samples_per_step=1, flops_per_tok=1.0, peak=None, world_size=1, device="cpu",
                fp16=False, terminal=False, eval_every=5, eval_batches=30, grad_accum=1)
    for step in (1, 2):
        m.train_step(step, 1.0, 1e-3, None, step_time=1.0, epoch=0.0)
    # Before any evaluation is timed: 30 batches at a third of a 1 s step each, for the step-5 and final ones.
    assert m.eta_s(2) == pytest.approx(8 * 1.0 + 2 * 10.0)
    m.evaluation_time(25.0)
    assert m.eta_s(5) == pytest.approx(5 * 1.0 + 1 * 25.0)  # the step-5 evaluation is done; the final one is left
