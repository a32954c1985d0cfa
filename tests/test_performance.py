"""Speed options that are guarded rather than silently slow. Throughput itself is measured by benchmarks/bench.py
(docs/PERFORMANCE.md), not asserted here: these machines are shared and timing tests would be noise."""

from __future__ import annotations

from conftest import TINY, forge, user_error_line


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
