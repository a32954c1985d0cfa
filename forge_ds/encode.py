"""Parallel encoding into shards: each task encodes one contiguous run of documents of the split order and writes
it to its own shard file, so a worker holds one batch, a finished shard survives an interruption, and the output
does not depend on how many workers there were.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forge_ds.bpe import READ_BATCH, children_deaf_to_ctrl_c, ignore_ctrl_c

_worker: dict = {}  # per process: the opened table, the tokenizer and the token dtype


@dataclass(frozen=True)
class ShardTask:
    path: Path  # the finished shard's file; its presence means done
    rows: np.ndarray  # source rows, in the split's order
    nbytes: int  # UTF-8 bytes of its documents, for progress


def open_table(table_files: list[str], field: str):
    """A one-column dataset over Arrow cache files, memory-mapped (no document is read until asked for)."""
    import datasets

    parts = [datasets.Dataset.from_file(f) for f in table_files]
    table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return table.select_columns([field])


def encode_texts(tok, texts: list[str], dtype) -> np.ndarray:
    """The token stream of `texts`: each as <bos> ... <eos>, concatenated."""
    # Match literal "<eos>" etc. in document text as plain bytes, not as special ids: a doc about HTML must not
    # inject document boundaries. The flag is not saved in tokenizer.json, so it is set on every tokenizer we use.
    tok.encode_special_tokens = True
    encs = tok.encode_batch_fast(texts)  # no character offsets (unused); the post-processor wraps each as <bos> ... <eos>
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
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # forking a process that used tokenizers' thread pool can deadlock it
    with children_deaf_to_ctrl_c():
        pool = ctx.Pool(min(num_proc, len(todo)), initializer=init_worker, initargs=(*init_args, True))
    with pool:
        try:
            for done in pool.imap_unordered(encode_shard, todo):
                if progress is not None:
                    progress.update(done)
        except BaseException:
            pool.terminate()
            raise
