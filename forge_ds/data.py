"""Corpus loading, tokenizer, prepared token files, training windows and the global batch order.

One prepared directory holds everything a run reads: train.bin / val.bin (uint16 token streams, each document encoded
as <bos> ... <eos> and concatenated), tokenizer.json and meta.json. Its name is a hash of everything that decides its
content, so changing any of those prepares a new one instead of silently reusing a stale one.

This module reads no environment variables and never touches torch.distributed: the caller decides which rank
prepares and places the barriers.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import math
import os
import random
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from forge_ds.errors import ForgeError
from forge_ds.files import sha256_file

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0, 1, 2, 3 (contract)
BOS_ID, EOS_ID = 2, 3
FORMAT_VERSION = 1  # bump when prepare() writes different bytes for the same inputs: old dirs get a new key
_CHUNK = 1 << 24  # tokens per chunk when streaming a .bin (bounds RAM on big corpora)


class Documents(list):
    """A list[str] of documents that also says how many had non-UTF-8 bytes replaced by U+FFFD."""

    non_utf8_documents: int = 0


# ----------------------------------------------------------------------------------------------- sources


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _is_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _classify(source: str) -> tuple[str, Path | None]:
    """Return (kind, path) for a source string; kinds: pydoc, hf, txt, txt_dir, jsonl, disk."""
    if source == "builtin:pydoc":
        return "pydoc", None
    if source.startswith("hf:"):
        return "hf", None
    if source.startswith("builtin:"):
        raise ForgeError(f"unknown data source {source!r}; the only builtin is builtin:pydoc")
    path = Path(source).expanduser()
    if not path.exists():
        raise ForgeError(f"data source {source!r} does not exist; pass builtin:pydoc, hf:<name>[:<config>], "
                         "a .txt/.jsonl file, a directory of .txt files or a save_to_disk directory")
    if path.is_dir():
        saved = any((path / n).exists() for n in ("state.json", "dataset_dict.json"))
        return ("disk" if saved else "txt_dir"), path
    if path.suffix == ".txt":
        return "txt", path
    if path.suffix == ".jsonl":
        return "jsonl", path
    raise ForgeError(f"data source {source!r} has unsupported extension {path.suffix!r}; use .txt or .jsonl")


def _txt_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")  # top level only, by name
    if not files:
        raise ForgeError(f"directory {str(path)!r} has no .txt files (and is not a save_to_disk dataset); "
                         "put one document per .txt file there")
    return files


def _load_local(builder: str, files: list[Path], **kwargs):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
    except Exception as exc:  # a malformed user file surfaces as many different exception types
        raise ForgeError(f"could not read {', '.join(map(str, files[:3]))} with the {builder!r} loader "
                         f"({_one_line(exc)}); check the file format") from exc


def _column(ds, field: str, where: str, line_of=lambda i: f"row {i}") -> list[str]:
    if field not in ds.column_names:
        raise ForgeError(f"{line_of(0)} of {where} has no field {field!r} (columns: {ds.column_names}); "
                         "set --data.text_field")
    texts = list(ds[field])
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = "has no field" if t is None else "has a non-string field"
            raise ForgeError(f"{line_of(i)} of {where} {what} {field!r}; fix that record or set --data.text_field")
    return texts


def _jsonl_line(path: Path, row: int) -> str:
    # The json loader skips blank lines, so row i is the i-th non-blank line; only computed on the error path.
    with open(path, "rb") as f:
        seen = -1
        for lineno, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == row:
                return f"line {lineno}"
    return f"record {row + 1}"


# CPython 3.11.7's pydoc help topics, shipped: each Python release regenerates them, so reading the running
# interpreter's would give every Python a different "default corpus" (and docs/QUALITY.md's figures only on 3.11.7).
PYDOC_CORPUS = Path(__file__).parent / "corpus" / "pydoc_topics-3.11.7.json.gz"


def pydoc_topics() -> dict[str, str]:
    with gzip.open(PYDOC_CORPUS, "rt", encoding="utf-8") as f:
        return json.load(f)


def _read_source(source: str, text_field: str) -> tuple[list[str], list[bool]]:
    """All documents of a source, in source order, with a per-document 'had bytes replaced' flag."""
    kind, path = _classify(source)
    if kind == "pydoc":
        topics = pydoc_topics()
        docs = [topics[k] for k in sorted(topics)]
        return docs, [False] * len(docs)
    if kind == "hf":
        import datasets

        name, _, config = source[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split="train")
        except Exception as exc:
            raise ForgeError(f"could not load {source} ({_one_line(exc)}); offline? set HF_DATASETS_OFFLINE=0 / "
                             "pre-download it, or save_to_disk it and pass that directory") from exc
        return _column(ds, text_field, source), [False] * len(ds)
    if kind == "disk":
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ForgeError(f"saved DatasetDict {source!r} has no 'train' split (splits: {list(ds)}); "
                                 "save the training split as 'train'")
            ds = ds["train"]
        return _column(ds, text_field, source), [False] * len(ds)

    # Text files. Policy for bytes that are not UTF-8: replace them with U+FFFD (one bad byte should not kill a
    # run over a web-scraped corpus) and count the affected documents so the caller can warn. A document counts
    # when it contains U+FFFD and comes from a file that failed strict decoding (a literal U+FFFD in such a file
    # is over-counted; harmless for a warning).
    files = _txt_files(path) if kind == "txt_dir" else [path]
    if all(p.stat().st_size == 0 for p in files):  # the loaders would fail on it with an unrelated-looking error
        raise ForgeError(f"data source {source!r} is empty (0 bytes{' in every .txt file' if len(files) > 1 else ''}); "
                         "put text in it or point --data.source elsewhere")
    bad_files = {p for p in files if not _is_utf8(p)}
    # datasets hands raw bytes to pyarrow when encoding == "utf-8" exactly and ignores encoding_errors there; the
    # codec alias "utf_8" routes through Python's decoder, which honours errors="replace".
    enc = dict(encoding="utf_8", encoding_errors="replace") if bad_files else {}
    if kind == "jsonl":
        ds = _load_local("json", files, **enc)
        docs = _column(ds, text_field, source, lambda i: _jsonl_line(path, i))
        return docs, [bool(bad_files) and "\ufffd" in d for d in docs]
    if kind == "txt":
        # A single .txt file: one document per blank-line-separated paragraph, so one file yields many documents
        # (the train/val split needs at least two). A directory: one document per file.
        ds = _load_local("text", files, sample_by="paragraph", **enc)
        docs = list(ds["text"])
        return docs, [bool(bad_files) and "\ufffd" in d for d in docs]
    ds = _load_local("text", files, sample_by="document", **enc)
    docs = list(ds["text"])  # one row per file, in the (sorted) order given
    return docs, [p in bad_files and "\ufffd" in d for p, d in zip(files, docs)]


def load_documents(source: str, text_field: str = "text", min_article_length: int = 0,
                   max_articles: int | None = None) -> Documents:
    """Documents of `source` in source order: whitespace-only ones dropped always, those shorter than
    `min_article_length` characters dropped, then the first `max_articles` kept. `.non_utf8_documents` counts kept
    documents whose bytes were replaced."""
    docs, bad = _read_source(source, text_field)
    kept = [(d, b) for d, b in zip(docs, bad) if d.strip() and len(d) >= min_article_length]
    if max_articles is not None:
        kept = kept[:max_articles]
    if not kept:
        raise ForgeError(f"data source {source!r} has no documents after filtering (min_article_length="
                         f"{min_article_length}, max_articles={max_articles}); add text or relax the filters")
    out = Documents(d for d, _ in kept)
    out.non_utf8_documents = sum(b for _, b in kept)
    return out


def split_documents(docs: list[str], val_fraction: float, split_seed: int) -> tuple[list[str], list[str]]:
    """(train, val): shuffle with random.Random(split_seed), hold out the first max(1, floor(N*val_fraction))."""
    if not 0 < val_fraction < 1:
        raise ForgeError(f"val_fraction={val_fraction} is outside (0, 1); set --data.val_fraction to e.g. 0.1")
    if len(docs) < 2:
        raise ForgeError(f"the corpus has {len(docs)} document; need at least 2 to hold out a validation split; "
                         "add text (a single .txt file is split at blank lines)")
    shuffled = list(docs)
    random.Random(split_seed).shuffle(shuffled)
    n_val = max(1, math.floor(len(docs) * val_fraction))
    return shuffled[n_val:], shuffled[:n_val]


# ----------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int, show_progress: bool = False) -> tokenizers.Tokenizer:
    """Byte-level BPE exactly as the contract specifies, trained on `docs` (ids 0..3 are SPECIAL_TOKENS)."""
    if not 256 + len(SPECIAL_TOKENS) <= vocab_size <= 65536:
        # Below 260 the byte alphabet alone overflows the model's embedding; above 65536 ids do not fit uint16.
        raise ForgeError(f"vocab_size={vocab_size} must be in [260, 65536] for byte-level BPE with uint16 token "
                         "files; set --model.vocab_size")
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(docs, trainer, length=len(docs))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    return tok


def load_tokenizer(path: str, vocab_size: int) -> tokenizers.Tokenizer:
    """Load a tokenizer.json and check it has the contract's special-token ids and fits `vocab_size`."""
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ForgeError(f"could not load tokenizer {str(path)!r} ({_one_line(exc)}); pass a tokenizers "
                         "tokenizer.json") from exc
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ForgeError(f"tokenizer {str(path)!r} has special ids {dict(zip(SPECIAL_TOKENS, ids))}, expected "
                         "<pad>=0 <unk>=1 <bos>=2 <eos>=3; retrain it with forge_ds or omit --data.tokenizer")
    if tok.get_vocab_size() > vocab_size:
        raise ForgeError(f"tokenizer {str(path)!r} has {tok.get_vocab_size()} tokens, more than vocab_size="
                         f"{vocab_size}; raise --model.vocab_size or use a smaller tokenizer")
    return tok


