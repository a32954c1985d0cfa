"""Resuming a run, in two calls: `plan` (every check that needs the saved state, before the engine exists; it
converts to DeepSpeed's universal checkpoint when the world size changed) and `restore(engine, plan)`.

The data position needs no saved sampler state: the global batch is held, and GlobalBatchSampler gives the same
samples per step at any world size, so the saved step is the position. Dropout needs no saved RNG either
(engine.dropout_seed). What changed between the saved config and this one is judged by `compare_configs`.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from forge_ds import checkpoint, distributed, ds_config, universal
from forge_ds.checkpoint import TrainState
from forge_ds.config import Config
from forge_ds.errors import ForgeError


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    target: Path       # the checkpoint this run continues
    saved: TrainState  # its state, checked against this run's data, batch and ZeRO stage
    load_from: Path    # the checkpoint itself, or its universal copy when the world size changed
    world_size: int
    ds: dict           # the DeepSpeed config to build the engine with (universal loading switched on if needed)
    notes: tuple[str, ...]

    @property
    def through_universal(self) -> bool:
        return self.load_from != self.target


def plan(target: Path, cfg: Config, ds: dict, global_batch: int, meta: dict, world_size: int,
         convert: bool = True) -> ResumePlan:
    """Collective when `convert` (rank 0 converts, the others wait under set-up's long timeout). `forge-ds check`
    passes convert=False: it names the universal folder a resume would use without writing it."""
    saved = checkpoint.read_state(target)
    _check_state(target, saved, cfg, ds, global_batch, meta)
    if saved.world_size == world_size:
        return ResumePlan(target, saved, target, world_size, ds, ())
    if saved.zero_stage == 0:
        note = (f"resume: world size {saved.world_size} -> {world_size} (ZeRO-0 keeps the optimizer state whole; "
                "loaded as saved)")
        return ResumePlan(target, saved, target, world_size, ds, (note,))
    load_from = (distributed.on_main(lambda: universal.convert(target)) if convert
                 else universal.universal_dir(target))
    note = (f"resume: world size {saved.world_size} -> {world_size}: through DeepSpeed's universal checkpoint "
            f"{load_from}")
    return ResumePlan(target, saved, load_from, world_size, universal.enable(copy.deepcopy(ds)), (note,))


def restore(engine, resume: ResumePlan) -> tuple[TrainState, dict]:
    """Collective: load the engine, optimizer and scheduler state. Returns (state, frozen parameters)."""
    if resume.through_universal:
        universal.load(engine, resume.load_from, resume.saved.world_size, resume.world_size)
    else:
        engine.load_checkpoint(str(resume.target.parent), tag=resume.target.name)
    return dataclasses.replace(resume.saved, world_size=resume.world_size), checkpoint.read_frozen(resume.target)


def _check_state(target: Path, saved: TrainState, cfg: Config, ds: dict, global_batch: int, meta: dict) -> None:
    if saved.tokenizer_sha256 != meta["tokenizer_sha256"]:
        # The data settings are unchanged (compare_configs ran first), so what changed is a file behind them:
        # the tokenizer file itself, or the corpus the tokenizer is trained on.
        what = (f"the tokenizer file {cfg.data.tokenizer}" if cfg.data.tokenizer else
                f"the corpus behind data.source={cfg.data.source} (the tokenizer is trained on it)")
        raise ForgeError(f"{target}: {what} changed since this checkpoint was saved (tokenizer sha256 "
                         f"{saved.tokenizer_sha256[:12]}… then, {meta['tokenizer_sha256'][:12]}… now); restore the "
                         "original data to resume, or start a new run in another --output_dir")
    if saved.global_batch != global_batch:
        raise ForgeError(f"resume: global batch {saved.global_batch} -> {global_batch}; keep "
                         "batch_size x gradient_accumulation_steps x ranks equal to resume")
    if saved.zero_stage != ds_config.zero_stage(ds):
        raise ForgeError(f"{target} was saved at ZeRO-{saved.zero_stage}, this run uses ZeRO-"
                         f"{ds_config.zero_stage(ds)}; resume with --deepspeed_config=zero{saved.zero_stage}")


# Fields a resume may change freely (logged); the schedule fields need --allow_schedule_change.
SAFE_TRAINING_CHANGES = {"checkpoint_every", "log_every", "eval_every", "eval_max_batches", "keep_checkpoints",
                         "export", "num_workers", "max_skipped_steps",
                         # torch.compile changes how the step runs, not what it computes or what a checkpoint holds
                         "compile"}
SCHEDULE_FIELDS = {"max_steps", "epochs_shared"}
# Where the prepared token files live is a cache location: a folder holding other data is refused by prepare.prepare
# (its identity differs) and another tokenizer by the tokenizer sha256 check, so moving the cache is safe.
SAFE_DATA_CHANGES = {"prepared_dir", "num_proc"}  # num_proc: how fast, not what
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
