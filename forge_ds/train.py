"""Phase 1 on DeepSpeed: build model + data + engine, run the loop, checkpoint, evaluate, export the shared subtree.

Read top to bottom: `RunOptions` (flags that are not config), `setup` (everything that can fail on bad input
fails here, before the first step), `fit` (the loop), `finish` (final checkpoint, evaluation, export, summary).
Formats belong to checkpoint.py / export.py; ranks and environment to distributed.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from forge_ds import checkpoint, data, distributed, ds_config, export, prepare, shared_dirs, universal
from forge_ds.config import Config, modularforge_yaml, to_yaml
from forge_ds.errors import ForgeError, TrainingDiverged
from forge_ds.metrics import Metrics, flops_per_token, peak_flops
from forge_ds.model import SharedTrainingModel, initialize, optimizer_groups


@dataclasses.dataclass
class RunOptions:
    config: Optional[str] = None
    deepspeed_config: str = "zero2"
    output_dir: Optional[str] = None
    resume: Optional[str] = None          # None: fresh run; "auto"/True: newest complete checkpoint; or a path/tag
    overwrite: bool = False
    stop_after_steps: Optional[int] = None
    init_from: Optional[str] = None
    allow_schedule_change: bool = False
    tensorboard_dir: Optional[str] = None
    peak_tflops: Optional[float] = None


@dataclasses.dataclass
class Run:
    """Everything `fit` needs, built once by `setup`."""
    cfg: Config
    opts: RunOptions
    env: distributed.Env
    run_dir: Path
    device: str
    precision: str
    ds: dict
    engine: object
    train_windows: data.TokenWindows
    val_windows: data.TokenWindows
    sampler: data.GlobalBatchSampler
    total_steps: int
    state: checkpoint.TrainState
    frozen: dict
    meta: dict
    metrics: Metrics
    resumed_from: Optional[Path] = None


def resolve_device(cfg: Config) -> str:
    return distributed.pick_device(cfg.training.device, "training.device", "--training.device")


def resolve_precision(cfg: Config, device: str) -> str:
    p = cfg.training.precision
    if p == "auto":
        return "bf16" if distributed.bf16_supported(device) else "fp32"
    if p == "bf16" and device == "cuda" and not distributed.bf16_supported(device):
        raise ForgeError("training.precision=bf16 but this GPU does not support bf16; use fp16 or fp32")
    return p


def resolve_run_dir(opts: RunOptions, env: distributed.Env) -> Path:
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


def on_main(fn, share: bool = True):
    """Run `fn` on rank 0 only; the others wait, then all get its result or all raise its user error. With
    share=False only rank 0 gets the result (the others None): nothing but the outcome is pickled and sent."""
    outcome, result = None, None
    if distributed.is_main():
        try:
            result = fn()
            outcome = ("ok", result if share else None)
        except ForgeError as e:
            outcome = ("error", str(e))
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise ForgeError(outcome[1])
    return outcome[1] if share else result


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


def build_model(cfg: Config, init_state: Optional[dict]) -> SharedTrainingModel:
    """The Phase-1 model, initialised by the recipe, then overwritten by `init_state` (from load_init_from)."""
    m = cfg.model
    model = SharedTrainingModel(m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.d_ff, m.max_seq_len, m.dropout,
                                activation_checkpointing=cfg.training.activation_checkpointing)
    initialize(model, cfg.training.recipe, cfg.training.seed)
    if init_state is not None:
        model.shared.load_state_dict(init_state, strict=True)
    return model


def lr_lambda(total_steps: int, warmup: int):
    """Linear warm-up from 0, then cosine to 0 at the last step (the contract's schedule)."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))))
    return f


@contextmanager
def long_wait():
    """Saves, evaluation and export may keep some ranks waiting longer than a training step's timeout. Restores
    the timeout it found: during set-up (a resume's load) that is still the long one."""
    previous = distributed.current_timeout()
    distributed.set_timeout(distributed.SETUP_TIMEOUT)
    try:
        yield
    finally:
        distributed.set_timeout(previous)


def preflight(cfg: Config, opts: RunOptions, world_size: int) -> tuple[str, str, dict, Optional[dict]]:
    """Every check that needs no other rank and no data: device, precision, DeepSpeed config, flag conflicts,
    --init_from. Returns (device, precision, resolved DS config, init_from tensors). `forge-ds check` runs this
    same function, so both commands fail with the same message."""
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
    if t.compile and ds_config.zero_stage(ds) == 3:
        # Measured with DeepSpeed 0.19.8 / torch 2.13: ZeRO-3 gathers and re-partitions parameters around each
        # module, so every call sees new shapes, dynamo recompiles until its limit and falls back to eager.
        raise ForgeError(f"training.compile=true does not work with ZeRO-3 ({ds_source.name}): the partitioned "
                         "parameters change shape between calls and torch.compile recompiles every layer; use "
                         "ZeRO-0/1/2 with compile, or --training.compile=false")
    init_state = load_init_from(cfg, opts.init_from) if opts.init_from else None
    return device, precision, ds, init_state


def setup(cfg: Config, opts: RunOptions, env: distributed.Env, notes: list[str]) -> Run:
    import deepspeed

    device, precision, ds, init_state = preflight(cfg, opts, env.world_size)
    t = cfg.training
    distributed.init(device)
    run_dir = resolve_run_dir(opts, env)
    check_run_dir(run_dir, opts)
    resume_from = checkpoint.find_resume_target(run_dir, opts.resume) if opts.resume else None
    if resume_from is not None:
        notes += checkpoint.compare_configs(checkpoint.saved_config(resume_from), cfg, opts.allow_schedule_change)
        on_main(lambda: checkpoint.verify_manifest(resume_from))

    prepared = on_main(lambda: prepare.for_config(cfg))
    shared_dirs.check_same_dirs(run=run_dir, prepared_data=prepared)
    meta = data.read_meta(prepared)
    data.check_fits(prepared, cfg.model.max_seq_len)
    train_windows = data.TokenWindows(prepared / "train.bin", cfg.model.max_seq_len)
    val_windows = data.TokenWindows(prepared / "val.bin", cfg.model.max_seq_len)
    sampler = data.GlobalBatchSampler(len(train_windows), t.batch_size, t.gradient_accumulation_steps,
                                      env.world_size, t.seed)
    if sampler.steps_per_epoch < 1:
        raise ForgeError(f"the training split has {len(train_windows)} windows, fewer than one global batch of "
                         f"{sampler.global_batch}; lower --training.batch_size or add text")
    total_steps = t.max_steps or t.epochs_shared * sampler.steps_per_epoch
    saved, load_from = plan_resume(resume_from, env, ds, sampler, meta, notes) if resume_from else (None, None)

    model = build_model(cfg, init_state)
    # Counted before deepspeed.initialize: ZeRO-3 replaces each parameter by an empty placeholder (numel 0).
    shared_params, temp_params = model.shared_parameter_count(), model.temp_parameter_count()
    frozen = {name: p.detach().clone() for name, p in model.shared.named_parameters() if not p.requires_grad}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=optimizer_groups(model, t.recipe, t.weight_decay), config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, t.warmup_steps)))
    if t.compile:
        engine.compile()

    state = checkpoint.TrainState(world_size=env.world_size, global_batch=sampler.global_batch,
                                  zero_stage=ds_config.zero_stage(ds), precision=precision,
                                  tokenizer_sha256=meta["tokenizer_sha256"])
    if resume_from is not None:
        with long_wait():
            if load_from != resume_from:
                universal.load(engine, load_from, saved.world_size, env.world_size)
            else:
                engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name)
        state = dataclasses.replace(saved, world_size=env.world_size)
        frozen = checkpoint.read_frozen(resume_from)

    hosts = distributed.gather_hostnames()
    if env.is_main:
        _write_run_files(run_dir, cfg, ds, prepared, env, hosts, opts.overwrite and not opts.resume)
    distributed.barrier()
    n_params = shared_params + temp_params
    metrics = Metrics(run_dir, tensorboard_dir(opts, run_dir), env.is_main, total_steps,
                      state.step, t.log_every, tokens_per_step=sampler.global_batch * cfg.model.max_seq_len,
                      samples_per_step=sampler.global_batch,
                      flops_per_tok=flops_per_token(n_params, cfg.model.n_layers, cfg.model.d_model,
                                                    cfg.model.max_seq_len),
                      peak=peak_flops(device, opts.peak_tflops), world_size=env.world_size, device=device,
                      fp16=precision == "fp16", terminal=distributed.stdout_is_terminal())
    run = Run(cfg, opts, env, run_dir, device, precision, ds, engine, train_windows, val_windows, sampler,
              total_steps, state, frozen, meta, metrics, resume_from)
    if env.is_main:
        for note in notes:
            print(note, flush=True)
        _print_start_block(run, shared_params, temp_params)
        metrics.text("config", to_yaml(cfg))
        metrics.text("ds_config", json.dumps(ds, indent=2))
    return run


