"""File helpers shared by data, checkpoint and export: content hashes, atomic writes."""

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks so multi-GB shards never sit in memory whole. One buffer, refilled:
    a fresh bytes object per block would keep two blocks alive at each read."""
    h, block = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            h.update(view[:n])
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """A temporary name beside `path`, then a rename: a crash never leaves a half-written file there. Written with
    open(), so the file gets the mode every other file of ours gets (0644 under the usual umask 022);
    safetensors' own save_file (0.8) writes 0600."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
