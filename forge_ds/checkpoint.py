"""Checkpoints: one TrainState, `checkpoints/step-00000100/` folders, completion marker, `latest`, keep-N, resume.

A checkpoint folder is DeepSpeed's own tag folder (engine and optimizer shards of every rank) plus our files:
`forge_state.json` (TrainState), `config.yaml`, `frozen_params.safetensors` (the fp32 values of parameters the
optimizer never sees), `manifest.json` (bytes and sha256 of every file) and, written last, `COMPLETE`. Only after `COMPLETE` is the `latest` pointer moved, by an
atomic rename, so a process killed mid-save leaves the previous checkpoint as the newest complete one.

Dropout's RNG is re-seeded from (seed, step, micro-batch slot in the global batch) at every micro-step, so no RNG
state needs saving: a resumed run draws exactly the masks the uninterrupted run would have, at any world size.
A resume at another world size goes through DeepSpeed's universal checkpoint (universal.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from forge_ds import distributed, faults
from forge_ds.config import Config, load_saved, to_yaml
from forge_ds.errors import ForgeError, describe
from forge_ds.files import atomic_write_bytes, atomic_write_text, sha256_file, temp_path

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "forge_state.json"
MANIFEST = "manifest.json"  # size and sha256 of every file of the folder, written just before COMPLETE
TAG_PATTERN = re.compile(r"step-\d{8}")  # not `step-*`: `step-…_universal` copies live beside the checkpoints


@dataclasses.dataclass
class TrainState:
    """Everything a resume needs beyond DeepSpeed's engine/optimizer/scheduler state."""
    step: int = 0                 # optimizer steps done
    samples_consumed: int = 0     # global samples: the data position, independent of world size
    tokens_seen: int = 0
    best_val_loss: Optional[float] = None
    best_step: Optional[int] = None
    last_train_loss: Optional[float] = None
    last_val_loss: Optional[float] = None
    world_size: int = 1
    global_batch: int = 0
    zero_stage: int = 0
    precision: str = "fp32"
    tokenizer_sha256: str = ""

    def advance(self, global_batch: int, seq_len: int) -> None:
        """One optimizer step done: the data position moves by one global batch."""
        self.step += 1
        self.samples_consumed += global_batch
        self.tokens_seen += global_batch * seq_len

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file() and (ckpt / STATE_FILE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and TAG_PATTERN.fullmatch(p.name)
                   and is_complete(p)), key=lambda p: p.name)


