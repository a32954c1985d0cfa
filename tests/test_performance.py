"""Speed options that are guarded rather than silently slow. Throughput itself is measured by benchmarks/bench.py
(docs/PERFORMANCE.md), not asserted here: these machines are shared and timing tests would be noise."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import TINY, forge, read_metrics, train_losses, user_error_line

from forge_ds.config import resolve
from forge_ds.ds_config import find_ds_config
from forge_ds.resume import compare_configs


def test_compile_with_zero3_is_a_one_line_user_error(tmp_path, repetitive_corpus):
    # Under ZeRO-3 torch.compile recompiles every layer until dynamo's limit, then runs eager: refuse up front,
    # before any engine is built, instead of a slow run full of recompile warnings.
    result = forge(["train", *TINY, f"--data.source={repetitive_corpus}", f"--data.prepared_dir={tmp_path / 'p'}",
                    "--training.compile=true", "--deepspeed_config=zero3", "--training.max_steps=2",
                    "--training.eval_every=1", "--training.checkpoint_every=1", f"--output_dir={tmp_path / 'run'}"],
                   cwd=tmp_path)
    line = user_error_line(result)
    assert "training.compile" in line and "ZeRO-3" in line, line
    assert not (tmp_path / "run").exists()  # refused before the run directory or data were touched
    assert not (tmp_path / "p").exists()


def test_deepcompile_on_cpu_is_a_one_line_user_error(tmp_path, repetitive_corpus):
    # DeepCompile is CUDA-only (opt-in through the DeepSpeed JSON): on CPU it would fail deep in engine.compile().
    ds = json.loads(Path(find_ds_config("zero1")).read_text())
    ds["compile"] = {"deepcompile": True}
    (tmp_path / "dc.json").write_text(json.dumps(ds))
    result = forge(["train", *TINY, f"--data.source={repetitive_corpus}", f"--data.prepared_dir={tmp_path / 'p'}",
                    f"--deepspeed_config={tmp_path / 'dc.json'}", "--training.max_steps=2",
                    f"--output_dir={tmp_path / 'run'}"], cwd=tmp_path)
    line = user_error_line(result)
    assert "dc.json" in line and "compile.deepcompile=true needs a CUDA GPU" in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()


def test_a_resume_may_switch_torch_compile():
    # compile changes how a step runs, not what it computes or what a checkpoint holds: a run saved without it
    # (the old default) resumes with it, and back.
    saved = resolve(None, {"training.compile": False})[0]
    notes = compare_configs(saved, resolve(None, {"training.compile": True})[0], allow_schedule_change=False)
    assert notes == ["resume: changed training.compile: False -> True"]


def test_torch_autocast_at_zero0_resumes_bit_exact_and_exports(tmp_path, repetitive_corpus):
    # DeepSpeed's torch_autocast: fp32 weights, torch AdamW unwrapped (no bf16 weight copies, no per-parameter
    # overflow scan). Its checkpoints hold the same run: stopping and resuming reproduces the straight run's
    # losses and exported weights exactly, and the loop reports a gradient norm (forge_ds computes it here).
    ds = json.loads(Path(find_ds_config("zero0")).read_text())
    ds["torch_autocast"] = {"enabled": True, "dtype": "auto"}
    (tmp_path / "ac.json").write_text(json.dumps(ds))
    common = ["train", *TINY, f"--data.source={repetitive_corpus}", f"--data.prepared_dir={tmp_path / 'p'}",
              f"--deepspeed_config={tmp_path / 'ac.json'}", "--training.precision=bf16", "--training.max_steps=4",
              "--training.checkpoint_every=2", "--model.dropout=0.1", "--training.eval_every=1000"]
    straight = forge([*common, f"--output_dir={tmp_path / 'a'}"], cwd=tmp_path)
    first = forge([*common, f"--output_dir={tmp_path / 'b'}", "--stop_after_steps=2"], cwd=tmp_path)
    resumed = forge([*common, f"--output_dir={tmp_path / 'b'}", "--resume"], cwd=tmp_path)
    for result in (straight, first, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "ZeRO-0, bf16" in straight.stdout
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b") and len(train_losses(tmp_path / "a")) == 4
    norms = [m["opt/grad_norm"] for m in read_metrics(tmp_path / "a") if "opt/grad_norm" in m]
    assert len(norms) == 4 and all(n > 0 for n in norms)
    a, b = (torch.load(tmp_path / run / "shared_components.pt") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.float32 for t in a.values() if t.is_floating_point())
