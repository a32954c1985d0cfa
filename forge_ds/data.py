"""Online feeding: a prepared directory's meta.json, the training windows and the global batch order.

Preparation (sources, tokenizer, token files) is prepare.py's; this module only reads what it wrote: train.bin /
val.bin (uint16 or uint32 token streams, as meta.json says), tokenizer.json and meta.json.

This module reads no environment variables and never touches torch.distributed: the caller decides which rank
prepares and places the barriers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from forge_ds.errors import ForgeError
from forge_ds.files import sha256_file
from forge_ds.tokens import BOS_ID, EOS_ID, SPECIAL_TOKENS, file_dtype  # noqa: F401 (the ids readers use)

_CHUNK = 1 << 24  # tokens per chunk when streaming a .bin (bounds RAM on big corpora)


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
    np.memmap, so the dataset never holds the corpus in RAM; their dtype is meta.json's unless given.
    """

    def __init__(self, bin_path, seq_len: int, dtype=None):
        self.bin_path, self.seq_len = str(bin_path), int(seq_len)
        self.dtype = np.dtype(dtype) if dtype is not None else file_dtype(bin_path)
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
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
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")

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


def unigram_entropy(bin_path, dtype=None) -> float:
    """Entropy in nats of the token stream's unigram distribution (the loss of the best context-free predictor)."""
    tokens = np.memmap(bin_path, dtype=np.dtype(dtype) if dtype is not None else file_dtype(bin_path), mode="r")
    if len(tokens) == 0:
        raise ForgeError(f"{str(bin_path)!r} has no tokens; prepare the data again")
    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, len(tokens), _CHUNK):  # chunked: bincount would copy the whole stream as int64
        chunk = np.bincount(tokens[start:start + _CHUNK])
        counts = np.pad(counts, (0, max(0, len(chunk) - len(counts))))
        counts[:len(chunk)] += chunk
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def to_device(batch: tuple[torch.Tensor, torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # non_blocking: from pinned memory (the loader's, on a GPU) the copy overlaps the step still queued there.
    return tuple(t.to(device, non_blocking=True) for t in batch)