def plan_resume(resume_from: Path, env: distributed.Env, ds: dict, sampler: data.GlobalBatchSampler, meta: dict,
                notes: list[str]) -> tuple[checkpoint.TrainState, Path]:
    """Checks that need the saved state, before the engine exists. Returns (saved state, folder to load): the
    checkpoint itself, or its universal copy when the world size changed (the engine must then be built with
    load_universal, set here in `ds`)."""
    saved = check_resume_state(resume_from, ds, sampler, meta)
    if saved.world_size == env.world_size:
        return saved, resume_from
    if saved.zero_stage == 0:
        notes.append(f"resume: world size {saved.world_size} -> {env.world_size} (ZeRO-0 keeps the optimizer "
                     "state whole; loaded as saved)")
        return saved, resume_from
    load_from = on_main(lambda: universal.convert(resume_from))  # set-up's long timeout covers the others' wait
    universal.enable(ds)
    notes.append(f"resume: world size {saved.world_size} -> {env.world_size}: through DeepSpeed's universal "
                 f"checkpoint {load_from}")
    return saved, load_from


def check_resume_state(resume_from: Path, ds: dict, sampler: data.GlobalBatchSampler,
                       meta: dict) -> checkpoint.TrainState:
    """The saved state, if this run can continue it (shared with `forge-ds check`)."""
    saved = checkpoint.read_state(resume_from)
    if saved.tokenizer_sha256 != meta["tokenizer_sha256"]:
        raise ForgeError(f"{resume_from} was trained with another tokenizer (sha256 {saved.tokenizer_sha256[:12]}"
                         f"… vs {meta['tokenizer_sha256'][:12]}…); resume with the original data settings")
    # The data position is the step: with the global batch held, step s covers the same samples at any world size.
    if saved.global_batch != sampler.global_batch:
        raise ForgeError(f"resume: global batch {saved.global_batch} -> {sampler.global_batch}; keep "
                         "batch_size x gradient_accumulation_steps x ranks equal to resume")
    if saved.zero_stage != ds_config.zero_stage(ds):
        raise ForgeError(f"{resume_from} was saved at ZeRO-{saved.zero_stage}, this run uses ZeRO-"
                         f"{ds_config.zero_stage(ds)}; resume with --deepspeed_config=zero{saved.zero_stage}")
    return saved


