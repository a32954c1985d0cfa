"""Every validation a run needs, done once, before its first step: `forge-ds train` runs it and then trains,
`forge-ds check` runs it and prints what it found, so both fail with the same one-line message.

The order is the cost order: flags, device, precision and the DeepSpeed config first (no other rank, no data),
then the run directory and the resume target, then the data (rank 0 prepares it once, the others wait), then
what needs the data: window counts, the batch split and the saved state a resume must match.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from forge_ds import (checkpoint, data, distributed, ds_config, export, launch_env, plan_auto, prepare, resume,
                      runlock, shared_dirs)
from forge_ds.config import Config
from forge_ds.errors import ForgeError
from forge_ds.options import RunOptions


@dataclasses.dataclass
class Preflight:
    device: str
    precision: str
    ds: dict                      # the resolved DeepSpeed config the engine is built with
    init_state: Optional[dict]    # --init_from's tensors
    run_dir: Path
    prepared: Path                # the prepared-data folder: token files, tokenizer.json, meta.json
    meta: dict
    train_windows: data.TokenWindows
    val_windows: data.TokenWindows
    sampler: data.GlobalBatchSampler
    total_steps: int
    resume: Optional[resume.ResumePlan]
    notes: list[str]


def preflight(cfg: Config, opts: RunOptions, env: launch_env.Env, world_size: int, training: bool) -> Preflight:
    """With training=True the process group is started (after the checks that need no other rank), progress is
    shown, and a resume at another world size converts its checkpoint; `check` passes False and writes nothing
    but the prepared-data cache."""
    auto = plan_auto.settle_auto(cfg, opts, world_size, env, resolve_device(cfg),
                                 lambda: resolve_run_dir(opts, env), start_group=training)
    device, precision, ds, init_state = check_inputs(cfg, opts, world_size)
    if training:
        distributed.init(device)
    run_dir = resolve_run_dir(opts, env)
    check_run_dir(run_dir, opts)
    for flag, path in (("--output_dir", run_dir), ("--tensorboard_dir", opts.tensorboard_dir),
                       ("--data.prepared_dir", cfg.data.prepared_dir or "data/prepared")):
        if path is not None:
            check_writable_dir(Path(path).resolve(), flag)
    if training:  # held until the process ends, taken before anything is written; check only looks
        distributed.on_main(lambda: runlock.hold(run_dir), share=False)
    else:
        runlock.refuse_if_locked(run_dir)
    target, notes = find_resume_target(run_dir, opts, cfg)
    notes = ([auto] if auto else []) + notes
    prepared = distributed.on_main(lambda: prepare.for_config(cfg, show_progress=training))
    if training:  # checkpoints and data must be where every rank looks (one filesystem all nodes share)
        shared_dirs.check_same_dirs(run=run_dir, prepared_data=prepared)
    meta = data.read_meta(prepared)
    export.check_init_tokenizer(opts.init_from, meta["tokenizer_sha256"])
    data.check_fits(prepared, cfg.model.max_seq_len)
    train_windows = data.TokenWindows(prepared / "train.bin", cfg.model.max_seq_len)
    val_windows = data.TokenWindows(prepared / "val.bin", cfg.model.max_seq_len)
    t = cfg.training
    sampler = data.GlobalBatchSampler(len(train_windows), t.batch_size, t.gradient_accumulation_steps, world_size,
                                      t.seed)
    if sampler.steps_per_epoch < 1:
        raise ForgeError(f"the training split has {len(train_windows)} windows, fewer than one global batch of "
                         f"{sampler.global_batch}; lower --training.batch_size or add text")
    total_steps = t.max_steps or t.epochs_shared * sampler.steps_per_epoch
    plan = (resume.plan(target, cfg, ds, sampler.global_batch, meta, world_size, convert=training) if target
            else None)
    if plan is not None:
        ds, notes = plan.ds, notes + list(plan.notes)
    return Preflight(device, precision, ds, init_state, run_dir, prepared, meta, train_windows, val_windows, sampler,
                     total_steps, plan, notes)


def check_inputs(cfg: Config, opts: RunOptions, world_size: int) -> tuple[str, str, dict, Optional[dict]]:
    """The checks that need no other rank and no data. Returns (device, precision, DS config, init_from tensors)."""
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    t = cfg.training
    ds_source = ds_config.find_ds_config(opts.deepspeed_config)
    ds = ds_config.resolve_ds_config(
        ds_config.load_ds_config(opts.deepspeed_config), micro_batch=t.batch_size,
        grad_accum=t.gradient_accumulation_steps, world_size=world_size, max_grad_norm=t.max_grad_norm,
        lr=t.learning_rate, weight_decay=t.weight_decay, precision=precision, device=device, source=str(ds_source))
    if opts.init_from and opts.resume:
        raise ForgeError("--init_from starts a new run from an export; it cannot be combined with --resume")
    if opts.resume and opts.overwrite:
        raise ForgeError("--resume continues a run and --overwrite replaces it; pass one of them")
    if t.compile and ds_config.zero_stage(ds) == 3:
        # Measured with DeepSpeed 0.19.8 / torch 2.13: ZeRO-3 gathers and re-partitions parameters around each
        # module, so every call sees new shapes, dynamo recompiles until its limit and falls back to eager.
        raise ForgeError(f"training.compile=true does not work with ZeRO-3 ({ds_source.name}): the partitioned "
                         "parameters change shape between calls and torch.compile recompiles every layer; use "
                         "ZeRO-0/1/2 with compile, or --training.compile=false")
    init_state = load_init_from(cfg, opts.init_from) if opts.init_from else None
    return device, precision, ds, init_state


def resolve_device(cfg: Config) -> str:
    return launch_env.pick_device(cfg.training.device, "training.device", "--training.device")


def resolve_precision(cfg: Config, device: str) -> str:
    p = cfg.training.precision
    if p == "auto":
        return "bf16" if launch_env.bf16_supported(device) else "fp32"
    if p == "bf16" and device == "cuda" and not launch_env.bf16_supported(device):
        raise ForgeError("training.precision=bf16 but this GPU does not support bf16; use fp16 or fp32")
    return p


def resolve_run_dir(opts: RunOptions, env: launch_env.Env) -> Path:
    if opts.output_dir:
        return Path(opts.output_dir).resolve()
    if env.slurm_job_id:  # a requeued job must find its own run
        return Path("runs", f"slurm-{env.slurm_job_id}").resolve()
    if opts.resume:
        runs = sorted((p for p in Path("runs").glob("*") if checkpoint.complete_checkpoints(p / "checkpoints")),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ForgeError("--resume without --output_dir: no run with a complete checkpoint under runs/")
        if env.is_main:
            print(f"resuming the newest run: {runs[-1]}", flush=True)
        return runs[-1].resolve()
    return Path("runs", distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))).resolve()


def check_run_dir(run_dir: Path, opts: RunOptions) -> None:
    """Never overwrite a finished or unfinished run silently."""
    if opts.overwrite or opts.resume:
        return
    if (run_dir / f"{export.EXPORT_STEM}.pt").exists():
        raise ForgeError(f"{run_dir} already holds a finished run (shared_components.pt); "
                         "pass --overwrite to replace it, --resume to continue, or another --output_dir")
    if checkpoint.complete_checkpoints(run_dir / "checkpoints"):
        raise ForgeError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it, "
                         "--overwrite to start over, or another --output_dir")


def check_writable_dir(path: Path, flag: str) -> None:
    """A directory the run will create or write into: not an existing file, not under one, and in a place that
    takes writes. Probed by creating (and removing) an empty folder in its nearest existing parent: permission
    bits say little to root, and a place like /proc refuses writes whatever they say."""
    if path.exists() and not path.is_dir():
        raise ForgeError(f"{flag}={path} is an existing file, not a directory; give a directory path")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ForgeError(f"{flag}={path} lies under {parent}, which is a file; give a path under a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".forge-ds-probe-", dir=parent))
    except OSError as e:
        raise ForgeError(f"{flag}={path}: nothing can be written under {parent} ({e.strerror}); choose a "
                         "writable place") from None


def find_resume_target(run_dir: Path, opts: RunOptions, cfg: Config) -> tuple[Optional[Path], list[str]]:
    """The checkpoint to continue (None: a fresh run) and notes on the config changes it accepts. Checked before
    any data work: a wrong target or an incompatible change fails in seconds."""
    target = checkpoint.find_resume_target(run_dir, opts.resume) if opts.resume else None
    if target is None:
        # An explicit tag or path that does not exist failed above; `auto` with nothing to resume starts fresh,
        # which is what a SLURM job's first submission relies on.
        return None, [f"resume: no complete checkpoint in {run_dir} yet; starting a fresh run"] if opts.resume else []
    notes = resume.compare_configs(checkpoint.saved_config(target), cfg, opts.allow_schedule_change)
    distributed.on_main(lambda: checkpoint.verify_manifest(target))
    return target, notes


def load_init_from(cfg: Config, init_from: str) -> dict:
    """The tensors of an --init_from export, checked against the model config (called before any data work, so a
    wrong export fails in seconds, not after tokenisation)."""
    m = cfg.model
    path = Path(init_from).resolve()
    state = export.load_export(path)
    vocab, d, seq, layers = export.infer_shape(state)
    if (vocab, d, seq, layers) != (m.vocab_size, m.d_model, m.max_seq_len, m.n_layers):
        raise ForgeError(f"--init_from={path}: export has vocab {vocab}, d_model {d}, max_seq_len {seq}, "
                         f"n_layers {layers}; the config has {m.vocab_size}, {m.d_model}, {m.max_seq_len}, "
                         f"{m.n_layers}; make the model section match the export")
    problems = export.verify(path, n_heads=m.n_heads)
    if problems:
        raise ForgeError(f"--init_from={path}: not a valid shared export: {problems[0]}")
    return state