def _encode_batch(batch: dict, tokenizer: tokenizers.Tokenizer) -> dict:
    # Match literal "<eos>" etc. in document text as plain bytes, not as special ids: a doc about HTML must not
    # inject document boundaries. The flag is not saved in tokenizer.json nor pickled to workers, so set it here.
    tokenizer.encode_special_tokens = True
    encs = tokenizer.encode_batch(batch["text"])  # the post-processor wraps each as <bos> ... <eos>
    return {"ids": [np.asarray(e.ids, dtype=np.uint16) for e in encs]}


# ----------------------------------------------------------------------------------------------- prepare


def _stat(paths: list[Path], base: Path) -> list:
    # size + mtime instead of a content hash: cheap on big corpora; touching a file only costs a re-prepare.
    return [[str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def prepared_key(source_identity: dict) -> str:
    canonical = json.dumps(source_identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def source_identity(source, text_field, min_article_length, max_articles, vocab_size, val_fraction, split_seed,
                    tokenizer_path) -> dict:
    """Everything that decides a prepared directory's bytes (JSON-native values, so it compares after a reload)."""
    kind, path = _classify(source)
    ident = dict(format=FORMAT_VERSION, source=source, kind=kind, text_field=text_field,
                 min_article_length=min_article_length, max_articles=max_articles, vocab_size=vocab_size,
                 val_fraction=val_fraction, split_seed=split_seed,
                 tokenizer_sha256=sha256_file(Path(tokenizer_path)) if tokenizer_path else None)
    if kind == "pydoc":
        ident["corpus"] = PYDOC_CORPUS.name
    elif kind == "hf":
        ident["split"] = "train"  # hub revisions are not tracked: pass an explicit prepared_dir or delete it
    else:
        ident["path"] = str(path.resolve())
        if kind == "txt_dir":
            ident["files"] = _stat(_txt_files(path), path)
        elif kind == "disk":
            ident["files"] = _stat(sorted(p for p in path.rglob("*") if p.is_file()), path)
        else:
            ident["files"] = _stat([path], path.parent)
    return ident


def _replace_into(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)  # atomic on POSIX: readers see the old file or the complete new one


def _write_tokens(docs: list[str], tok: tokenizers.Tokenizer, out: Path, num_proc: int, show_progress: bool) -> int:
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    if not show_progress:
        datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_dict({"text": docs}).map(
            _encode_batch, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"],
            fn_kwargs={"tokenizer": tok}, desc=f"tokenizing {out.stem}")
    finally:
        if enabled and not show_progress:
            datasets.enable_progress_bars()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    n = 0
    with open(tmp, "wb") as f:
        # Stream the arrow chunks to disk: no second full copy of the corpus in RAM.
        for chunk in tqdm(ds.data.column("ids").chunks, desc=f"writing {out.name}", disable=not show_progress):
            arr = chunk.flatten().to_numpy().astype(np.uint16, copy=False)
            f.write(arr.tobytes())
            n += len(arr)
    _replace_into(tmp, out)
    return n


def prepare(source, *, vocab_size, text_field="text", val_fraction=0.1, split_seed=0, tokenizer_path=None,
            min_article_length=0, max_articles=None, prepared_dir=None, root="data/prepared", num_proc=1,
            show_progress=True) -> Path:
    """Prepare (or reuse) the directory with train.bin, val.bin, tokenizer.json and meta.json; return its path.

    Call it on one rank and barrier before the others read. meta.json is written last, atomically: its presence
    is what marks a directory complete, so a crash mid-way leaves a directory that is simply prepared again.
    """
    ident = source_identity(source, text_field, min_article_length, max_articles, vocab_size, val_fraction,
                            split_seed, tokenizer_path)
    out = Path(prepared_dir) if prepared_dir is not None else Path(root) / prepared_key(ident)
    if (out / "meta.json").exists():
        meta = read_meta(out)
        now = json.loads(json.dumps(ident))  # as it reads back from meta.json (tuples become lists)
        if meta["source_identity"] != now:
            differ = sorted(k for k in now.keys() | meta["source_identity"].keys()
                            if now.get(k) != meta["source_identity"].get(k))
            raise ForgeError(f"prepared dir {str(out)!r} was made from different data or settings "
                             f"({meta['source']!r}; differs in {', '.join(differ)}); delete it or pick another "
                             "--data.prepared_dir")
        return out

    given = load_tokenizer(tokenizer_path, vocab_size) if tokenizer_path else None  # checked before reading a corpus
    docs = load_documents(source, text_field, min_article_length, max_articles)
    train_docs, val_docs = split_documents(docs, val_fraction, split_seed)
    # Trained on the training documents only, so validation text never shapes the vocabulary.
    tok = given if given is not None else train_tokenizer(train_docs, vocab_size, show_progress)
    assert tok.get_vocab_size() <= 65536, "ids must fit uint16"  # guaranteed by train/load checks above

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tokenizer.json.tmp{os.getpid()}"
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, tmp)  # byte copy, so its sha256 equals the one in the identity
    else:
        tok.save(str(tmp))
    _replace_into(tmp, out / "tokenizer.json")
    train_tokens = _write_tokens(train_docs, tok, out / "train.bin", num_proc, show_progress)
    val_tokens = _write_tokens(val_docs, tok, out / "val.bin", num_proc, show_progress)

    meta = dict(source=source, source_identity=ident, tokenizer_sha256=sha256_file(out / "tokenizer.json"),
                vocab_size=vocab_size, vocab_learned=tok.get_vocab_size(), dtype="uint16",
                n_documents={"train": len(train_docs), "val": len(val_docs)}, train_tokens=train_tokens,
                val_tokens=val_tokens, non_utf8_documents=docs.non_utf8_documents,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tmp = out / f".meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    _replace_into(tmp, out / "meta.json")
    return out


def read_meta(prepared: Path) -> dict:
    """meta.json of a prepared directory, checked against the tokenizer.json beside it."""
    prepared = Path(prepared)
    try:
        meta = json.loads((prepared / "meta.json").read_text())
    except FileNotFoundError:
        raise ForgeError(f"{str(prepared)!r} is not a complete prepared data dir (no meta.json); "
                         "run prepare again or point --data.prepared_dir elsewhere") from None
    except json.JSONDecodeError as exc:
        raise ForgeError(f"{str(prepared / 'meta.json')!r} is not valid JSON ({exc}); delete the directory "
                         "and prepare again") from exc
    tok_path = prepared / "tokenizer.json"
    if not tok_path.exists() or sha256_file(tok_path) != meta.get("tokenizer_sha256"):
        raise ForgeError(f"{str(tok_path)!r} is missing or differs from the tokenizer the token files were made "
                         "with (meta.json tokenizer_sha256); delete the directory and prepare again")
    return meta


def check_fits(prepared, seq_len: int) -> None:
    """Raise ForgeError unless both splits hold at least one window of seq_len+1 tokens."""
    meta = read_meta(prepared)
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        if n < seq_len + 1:
            raise ForgeError(f"corpus {meta['source']!r} {split} split has {n} tokens, fewer than one window of "
                             f"max_seq_len+1={seq_len + 1}; use a smaller --model.max_seq_len or more text")


# ----------------------------------------------------------------------------------------------- reading


class TokenWindows(torch.utils.data.Dataset):
    """Windows of seq_len+1 tokens with stride seq_len: input = first seq_len, target = last seq_len.

    The last partial window is dropped (ModularForge pads it with <pad> and its loss ignores pads; we lose at most
    seq_len-1 tokens per split instead, and every sample has the same shape). Tokens are read from a read-only
    np.memmap, so the dataset never holds the corpus in RAM.
    """

    def __init__(self, bin_path, seq_len: int):
        self.bin_path, self.seq_len = str(bin_path), int(seq_len)
        self.tokens = np.memmap(self.bin_path, dtype=np.uint16, mode="r")
        self.n_tokens = len(self.tokens)
        if len(self) == 0:
            raise ForgeError(f"{self.bin_path!r} has {self.n_tokens} tokens, fewer than one window of "
                             f"max_seq_len+1={seq_len + 1}; use a smaller --model.max_seq_len or more text")

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getstate__(self):
        # Pickling a memmap copies its data; DataLoader workers reopen the file instead.
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.tokens = np.memmap(self.bin_path, dtype=np.uint16, mode="r")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        start = i * self.seq_len
        window = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class GlobalBatchSampler:
    """The global sample order, independent of world size (so a run can resume on a different number of GPUs).

    Epoch e is torch.randperm(num_samples) seeded with seed*1_000_003 + e; optimizer step s of the epoch takes the
    global batch perm[s*G:(s+1)*G] (the tail that does not fill a global batch is dropped). Inside it, micro-step
    m of rank r takes [(m*world + r)*micro_batch : +micro_batch], so any split with the same G = micro_batch *
    grad_accum * world_size trains on exactly the same samples per step.
    """

    def __init__(self, num_samples: int, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        if min(micro_batch, grad_accum, world_size) < 1:
            raise ForgeError(f"micro_batch={micro_batch}, grad_accum={grad_accum}, world_size={world_size} must "
                             "all be >= 1; fix the batch settings")
        self.num_samples, self.micro_batch = num_samples, micro_batch
        self.grad_accum, self.world_size, self.seed = grad_accum, world_size, seed
        self.global_batch = micro_batch * grad_accum * world_size
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ForgeError(f"the dataset has {num_samples} windows, fewer than one global batch of "
                             f"{self.global_batch} (micro_batch*grad_accum*world_size); lower the batch or add text")
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:  # cached: every micro-step of an epoch reuses the same permutation
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=gen), epoch
        return self._perm

    def step_indices(self, global_step: int) -> list[int]:
        epoch, step = divmod(global_step, self.steps_per_epoch)
        start = step * self.global_batch
        return self._permutation(epoch)[start:start + self.global_batch].tolist()

    def micro_indices(self, global_step: int, rank: int, micro_step: int) -> list[int]:
        if not (0 <= rank < self.world_size and 0 <= micro_step < self.grad_accum):
            raise ValueError(f"rank {rank} / micro_step {micro_step} out of range for world_size "
                             f"{self.world_size}, grad_accum {self.grad_accum}")
        start = (micro_step * self.world_size + rank) * self.micro_batch
        return self.step_indices(global_step)[start:start + self.micro_batch]


def stack_windows(windows: TokenWindows, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [windows[i] for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class MicroBatches(torch.utils.data.Dataset):
    """Item k is this rank's micro-batch `k % grad_accum` of optimizer step `k // grad_accum`: the unit a
    DataLoader worker prepares ahead of the step. Holds no state that a resume would need: the sampler decides."""

    def __init__(self, windows: TokenWindows, sampler: GlobalBatchSampler, rank: int):
        self.windows, self.sampler, self.rank = windows, sampler, rank

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro = divmod(k, self.sampler.grad_accum)
        return stack_windows(self.windows, self.sampler.micro_indices(step, self.rank, micro))


def micro_batches(windows: TokenWindows, sampler: GlobalBatchSampler, rank: int, first_step: int, end_step: int,
                  *, num_workers: int, pin_memory: bool):
    """This rank's micro-batches for optimizer steps [first_step, end_step), in loop order.

    num_workers > 0 prepares them in worker processes, `2 * num_workers` ahead of the step; pinned (page-locked)
    batches let the copy to a GPU run asynchronously, where a copy from ordinary memory first waits for the GPU to
    finish its queue. Its own generator keeps the loader from drawing on the global RNG that dropout uses.
    """
    ga = sampler.grad_accum
    loader = torch.utils.data.DataLoader(
        MicroBatches(windows, sampler, rank), batch_size=None, sampler=range(first_step * ga, end_step * ga),
        num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator(),
        prefetch_factor=2 if num_workers else None)
    return iter(loader)


def unigram_entropy(bin_path) -> float:
    """Entropy in nats of the token stream's unigram distribution (the loss of the best context-free predictor)."""
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r")
    if len(tokens) == 0:
        raise ForgeError(f"{str(bin_path)!r} has no tokens; prepare the data again")
    counts = np.zeros(65536, dtype=np.int64)
    for start in range(0, len(tokens), _CHUNK):  # chunked: bincount would copy the whole stream as int64
        counts += np.bincount(tokens[start:start + _CHUNK], minlength=65536)
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())