def _write_run_files(run_dir: Path, cfg: Config, ds: dict, prepared: Path, env, hosts, clear_old: bool) -> None:
    if clear_old:
        for stale in ("checkpoints", "tensorboard", "metrics.jsonl", "summary.json"):
            target = run_dir / stale
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        for ext in ("pt", "safetensors", "json"):
            (run_dir / f"{export.EXPORT_STEM}.{ext}").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    checkpoint.atomic_write_text(run_dir / "ds_config.json", json.dumps(ds, indent=2))
    checkpoint.atomic_write_text(run_dir / "modularforge.yaml", modularforge_yaml(cfg))
    checkpoint.atomic_write_text(run_dir / "env.txt", distributed.environment_report(env, hosts))
    shutil.copyfile(prepared / "tokenizer.json", run_dir / "tokenizer.json")


def tensorboard_dir(opts: RunOptions, run_dir: Path) -> Path:
    return Path(opts.tensorboard_dir).resolve() if opts.tensorboard_dir else run_dir / "tensorboard"


def _print_start_block(run: Run, shared_params: int, temp_params: int) -> None:
    c, s = run.cfg, run.sampler
    lines = [
        f"forge-ds train: {run.run_dir}",
        f"  model       d_model {c.model.d_model}, {c.model.n_layers} layers, {c.model.n_heads} heads, vocab "
        f"{c.model.vocab_size}, T {c.model.max_seq_len}; parameters: shared {shared_params:,} "
        f"(kept) + temporary experts {temp_params:,} (discarded)",
        f"  engine      ZeRO-{ds_config.zero_stage(run.ds)}, {run.precision}, {run.device}, world size "
        f"{run.env.world_size} ({run.env.launcher}), recipe {c.training.recipe}",
        f"  batch       global {s.global_batch} = {c.training.batch_size} per rank x "
        f"{c.training.gradient_accumulation_steps} accumulation x {run.env.world_size} ranks; "
        f"{s.steps_per_epoch * s.global_batch * c.model.max_seq_len:,} tokens/epoch",
        f"  schedule    {run.total_steps} steps ({s.steps_per_epoch}/epoch), from step {run.state.step}"
        + (f" (resumed from {run.resumed_from.name})" if run.resumed_from else ""),
        f"  data        {c.data.source}: {run.meta['train_tokens']:,} train / {run.meta['val_tokens']:,} val tokens",
        _inputs_line(run),
        f"  outputs     checkpoints {run.run_dir / 'checkpoints'}, export {run.run_dir / (export.EXPORT_STEM + '.pt')}",
        f"  logs        tensorboard --logdir {tensorboard_dir(run.opts, run.run_dir)}; "
        f"{run.run_dir / 'metrics.jsonl'}",
    ]
    print("\n".join(lines), flush=True)


