"""The byte-level BPE tokenizer: trained on a bounded sample of the training documents, or loaded and checked.

A large sample trains in a child process: the trainer's word counts then leave with it instead of staying in the
preparing process, its peak memory is measured on its own, and Ctrl-C does not wait for the merge loop (which
runs in Rust and does not look at Python signals).
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from forge_ds.errors import ForgeError, describe
from forge_ds.tokens import BOS_ID, EOS_ID, MIN_BPE_VOCAB, SPECIAL_TOKENS

IN_PROCESS_SAMPLE_BYTES = 8 << 20  # smaller samples train in a few seconds: not worth a child's start-up
READ_BATCH = 256  # documents read (and encoded) at a time: tokenizers holds ~80 bytes per token of a batch


def train_tokenizer(docs, vocab_size: int, show_progress: bool = False, length: int | None = None
                    ) -> tokenizers.Tokenizer:
    """Byte-level BPE exactly as the contract specifies, trained on `docs`, any iterable of str, in order (ids 0..3
    are SPECIAL_TOKENS)."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ForgeError(f"vocab_size={vocab_size} must be at least {MIN_BPE_VOCAB} for byte-level BPE (256 byte "
                         "symbols + 4 special tokens); set --model.vocab_size")
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(docs, trainer, length=len(docs) if length is None else length)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    return tok


def load_tokenizer(path: str, vocab_size: int) -> tokenizers.Tokenizer:
    """Load a tokenizer.json and check it has the contract's special-token ids and fits `vocab_size`."""
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ForgeError(f"could not load tokenizer {str(path)!r} ({describe(exc, 300)}); pass a tokenizers "
                         "tokenizer.json") from exc
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ForgeError(f"tokenizer {str(path)!r} has special ids {dict(zip(SPECIAL_TOKENS, ids))}, expected "
                         "<pad>=0 <unk>=1 <bos>=2 <eos>=3; retrain it with forge_ds or omit --data.tokenizer")
    if tok.get_vocab_size() > vocab_size:
        raise ForgeError(f"tokenizer {str(path)!r} has {tok.get_vocab_size()} tokens, more than vocab_size="
                         f"{vocab_size}; raise --model.vocab_size or use a smaller tokenizer")
    return tok


@contextmanager
def children_deaf_to_ctrl_c():
    """Processes started inside inherit a blocked SIGINT and ignore it once they run (ignore_ctrl_c): a Ctrl-C,
    which reaches the whole process group, then stops only this process, which ends them, instead of printing a
    traceback from each one still importing."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def texts_by_row(docs, rows, progress=None):
    """The documents at `rows` of a sources.ArrowDocs, in that order, read a batch at a time."""
    for start in range(0, len(rows), READ_BATCH):
        texts = docs.texts(rows[start:start + READ_BATCH])
        if progress is not None:
            progress.update(sum(len(t.encode("utf-8", "surrogatepass")) for t in texts))
        yield from texts


def _train_from_rows(table_files, field, rows, sample_bytes, vocab_size, out_path, show_progress) -> int:
    from tqdm import tqdm

    from forge_ds.sources import open_table

    table = open_table(table_files, field)
    with tqdm(desc="tokenizer sample", unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress,
              total=sample_bytes) as bar:
        tok = train_tokenizer(texts_by_row(table, rows, bar), vocab_size, show_progress, length=len(rows))
    tok.save(str(out_path))
    return own_peak_rss()


def own_peak_rss() -> int:
    """This process's peak RSS since it started (VmHWM) in bytes: not ru_maxrss, which after a fork + exec
    also holds the parent's RSS at the fork (the old address space's peak), here the main process's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def start_python(call: str, **popen) -> subprocess.Popen:
    """A plain interpreter running `call` from this checkout's forge_ds, deaf to Ctrl-C. Not multiprocessing:
    its spawn would import the parent's main module, the CLI, hence torch (150 MB and seconds per child)."""
    root = str(Path(__file__).resolve().parents[1])
    with children_deaf_to_ctrl_c():
        return subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r}); {call}"], **popen)


def train_child() -> None:
    """The child side of train_on_sample: arguments as a pickle on stdin, the outcome as JSON beside the output."""
    ignore_ctrl_c()
    args = pickle.load(sys.stdin.buffer)
    try:
        outcome = {"peak": _train_from_rows(*args)}
    except ForgeError as exc:
        outcome = {"error": str(exc)}
    Path(f"{args[-2]}.outcome").write_text(json.dumps(outcome))


def train_on_sample(table_files: list[str], field: str, rows, sample_bytes: int, vocab_size: int, out_path: Path,
                    show_progress: bool) -> int:
    """Train on the documents at `rows` and save to `out_path`; returns the training's peak RSS in bytes (of this
    process when trained here: then it is an upper bound)."""
    args = (table_files, field, rows, sample_bytes, vocab_size, out_path, show_progress)
    if sample_bytes <= IN_PROCESS_SAMPLE_BYTES:
        return _train_from_rows(*args)
    proc = start_python("from forge_ds.bpe import train_child; train_child()", stdin=subprocess.PIPE)
    try:
        pickle.dump(args, proc.stdin)
        proc.stdin.close()
        code = proc.wait()  # Ctrl-C interrupts the wait here; the child, deaf to it, is killed below
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outcome_file = Path(f"{out_path}.outcome")
    if code != 0 or not outcome_file.is_file():
        raise RuntimeError(f"tokenizer training process failed (exit code {code})")
    outcome = json.loads(outcome_file.read_text())
    outcome_file.unlink()
    if "error" in outcome:
        raise ForgeError(outcome["error"])
    return outcome["peak"]
