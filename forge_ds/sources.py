"""The corpus kinds a run reads, opened as memory-mapped Arrow tables, and the one pass that filters them.

No kind is read into a Python list: local files go through datasets' builders into an Arrow cache on disk
(written in chunks), hub datasets stream into an Arrow file of our own, saved datasets already are Arrow files,
and the filter pass walks the table in batches, keeping one row number and one byte count per kept document.
"""

from __future__ import annotations

import array
import codecs
import gzip
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forge_ds.errors import ForgeError, describe

# CPython 3.11.7's pydoc help topics, shipped: each Python release regenerates them, so reading the running
# interpreter's would give every Python a different "default corpus" (and docs/QUALITY.md's figures only on 3.11.7).
PYDOC_CORPUS = Path(__file__).parent / "corpus" / "pydoc_topics-3.11.7.json.gz"
SCAN_BATCH = 1_000  # rows per filter batch: about a MB of text for typical documents
READ_CHUNK = 1 << 20  # bytes the text/json builders read at a time (their default, 10 MB, costs ~60 MB of RAM)


def pydoc_topics() -> dict[str, str]:
    with gzip.open(PYDOC_CORPUS, "rt", encoding="utf-8") as f:
        return json.load(f)


def classify(source: str) -> tuple[str, Path | None]:
    """Return (kind, path) for a source string; kinds: pydoc, hf, txt, txt_dir, jsonl, disk."""
    if source == "builtin:pydoc":
        return "pydoc", None
    if source.startswith("hf:"):
        if not source[3:].split(":")[0].strip():
            raise ForgeError(f"data source {source!r} names no dataset; give hf:<name>[:<config>], e.g. "
                             "hf:wikitext:wikitext-103-raw-v1")
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


def txt_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")  # top level only, by name
    if not files:
        raise ForgeError(f"directory {str(path)!r} has no .txt files (and is not a save_to_disk dataset); "
                         "put one document per .txt file there")
    return files


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


def _first_bad_jsonl_line(path: Path) -> str | None:
    # Only on the error path: datasets' json builder reports a failure without saying where it is.
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                return f"{path}:{lineno}: not valid JSON ({exc}); fix or delete that line"
            if not isinstance(record, dict):
                return f"{path}:{lineno}: a JSON {type(record).__name__}, not an object; one object per line"
    return None


def _load_local(builder: str, files: list[Path], cache_dir: Path, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train",
                                     cache_dir=str(cache_dir), chunksize=READ_CHUNK, **kwargs)
    except Exception as exc:  # a malformed user file surfaces as many different exception types
        where = _first_bad_jsonl_line(files[0]) if builder == "json" else None
        raise ForgeError(where or f"could not read {', '.join(map(str, files[:3]))} with the {builder!r} loader "
                         f"({describe(exc, 300)}); check the file format") from exc


def jsonl_line(path: Path, row: int) -> str:
    # The json loader skips blank lines, so row i is the i-th non-blank line; only computed on the error path.
    with open(path, "rb") as f:
        seen = -1
        for lineno, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == row:
                return f"line {lineno}"
    return f"record {row + 1}"


@dataclass
class Source:
    """A corpus as an Arrow-backed datasets.Dataset plus what the filter pass needs to judge its rows."""

    name: str
    kind: str
    ds: object
    text_field: str
    path: Path | None = None
    bad_rows: object = None  # callable(row) -> bool: the row came from a file whose bytes were not all UTF-8
    files: list = field(default_factory=list)

    def line_of(self, row: int) -> str:
        return jsonl_line(self.path, row) if self.kind == "jsonl" else f"row {row}"


def _embedded_or_saved(source: str, kind: str, path: Path | None):
    import datasets

    if kind == "pydoc":
        topics = pydoc_topics()
        return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ForgeError(f"saved DatasetDict {source!r} has no 'train' split (splits: {list(ds)}); "
                             "save the training split as 'train'")
        ds = ds["train"]
    return ds


