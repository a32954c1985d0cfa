"""Offline preparation: a corpus of any size into train.bin / val.bin, tokenizer.json and meta.json.

One prepared directory holds everything a run reads: the token files (each document encoded as <bos> ... <eos>
and concatenated, uint16 or uint32 as meta.json says), tokenizer.json and meta.json. Its name is a hash of
everything that decides its content, so changing any of those prepares a new one instead of reusing a stale one.

The corpus is never held in memory: it is read into a memory-mapped Arrow table (sources.py), filtered in one
pass that keeps 16 bytes per document, split by shuffling document *indices* (the same permutation as the
in-memory preparation had), the tokenizer trains on a bounded prefix of the shuffled training documents, and
workers encode runs of documents into shard files that are then concatenated. Shards, the Arrow cache and the
tokenizer live in <dir>/.work until meta.json is written, so an interrupted preparation resumes from them.

This module never touches torch.distributed: the caller decides which rank prepares and places the barriers.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from forge_ds import bpe, encode, sources
from forge_ds.config import DataConfig
from forge_ds.errors import ForgeError
from forge_ds.files import sha256_file
from forge_ds.tokens import token_dtype

FORMAT_VERSION = 1  # bump when prepare() writes different bytes for the same inputs: old dirs get a new key
DEFAULT_TOKENIZER_TRAIN_BYTES = DataConfig.model_fields["tokenizer_train_bytes"].default
SHARD_BYTES = 8 << 20  # text per shard: a resume loses at most this much work per worker
WORK = ".work"

# The in-memory API that evaluate.py and the tests use on small corpora.
train_tokenizer, load_tokenizer = bpe.train_tokenizer, bpe.load_tokenizer


class Documents(list):
    """A list[str] of documents that also says how many had non-UTF-8 bytes replaced by U+FFFD."""

    non_utf8_documents: int = 0


# ----------------------------------------------------------------------------------------------- identity


def _stat(paths: list[Path], base: Path) -> list:
    # size + mtime instead of a content hash: cheap on big corpora; touching a file only costs a re-prepare.
    return [[str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def prepared_key(source_identity: dict) -> str:
    canonical = json.dumps(source_identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def source_identity(source, text_field, min_article_length, max_articles, vocab_size, val_fraction, split_seed,
                    tokenizer_path, tokenizer_train_bytes=DEFAULT_TOKENIZER_TRAIN_BYTES) -> dict:
    """Everything that decides a prepared directory's bytes (JSON-native values, so it compares after a reload).
    The number of encoding processes never enters: the files do not depend on it."""
    kind, path = sources.classify(source)
    ident = dict(format=FORMAT_VERSION, source=source, kind=kind, text_field=text_field,
                 min_article_length=min_article_length, max_articles=max_articles, vocab_size=vocab_size,
                 val_fraction=val_fraction, split_seed=split_seed,
                 tokenizer_sha256=sha256_file(Path(tokenizer_path)) if tokenizer_path else None)
    if tokenizer_train_bytes != DEFAULT_TOKENIZER_TRAIN_BYTES:  # absent at the default: existing keys stay
        ident["tokenizer_train_bytes"] = tokenizer_train_bytes
    if kind == "pydoc":
        ident["corpus"] = sources.PYDOC_CORPUS.name
    elif kind == "hf":
        ident["split"] = "train"  # hub revisions are not tracked: pass an explicit prepared_dir or delete it
    else:
        ident["path"] = str(path.resolve())
        if kind == "txt_dir":
            ident["files"] = _stat(sources.txt_files(path), path)
        elif kind == "disk":
            ident["files"] = _stat(sorted(p for p in path.rglob("*") if p.is_file()), path)
        else:
            ident["files"] = _stat([path], path.parent)
    return ident


def _check_existing(out: Path, ident: dict) -> None:
    from forge_ds.data import read_meta

    meta = read_meta(out)
    now = json.loads(json.dumps(ident))  # as it reads back from meta.json (tuples become lists)
    if meta["source_identity"] != now:
        differ = sorted(k for k in now.keys() | meta["source_identity"].keys()
                        if now.get(k) != meta["source_identity"].get(k))
        raise ForgeError(f"prepared dir {str(out)!r} was made from different data or settings "
                         f"({meta['source']!r}; differs in {', '.join(differ)}); delete it or pick another "
                         "--data.prepared_dir")


# ----------------------------------------------------------------------------------------------- split


def split_order(n_documents: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, int]:
    """(order, n_val): random.Random(split_seed) shuffling range(N); the first n_val = max(1, floor(N*f)) are
    validation. Indices, never texts, are shuffled: 8 bytes a document once the list is dropped."""
    if not 0 < val_fraction < 1:
        raise ForgeError(f"val_fraction={val_fraction} is outside (0, 1); set --data.val_fraction to e.g. 0.1")
    if n_documents < 2:
        raise ForgeError(f"the corpus has {n_documents} document; need at least 2 to hold out a validation split; "
                         "add text (a single .txt file is split at blank lines)")
    return shuffled_range(n_documents, split_seed), max(1, math.floor(n_documents * val_fraction))


def shuffled_range(n: int, seed: int) -> np.ndarray:
    """random.Random(seed).shuffle(list(range(n))), in 8 bytes an index: the list costs 36 (a pointer and an int
    object each), 3.6 GB for a corpus of 100M documents. Its own loop, the same draws: tests compare the two."""
    order, randbelow = array.array("q", range(n)), random.Random(seed)._randbelow
    for i in reversed(range(1, n)):
        j = randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return np.frombuffer(order, dtype=np.int64)


def split_documents(docs: list[str], val_fraction: float, split_seed: int) -> tuple[list[str], list[str]]:
    """(train, val) of an in-memory list, in the order prepare() writes them."""
    order, n_val = split_order(len(docs), val_fraction, split_seed)
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def load_documents(source: str, text_field: str = "text", min_article_length: int = 0,
                   max_articles: int | None = None) -> Documents:
    """All kept documents of a (small) source in memory, in source order; prepare() never calls this."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="forge-ds-docs-") as tmp:
        src = sources.open_source(source, text_field, Path(tmp))
        kept = sources.scan(src, sources.table_files(src, Path(tmp)), min_article_length, max_articles)
        docs = Documents(src.ds.select_columns([src.text_field])[kept.rows.tolist()][src.text_field])
    docs.non_utf8_documents = kept.non_utf8_documents
    return docs