def write_manifest(ckpt: Path) -> None:
    """Rank 0, after every rank's shards: a truncated or altered file is then named on resume/export instead of
    surfacing as an unpickling traceback from inside DeepSpeed."""
    files = {str(f.relative_to(ckpt)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name not in (MANIFEST, COMPLETE)}
    atomic_write_text(ckpt / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_manifest(ckpt: Path) -> None:
    """ForgeError naming the first missing, truncated or altered file (checkpoints without a manifest pass)."""
    if not (ckpt / MANIFEST).is_file():
        return
    try:
        files = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as e:
        raise ForgeError(f"{ckpt / MANIFEST}: unreadable ({type(e).__name__}); the checkpoint is damaged") from None
    older = [p.name for p in complete_checkpoints(ckpt.parent) if p.name < ckpt.name]
    hint = f"resume from an older one (--resume={older[-1]})" if older else "start the run again"
    for name, want in files.items():
        path = ckpt / name
        if not path.is_file():
            raise ForgeError(f"{ckpt}: {name} is missing; the checkpoint is damaged, {hint}")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise ForgeError(f"{ckpt}: {name} has {size} bytes, {want['bytes']} were written (truncated?); "
                             f"the checkpoint is damaged, {hint}")
        if sha256_file(path) != want["sha256"]:
            raise ForgeError(f"{ckpt}: {name} differs from its sha256 in {MANIFEST} (altered); "
                             f"the checkpoint is damaged, {hint}")


def save(engine, root: Path, state: TrainState, cfg: Config, frozen: dict[str, torch.Tensor]) -> Path:
    """Collective: every rank calls it. DeepSpeed writes each rank's shards; rank 0 writes our single files."""
    from safetensors.torch import save as save_tensors

    tag = tag_for(state.step)
    ckpt = root / tag
    # A full disk or an unwritable folder must end every rank with one clear message and leave the previous
    # checkpoint and `latest` as they were: each phase's failure is agreed on by all ranks (_agree), which stands
    # in for the barrier that phase would end with.
    failure = None
    if distributed.is_main():
        try:
            if ckpt.exists():
                shutil.rmtree(ckpt)  # a leftover incomplete folder of the same step (we never overwrite a complete one)
            root.mkdir(parents=True, exist_ok=True)  # here, not in DeepSpeed's rank-0 code before its first barrier
        except OSError as e:
            failure = e
    _agree(failure, root, tag)
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    except _WRITE_ERRORS as e:  # torch.save reports a failed write as a RuntimeError
        if _is_collective_failure(e):
            raise  # a peer died or hung inside DeepSpeed's barriers: not a write failure, nothing to agree on
        failure = e
        # The write sits between DeepSpeed's two barriers: stand in for the closing one, which the raise skipped,
        # so that this rank's collectives stay in step with the ranks whose writes went through.
        distributed.barrier()
    faults.point("save_after_shards", step=state.step)  # tests: die after the shards, before the marker
    _agree(failure, root, tag)
    if distributed.is_main():
        try:
            atomic_write_bytes(ckpt / "frozen_params.safetensors",  # bytes: save_file would write it 0600
                               save_tensors({k: v.detach().float().cpu().contiguous() for k, v in frozen.items()}))
            atomic_write_text(ckpt / "config.yaml", to_yaml(cfg))
            atomic_write_text(ckpt / STATE_FILE, state.to_json())
            write_manifest(ckpt)
            atomic_write_text(ckpt / COMPLETE, "")
            atomic_write_text(root / LATEST, tag)
        except _WRITE_ERRORS as e:
            failure = e
    _agree(failure, root, tag)
    return ckpt


def _write_errors() -> tuple:
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


_WRITE_ERRORS = _write_errors()


def _is_collective_failure(e: BaseException) -> bool:
    # gloo and NCCL raise plain RuntimeErrors (DistError in newer torch) naming themselves.
    return isinstance(e, getattr(torch.distributed, "DistError", ())) or any(
        word in str(e) for word in ("gloo", "NCCL", "Connection closed by peer", "Timed out waiting"))


def _agree(failure: Optional[BaseException], root: Path, tag: str) -> None:
    """Collective: if any rank failed to write, rank 0 removes the partial folder and every rank raises ForgeError."""
    reports = distributed.gather_object(None if failure is None else
                                        describe(failure))
    bad = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if not bad:
        return
    if distributed.is_main():
        shutil.rmtree(root / tag, ignore_errors=True)  # frees the space a partial save took
        temp_path(root / LATEST).unlink(missing_ok=True)
    previous = [p.name for p in complete_checkpoints(root) if p.name != tag]
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:,.0f} MiB free there: a full disk, a quota or a file-size limit?"
    except OSError:
        free = "free space unknown"
    rank, msg = bad[0]
    kept = (f"previous checkpoint {previous[-1]} is intact and `latest` unchanged; free space or fix permissions, "
            "then --resume" if previous else "no earlier checkpoint exists; free space or fix permissions, then rerun")
    raise ForgeError(f"could not write checkpoint {tag} in {root} (rank {rank}: {msg}; {free}); {kept}")


def prune(root: Path, keep: int, protect: set[str]) -> list[Path]:
    """Rank 0 deletes all but the newest `keep` complete checkpoints (never a protected tag) and stale partials."""
    if not distributed.is_main():
        return []
    complete = complete_checkpoints(root)
    removed = []
    for ckpt in complete[:-keep] if keep > 0 else []:
        if ckpt.name not in protect:
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append(ckpt)
    newest = complete[-1].name if complete else ""
    for partial in root.glob("step-*"):
        # An interrupted save older than the newest complete one, or a universal copy whose source is gone.
        source = partial.name.split("_")[0]
        if partial.is_dir() and ((not is_complete(partial) and partial.name < newest)
                                 or (partial.name != source and not (root / source).is_dir())):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


def find_resume_target(run_dir: Path, resume: str | bool) -> Optional[Path]:
    """`auto`/True: newest complete checkpoint, or None on a fresh run. A path or a tag: that checkpoint."""
    root = run_dir / "checkpoints"
    if resume in (True, "auto", "True", "true"):
        complete = complete_checkpoints(root)
        return complete[-1] if complete else None
    candidate = Path(str(resume))
    if not candidate.is_absolute() and not candidate.exists():
        candidate = root / str(resume)
    if not candidate.is_dir():
        raise ForgeError(f"--resume={resume}: no checkpoint folder at {candidate}; "
                         f"use --resume=auto or one of {[p.name for p in complete_checkpoints(root)]}")
    return validate_checkpoint_dir(candidate)


def validate_checkpoint_dir(ckpt: Path) -> Path:
    if not ckpt.is_dir() or not any(ckpt.iterdir()):
        raise ForgeError(f"{ckpt}: checkpoint folder is empty or missing; pick a complete checkpoint "
                         "(one with a COMPLETE file) or use --resume=auto")
    _refuse_non_checkpoint(ckpt)
    if not is_complete(ckpt):
        raise ForgeError(f"{ckpt}: checkpoint is incomplete (no {COMPLETE} marker: the save was interrupted); "
                         "use --resume=auto to take the newest complete one")
    if ckpt.name.endswith("_universal"):
        raise ForgeError(f"{ckpt}: a universal copy, not a checkpoint; give its source folder "
                         f"{ckpt.name.split('_')[0]}: a resume at another world size converts and uses the copy itself")
    return ckpt


def _refuse_non_checkpoint(folder: Path) -> None:
    """ForgeError saying what `folder` is, when it is no checkpoint at all: a run directory (naming its newest
    complete checkpoint) or another folder. "Incomplete" is kept for real checkpoints whose save was cut."""
    if (folder / "checkpoints").is_dir():
        complete = complete_checkpoints(folder / "checkpoints")
        raise ForgeError(f"{folder}: a run directory, not a checkpoint folder; " + (
            f"its newest complete checkpoint is {complete[-1]}" if complete else
            "it holds no complete checkpoint (see its checkpoints/ folder)"))
    inside = complete_checkpoints(folder)
    if inside:
        raise ForgeError(f"{folder}: a folder of checkpoints, not one; the newest complete one is {inside[-1]}")
    ours = any((folder / name).exists() for name in (COMPLETE, STATE_FILE, MANIFEST)) or any(
        folder.glob("*model_states.pt"))  # DeepSpeed's first file of a save, at every ZeRO stage
    if not ours and not TAG_PATTERN.fullmatch(folder.name.split("_")[0]):
        raise ForgeError(f"{folder}: not a checkpoint folder (no {STATE_FILE}, {COMPLETE} or DeepSpeed model "
                         "states); give one of a run's checkpoints/step-… folders")


def read_state(ckpt: Path) -> TrainState:
    try:
        return TrainState.from_json((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError) as e:
        raise ForgeError(f"{ckpt / STATE_FILE}: unreadable training state ({e}); the checkpoint is damaged") from None


def read_frozen(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(ckpt / "frozen_params.safetensors"))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ForgeError(f"{ckpt}/frozen_params.safetensors: unreadable ({e}); the checkpoint is damaged") from None


def saved_config(ckpt: Path) -> Config:
    return load_saved(ckpt / "config.yaml")
