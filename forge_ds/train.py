"""Phase 1 on DeepSpeed, read top to bottom: `setup` (preflight, then model, engine, run files and metrics), `fit`
(the loop), `finish` (final evaluation and checkpoint, the shared-only export, the summary), and `train`, which
runs them and turns how the loop ended into an exit code.

Everything that can fail on bad input fails in preflight.py, before the first step. Formats belong to
checkpoint.py / export.py, the engine and its step to engine.py, ranks to distributed.py, signals to preemption.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Optional

from forge_ds import (checkpoint, data, distributed, ds_config, export, faults, launch_env, package, preemption,
                      resume, runlock)
from forge_ds.config import Config, modularforge_yaml, to_yaml
from forge_ds.errors import Interrupted
from forge_ds.engine import Stepper, build_engine, build_model
from forge_ds.evaluate import batches_per_rank, mean_loss
from forge_ds.files import atomic_write_text
from forge_ds.metrics import Metrics, flops_per_token, peak_flops, perplexity
from forge_ds.options import RunOptions
from forge_ds.preflight import preflight


@dataclasses.dataclass
class Run:
    """Everything `fit` and `finish` need, built once by `setup`."""
    cfg: Config
    opts: RunOptions
    env: launch_env.Env
    run_dir: Path
    device: str
    precision: str
    ds: dict
    engine: object
    stepper: Stepper
    train_windows: data.TokenWindows
    val_windows: data.TokenWindows
    sampler: data.GlobalBatchSampler
    total_steps: int
    state: checkpoint.TrainState
    frozen: dict
    meta: dict
    metrics: Metrics
    resumed_from: Optional[Path] = None


def setup(cfg: Config, opts: RunOptions, env: launch_env.Env, notes: list[str]) -> Run:
    pf = preflight(cfg, opts, env, env.world_size, training=True)
    model = build_model(cfg, pf.init_state)
    # Counted before deepspeed.initialize: ZeRO-3 replaces each parameter by an empty placeholder (numel 0).
    shared_params, temp_params = model.shared_parameter_count(), model.temp_parameter_count()
    frozen = {name: p.detach().clone() for name, p in model.shared.named_parameters() if not p.requires_grad}
    engine = build_engine(cfg, model, pf.ds, pf.total_steps)
    state = checkpoint.TrainState(world_size=env.world_size, global_batch=pf.sampler.global_batch,
                                  zero_stage=ds_config.zero_stage(pf.ds), precision=pf.precision,
                                  tokenizer_sha256=pf.meta["tokenizer_sha256"])
    if pf.resume is not None:
        with distributed.long_wait():
            state, frozen = resume.restore(engine, pf.resume)

    hosts = distributed.gather_hostnames()
    sources = distributed.gather_object(package.source())  # which forge_ds each rank runs: env.txt
    if env.is_main:
        _write_run_files(pf.run_dir, cfg, pf.ds, pf.prepared, env, hosts, sources,
                         opts.overwrite and not opts.resume)
    distributed.barrier()
    m = cfg.model
    metrics = Metrics(pf.run_dir, tensorboard_dir(opts, pf.run_dir), env.is_main, pf.total_steps, state.step,
                      cfg.training.log_every, tokens_per_step=pf.sampler.global_batch * m.max_seq_len,
                      samples_per_step=pf.sampler.global_batch,
                      flops_per_tok=flops_per_token(shared_params + temp_params, m.n_layers, m.d_model,
                                                    m.max_seq_len),
                      peak=peak_flops(pf.device, opts.peak_tflops), world_size=env.world_size, device=pf.device,
                      fp16=pf.precision == "fp16", terminal=launch_env.stdout_is_terminal(),
                      eval_every=cfg.training.eval_every, eval_batches=batches_per_rank(len(pf.val_windows), env.world_size,
                                                                cfg.training.batch_size,
                                                                cfg.training.eval_max_batches),
                      grad_accum=cfg.training.gradient_accumulation_steps)
    stepper = Stepper(engine, cfg, pf.precision, state.zero_stage, env.rank, env.world_size, pf.device)
    run = Run(cfg, opts, env, pf.run_dir, pf.device, pf.precision, pf.ds, engine, stepper, pf.train_windows,
              pf.val_windows, pf.sampler, pf.total_steps, state, frozen, pf.meta, metrics,
              pf.resume.target if pf.resume else None)
    if env.is_main:
        for note in notes + pf.notes:
            print(note, flush=True)
        _print_start_block(run, shared_params, temp_params)
        metrics.text("config", to_yaml(cfg))
        metrics.text("ds_config", json.dumps(pf.ds, indent=2))
    return run


def fit(run: Run) -> str:
    """The loop. Returns why it ended: "done", "budget" (--stop_after_steps) or "signal"."""
    engine, state, t = run.engine, run.state, run.cfg.training
    stop_at = min(run.total_steps, state.step + (run.opts.stop_after_steps or run.total_steps))
    # The short collective timeout starts once this invocation's first step is through: that step's one-time work
    # (compilation, lazy allocations) may keep one rank waiting for another.
    first_step, last_saved, reason = state.step + 1, state.step if run.resumed_from else None, "done"
    batches = data.micro_batches(run.train_windows, run.sampler, run.env.rank, state.step, stop_at,
                                 num_workers=t.num_workers, pin_memory=run.device.startswith("cuda"))
    while state.step < stop_at:
        # 1. forward / backward over the accumulation micro-batches (DeepSpeed steps at the boundary)
        started, lr = time.perf_counter(), engine.get_lr()[0]  # the rate this step applies
        local_loss = run.stepper.step(batches, state.step)
        # 2. agree across ranks: mean loss and stop signals (one collective, one host read), then the health checks
        train_loss, stop_flag, grad_norm = run.stepper.read(local_loss, preemption.local_stop_requested())
        state.advance(run.sampler.global_batch, run.cfg.model.max_seq_len)
        if state.step == first_step:
            distributed.set_timeout(distributed.TRAINING_TIMEOUT)
        run.stepper.check_health(state.step, train_loss, grad_norm, lambda: _last_good(run))
        state.last_train_loss = train_loss
        # 3. log
        run.metrics.train_step(state.step, train_loss, lr, grad_norm, time.perf_counter() - started,
                               state.step / run.sampler.steps_per_epoch, loss_scale=run.stepper.loss_scale(),
                               skipped_steps=run.stepper.skipped_steps())
        faults.point("after_step")  # tests: `after_step:sleep0.5` slows steps so a signal lands mid-run
        # 4. evaluate
        if state.step % t.eval_every == 0 and state.step < run.total_steps and evaluate_and_track(run) is None:
            stop_flag = True  # a stop signal ended the evaluation: every rank agreed, now save and stop
        # 5. checkpoint
        if state.step % t.checkpoint_every == 0 and state.step < run.total_steps:
            save(run)
            last_saved = state.step
        if stop_flag:
            reason = "signal"
            break
    else:
        reason = "done" if state.step >= run.total_steps else "budget"
    if reason != "done" and last_saved != state.step:
        save(run)
    return reason


def evaluate_and_track(run: Run) -> Optional[float]:
    """The validation loss, or None when a stop signal ended the evaluation (every rank agrees between batches:
    ZeRO-3's forwards are collective, so a rank that stopped alone would hang the others)."""
    started = time.perf_counter()
    with distributed.long_wait(), preemption.phase("poll"):
        val = mean_loss(run.engine, run.val_windows, run.cfg.training.batch_size, run.device,
                        run.cfg.training.eval_max_batches,
                        stop_requested=lambda: distributed.any_rank(preemption.local_stop_requested()))
    if val is None:
        return None
    run.metrics.evaluation_time(time.perf_counter() - started)
    run.state.last_val_loss = val
    if run.state.best_val_loss is None or val < run.state.best_val_loss:
        run.state.best_val_loss, run.state.best_step = val, run.state.step
    run.metrics.evaluation(run.state.step, val)
    return val


def save(run: Run) -> Path:
    with distributed.long_wait():
        ckpt = checkpoint.save(run.engine, run.run_dir / "checkpoints", run.state, run.cfg, run.frozen)
    protect = {checkpoint.tag_for(run.state.best_step)} if (run.cfg.training.export == "best"
                                                           and run.state.best_step) else set()
    if run.resumed_from is not None:
        protect.add(run.resumed_from.name)
    checkpoint.prune(run.run_dir / "checkpoints", run.cfg.training.keep_checkpoints, protect)
    return ckpt


def finish(run: Run) -> Optional[dict]:
    """End of a completed schedule: final evaluation and checkpoint, then the export of final or best weights.
    None when a stop signal ended the final evaluation: the checkpoint is saved, and a resume finishes the job."""
    cfg, state = run.cfg, run.state
    with preemption.phase("step"):  # a signal during the final save only sets the flag: the save completes
        val = evaluate_and_track(run)
        save(run)
    if val is None:
        return None
    try:
        paths = export_weights(run, val)
    except KeyboardInterrupt:  # all three files or none were written (export.write), and the checkpoint is whole
        raise Interrupted(f"stopped by Ctrl-C during the export, which was abandoned; checkpoint "
                          f"{checkpoint.tag_for(state.step)} is complete: run `forge-ds export {run.run_dir}` "
                          "later to write the shared export") from None
    summary = run.metrics.summary(run.run_dir, {
        "final_train_loss": state.last_train_loss, "final_train_ppl": perplexity(state.last_train_loss),
        "final_val_loss": val, "final_val_ppl": perplexity(val),
        "best_val_loss": state.best_val_loss, "best_step": state.best_step, "steps": state.step,
        "tokens_seen": state.tokens_seen, "export": str(paths.get("pt", run.run_dir / "shared_components.pt")),
        "checkpoints": str(run.run_dir / "checkpoints"),
        "tensorboard": str(tensorboard_dir(run.opts, run.run_dir)),
        "metrics": str(run.run_dir / "metrics.jsonl")})
    run.metrics.hparams({**{f"model.{k}": v for k, v in cfg.model.model_dump().items()},
                         **{f"training.{k}": v for k, v in cfg.training.model_dump().items()},
                         "zero_stage": state.zero_stage, "world_size": run.env.world_size}, val, state.step)
    return summary


def export_weights(run: Run, val: float) -> dict[str, Path]:
    """Collective: gather the final (or best) shared weights; rank 0 writes the export. Returns its paths (rank 0)."""
    cfg, state, m = run.cfg, run.state, run.cfg.model
    best = cfg.training.export == "best" and state.best_step != state.step
    with distributed.long_wait():
        if best:
            ckpt = run.run_dir / "checkpoints" / checkpoint.tag_for(state.best_step)
            # Only rank 0 writes: broadcasting the weights would pickle copies of them on every rank.
            weights = distributed.on_main(lambda: export.gather_from_checkpoint(
                ckpt, m.n_layers, m.max_seq_len, m.d_model, checkpoint.read_frozen(ckpt), state.zero_stage),
                share=False)
        else:
            weights = export.gather_live(run.engine, m.n_layers, m.max_seq_len, m.d_model, run.frozen)
        paths = {}
        if distributed.is_main():
            paths = export.write(weights, run.run_dir, export.metadata(
                cfg, state, run.env.world_size, val, cfg.training.export, state.best_step if best else state.step))
        distributed.barrier()
    return paths


def train(cfg: Config, opts: RunOptions, env: launch_env.Env, notes: list[str]) -> int:
    """The whole job. Returns the process exit code."""
    # Before setup: a SLURM preemption signal that lands while ranks start up is then honoured at the first
    # step (checkpoint + requeue) instead of killing the job with USR1's default action.
    preemption.install_stop_handlers()
    try:
        run = setup(cfg, opts, env, notes)
    except BaseException:
        runlock.release_unused()  # a run refused on bad input leaves no run directory behind
        raise
    try:
        with preemption.phase("step"):
            reason = fit(run)
        summary = finish(run) if reason == "done" else None
        code = 0
        if summary is not None:
            _say(env, f"shared export written: {summary['export']}")
        elif reason == "budget":
            _say(env, f"stopped after {opts.stop_after_steps} steps at step {run.state.step}/{run.total_steps}; "
                      f"resume with --resume --output_dir={run.run_dir}")
        else:  # a stop signal: every rank has saved; under SLURM rank 0 requeues the job (which kills this step)
            # The signal any rank got (rank 0 may have got none: the ranks agree to stop); also the barrier
            # that makes sure every rank saved before a requeue kills the step.
            signum = int(distributed.all_reduce([float(preemption.stop_signal_number())], op="max")[0])
            requeued = env.is_main and preemption.requeue_slurm_job(env)
            during = " during the final evaluation (resume to evaluate and export)" if reason == "done" else ""
            _say(env, f"stopped by {preemption.signal_name(signum)} at step {run.state.step}{during}; checkpoint "
                      "saved" + ("; job requeued" if requeued else f"; resume with --resume --output_dir={run.run_dir}"))
            code = 0 if env.slurm_job_id else 128 + signum
    finally:
        run.metrics.close()
    # Leave together, and take the process group down before the interpreter does: a rank whose group is torn
    # down at exit while a peer still writes can abort there ("terminate called without an active exception",
    # exit -6 on a run that had finished). Only on the way out of a run that ended well: after an error a peer may
    # be gone, and a barrier would wait for it.
    with distributed.long_wait():
        distributed.barrier()
    distributed.shutdown()
    return code


def _say(env: launch_env.Env, line: str) -> None:
    if env.is_main:
        print(line, flush=True)


def _write_run_files(run_dir: Path, cfg: Config, ds: dict, prepared: Path, env, hosts, sources,
                     clear_old: bool) -> None:
    if clear_old:
        for stale in ("checkpoints", "tensorboard", "metrics.jsonl", "summary.json"):
            target = run_dir / stale
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        for ext in ("pt", "safetensors", "json"):
            (run_dir / f"{export.EXPORT_STEM}.{ext}").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    atomic_write_text(run_dir / "ds_config.json", json.dumps(ds, indent=2))
    atomic_write_text(run_dir / "modularforge.yaml", modularforge_yaml(cfg))
    atomic_write_text(run_dir / "env.txt", launch_env.environment_report(env, hosts, sources))
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


def _last_good(run: Run) -> str:
    good = checkpoint.complete_checkpoints(run.run_dir / "checkpoints")
    if not good:
        return "no checkpoint was saved before it; lower --training.learning_rate and start again"
    return (f"last good checkpoint {good[-1]} is kept; lower --training.learning_rate and resume from it "
            f"(--resume --output_dir={run.run_dir})")