def encode_documents(docs: list[str], tok, vocab_size: int) -> np.ndarray:
    """One token stream of `docs`, encoded exactly as prepare() encodes them."""
    return encode.encode_texts(tok, list(docs), token_dtype(vocab_size))


# ----------------------------------------------------------------------------------------------- prepare


def _bar(desc: str, show: bool, total=None):
    return tqdm(desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
                dynamic_ncols=True)


@contextmanager
def _exclusive(out: Path, show_progress: bool):
    """One preparer per directory: a second job preparing the same key waits, then finds the first's meta.json."""
    with open(out / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"forge-ds: another process is preparing {out}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when this process dies


@contextmanager
def _stop_on_ctrl_c(work: Path):
    """The first Ctrl-C ends preparation with one line (no traceback) and the exit code of a signal. Training
    installs handlers that only note a signal; during preparation Ctrl-C must interrupt, so restore Python's."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
    try:
        yield
    except KeyboardInterrupt:
        print(f"forge-ds: preparation stopped by SIGINT; finished shards are kept in {work}, the same command "
              "resumes from them", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


@contextmanager
def _datasets_bars(show: bool):
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    if enabled and not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled and not show:
            datasets.enable_progress_bars()


def _fresh_work(work: Path, out: Path, ident: dict) -> bool:
    """Keep .work only when it was started for the same identity; True when it was (a resume)."""
    stamp = work / "identity.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(ident)):
        return True
    shutil.rmtree(work, ignore_errors=True)
    (out / "tokenizer.json").unlink(missing_ok=True)
    (work / "shards").mkdir(parents=True)
    stamp.write_text(json.dumps(ident))
    return False


def _tokenizer(out: Path, work: Path, files: list[str], field: str, train_rows, train_bytes, given, opts) -> dict:
    """Save tokenizer.json (given, kept from an interrupted run, or trained on the bounded sample); returns what
    meta.json records about the sample."""
    tok_path = out / "tokenizer.json"
    n = max(1, int(np.searchsorted(np.cumsum(train_bytes), opts["tokenizer_train_bytes"], side="right")))
    sample = {"tokenizer_train_bytes": opts["tokenizer_train_bytes"], "tokenizer_sample_documents": n,
              "tokenizer_sample_bytes": int(train_bytes[:n].sum())}
    if given is not None:
        tmp = out / f".tokenizer.json.tmp{os.getpid()}"
        shutil.copyfile(given, tmp)  # byte copy, so its sha256 equals the one in the identity
        os.replace(tmp, tok_path)
        return {}
    if tok_path.is_file():
        return sample
    tmp = work / f"tokenizer.json.tmp{os.getpid()}"
    # A prefix of the shuffled training documents is a uniform sample; on a corpus below the bound it is all
    # of them, in the order the in-memory preparation trained on, so the vocabulary and merges are unchanged.
    peak = bpe.train_on_sample(files, field, train_rows[:n], sample["tokenizer_sample_bytes"], opts["vocab_size"],
                               tmp, opts["show_progress"])
    os.replace(tmp, tok_path)
    return {**sample, "tokenizer_peak_rss": peak}


def _concatenate(tasks: list[encode.ShardTask], final: Path, itemsize: int) -> int:
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as dst:
        for task in tasks:
            with open(task.path, "rb") as f:
                shutil.copyfileobj(f, dst, 1 << 20)  # a bigger buffer is as fast and a peak of its own
    os.replace(tmp, final)  # atomic on POSIX: readers see the old file or the complete new one
    return final.stat().st_size // itemsize


def _build(out: Path, ident: dict, opts: dict) -> dict:
    """Every step from the source to meta.json's content, resuming from what .work holds."""
    work, show = out / WORK, opts["show_progress"]
    _fresh_work(work, out, ident)
    marks = [time.monotonic()]  # phase boundaries, for meta.json's "seconds" (this run's, not a resumed one's)
    src = sources.open_source(opts["source"], opts["text_field"], work / "arrow", show)
    files = sources.table_files(src, work)
    with _bar("reading", show) as bar:
        kept = sources.scan(src, files, opts["min_article_length"], opts["max_articles"], bar)
    order, n_val = split_order(len(kept.rows), opts["val_fraction"], opts["split_seed"])
    rows, nbytes, non_utf8 = kept.rows[order], kept.nbytes[order], kept.non_utf8_documents
    del order, kept  # the unshuffled index: 16 bytes a document
    marks.append(time.monotonic())
    given = opts["tokenizer_path"]
    sample = _tokenizer(out, work, files, src.text_field, rows[n_val:], nbytes[n_val:], given, opts)
    marks.append(time.monotonic())
    dtype = token_dtype(opts["vocab_size"])
    splits = {"val": (rows[:n_val], nbytes[:n_val]), "train": (rows[n_val:], nbytes[n_val:])}
    tasks = {s: encode.plan_shards(work / "shards", s, r, b, SHARD_BYTES) for s, (r, b) in splits.items()}
    with _bar("encoding", show, total=int(nbytes.sum())) as bar:
        encode.run_shards(tasks["train"] + tasks["val"], opts["num_proc"],
                          (files, src.text_field, str(out / "tokenizer.json"), dtype.name), bar)
    marks.append(time.monotonic())
    tokens = {s: _concatenate(tasks[s], out / f"{s}.bin", dtype.itemsize) for s in ("train", "val")}
    marks.append(time.monotonic())
    vocab_learned = bpe.load_tokenizer(str(out / "tokenizer.json"), opts["vocab_size"]).get_vocab_size()
    return dict(source=opts["source"], source_identity=ident, tokenizer_sha256=sha256_file(out / "tokenizer.json"),
                vocab_size=opts["vocab_size"], vocab_learned=vocab_learned, dtype=dtype.name,
                n_documents={"train": len(rows) - n_val, "val": n_val}, train_tokens=tokens["train"],
                val_tokens=tokens["val"], non_utf8_documents=non_utf8,
                text_bytes=int(nbytes.sum()), **sample,
                seconds=dict(zip(("read", "tokenizer", "encode", "concatenate"), np.diff(marks).round(2).tolist())),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def prepare(source, *, vocab_size, text_field="text", val_fraction=0.1, split_seed=0, tokenizer_path=None,
            min_article_length=0, max_articles=None, prepared_dir=None, root="data/prepared", num_proc=1,
            tokenizer_train_bytes=DEFAULT_TOKENIZER_TRAIN_BYTES, show_progress=True) -> Path:
    """Prepare (or reuse) the directory with train.bin, val.bin, tokenizer.json and meta.json; return its path.

    Call it on one rank and barrier before the others read. meta.json is written last, atomically: its presence
    is what marks a directory complete; until then .work keeps what a rerun resumes from.
    """
    ident = source_identity(source, text_field, min_article_length, max_articles, vocab_size, val_fraction,
                            split_seed, tokenizer_path, tokenizer_train_bytes)
    out = Path(prepared_dir) if prepared_dir is not None else Path(root) / prepared_key(ident)
    if (out / "meta.json").exists():
        _check_existing(out, ident)
        return out
    if tokenizer_path:
        bpe.load_tokenizer(tokenizer_path, vocab_size)  # checked before reading a corpus
    elif vocab_size < bpe.MIN_BPE_VOCAB:
        bpe.train_tokenizer([], vocab_size)  # raises its one-line error before any data work
    opts = dict(locals(), num_proc=max(1, int(num_proc)))
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _exclusive(out, show_progress), _stop_on_ctrl_c(out / WORK), _datasets_bars(show_progress):
        if (out / "meta.json").exists():  # the job we waited for made it
            _check_existing(out, ident)
            return out
        meta = _build(out, ident, opts)
        tmp = out / f".meta.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out / "meta.json")
        shutil.rmtree(out / WORK, ignore_errors=True)
    if show_progress:
        print(_summary(meta, time.monotonic() - started), file=sys.stderr, flush=True)
    return out


def _summary(meta: dict, seconds: float) -> str:
    docs, tokens = sum(meta["n_documents"].values()), meta["train_tokens"] + meta["val_tokens"]
    peak = meta.get("tokenizer_peak_rss")
    return (f"prepared {docs:,} documents, {tokens:,} tokens ({meta['dtype']}), "
            f"{meta['text_bytes'] / max(1, tokens):.2f} bytes/token, in {seconds:.1f} s"
            + (f"; tokenizer trained on {meta['tokenizer_sample_bytes'] / 1e6:.1f} MB, peak RSS "
               f"{peak / 1e6:.0f} MB" if peak else ""))


def default_num_proc() -> int:
    """The cores this process may run on (a job's CPU set, not the machine's): resolved per run, never saved."""
    return len(os.sched_getaffinity(0))


def for_config(cfg, show_progress: bool = True) -> Path:
    """Prepare (or reuse) the data a config names; warns on every run whose files hold replaced bytes."""
    from forge_ds import faults
    from forge_ds.data import read_meta

    d = cfg.data
    faults.point("prepare_data")  # tests: a slow rank 0 while the others wait
    prepared = prepare(d.source, vocab_size=cfg.model.vocab_size, text_field=d.text_field,
                       val_fraction=d.val_fraction, split_seed=d.split_seed, tokenizer_path=d.tokenizer,
                       min_article_length=d.min_article_length, max_articles=d.max_articles,
                       prepared_dir=d.prepared_dir, num_proc=d.num_proc or default_num_proc(),
                       tokenizer_train_bytes=d.tokenizer_train_bytes, show_progress=show_progress)
    bad = read_meta(prepared).get("non_utf8_documents", 0)
    if bad:  # printed on every run that uses these files, not only the one that made them
        print(f"forge-ds: warning: {bad} document(s) of {d.source} held bytes that are not UTF-8, replaced by "
              f"U+FFFD (counted as non_utf8_documents in {Path(prepared).resolve() / 'meta.json'})",
              file=sys.stderr, flush=True)
    return prepared