def _hub(source: str, text_field: str, cache_dir: Path, show_progress: bool):
    """hf:<name>[:<config>]'s train split in datasets' streaming mode, its text column copied into one Arrow file
    in `cache_dir` as it arrives: the split reads documents by index, which a stream cannot, and the hub's files
    are neither downloaded whole nor converted a second time into datasets' cache (for a 100 GB corpus, 200 GB
    of disk less). Offline nothing can stream, so there a copy pre-downloaded into that cache is loaded."""
    import datasets

    name, _, config = source[3:].partition(":")
    copy = cache_dir / "hub-train.arrow"  # complete, or absent: kept by an interrupted preparation
    try:
        if datasets.config.HF_HUB_OFFLINE:
            return datasets.load_dataset(name, config or None, split="train")
        if not copy.is_file():
            stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
            _copy_stream(stream, source, text_field, copy, show_progress)
    except ForgeError:
        raise
    except Exception as exc:
        raise ForgeError(f"could not load {source} ({describe(exc, 300)}); offline? set HF_HUB_OFFLINE=0 / "
                         "pre-download it, or save_to_disk it and pass that directory") from exc
    return datasets.Dataset.from_file(str(copy))


def _copy_stream(stream, source: str, text_field: str, copy: Path, show_progress: bool) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    from tqdm import tqdm

    copy.parent.mkdir(parents=True, exist_ok=True)
    tmp, row = copy.with_name(f".{copy.name}.tmp{os.getpid()}"), 0
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, pa.schema([(text_field, pa.string())])) as out, \
            tqdm(desc=f"streaming {source}", unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                 disable=not show_progress) as bar:
        for batch in stream.iter(batch_size=SCAN_BATCH):  # one batch in memory: the stream is never listed
            if text_field not in batch:
                raise ForgeError(f"row {row} of {source} has no field {text_field!r} (columns: {sorted(batch)}); "
                                 "set --data.text_field")
            try:
                texts = pa.array(batch[text_field], type=pa.string())
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise ForgeError(f"rows {row}-{row + len(batch[text_field]) - 1} of {source}: field {text_field!r} "
                                 f"is not text ({describe(exc, 120)}); set --data.text_field") from exc
            out.write_batch(pa.record_batch([texts], names=[text_field]))
            row += len(texts)
            bar.update(pc.sum(pc.binary_length(texts)).as_py() or 0)
    os.replace(tmp, copy)


def open_source(source: str, text_field: str, cache_dir: Path, show_progress: bool = False) -> Source:
    """The corpus as a memory-mapped table in source order, its text field checked; local text files and hub
    streams are written into `cache_dir`."""
    src = _open(source, text_field, cache_dir, show_progress)
    _check_field(src)
    return src


def _open(source: str, text_field: str, cache_dir: Path, show_progress: bool) -> Source:
    kind, path = classify(source)
    if kind == "hf":
        return Source(source, kind, _hub(source, text_field, cache_dir, show_progress), text_field,
                      bad_rows=lambda row: False)
    if kind in ("pydoc", "disk"):
        ds = _embedded_or_saved(source, kind, path)
        field_name = "text" if kind == "pydoc" else text_field
        return Source(source, kind, ds, field_name, path, bad_rows=lambda row: False)
    # Text files. Policy for bytes that are not UTF-8: replace them with U+FFFD (one bad byte should not kill a
    # run over a web-scraped corpus) and count the affected documents so the caller can warn. A document counts
    # when it contains U+FFFD and comes from a file that failed strict decoding (a literal U+FFFD in such a file
    # is over-counted; harmless for a warning).
    files = txt_files(path) if kind == "txt_dir" else [path]
    if all(p.stat().st_size == 0 for p in files):  # the loaders would fail on it with an unrelated-looking error
        raise ForgeError(f"data source {source!r} is empty (0 bytes{' in every .txt file' if len(files) > 1 else ''}); "
                         "put text in it or point --data.source elsewhere")
    bad = [not _is_utf8(p) for p in files]
    # datasets hands raw bytes to pyarrow when encoding == "utf-8" exactly and ignores encoding_errors there; the
    # codec alias "utf_8" routes through Python's decoder, which honours errors="replace".
    enc = dict(encoding="utf_8", encoding_errors="replace") if any(bad) else {}
    if kind == "jsonl":
        ds = _load_local("json", files, cache_dir, **enc)
    else:
        # A single .txt file: one document per blank-line-separated paragraph, so one file yields many documents
        # (the train/val split needs at least two). A directory: one document per file, in the sorted order.
        ds = _load_local("text", files, cache_dir, sample_by="paragraph" if kind == "txt" else "document", **enc)
    bad_rows = (lambda row: bad[row]) if kind == "txt_dir" else (lambda row: bad[0])
    return Source(source, kind, ds, text_field, path, bad_rows=bad_rows, files=files)


