"""Checkpoints: one TrainState, `checkpoints/step-00000100/` folders, completion marker, `latest`, keep-N, resume.

A checkpoint folder is DeepSpeed's own tag folder (engine and optimizer shards of every rank) plus our files:
`forge_state.json` (TrainState), `config.yaml`, `frozen_params.safetensors` (the fp32 values of parameters the
optimizer never sees) and, written last, `COMPLETE`. Only after `COMPLETE` is the `latest` pointer moved, by an
atomic rename, so a process killed mid-save leaves the previous checkpoint as the newest complete one.

Dropout's RNG is re-seeded from (seed, step, rank) at every step, so no RNG state needs saving: a resumed run draws
exactly the masks the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from forge_ds import distributed
from forge_ds.config import Config, load_saved, to_yaml
from forge_ds.errors import ForgeError

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "forge_state.json"


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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file() and (ckpt / STATE_FILE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and is_complete(p)), key=lambda p: p.name)


def save(engine, root: Path, state: TrainState, cfg: Config, frozen: dict[str, torch.Tensor]) -> Path:
    """Collective: every rank calls it. DeepSpeed writes each rank's shards; rank 0 writes our single files."""
    from safetensors.torch import save_file

    tag = tag_for(state.step)
    ckpt = root / tag
    if distributed.is_main() and ckpt.exists():
        shutil.rmtree(ckpt)  # a leftover incomplete folder of the same step (we never overwrite a complete one)
    distributed.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    distributed.fault_point("save_after_shards")  # tests: die after the shards, before the marker
    distributed.barrier()
    if distributed.is_main():
        save_file({k: v.detach().float().cpu().contiguous() for k, v in frozen.items()}, str(ckpt / "frozen_params.safetensors"))
        atomic_write_text(ckpt / "config.yaml", to_yaml(cfg))
        atomic_write_text(ckpt / STATE_FILE, state.to_json())
        atomic_write_text(ckpt / COMPLETE, "")
        atomic_write_text(root / LATEST, tag)
    distributed.barrier()
    return ckpt


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
        if partial.is_dir() and not is_complete(partial) and partial.name < newest:
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
    if not is_complete(ckpt):
        raise ForgeError(f"{ckpt}: checkpoint is incomplete (no {COMPLETE} marker: the save was interrupted); "
                         "use --resume=auto to take the newest complete one")
    return ckpt


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


# Fields a resume may change freely (logged); the schedule fields need --allow_schedule_change.
SAFE_TRAINING_CHANGES = {"checkpoint_every", "log_every", "eval_every", "eval_max_batches", "keep_checkpoints",
                         "export", "num_workers", "max_skipped_steps"}
SCHEDULE_FIELDS = {"max_steps", "epochs_shared"}
# batch_size / accumulation may change only with the world size, holding the global batch (checked by the caller).
BATCH_FIELDS = {"batch_size", "gradient_accumulation_steps"}


def compare_configs(saved: Config, new: Config, allow_schedule_change: bool) -> list[str]:
    """Raise ForgeError naming the first incompatible difference; return notes for the allowed ones."""
    notes = []
    for section in ("model", "data", "training"):
        old_s, new_s = getattr(saved, section).model_dump(), getattr(new, section).model_dump()
        for key in old_s:
            if old_s[key] == new_s[key]:
                continue
            what = f"{section}.{key}: {old_s[key]!r} -> {new_s[key]!r}"
            if section == "training" and key in SAFE_TRAINING_CHANGES:
                notes.append(f"resume: changed {what}")
            elif section == "training" and key in SCHEDULE_FIELDS and allow_schedule_change:
                notes.append(f"resume: schedule changed {what} (--allow_schedule_change)")
            elif section == "training" and key in BATCH_FIELDS:
                notes.append(f"resume: changed {what}")
            elif section == "training" and key in SCHEDULE_FIELDS:
                raise ForgeError(f"resume: {what} changes the LR schedule; pass --allow_schedule_change to accept it")
            else:
                raise ForgeError(f"resume: {what} is incompatible with the checkpoint; "
                                 "restore the original value or start a new run (--output_dir)")
    return notes


def saved_config(ckpt: Path) -> Config:
    return load_saved(ckpt / "config.yaml")
