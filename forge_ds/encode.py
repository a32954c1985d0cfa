"""Parallel encoding into shards: each task encodes one contiguous run of documents of the split order and writes
it to its own shard file, so a worker holds one batch, a finished shard survives an interruption, and the output
does not depend on how many workers there were.
"""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forge_ds.bpe import READ_BATCH, ignore_ctrl_c, start_python
from forge_ds.sources import open_table

_worker: dict = {}  # per process: the opened table, the tokenizer and the token dtype


@dataclass(frozen=True)
class ShardTask:
    path: Path  # the finished shard's file; its presence means done
    rows: np.ndarray  # source rows, in the split's order
    nbytes: int  # UTF-8 bytes of its documents, for progress


def encode_texts(tok, texts: list[str], dtype) -> np.ndarray:
    """The token stream of `texts`: each as <bos> ... <eos>, concatenated."""
    # Match literal "<eos>" etc. in document text as plain bytes, not as special ids: a doc about HTML must not
    # inject document boundaries. The flag is not saved in tokenizer.json, so it is set on every tokenizer we use.
    tok.encode_special_tokens = True
    encs = tok.encode_batch_fast(texts)  # without character offsets (unused); each wrapped as <bos> ... <eos>
    if not encs:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encs])


def init_worker(table_files: list[str], field: str, tokenizer_path: str, dtype: str, in_pool: bool) -> None:
    import tokenizers

    if in_pool:
        ignore_ctrl_c()  # the parent stops the pool on Ctrl-C
    # One thread per process, so num_proc means cores: tokenizers' own thread pool would oversubscribe the workers,
    # and in a single process its per-thread allocations make the peak memory vary from run to run by ~100 MB.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(table=open_table(table_files, field), tok=tokenizers.Tokenizer.from_file(tokenizer_path),
                   dtype=np.dtype(dtype))


def encode_shard(task: ShardTask) -> int:
    """Write one shard (atomically: a crash leaves no file that looks finished); returns its UTF-8 bytes."""
    from forge_ds.bpe import texts_by_row

    tmp = task.path.with_name(f".{task.path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        batch: list[str] = []
        for text in texts_by_row(_worker["table"], task.rows):
            batch.append(text)
            if len(batch) == READ_BATCH:
                f.write(encode_texts(_worker["tok"], batch, _worker["dtype"]).tobytes())
                batch = []
        f.write(encode_texts(_worker["tok"], batch, _worker["dtype"]).tobytes())
    os.replace(tmp, task.path)
    return task.nbytes


def plan_shards(shard_dir: Path, split: str, rows: np.ndarray, nbytes: np.ndarray, shard_bytes: int
                ) -> list[ShardTask]:
    """Cut the split's documents into runs of about `shard_bytes` of text: decided by the data alone, so a resume
    with another number of workers finds the same shards."""
    starts = (np.cumsum(nbytes) - nbytes) // shard_bytes
    cuts = [0, *(np.flatnonzero(np.diff(starts)) + 1).tolist(), len(rows)]
    return [ShardTask(shard_dir / f"{split}-{i:06d}.bin", rows[a:b], int(nbytes[a:b].sum()))
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]


def run_shards(tasks: list[ShardTask], num_proc: int, init_args: tuple, progress) -> None:
    """Encode every task whose shard is missing, on `num_proc` processes (this one when 1 or a single task)."""
    todo = [t for t in tasks if not t.path.exists()]
    if progress is not None:
        progress.update(sum(t.nbytes for t in tasks) - sum(t.nbytes for t in todo))
    if num_proc <= 1 or len(todo) <= 1:
        init_worker(*init_args, in_pool=False)
        for task in todo:
            done = encode_shard(task)
            if progress is not None:
                progress.update(done)
        return
    _run_in_workers(todo, min(num_proc, len(todo)), init_args, progress)


def serve() -> None:
    """A worker process (bpe.start_python): the init arguments, then shard tasks, as pickles on stdin; a pickle
    per finished shard on stdout."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    init_worker(*pickle.load(inp), in_pool=True)
    while True:
        try:
            task = pickle.load(inp)
        except EOFError:
            return
        pickle.dump(encode_shard(task), out)
        out.flush()


def _run_in_workers(todo: list[ShardTask], n: int, init_args: tuple, progress) -> None:
    procs = [start_python("from forge_ds.encode import serve; serve()", stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) for _ in range(n)]
    pending, busy = list(reversed(todo)), {}

    def give(proc) -> None:
        if pending:
            pickle.dump(pending.pop(), proc.stdin)
            proc.stdin.flush()
            busy[proc.stdout.fileno()] = proc
        else:
            proc.stdin.close()  # end of work: it exits

    try:
        for proc in procs:
            pickle.dump(init_args, proc.stdin)
            give(proc)
        while busy:
            for fd in select.select(list(busy), [], [])[0]:
                proc = busy.pop(fd)
                try:
                    done = pickle.load(proc.stdout)
                except EOFError:
                    raise RuntimeError(f"an encoding process died (exit code {proc.wait()})") from None
                if progress is not None:
                    progress.update(done)
                give(proc)
    finally:
        for proc in procs:
            if busy or pending:  # interrupted or failed: nothing of theirs is needed
                proc.kill()
            proc.wait()
