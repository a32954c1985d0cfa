"""Resume at another world size through DeepSpeed's universal checkpoint.

A ZeRO-1/2/3 checkpoint stores the optimizer state partitioned over the ranks that wrote it, so a job with another
number of ranks cannot load it directly. DeepSpeed's converter (`python -m deepspeed.checkpoint.ds_to_universal
--input_folder <tag dir> --output_folder <out> --inject_missing_state`, run here in-process with the same arguments)
rewrites it as one file per parameter; an engine built with `"checkpoint": {"load_universal": true}` then loads it at
any world size. We write the result beside the source as `step-XXXXXXXX_universal/`, copy our own files into it
(TrainState, config, frozen parameters) and write COMPLETE last, so an interrupted conversion is redone, never used.
DeepSpeed itself points `checkpoints/latest_universal` at it (the tag its engine reads when given none).

ZeRO-0 needs no conversion: its optimizer state is not partitioned, and any world size loads it as it is.
The data position needs nothing either: the global batch is held, and GlobalBatchSampler gives the same samples per
step whatever the world size, so the saved step (= global samples consumed / global batch) is the position.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

import torch

from forge_ds import checkpoint
from forge_ds.errors import ForgeError, describe
from forge_ds.files import atomic_write_text

SUFFIX = "_universal"
LATEST_UNIVERSAL = "latest_universal"
COPIED = (checkpoint.STATE_FILE, "config.yaml", "frozen_params.safetensors")
SOURCE_MANIFEST = "source_manifest.json"  # the source's manifest.json, so a stale copy is never reused


def universal_dir(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + SUFFIX)


def convert(ckpt: Path, workers: int = 1) -> Path:
    """Rank 0 only (or offline). Returns the universal folder; reuses a complete one from an earlier conversion."""
    ckpt = checkpoint.validate_checkpoint_dir(Path(ckpt))
    state = checkpoint.read_state(ckpt)
    if state.zero_stage == 0:
        raise ForgeError(f"{ckpt} is a ZeRO-0 checkpoint: its optimizer state is not partitioned, so any world size "
                         "resumes from it directly; no conversion needed")
    out = universal_dir(ckpt)
    if checkpoint.is_complete(out) and _same_source(ckpt, out):
        atomic_write_text(ckpt.parent / LATEST_UNIVERSAL, out.name)
        return out
    shutil.rmtree(out, ignore_errors=True)
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    log = io.StringIO()
    try:
        # Its progress prints and tqdm bars would interleave with the training log; kept for the error below.
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as e:  # DeepSpeed raises assorted types for layouts it cannot convert
        shutil.rmtree(out, ignore_errors=True)
        raise ForgeError(f"{ckpt}: DeepSpeed's universal conversion (ds_to_universal, ZeRO-{state.zero_stage}, "
                         f"{state.world_size} ranks) failed: {describe(e, 300)}; resume with "
                         f"{state.world_size} ranks instead") from None
    for name in COPIED:
        shutil.copy2(ckpt / name, out / name)
    if (ckpt / checkpoint.MANIFEST).is_file():
        shutil.copy2(ckpt / checkpoint.MANIFEST, out / SOURCE_MANIFEST)
    (out / "ds_to_universal.log").write_text(log.getvalue(), encoding="utf-8")
    atomic_write_text(out / checkpoint.COMPLETE, "")
    atomic_write_text(ckpt.parent / LATEST_UNIVERSAL, out.name)
    return out


def _same_source(ckpt: Path, out: Path) -> bool:
    """A copy made from this very save (a folder re-saved under the same tag since then gets a new copy)."""
    if not (ckpt / checkpoint.MANIFEST).is_file():
        return True
    return (out / SOURCE_MANIFEST).is_file() and \
        (out / SOURCE_MANIFEST).read_bytes() == (ckpt / checkpoint.MANIFEST).read_bytes()


def load(engine, ckpt: Path, saved_world: int, world: int) -> None:
    """Collective: load a universal folder into an engine built with load_universal (see enable)."""
    groups = engine.optimizer.param_groups
    built = [{k: v for k, v in g.items() if k not in _SCHEDULED} for g in groups]
    try:
        engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    except Exception as e:
        raise ForgeError(f"{ckpt}: DeepSpeed's universal loading failed resuming {saved_world} -> {world} ranks: "
                         f"{describe(e, 300)}; resume with {saved_world} ranks instead") from None
    # DeepSpeed 0.19.8's ZeRO-3 universal load copies param group 0's hyper-parameters onto every group ("generally
    # the same"): our no-decay group (embedding, norms, biases) would get weight decay from then on. The values
    # the engine was built with are the run's own; only the scheduled lr comes from the checkpoint.
    for group, own in zip(engine.optimizer.param_groups, built):
        group.update(own)
    # The same load hands one `step` tensor to every sub-group's state; torch's Adam increments it in place, once
    # per sub-group, so the second group's bias correction would run a step ahead (and further each step).
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


_SCHEDULED = ("params", "lr", "initial_lr")


def enable(ds: dict) -> dict:
    """The DeepSpeed config change that makes deepspeed.initialize build an engine that loads universal folders."""
    section = ds.setdefault("checkpoint", {})
    if not isinstance(section, dict):
        raise ForgeError(f"DeepSpeed config: 'checkpoint' must be a JSON object, got {section!r}; fix the file")
    section["load_universal"] = True
    return ds

