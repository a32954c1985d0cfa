"""How forge_ds writes files: content hashes, atomic replacement, and the streamed safetensors writer.

Every file a later run trusts (checkpoint parts, exports, run files, metrics) is written under a temporary name in
its own folder and renamed into place, so a crash or Ctrl-C never leaves a half-written file under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks so multi-GB shards never sit in memory whole. One buffer, refilled:
    a fresh bytes object per block would keep two blocks alive at each read."""
    h, block = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            h.update(view[:n])
    return h.hexdigest()


def temp_path(path: Path) -> Path:
    """The one temporary-name scheme: hidden, beside the target (same filesystem, so the rename is atomic), and
    per process, so two writers never share a temporary file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file, which then replaces `path` in one rename; on failure it is removed."""
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_group(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Files that belong together (an export's .pt, .safetensors and .json): each is written under its temporary
    name, in order, and only then are all renamed into place; an error or Ctrl-C before the renames leaves none of
    them, and the files they replace stay as they were."""
    try:
        for path, write in writers.items():
            write(temp_path(path))
        for path in writers:
            os.replace(temp_path(path), path)
    except BaseException:
        for path in writers:
            temp_path(path).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Written with open(), so the file gets the mode every other file of ours gets (0644 under the usual umask
    022): safetensors' own save_file (0.8) writes 0600."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_safetensors_streamed(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """What safetensors' `save_file` writes, byte for byte (8-byte little-endian header length, compact JSON header
    padded with spaces to 8 bytes, the tensors end to end sorted by dtype then name: by name here, all fp32), but
    streamed from `state`. Why not save_file: it refuses the tied matrix's shared storage, and an untied
    copy to please it would cost as much memory again as the embedding (the export's ≤ 1.1x memory target)."""
    header, offset = {"__metadata__": metadata}, 0
    for name in sorted(state):
        tensor = state[name]
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name}: {tensor.dtype}; the streamed writer takes fp32 tensors only")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in sorted(state):
            f.write(state[name].detach().contiguous().numpy())  # the tensor's own memory, no bytes copy
