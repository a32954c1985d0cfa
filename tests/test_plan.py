"""`forge-ds plan` (issue 20): its figures held against one real 2-rank DeepSpeed run per stage, its command and its
errors, and `--deepspeed_config=auto`. The full stage x rank-count comparison is benchmarks/plan_check.py."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT, TINY, forge, user_error_line

sys.path[:0] = [str(ROOT / "benchmarks")]
import plan_check  # noqa: E402


@pytest.fixture(scope="module")
def two_rank_rows(tmp_path_factory):
    """One 2-rank run that builds ZeRO-0, 2 and 3 in turn at a shape of a few MB (tiny shapes are all container
    overhead), planner's figures beside each."""
    work = tmp_path_factory.mktemp("plan_check")
    measured = plan_check.measure("calib", 2, ["zero0", "zero2", "zero3"], work, "fp32", steps=2, threads=1)
    return {r["stage"]: r for r in plan_check.compare(measured[0], "calib", "fp32")}


@pytest.mark.multirank
def test_collectives_equal_what_deepspeeds_comms_logger_records(two_rank_rows):
    for stage, row in two_rank_rows.items():
        assert row["comms_equal"], (stage, row["comms_measured"], row["comms_predicted"])
    # Not vacuous: ZeRO-3 gathers every parameter's partition and reduce-scatters the gradients.
    assert len(two_rank_rows["zero3"]["comms_measured"]["all_gather_into_tensor"]) > 10


@pytest.mark.multirank
def test_model_states_checkpoint_and_export_sizes_match_the_run(two_rank_rows):
    for stage, row in two_rank_rows.items():
        measured, predicted = row["model_state"]
        assert abs(measured / predicted - 1) < 0.05, (stage, measured, predicted)
        for key in ("checkpoint", "export_pt", "export_safetensors"):
            measured, predicted = row[key]
            assert abs(measured / predicted - 1) < 0.02, (stage, key, measured, predicted)


@pytest.mark.multirank
def test_step_peak_memory_matches_rss_growth_on_cpu(two_rank_rows):
    measured, predicted = two_rank_rows["zero0"]["step_peak_growth"]  # the process's first engine: a clean heap
    assert abs(measured / predicted - 1) < 0.20, (measured, predicted)


def test_plan_prints_every_stage_and_a_recommendation():
    result = forge(["plan", *TINY, "--nodes=2", "--gpus_per_node=8", "--gpu=A100 40GB", "--tokens=10000000"])
    assert result.returncode == 0, result.output[-3000:]
    out = result.stdout
    for stage in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        assert any(line.strip().startswith(stage + " ") for line in out.splitlines()), out
    assert "--deepspeed_config=zero" in out and "global batch 64" in out and "A100 40GB" in out
    assert "stops      past" in out and "why " in out


@pytest.mark.parametrize("flags, expected", [
    (["--gpu=H900"], "unknown --gpu='H900'"),
    (["--nodes=0"], "--nodes=0 must be"),
    (["--model.d_model=8192", "--model.n_heads=64", "--model.n_layers=96", "--model.d_ff=32768",
      "--model.max_seq_len=16384", "--training.batch_size=1", "--gpus_per_node=1"], "GiB too much"),
])
def test_plan_bad_input_is_one_line_and_exit_2(flags, expected):
    line = user_error_line(forge(["plan", "--tokens=1000000", *flags]))
    assert expected in line, line


def test_check_with_auto_shows_the_choice_and_its_reason(tmp_path, repetitive_corpus, prepared_root):
    result = forge(["check", *TINY, "--deepspeed_config=auto", f"--output_dir={tmp_path / 'run'}",
                    f"--data.source={repetitive_corpus}", f"--data.prepared_dir={prepared_root / 'auto'}"])
    assert result.returncode == 0, result.output[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("deepspeed_config=auto: "))
    chosen = line.split()[1].rstrip(":")
    assert "is the fastest stage" in line and "planner's micro-batch" in line
    assert f"ZeRO-{chosen[4]}" in result.stdout  # the check ran with the stage it printed


@pytest.mark.multirank
def test_train_auto_is_decided_once_and_resume_keeps_the_saved_stage(tmp_path, repetitive_corpus, prepared_root):
    data = [f"--data.source={repetitive_corpus}", f"--data.prepared_dir={prepared_root / 'auto'}",
            "--training.max_steps=4", "--stop_after_steps=1"]
    fresh = forge(["train", *TINY, *data, "--deepspeed_config=auto", f"--output_dir={tmp_path / 'fresh'}"], ranks=2)
    assert fresh.returncode == 0, fresh.output[-3000:]
    line = next(line for line in fresh.stdout.splitlines() if line.startswith("deepspeed_config=auto: "))
    chosen = line.split()[1].rstrip(":")
    assert "is the fastest stage" in line and f"  engine      ZeRO-{chosen[4]}," in fresh.stdout
    # A run saved at another stage than auto picks today keeps its own on resume.
    other = "zero3" if chosen != "zero3" else "zero2"
    run = tmp_path / "saved"
    first = forge(["train", *TINY, *data, f"--deepspeed_config={other}", f"--output_dir={run}"], ranks=2)
    assert first.returncode == 0, first.output[-3000:]
    resumed = forge(["train", *TINY, *data, "--deepspeed_config=auto", "--resume", f"--output_dir={run}"], ranks=2)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"deepspeed_config=auto: {other}, the stage this run was saved with" in resumed.stdout
    assert f"  engine      ZeRO-{other[4]}," in resumed.stdout and "from step 1 (resumed" in resumed.stdout
