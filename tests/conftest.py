"""Shared test harness: run forge-ds for real, as 1 or 2 ranks, on tiny models.

Ranks are spawned directly with the torch.distributed environment variables (one process each, what a launcher
does) where the launcher itself is not under test; one test goes through the real `deepspeed` launcher.
Nothing reaches the network: the HF hub is forced offline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A model that trains in well under a second per step on 2 CPU cores, on a short repetitive corpus.
TINY = [
    "--model.d_model=32", "--model.n_heads=4", "--model.n_layers=2", "--model.d_ff=64", "--model.vocab_size=300",
    "--model.max_seq_len=32", "--training.batch_size=4", "--training.warmup_steps=2", "--training.log_every=1",
    "--training.learning_rate=3e-3",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs root and Debian's SLURM (started by the tests)")
    config.addinivalue_line("markers", "multirank: spawns real DeepSpeed ranks")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def base_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    # One intra-op thread per rank: two ranks on two cores otherwise oversubscribe and run ~10x slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra or {})
    return env


def forge(args: list[str], ranks: int = 1, cwd: Path | None = None, env: dict | None = None,
          timeout: float = 300) -> Result:
    """Run `forge-ds <args>` as `ranks` real processes (rank 0's output is the result; any failing rank fails)."""
    cmd = [sys.executable, "-m", "forge_ds.cli", *args]
    started = time.time()
    if ranks == 1:
        p = subprocess.run(cmd, cwd=cwd or ROOT, env=base_env(env), capture_output=True, text=True, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr, time.time() - started)
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        rank_env = base_env({**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen(cmd, cwd=cwd or ROOT, env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, timeout - (time.time() - started))))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    code = next((c for c in codes if c != 0), 0)
    stderr = "".join(f"[rank {r}] {line}\n" for r, o in enumerate(outs) for line in o[1].splitlines() if r > 0)
    return Result(code, outs[0][0], outs[0][1] + stderr, time.time() - started)


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
