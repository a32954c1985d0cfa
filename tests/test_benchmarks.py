"""The benchmark scripts run end to end and report what they claim (issues 7 and 9). Their figures are measured in
docs/PERFORMANCE.md and docs/QUALITY.md; here only what does not depend on the machine's speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from conftest import ERROR, ROOT, base_env, user_error_line

TINY_SHAPE = ["--d_model", "32", "--n_heads", "4", "--n_layers", "2", "--d_ff", "64", "--vocab", "300",
              "--seq_len", "32", "--batch_size", "4"]


def run_script(args: list[str], cwd) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=base_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def test_throughput_bench_compares_loops_and_accounts_model_state(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script([str(ROOT / "benchmarks" / "bench.py"), *TINY_SHAPE, "--precision", "fp32", "--zero", "2",
                         "--pairs", "2", "--steps_per_chunk", "2", "--warmup", "2", "--profile",
                         "--workdir", str(tmp_path / "w"), "--json", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert report["zero_stage"] == 2 and report["world_size"] == 1 and report["precision"] == "fp32"
    ratio = report["ours_over_plain_tokens_per_s"]
    assert len(ratio["per_pair"]) == 2  # one ratio per interleaved pair, none dropped
    # Every loop trained at the global batch the config asks for: 4 samples of 32 tokens per step.
    assert report["tokens_per_step"] == 4 * 32
    # fp32 ZeRO-2, one rank: 4Ψ + 16Ψ/N (DeepSpeed 0.19 keeps an fp32 master partition beside the fp32 params).
    # What the engine holds, counted storage by storage, must be that.
    assert abs(report["model_state_over_formula"] - 1.0) < 0.05, report["model_state_bytes_per_rank"]
    assert set(report["profile"]) == {"ours", "plain"}
    assert "profile (forge_ds, one chunk)" in result.stdout and "ours/plain tokens/s: median" in result.stdout


def test_throughput_bench_bad_input_is_one_line_and_exit_2(tmp_path):
    # The ranks find it (the global batch is larger than the data): rank 0's line, echoed once, and no traceback.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), *TINY_SHAPE,
                             "--batch_size", "100000", "--workdir", str(tmp_path / "w")],
                            cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert "fewer than one global batch of 100000" in lines[0]


def test_quality_bench_passes_on_forge_ds_trains_user_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--steps", "5",
                             "--workdir", str(tmp_path / "w"), "--model.vocab_size=300", "--model.n_heads=3"],
                            cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=600)
    line = user_error_line(result)
    assert "n_heads=3" in line and "divides d_model" in line


def test_quality_bench_reports_validation_curve_beside_the_unigram_line(tmp_path):
    out = tmp_path / "q.json"
    run_script([str(ROOT / "benchmarks" / "quality.py"), "--steps", "20", "--workdir", str(tmp_path / "w"),
                "--json", str(out), "--model.d_model=32", "--model.n_heads=4", "--model.n_layers=1",
                "--model.d_ff=64", "--model.vocab_size=300", "--model.max_seq_len=64", "--training.eval_every=10"],
               tmp_path)
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert set(run["val_loss"]) == {"10", "20"} and all(np.isfinite(v) for v in run["val_loss"].values())
    assert 0 < report["val_unigram_entropy"] and 0 < report["val_cross_entropy_of_train_unigram"]
    # Counts follow the run's own window length (64 here), read from the very folder the run trained on.
    prepared = tmp_path / "w" / "data" / "prepared-v300"
    train_tokens = np.fromfile(prepared / "train.bin", dtype=np.uint16).size
    assert report["data"]["train_tokens"] == train_tokens
    assert report["data"]["train_windows"] == (train_tokens - 1) // 64


def test_export_memory_bench_measures_the_live_export_on_rank_0(tmp_path):
    out, work = tmp_path / "mem.json", tmp_path / "w"
    # 4.5 MiB of tensors (mostly the 8192 x 128 embedding): the export's own demand stands well clear of page noise.
    run_script([str(ROOT / "benchmarks" / "export_memory.py"), "--d_model", "128", "--n_heads", "4",
                "--n_layers", "2", "--d_ff", "256", "--vocab", "8192", "--seq", "64", "--workdir", str(work),
                "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())["rows"]
    live = {(r["zero_stage"], r["reader"]): r for r in rows if r["reader"].startswith("live export")}
    assert set(live) == {(stage, reader) for stage in (2, 3)
                         for reader in ("live export, rank 0", "live export, rank 0, heap trimmed")}
    for (stage, reader), r in live.items():
        # The bytes the growth is compared with are those of the tensors in the file that run wrote, the tied
        # embedding once.
        written = torch.load(r["export_file"], map_location="cpu", weights_only=True)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in written.values()}
        assert r["shared_fp32_mib"] * 2**20 == sum(storages.values()) > 4 * 2**20, (stage, reader)
        assert r["peak_growth_mib"] < 3 * r["shared_fp32_mib"], (stage, reader, r)
        if reader.endswith("heap trimmed"):
            # With freed memory handed back first, the export's own demand shows: it holds every tensor at once.
            assert r["peak_growth_mib"] > 0.5 * r["shared_fp32_mib"], (stage, reader, r)


def test_host_overhead_counts_syncs_by_caller_and_one_per_step_in_forge_ds(tmp_path):
    # The counts are exact (issue 17): forge_ds reads the device once per optimizer step whatever the
    # accumulation, the plain loop once per micro-step, and DeepSpeed's throughput timer syncs twice a
    # micro-step only when a config turns it back on.
    out = tmp_path / "host.json"
    run_script([str(ROOT / "benchmarks" / "host_overhead.py"), "--configs", "plain,zero2,zero2 +tput timer",
                "--cases", "1x2", "--rounds", "0", "--count_steps", "2", "--workdir", str(tmp_path / "w"),
                "--json", str(out)], tmp_path)
    counts = json.loads(out.read_text())["counts"]["1x2"]

    def syncs(name, package):
        return sum(v for k, v in counts[name]["syncs_per_step"].items() if k.startswith(package + " / "))

    assert syncs("plain", "loop") == 2 and syncs("zero2", "forge_ds") == 1
    assert syncs("zero2 +tput timer", "deepspeed") - syncs("zero2", "deepspeed") == 2 * 2
    for name in counts:
        assert counts[name]["aten_ops_per_step"] > 1000 and sum(counts[name]["python_calls_per_step"].values()) > 0
    assert counts["zero2"]["python_calls_per_step"]["deepspeed"] > 0