@dataclass
class Kept:
    """The documents the filters keep, by source row, with their UTF-8 sizes (16 bytes per document)."""

    rows: np.ndarray
    nbytes: np.ndarray
    non_utf8_documents: int


def _check_field(src: Source) -> None:
    if src.text_field not in src.ds.column_names:
        raise ForgeError(f"{src.line_of(0)} of {src.name} has no field {src.text_field!r} (columns: "
                         f"{src.ds.column_names}); set --data.text_field")


def scan(src: Source, files: list[str], min_article_length: int = 0, max_articles: int | None = None,
         progress=None) -> Kept:
    """One pass over the table (`files`, from table_files): whitespace-only documents dropped always, those
    shorter than `min_article_length` characters dropped, then the first `max_articles` kept."""
    rows, sizes, non_utf8 = array.array("q"), array.array("q"), 0  # 8 bytes a document, not a Python int's 28
    start = 0
    for texts in iter_texts(files, src.text_field):
        batch_bytes = 0
        for i, text in enumerate(texts, start):
            if not isinstance(text, str):
                what = "has no field" if text is None else "has a non-string field"
                raise ForgeError(f"{src.line_of(i)} of {src.name} {what} {src.text_field!r}; fix that record or "
                                 "set --data.text_field")
            if text.strip() and len(text) >= min_article_length:
                size = len(text.encode("utf-8", "surrogatepass"))
                rows.append(i), sizes.append(size)
                batch_bytes += size
                non_utf8 += src.bad_rows(i) and "\ufffd" in text
                if len(rows) == max_articles:
                    break
        if progress is not None:
            progress.update(batch_bytes)
        if len(rows) == max_articles:
            break
        start += len(texts)
    if not rows:
        raise ForgeError(f"data source {src.name!r} has no documents after filtering (min_article_length="
                         f"{min_article_length}, max_articles={max_articles}); add text or relax the filters")
    return Kept(np.asarray(rows, dtype=np.int64), np.asarray(sizes, dtype=np.int64), int(non_utf8))


def table_files(src: Source, work: Path) -> list[str]:
    """The Arrow files behind the source, which scan and worker processes map for themselves; an in-memory table
    (the embedded corpus) or one with an index mapping is written out to `work` first."""
    import datasets

    ds = src.ds
    if not ds.cache_files or ds._indices is not None:
        saved = work / "table"
        if not (saved / "state.json").is_file():
            tmp = work / f".table.tmp{os.getpid()}"
            ds.select_columns([src.text_field]).flatten_indices().save_to_disk(str(tmp))
            os.replace(tmp, saved)
        ds = datasets.load_from_disk(str(saved))
    return [c["filename"] for c in ds.cache_files]


