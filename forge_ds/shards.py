"""Read chosen fp32 master weights out of a DeepSpeed ZeRO-1/2/3 checkpoint folder, one tensor at a time.

DeepSpeed's zero_to_fp32, even in lazy mode, loads every model-states file whole (at ZeRO-1/2 that is the full module)
and at ZeRO-1/2 concatenates every rank's flat fp32 partition into one vector of all trainable parameters: the
offline export of a few shared tensors then costs several times the whole model (benchmarks/export_memory.py).
Here every file is memory-mapped and a parameter is copied out of the ranks' flat partitions in chunks, each
chunk's mapped pages dropped from the process once copied, so memory grows by the requested tensors and a few MiB. The
layout rules are zero_to_fp32's; the tests compare the result with its reconstruction tensor by tensor.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import re
from pathlib import Path

import torch

# DeepSpeed's checkpoint keys (deepspeed.checkpoint.constants), spelled out so that reading needs no DeepSpeed import.
OPTIMIZER_STATE_DICT, ZERO_STAGE, PARTITION_COUNT = "optimizer_state_dict", "zero_stage", "partition_count"
PARAM_SHAPES, PARAM_ALIGNMENT_PADDINGS = "param_shapes", "param_alignment_paddings"
ZERO12_GROUPS, ZERO3_GROUPS = "single_partition_of_fp32_groups", "fp32_flat_groups"
# Elements per copy (1 MiB of fp32). The file pages resident at a time are a chunk plus what the kernel maps around
# a fault (whole page-cache folios, up to 2 MiB each on ext4), whatever the tensor's size.
CHUNK = 1 << 18


def _natural(path: Path) -> list:
    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", path.name)]


def _deepspeed_globals() -> list:
    """The few DeepSpeed classes its checkpoint files pickle besides tensors and containers (0.19.8: fp32, bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load(path: Path) -> dict:
    # weights_only with those classes allowed: a checkpoint folder from elsewhere cannot run code here. mmap leaves
    # every tensor on disk until a slice of it is read.
    with torch.serialization.safe_globals(_deepspeed_globals()):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


class ZeroShards:
    """`get(name)`: the fp32 master value of one trainable parameter (a fresh tensor, not a view of the files)."""

    def __init__(self, ckpt: Path):
        optim_files = sorted(ckpt.glob("*_optim_states.pt"), key=_natural)
        if not optim_files:
            raise FileNotFoundError(f"no *_optim_states.pt files in {ckpt}")
        states = [_load(f)[OPTIMIZER_STATE_DICT] for f in optim_files]
        self.stage = int(states[0][ZERO_STAGE])
        count = states[0][PARTITION_COUNT]
        self.world = max(count) if isinstance(count, list) else int(count)
        if self.world != len(optim_files):
            raise ValueError(f"expected {self.world} *_optim_states.pt files in {ckpt}, found {len(optim_files)}")
        model_file = ckpt / ("mp_rank_00_model_states.pt" if self.stage <= 2
                             else "zero_pp_rank_0_mp_rank_00_model_states.pt")
        model = _load(model_file)
        self.aliases = dict(model.get("shared_params") or {})  # tied name -> the name the optimizer holds
        self.index: dict[str, tuple] = {}
        if self.stage <= 2:
            self.flats = [s[ZERO12_GROUPS] for s in states]  # [rank][group]: that rank's slice of the group
            paddings = states[0].get(PARAM_ALIGNMENT_PADDINGS)
            for g, shapes in enumerate(model[PARAM_SHAPES]):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    self.index[name] = (g, offset, torch.Size(shape))
                    offset += math.prod(shape) + (paddings[g][i] if paddings is not None else 0)
        else:
            self.flats = [s[ZERO3_GROUPS] for s in states]  # [rank][sub-group]; a parameter may span sub-groups
            offset = 0
            for name, shape in ((k, v) for d in model[PARAM_SHAPES] for k, v in d.items()):
                part = math.ceil(math.prod(shape) / self.world)  # every rank holds `part` elements, the last padded
                self.index[name] = (None, offset, torch.Size(shape))
                offset += part

    def names(self) -> list[str]:
        return [*self.index, *self.aliases]

    def get(self, name: str) -> torch.Tensor:
        g, offset, shape = self.index[self.aliases.get(name, name)]
        numel = math.prod(shape)
        if self.stage <= 2:
            # The group's full vector is the ranks' slices end to end; copy the part of [offset, offset+numel)
            # that each rank's slice holds.
            out, start, copied = torch.empty(numel, dtype=torch.float32), 0, 0
            for rank in range(self.world):
                flat = self.flats[rank][g]
                lo, hi = max(offset, start), min(offset + numel, start + flat.numel())
                if lo < hi:
                    _copy_mapped(out[lo - offset:hi - offset], flat[lo - start:hi - start])
                    copied += hi - lo
                start += flat.numel()
            if copied != numel:
                raise ValueError(f"{name}: the flat partitions hold {copied} of its {numel} elements; damaged checkpoint?")
            return out.view(shape)
        part = math.ceil(numel / self.world)
        out = torch.empty(part * self.world, dtype=torch.float32)
        for rank in range(self.world):
            _copy_span(self.flats[rank], offset, out[rank * part:(rank + 1) * part])
        return out[:numel].view(shape)


def _copy_span(groups: list[torch.Tensor], offset: int, dest: torch.Tensor) -> None:
    """Copy elements [offset, offset + len(dest)) of the concatenation of `groups` into dest, group by group."""
    start, filled = 0, 0
    for flat in groups:
        lo, hi = max(offset + filled, start), min(offset + dest.numel(), start + flat.numel())
        if lo < hi:
            _copy_mapped(dest[lo - offset:hi - offset], flat[lo - start:hi - start])
            filled = hi - offset
        start += flat.numel()
    if filled != dest.numel():
        raise ValueError(f"the flat partitions end before element {offset + dest.numel()}; damaged checkpoint?")


def _copy_mapped(dest: torch.Tensor, src: torch.Tensor) -> None:
    """dest.copy_(src) for a 1-D `src` in a memory-mapped checkpoint file, chunk by chunk, each chunk's file pages
    released after its copy: read pages count in the process's RSS until unmapped, as much again as the tensors."""
    for lo in range(0, src.numel(), CHUNK):
        part = src[lo:lo + CHUNK]
        dest[lo:lo + CHUNK].copy_(part)
        _release(part)


def _release(mapped: torch.Tensor) -> None:
    """Drop the pages under `mapped` from this process. Only for views of torch.load(mmap=True) storages: those are
    file mappings never written to, so MADV_DONTNEED keeps their content (a later read faults it back in from the
    file); on anonymous memory it would zero the pages. Where madvise is missing the pages merely stay."""
    if _MADVISE is None:
        return
    page = mmap.PAGESIZE
    # Whole pages only: the page holding the start (still inside the mapping, which starts on a page) is dropped
    # too, harmlessly; the partial page at the end is left for the next chunk, which starts inside it.
    start = mapped.data_ptr() // page * page
    end = (mapped.data_ptr() + mapped.numel() * mapped.element_size()) // page * page
    if end > start:
        _MADVISE(start, end - start, mmap.MADV_DONTNEED)


def _libc_madvise():
    if not hasattr(mmap, "MADV_DONTNEED"):  # Windows
        return None
    madvise = getattr(ctypes.CDLL(None), "madvise", None)
    if madvise is not None:
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()
