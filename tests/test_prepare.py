"""Streaming preparation (issue 19): bounded memory, every core, resume, a lock, Ctrl-C, uint32, clear bad input.

One generated ~30 MB corpus serves the memory, parallel, interrupt and resume tests: it is prepared once with one
process (the reference) and once with two processes, interrupted and resumed.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, base_env
from forge_ds import config, data, prepare
from forge_ds.errors import ForgeError

sys.path.insert(0, str(ROOT / "benchmarks"))
from corpus_gen import paragraphs, write_corpus  # noqa: E402
from rss import run_measured  # noqa: E402

MB = 1 << 20
# A fixed tokenizer sample keeps BPE training the same size for every corpus, so a peak's growth is the corpus's.
FLAGS = ["--model.vocab_size=300", "--data.tokenizer_train_bytes=2000000"]


def prepare_cmd(source, prepared_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "forge_ds.cli", "prepare", *FLAGS, f"--data.source={source}",
            f"--data.prepared_dir={prepared_dir}", *extra]


def tokens(folder, split="train") -> np.ndarray:
    return np.fromfile(folder / f"{split}.bin", dtype=data.read_meta(folder)["dtype"])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    sizes = {"small": write_corpus(root / "small.txt", 6 * MB), "big": write_corpus(root / "big.txt", 30 * MB)}
    return root, sizes


@pytest.fixture(scope="module")
def measured(corpora):
    """Both corpora prepared by one process each, with the peak memory of the process tree."""
    root, sizes = corpora
    peaks = {}
    for name in sizes:
        result, peak, _ = run_measured(prepare_cmd(root / f"{name}.txt", root / f"prep-{name}", "--data.num_proc=1"),
                                       cwd=ROOT, env=base_env())
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[name] = peak
    return peaks


def test_peak_memory_grows_by_less_than_half_the_corpus(corpora, measured):
    # Proportional set sizes (a forked helper's shared pages count once), in total and anonymous only. The total
    # holds the memory-mapped Arrow pages a process still has mapped: bounded only because every read hands its
    # pages back (sources.ArrowDocs). The small corpus's peak is the baseline: imports, the tokenizer sample and
    # the encoder's buffers, which do not grow with the corpus.
    _, sizes = corpora
    extra = sizes["big"] - sizes["small"]
    growth = {key: measured["big"][key] - measured["small"][key] for key in ("Pss", "Pss_Anon")}
    print(f"peaks {measured}, growth {growth} bytes for {extra / MB:.1f} MiB more text")
    assert all(g <= 0.5 * extra for g in growth.values()), (measured, sizes)


def test_two_processes_interrupted_then_resumed_give_the_files_of_one_process(corpora, measured):
    root, _ = corpora
    out = root / "prep-resumed"
    proc = subprocess.Popen(prepare_cmd(root / "big.txt", out, "--data.num_proc=2"), cwd=ROOT, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    shards = out / prepare.WORK / "shards"
    deadline = time.time() + 240
    while not list(shards.glob("train-*.bin")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("forge-ds: preparation stopped by SIGINT"), err[-1000:]
    assert not (out / "meta.json").exists()

    # A finished shard is not encoded again: zero one, and the resumed train.bin holds those zeros (<pad>, id 0,
    # never comes out of the encoder) where the reference has that shard's tokens.
    finished = sorted(shards.glob("train-*.bin"))[0]
    n_zeroed = finished.stat().st_size // 2
    finished.write_bytes(bytes(finished.stat().st_size))
    subprocess.run(prepare_cmd(root / "big.txt", out, "--data.num_proc=2"), cwd=ROOT, env=base_env(), check=True,
                   capture_output=True)
    reference, resumed = tokens(root / "prep-big"), tokens(out)
    assert len(resumed) == len(reference) and not (reference == 0).any()
    assert (resumed == 0).sum() == n_zeroed
    assert np.array_equal(resumed[resumed != 0], reference[resumed != 0])
    assert np.array_equal(tokens(out, "val"), tokens(root / "prep-big", "val"))
    assert not (out / prepare.WORK).exists()


def test_two_preparations_of_one_directory_wait_for_each_other(corpora):
    root, _ = corpora
    out = root / "prep-shared"
    out.mkdir()
    logs = [root / f"shared-{i}.err" for i in range(2)]
    with open(out / ".lock", "a+") as held:  # a third preparer, mid-way: both must wait for it
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [subprocess.Popen(prepare_cmd(root / "small.txt", out, "--data.num_proc=1"), cwd=ROOT,
                                  env=base_env(), stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
                 for log in logs]
        deadline = time.time() + 120
        while not all("another process is preparing" in log.read_text() for log in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [g.read_text() for g in logs]
            time.sleep(0.2)
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [g.read_text()[-2000:] for g in logs]
    assert all(f"prepared: {out}" in stdout for stdout in outputs)
    assert np.array_equal(tokens(out), tokens(root / "prep-small"))
    assert data.read_meta(out)["train_tokens"] * 2 == (out / "train.bin").stat().st_size


def test_a_save_to_disk_dataset_prepares_like_the_same_documents_as_jsonl(tmp_path):
    import datasets

    docs = [p for p, _ in zip(paragraphs(seed=3), range(1000))]
    datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).save_to_disk(str(tmp_path / "saved"))
    with open(tmp_path / "same.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    kw = dict(vocab_size=300, root=str(tmp_path / "p"), show_progress=False)
    saved, jsonl = prepare.prepare(str(tmp_path / "saved"), **kw), prepare.prepare(str(tmp_path / "same.jsonl"), **kw)
    for name in ("train.bin", "val.bin"):
        assert (saved / name).read_bytes() == (jsonl / name).read_bytes()
    assert data.read_meta(saved)["n_documents"] == {"train": 900, "val": 100}


@pytest.mark.parametrize("n,seed", [(0, 0), (1, 0), (2, 3), (17, 1), (1000, 0), (54_321, 7)])
def test_the_split_shuffle_draws_what_random_shuffle_draws(n, seed):
    import random

    expected = list(range(n))
    random.Random(seed).shuffle(expected)
    assert prepare.shuffled_range(n, seed).tolist() == expected


def hub_style_dataset(folder, docs) -> str:
    """A dataset laid out as on the hub (parquet files named by split, an extra column), as an hf: source."""
    import datasets

    (folder / "data").mkdir(parents=True)
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        datasets.Dataset.from_dict({"url": ["u"] * len(part), "text": part}).to_parquet(
            str(folder / "data" / f"train-{i:05d}-of-00002.parquet"))
    return f"hf:{folder}"


def test_an_hf_source_streams_into_our_own_arrow_file_and_prepares_like_its_documents(tmp_path, monkeypatch):
    import datasets

    docs = [p for p, _ in zip(paragraphs(seed=5), range(1000))]
    source = hub_style_dataset(tmp_path / "hub", docs)
    with open(tmp_path / "same.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    kw = dict(vocab_size=300, show_progress=False)
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = set(cache.rglob("*"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # online: streaming mode
    streamed = prepare.prepare(source, root=str(tmp_path / "streamed"), **kw)
    added = [p for p in set(cache.rglob("*")) - before if p.is_file() and p.suffix != ".lock"]
    assert added == []  # no copy in datasets' cache (streaming leaves only its lock file there)
    assert not (streamed / prepare.WORK).exists()  # the copy went with the work folder
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # offline: datasets' cache, as before
    cached = prepare.prepare(source, root=str(tmp_path / "cached"), **kw)
    assert any(p.suffix == ".arrow" for p in set(cache.rglob("*")) - before)  # what streaming spared
    jsonl = prepare.prepare(str(tmp_path / "same.jsonl"), root=str(tmp_path / "jsonl"), **kw)
    for name in ("train.bin", "val.bin"):
        assert (streamed / name).read_bytes() == (cached / name).read_bytes() == (jsonl / name).read_bytes()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(ForgeError, match=r"row 0 of hf:.* has no field 'body' \(columns: \['text', 'url'\]\)"):
        prepare.prepare(source, text_field="body", root=str(tmp_path / "wrong"), **kw)


def test_a_tokenizer_sample_bound_is_recorded_and_changes_the_key_only_when_not_the_default(tmp_path):
    kw = dict(vocab_size=300, root=str(tmp_path), show_progress=False)
    bounded = prepare.prepare("builtin:pydoc", tokenizer_train_bytes=100_000, **kw)
    meta = data.read_meta(bounded)
    assert meta["tokenizer_train_bytes"] == 100_000 and 0 < meta["tokenizer_sample_bytes"] <= 100_000
    assert meta["tokenizer_sample_documents"] < meta["n_documents"]["train"]
    default = prepare.source_identity("builtin:pydoc", "text", 0, None, 300, 0.1, 0, None)
    assert "tokenizer_train_bytes" not in default and bounded.name != prepare.prepared_key(default)


def test_a_vocabulary_above_65536_writes_uint32_files_that_every_reader_follows(tmp_path):
    small = prepare.prepare("builtin:pydoc", vocab_size=2048, root=str(tmp_path), show_progress=False)
    big = prepare.prepare("builtin:pydoc", vocab_size=70_000, tokenizer_path=str(small / "tokenizer.json"),
                          root=str(tmp_path), show_progress=False)
    assert data.read_meta(big)["dtype"] == "uint32" and data.read_meta(small)["dtype"] == "uint16"
    assert (big / "train.bin").stat().st_size == 4 * data.read_meta(big)["train_tokens"]
    assert np.array_equal(tokens(big), tokens(small))
    w16, w32 = data.TokenWindows(small / "train.bin", 64), data.TokenWindows(big / "train.bin", 64)
    assert len(w16) == len(w32) and all(torch_equal(w16[i], w32[i]) for i in (0, len(w16) - 1))
    assert data.unigram_entropy(big / "val.bin") == data.unigram_entropy(small / "val.bin")
    cfg, _ = config.resolve("cpu_demo", {"model.vocab_size": 70_000})
    assert cfg.model.vocab_size == 70_000


def torch_equal(a, b) -> bool:
    return all(bool((x == y).all()) for x, y in zip(a, b))


def test_a_jsonl_line_that_is_not_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": oops}\n{"text": "four"}\n')
    with pytest.raises(ForgeError, match=rf"^{path}:4: not valid JSON \(.*\); fix or delete that line$"):
        prepare.prepare(str(path), vocab_size=300, root=str(tmp_path / "p"), show_progress=False)