def _inputs_line(run: Run) -> str:
    """Every path the run reads, resolved: what a relative path in a config meant is visible in the log."""
    d, o = run.cfg.data, run.opts
    items = [f"corpus {run.meta.get('source_identity', {}).get('path') or d.source}",
             f"prepared {Path(run.train_windows.bin_path).parent.resolve()}",
             f"tokenizer {Path(d.tokenizer).resolve() if d.tokenizer else 'trained on the corpus'}",
             f"deepspeed config {ds_config.find_ds_config(o.deepspeed_config).resolve()}"]
    if o.init_from:
        items.append(f"init_from {Path(o.init_from).resolve()}")
    return "  inputs      " + ", ".join(items)


def dropout_seed(seed: int, step: int, slot: int) -> int:
    """Re-seeding per (step, micro-batch slot) makes a resumed run draw the uninterrupted run's masks. The slot is
    the micro-batch's place in the global batch (micro * world_size + rank, the sampler's order), not the rank:
    the same samples get the same masks at any world size, so a resume on another number of ranks continues
    the uninterrupted run's dropout too (given the same per-rank batch_size)."""
    return (seed * 1_000_003 + step * 7_919 + slot * 104_729) % (2**63)


def get_batch(windows: data.TokenWindows, indices: list[int], device: str):
    return to_device(data.stack_windows(windows, indices), device)


