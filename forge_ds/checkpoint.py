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
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from forge_ds import distributed
from forge_ds.config import Config, load_saved, to_yaml
from forge_ds.errors import ForgeError
from forge_ds.files import sha256_file

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
    from safetensors.torch import save_file

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
    distributed.fault_point("save_after_shards", step=state.step)  # tests: die after the shards, before the marker
    _agree(failure, root, tag)
    if distributed.is_main():
        try:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in frozen.items()},
                      str(ckpt / "frozen_params.safetensors"))
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
                                        f"{type(failure).__name__}: {' '.join(str(failure).split())[:200]}")
    bad = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if not bad:
        return
    if distributed.is_main():
        shutil.rmtree(root / tag, ignore_errors=True)  # frees the space a partial save took
        (root / f".{LATEST}.tmp-{os.getpid()}").unlink(missing_ok=True)
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
    if not is_complete(ckpt):
        raise ForgeError(f"{ckpt}: checkpoint is incomplete (no {COMPLETE} marker: the save was interrupted); "
                         "use --resume=auto to take the newest complete one")
    if ckpt.name.endswith("_universal"):
        raise ForgeError(f"{ckpt}: a universal copy, not a checkpoint; give its source folder "
                         f"{ckpt.name.split('_')[0]}: a resume at another world size converts and uses the copy itself")
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
# Where the prepared token files live is a cache location: a folder holding other data is refused by data.prepare
# (its identity differs) and another tokenizer by the tokenizer sha256 check, so moving the cache is safe.
SAFE_DATA_CHANGES = {"prepared_dir", "num_proc"}
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
            if (section == "training" and key in SAFE_TRAINING_CHANGES) or (section == "data"
                                                                             and key in SAFE_DATA_CHANGES):
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
