"""File helpers shared by data, checkpoint and export: content hashes."""

import hashlib
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