def to_device(batch: tuple[torch.Tensor, torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # non_blocking: from pinned memory (the loader's, on a GPU) the copy overlaps the step still queued there.
    return tuple(t.to(device, non_blocking=True) for t in batch)


def seed_dropout(seed: int, device: str) -> None:
    """Seed only the generator the forward draws dropout from. torch.manual_seed would also queue a seeding, with
    a formatted stack trace, for every accelerator type not initialised in this process (XPU, MTIA, and CUDA on a
    CPU run): about a millisecond of host time per micro-batch."""
    if device.startswith("cuda"):
        torch.cuda.manual_seed(seed)
    torch.default_generator.manual_seed(seed)


@torch.no_grad()
def evaluate(engine, windows: data.TokenWindows, batch_size: int, device: str, max_batches: Optional[int]) -> float:
    """Token-weighted mean loss over the split. Every rank runs the same number of forwards (ZeRO-3 gathers
    parameters collectively), so short ranks repeat a window with weight zero."""
    rank, world = distributed.rank(), distributed.world_size()
    indices = list(range(len(windows)))
    per_rank = math.ceil(len(indices) / world)
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    n_batches = math.ceil(per_rank / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    engine.eval()
    loss_sum = tokens = 0.0
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1.0 if chunk else 0.0
        x, y = get_batch(windows, chunk or [0], device)
        n = float((y != 0).sum()) * weight
        loss_sum += float(engine(x, y)) * n
        tokens += n
    engine.train()
    total_loss, total_tokens = distributed.all_reduce([loss_sum, tokens])
    return total_loss / max(total_tokens, 1.0)


def fit(run: Run) -> str:
    """The loop. Returns why it ended: "done", "budget" (--stop_after_steps) or "signal"."""
    engine, cfg, state, t = run.engine, run.cfg, run.state, run.cfg.training
    rank, ga = run.env.rank, t.gradient_accumulation_steps
    stop_at = run.total_steps if not run.opts.stop_after_steps else min(run.total_steps,
                                                                          state.step + run.opts.stop_after_steps)
    nan_at = distributed.fault_value("nan_at_step")
    # The short collective timeout starts once this invocation's first step is through: that step's one-time work
    # (compilation, lazy allocations) may keep one rank waiting for another.
    first_step, overflow_run = state.step + 1, 0
    last_saved = state.step if run.resumed_from else None
    reason = "done"
    # ZeRO-0 in fp32 steps torch's own AdamW, which keeps no gradient norm (get_global_grad_norm() is None there).
    own_grad_norm, pre_clip_norm = state.zero_stage == 0 and run.precision == "fp32", None
    batches = data.micro_batches(run.train_windows, run.sampler, rank, state.step, stop_at,
                                 num_workers=t.num_workers, pin_memory=run.device.startswith("cuda"))
    while state.step < stop_at:
        # 1. forward / backward over the accumulation micro-batches (DeepSpeed steps at the boundary)
        started, loss_sum, skipped_before = time.perf_counter(), 0.0, getattr(engine, "skipped_steps", 0)
        lr = engine.get_lr()[0]  # the rate this step applies; the scheduler moves on inside engine.step()
        for micro in range(ga):
            seed_dropout(dropout_seed(t.seed, state.step, micro * run.env.world_size + rank), run.device)
            x, y = to_device(next(batches), run.device)
            loss = engine(x, y)
            distributed.fault_point("train_step", step=state.step + 1)  # tests: a rank dies or hangs mid-step
            if nan_at is not None and int(nan_at) == state.step + 1:
                loss = loss * float("nan")
            engine.backward(loss)
            if own_grad_norm and micro == ga - 1:
                pre_clip_norm = grad_norm_of(engine.module)  # all-reduced by backward(), not yet clipped by step()
            engine.step()
            loss_sum += loss.item()
        # 2. agree across ranks: mean loss, divergence, stop signals (one collective)
        total, stop_flag = distributed.all_reduce([loss_sum / ga, float(distributed.local_stop_requested())])
        train_loss = total / run.env.world_size
        state.step += 1
        if state.step == first_step:
            distributed.set_timeout(distributed.TRAINING_TIMEOUT)
        state.samples_consumed += run.sampler.global_batch
        state.tokens_seen += run.sampler.global_batch * cfg.model.max_seq_len
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else pre_clip_norm
        if not math.isfinite(train_loss) or (grad_norm is not None and not math.isfinite(grad_norm)
                                             and run.precision != "fp16"):
            raise TrainingDiverged(f"non-finite {'loss' if not math.isfinite(train_loss) else 'gradient norm'} at "
                                   f"step {state.step}; {_last_good(run)}")
        # fp16: DeepSpeed skips a step whose scaled gradients overflowed and lowers the loss scale; now and then
        # that is normal, many in a row is divergence.
        overflow_run = overflow_run + 1 if getattr(engine, "skipped_steps", 0) > skipped_before else 0
        if overflow_run > t.max_skipped_steps:
            raise TrainingDiverged(f"fp16: {overflow_run} steps in a row skipped for gradient overflow, the last at "
                                   f"step {state.step} (training.max_skipped_steps={t.max_skipped_steps}); "
                                   f"{_last_good(run)}")
        state.last_train_loss = train_loss
        # 3. log
        run.metrics.train_step(state.step, train_loss, lr, grad_norm,
                               time.perf_counter() - started, state.step / run.sampler.steps_per_epoch,
                               loss_scale=_loss_scale(engine), skipped_steps=getattr(engine, "skipped_steps", None))
        distributed.fault_point("after_step")  # tests: `after_step:sleep0.5` slows steps so a signal lands mid-run
        # 4. evaluate
        if state.step % t.eval_every == 0 and state.step < run.total_steps:
            _evaluate_and_track(run)
        # 5. checkpoint
        if state.step % t.checkpoint_every == 0 and state.step < run.total_steps:
            save(run)
            last_saved = state.step
        if stop_flag > 0:
            reason = "signal"
            break
    else:
        reason = "done" if state.step >= run.total_steps else "budget"
    if reason != "done" and last_saved != state.step:
        save(run)
    return reason


def _last_good(run: Run) -> str:
    good = checkpoint.complete_checkpoints(run.run_dir / "checkpoints")
    if not good:
        return "no checkpoint was saved before it; lower --training.learning_rate and start again"
    return (f"last good checkpoint {good[-1]} is kept; lower --training.learning_rate and resume from it "
            f"(--resume --output_dir={run.run_dir})")


def grad_norm_of(module: torch.nn.Module) -> float:
    """Global L2 norm of the gradients held in `module` (ZeRO-0: every rank holds the full, averaged gradients)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _loss_scale(engine) -> Optional[float]:
    # ZeRO-1/2/3 optimizers expose both names; ZeRO-0's FP16_Optimizer only `loss_scale` (DeepSpeed 0.19.8).
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "loss_scale", None)
    scale = scale if isinstance(scale, (int, float, torch.Tensor)) else getattr(optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None


def _evaluate_and_track(run: Run) -> float:
    with long_wait():
        val = evaluate(run.engine, run.val_windows, run.cfg.training.batch_size, run.device,
                       run.cfg.training.eval_max_batches)
    run.state.last_val_loss = val
    if run.state.best_val_loss is None or val < run.state.best_val_loss:
        run.state.best_val_loss, run.state.best_step = val, run.state.step
    run.metrics.evaluation(run.state.step, val)
    return val


def save(run: Run) -> Path:
    with long_wait():
        ckpt = checkpoint.save(run.engine, run.run_dir / "checkpoints", run.state, run.cfg, run.frozen)
    protect = {checkpoint.tag_for(run.state.best_step)} if (run.cfg.training.export == "best"
                                                           and run.state.best_step) else set()
    if run.resumed_from is not None:
        protect.add(run.resumed_from.name)
    checkpoint.prune(run.run_dir / "checkpoints", run.cfg.training.keep_checkpoints, protect)
    return ckpt


def finish(run: Run) -> dict:
    """End of a completed schedule: final evaluation and checkpoint, then the export of final or best weights."""
    cfg, state = run.cfg, run.state
    val = _evaluate_and_track(run)
    save(run)
    m = cfg.model
    with long_wait():
        if cfg.training.export == "best" and state.best_step != state.step:
            best = run.run_dir / "checkpoints" / checkpoint.tag_for(state.best_step)
            # Only rank 0 writes: broadcasting the weights would pickle copies of them on every rank.
            weights = on_main(lambda: export.gather_from_checkpoint(
                best, m.n_layers, m.max_seq_len, m.d_model, checkpoint.read_frozen(best), state.zero_stage),
                share=False)
        else:
            weights = export.gather_live(run.engine, m.n_layers, m.max_seq_len, m.d_model, run.frozen)
        paths = {}
        if distributed.is_main():
            paths = export.write(weights, run.run_dir, export_metadata(run, val))
        distributed.barrier()
    summary = run.metrics.summary(run.run_dir, {
        "final_train_loss": state.last_train_loss,
        "final_train_ppl": math.exp(min(state.last_train_loss, 50)) if state.last_train_loss is not None else None,
        "final_val_loss": val, "final_val_ppl": math.exp(min(val, 50)),
        "best_val_loss": state.best_val_loss, "best_step": state.best_step, "steps": state.step,
        "tokens_seen": state.tokens_seen, "export": str(paths.get("pt", run.run_dir / "shared_components.pt")),
        "checkpoints": str(run.run_dir / "checkpoints"),
        "tensorboard": str(tensorboard_dir(run.opts, run.run_dir)),
        "metrics": str(run.run_dir / "metrics.jsonl")})
    run.metrics.hparams({**{f"model.{k}": v for k, v in cfg.model.model_dump().items()},
                         **{f"training.{k}": v for k, v in cfg.training.model_dump().items()},
                         "zero_stage": state.zero_stage, "world_size": run.env.world_size}, val, state.step)
    return summary


def export_metadata(run: Run, val_loss: float) -> dict:
    import deepspeed

    import forge_ds

    s = run.state
    return {"format": "modularforge.shared_components.v1", "model": run.cfg.model.model_dump(),
            "recipe": run.cfg.training.recipe, "exported_weights": run.cfg.training.export,
            "exported_step": s.best_step if run.cfg.training.export == "best" else s.step,
            "tokenizer_sha256": s.tokenizer_sha256, "steps": s.step, "tokens_seen": s.tokens_seen,
            "final_train_loss": s.last_train_loss, "final_train_ppl": math.exp(min(s.last_train_loss or 0, 50)),
            "final_val_loss": val_loss, "final_val_ppl": math.exp(min(val_loss, 50)),
            "best_val_loss": s.best_val_loss, "best_step": s.best_step, "zero_stage": s.zero_stage,
            "precision": s.precision, "world_size": run.env.world_size,
            # Module attributes, not package metadata: a source checkout on PYTHONPATH has no metadata.
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "forge_ds": forge_ds.__version__}}


def train(cfg: Config, opts: RunOptions, env: distributed.Env, notes: list[str]) -> int:
    """The whole job. Returns the process exit code."""
    # Before setup: a SLURM preemption signal that lands while ranks start up is then honoured at the first
    # step (checkpoint + requeue) instead of killing the job with USR1's default action.
    distributed.install_stop_handlers()
    run = setup(cfg, opts, env, notes)
    try:
        reason = fit(run)
        if reason == "done":
            summary = finish(run)
            if env.is_main:
                print(f"shared export written: {summary['export']}", flush=True)
            code = 0
        elif reason == "budget":
            if env.is_main:
                print(f"stopped after {opts.stop_after_steps} steps at step {run.state.step}/{run.total_steps}; "
                      f"resume with --resume --output_dir={run.run_dir}", flush=True)
            code = 0
        else:  # a stop signal: every rank has saved; under SLURM rank 0 requeues the job (which kills this step)
            distributed.barrier()
            requeued = env.is_main and distributed.requeue_slurm_job(env)
            if env.is_main:
                print(f"stopped by {distributed.stop_signal_name()} at step {run.state.step}; checkpoint saved"
                      + ("; job requeued" if requeued else f"; resume with --resume --output_dir={run.run_dir}"),
                      flush=True)
            code = 0 if env.slurm_job_id else 128 + distributed.stop_signal_number()
    finally:
        run.metrics.close()
    # Leave together, and take the process group down before the interpreter does: a rank whose group is torn
    # down at exit while a peer still writes can abort there ("terminate called without an active exception",
    # exit -6 on a run that had finished). Only on the way out of a run that ended well: after an error a peer may
    # be gone, and a barrier would wait for it.
    with long_wait():
        distributed.barrier()
    distributed.shutdown()
    return code