def _mapped_batches(table_files: list[str], field: str, keep_fds: bool = False):
    """(mapping, file descriptor, the mapping as a pyarrow buffer, the column of each record batch) in file order,
    zero-copy: the mapping's pages stay on disk until a column is read."""
    import pyarrow as pa

    for name in table_files:
        fd = os.open(name, os.O_RDONLY)  # with keep_fds, left open for ArrowDocs' preads
        try:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            view = pa.py_buffer(mapped)
            reader = pa.ipc.open_stream(view)
            column = reader.schema.get_field_index(field)
            for batch in reader:  # reading a batch's header touches a page: callers hand them back
                yield mapped, fd, view, batch.column(column)
        finally:
            if not keep_fds:
                os.close(fd)  # the mapping holds its own


def iter_texts(table_files: list[str], field: str):
    """Every row's text (None for a null) in file order, SCAN_BATCH rows at a time, the mapping's pages handed back
    (madvise DONTNEED) after each: read pages otherwise stay in this process's RSS, up to the corpus's size."""
    for mapped, _, _, column in _mapped_batches(table_files, field):
        for start in range(0, len(column), SCAN_BATCH):
            yield column[start:start + SCAN_BATCH].to_pylist()
            mapped.madvise(mmap.MADV_DONTNEED)


class ArrowDocs:
    """One text column of Arrow IPC stream files (datasets' cache format), read by row number in any order.

    pyarrow alone, not datasets: worker processes start faster and a few hundred MB smaller without it. Each row
    comes by pread from its array's offsets and data in the file, never through a mapping: a touched mapped page
    stays in the process's RSS and the kernel maps whole large folios (~350 KB a document here), so shuffled
    reads grew the tokenizer child and the encoders to the corpus's size (page cache the kernel may drop, but
    what `top`, SLURM's accounting and a memory cgroup's usage show). Kept per record batch: four integers."""

    def __init__(self, table_files: list[str], field: str):
        places, lengths, self.copied = [], [], {}
        for i, (mapped, fd, view, column) in enumerate(_mapped_batches(table_files, field, keep_fds=True)):
            place = _place_in_file(column, fd, view)
            if place is None:  # a buffer pyarrow copied (unaligned) or not a string column: keep the array
                self.copied[i], place = column, (fd, 0, 0, 0)
            places.append(place)
            lengths.append(len(column))
            if i % 64 == 63:
                mapped.madvise(mmap.MADV_DONTNEED)
        self.places = np.asarray(places, dtype=np.int64).reshape(-1, 4)
        self.starts = np.cumsum([0] + lengths)
        # Only arrays kept in `copied` still reference a mapping; the others are unmapped once this returns.

    def __len__(self) -> int:
        return int(self.starts[-1])

    def texts(self, rows: np.ndarray) -> list[str]:
        chunk = np.searchsorted(self.starts, rows, side="right") - 1
        out = []
        for c, row in zip(chunk.tolist(), (rows - self.starts[chunk]).tolist()):
            if c in self.copied:
                out.append(self.copied[c][row].as_py())
                continue
            fd, offsets_at, data_at, width = self.places[c].tolist()
            ends = os.pread(fd, 2 * width, offsets_at + row * width)
            begin, end = int.from_bytes(ends[:width], "little"), int.from_bytes(ends[width:], "little")
            out.append(os.pread(fd, end - begin, data_at + begin).decode("utf-8"))
        return out


def _place_in_file(column, fd: int, view) -> tuple | None:
    """(fd, file position of the column's first offset, of its data, offset width) when both buffers lie in the
    mapped file; else None."""
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    _, offsets, data = column.buffers()
    width = 8 if pa.types.is_large_string(column.type) else 4
    if not all(b is not None and b.size > 0 and view.address <= b.address < view.address + view.size
               for b in (offsets, data)):
        return None
    return fd, offsets.address - view.address + column.offset * width, data.address - view.address, width


def open_table(table_files: list[str], field: str) -> ArrowDocs:
    return ArrowDocs(table_files, field)
