"""Shared test harness: run forge-ds for real, as 1 or 2 ranks, on tiny models.

Ranks are spawned directly with the torch.distributed environment variables (one process each, what a launcher
does; tests/ranks.py) where the launcher itself is not under test; one test goes through the real `deepspeed`
launcher.
Nothing reaches the network: the HF hub is forced offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from forge_ds.errors import USER_ERROR_PREFIX
from ranks import ROOT, base_env, free_port, spawn_ranks  # noqa: F401  (re-exported: tests import them from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ERROR = USER_ERROR_PREFIX.rstrip()  # how every user error starts (forge_ds.cli), alone on its line

# A model that trains in well under a second per step on 2 CPU cores, on a short repetitive corpus.
TINY = [
    "--model.d_model=32", "--model.n_heads=4", "--model.n_layers=2", "--model.d_ff=64", "--model.vocab_size=300",
    "--model.max_seq_len=32", "--training.batch_size=4", "--training.warmup_steps=2", "--training.log_every=1",
    "--training.learning_rate=3e-3",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs root and Debian's SLURM (started by the tests)")
    config.addinivalue_line("markers", "multirank: spawns real DeepSpeed ranks")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def forge(args: list[str], ranks: int = 1, cwd: Path | None = None, env: dict | None = None,
          timeout: float = 300) -> Result:
    """Run `forge-ds <args>` as `ranks` real processes (rank 0's output is the result; any failing rank fails)."""
    cmd = [sys.executable, "-m", "forge_ds.cli", *args]
    started = time.time()
    if ranks == 1:
        p = subprocess.run(cmd, cwd=cwd or ROOT, env=base_env(env), capture_output=True, text=True, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr, time.time() - started)
    ranks_ = spawn_ranks(args, ranks, cwd or ROOT, env, timeout)
    code = next((r.returncode for r in ranks_ if r.returncode != 0), 0)
    stderr = "".join(f"[rank {r.rank}] {line}\n" for r in ranks_[1:] for line in r.stderr.splitlines())
    return Result(code, ranks_[0].stdout, ranks_[0].stderr + stderr, time.time() - started)


def user_error_line(result, code: int = 2) -> str:
    """The one `forge-ds: error:` line of a process that ended on a user error; fails unless it ended with `code`,
    printed exactly one such line and no traceback."""
    assert result.returncode == code, (f"exit {result.returncode}, expected {code}\n"
                                       f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
    lines = [line for line in result.stderr.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session: tokenizer training runs once per corpus/vocab."""
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="session")
def repetitive_corpus(tmp_path_factory) -> Path:
    """A short repetitive text where context pays at once (a bigram model beats the unigram line)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    sentences = ["the cat sat on the mat", "a dog ran in the park", "my bird sang a song",
                 "the sun rose over the hill", "we ate bread with jam"]
    paragraphs = [" . ".join(sentences[(i + j) % len(sentences)] for j in range(5)) for i in range(200)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path
