"""`forge-ds` commands. Each function's signature is its CLI (fire); dotted config flags arrive in **overrides.

User mistakes raise ForgeError anywhere below; here they become one line `forge-ds: error: …` (rank 0 only) and
exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

import fire

from forge_ds import config as config_mod
from forge_ds import distributed
from forge_ds.errors import USER_ERROR_PREFIX, ForgeError, TrainingDiverged

RUN_OPTIONS_HELP = """run options (not part of the saved config):
  --config=PATH|PRESET        a YAML/JSON config, a preset (modularforge, cpu_demo) or ModularForge's configs/default.yaml
  --deepspeed_config=NAME     ds_configs/ name (zero0 zero1 zero2 zero3 zero3_offload) or a JSON path; default zero2
  --output_dir=DIR            run directory; default runs/<YYYYmmdd-HHMMSS> (runs/slurm-<job id> under SLURM)
  --resume[=auto|PATH|TAG]    continue from the newest complete checkpoint (auto) or a chosen one
  --overwrite                 replace a finished run in --output_dir
  --stop_after_steps=N        end this invocation after N steps with a checkpoint; the schedule is unchanged
  --init_from=PATH            start from an existing shared_components.pt (fresh experts, optimizer, schedule)
  --allow_schedule_change     accept a changed max_steps/epochs_shared on resume
  --tensorboard_dir=DIR       TensorBoard event files; default <run dir>/tensorboard
  --peak_tflops=F             per-rank peak for MFU when the GPU is not in the built-in table
  --local_rank=N              accepted from the deepspeed launcher (the environment wins)
config fields (type, default), as dotted flags:"""


def _config(config, overrides) -> tuple:
    overrides = dict(overrides)
    if overrides.pop("help", False):
        print("usage: forge-ds train [run options] [--section.field=value ...]\n" + RUN_OPTIONS_HELP)
        print(config_mod.help_text())
        raise SystemExit(0)
    return config_mod.resolve(config, overrides)


def _check_stop_after_steps(stop_after_steps) -> None:
    if stop_after_steps is not None and (not isinstance(stop_after_steps, int) or stop_after_steps < 1):
        raise ForgeError(f"--stop_after_steps={stop_after_steps!r} must be a positive integer")


def _resume_target(resume) -> Optional[str]:
    """--resume (fire gives True) means the newest complete checkpoint; --resume=step-… or a path names one."""
    return None if resume in (None, False) else "auto" if resume is True else str(resume)


def train(config: Optional[str] = None, deepspeed_config: str = "zero2", output_dir: Optional[str] = None,
          resume=None, overwrite: bool = False, stop_after_steps: Optional[int] = None,
          init_from: Optional[str] = None, allow_schedule_change: bool = False,
          tensorboard_dir: Optional[str] = None, peak_tflops: Optional[float] = None,
          local_rank: Optional[int] = None, **overrides) -> None:
    """Train the shared components (Phase 1) and export them. `forge-ds train --help` lists every flag."""
    from forge_ds.metrics import configure_console
    from forge_ds.train import RunOptions
    from forge_ds.train import train as run_training

    cfg, notes = _config(config, overrides)
    _check_stop_after_steps(stop_after_steps)
    env = distributed.detect(local_rank)
    configure_console(env.rank)
    opts = RunOptions(config=config, deepspeed_config=str(deepspeed_config), output_dir=output_dir,
                      resume=_resume_target(resume),
                      overwrite=bool(overwrite), stop_after_steps=stop_after_steps, init_from=init_from,
                      allow_schedule_change=bool(allow_schedule_change), tensorboard_dir=tensorboard_dir,
                      peak_tflops=peak_tflops)
    if env.is_main:
        print("resolved config:\n" + config_mod.to_yaml(cfg), flush=True)
    code = run_training(cfg, opts, env, notes)
    if code:
        raise SystemExit(code)


def prepare(config: Optional[str] = None, **overrides) -> None:
    """Read the corpus, train (or reuse) the tokenizer, write the token files; prints the prepared folder."""
    from forge_ds import data, prepare as preparation

    cfg, notes = _config(config, overrides)
    for note in notes:
        print(note)
    prepared = preparation.for_config(cfg)
    meta = data.read_meta(prepared)
    print(f"prepared: {prepared} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab learned {meta['vocab_learned']})")


def check(config: Optional[str] = None, deepspeed_config: str = "zero2", output_dir: Optional[str] = None,
          resume=None, overwrite: bool = False, stop_after_steps: Optional[int] = None,
          init_from: Optional[str] = None, allow_schedule_change: bool = False,
          tensorboard_dir: Optional[str] = None, peak_tflops: Optional[float] = None,
          world_size: Optional[int] = None, local_rank: Optional[int] = None, **overrides) -> None:
    """Every validation `train` does before its first step, without training: run it with train's flags before
    sbatch (--world_size=N checks the batch split for N ranks; default: this launch's). It prepares the data, as
    train would (cached, so train reuses it): only the token counts tell whether the corpus fills a window."""
    from forge_ds import checkpoint, data, ds_config, prepare as preparation
    from forge_ds.train import RunOptions, check_resume_state, check_run_dir, preflight, resolve_run_dir

    cfg, notes = _config(config, overrides)
    for note in notes:
        print(note)
    _check_stop_after_steps(stop_after_steps)
    env = distributed.detect(local_rank)
    world = int(world_size or env.world_size)
    # The same checks in the same order as train.setup, so both fail with the same message.
    opts = RunOptions(config=config, deepspeed_config=str(deepspeed_config), output_dir=output_dir,
                      resume=_resume_target(resume),
                      overwrite=bool(overwrite), init_from=init_from)
    device, precision, ds, _ = preflight(cfg, opts, world)
    t = cfg.training
    run_dir = resolve_run_dir(opts, env)
    check_run_dir(run_dir, opts)
    target = checkpoint.find_resume_target(run_dir, opts.resume) if opts.resume else None
    if target is not None:
        checkpoint.compare_configs(checkpoint.saved_config(target), cfg, bool(allow_schedule_change))
        checkpoint.verify_manifest(target)
    prepared = preparation.for_config(cfg, show_progress=False)
    meta = data.read_meta(prepared)
    data.check_fits(prepared, cfg.model.max_seq_len)
    train_windows = data.TokenWindows(prepared / "train.bin", cfg.model.max_seq_len)
    sampler = data.GlobalBatchSampler(len(train_windows), t.batch_size, t.gradient_accumulation_steps, world, t.seed)
    if target is not None:
        check_resume_state(target, ds, sampler, meta)
    print(f"data: {cfg.data.source}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {prepared}")
    print(f"run directory: {run_dir}" + (f", resuming from {target.name}" if target is not None else ""))
    print(f"check passed: device {device}, precision {precision}, ZeRO-{ds_config.zero_stage(ds)}, world size "
          f"{world}, {sampler.steps_per_epoch} steps/epoch of global batch {sampler.global_batch}")


def export(checkpoint_dir: str, out: Optional[str] = None, overwrite: bool = False) -> None:
    """Write the shared-only export from a checkpoint folder (or a run folder: its newest complete checkpoint),
    offline, in one process, at any ZeRO stage and world size."""
    from forge_ds import checkpoint
    from forge_ds import export as export_mod
    from forge_ds.config import modularforge_yaml

    path = Path(checkpoint_dir).resolve()
    if (path / "checkpoints").is_dir():
        complete = checkpoint.complete_checkpoints(path / "checkpoints")
        if not complete:
            raise ForgeError(f"{path}: no complete checkpoint under checkpoints/")
        path = complete[-1]
    ckpt = checkpoint.validate_checkpoint_dir(path)
    checkpoint.verify_manifest(ckpt)
    cfg = checkpoint.saved_config(ckpt)
    state = checkpoint.read_state(ckpt)
    out_dir = Path(out).resolve() if out else ckpt.parent.parent / f"export-{ckpt.name}"
    if (out_dir / f"{export_mod.EXPORT_STEM}.pt").exists() and not overwrite:
        raise ForgeError(f"{out_dir} already holds an export; pass --overwrite or another --out")
    m = cfg.model
    weights = export_mod.gather_from_checkpoint(ckpt, m.n_layers, m.max_seq_len, m.d_model,
                                                checkpoint.read_frozen(ckpt), state.zero_stage)
    meta = {"format": "modularforge.shared_components.v1", "model": m.model_dump(), "recipe": cfg.training.recipe,
            "source_checkpoint": str(ckpt), "steps": state.step, "tokens_seen": state.tokens_seen,
            "tokenizer_sha256": state.tokenizer_sha256, "final_train_loss": state.last_train_loss,
            "final_val_loss": state.last_val_loss, "zero_stage": state.zero_stage, "world_size": state.world_size}
    paths = export_mod.write(weights, out_dir, meta)
    run_dir = ckpt.parent.parent
    if (run_dir / "tokenizer.json").is_file() and out_dir != run_dir:
        shutil.copyfile(run_dir / "tokenizer.json", out_dir / "tokenizer.json")
    (out_dir / "modularforge.yaml").write_text(modularforge_yaml(cfg), encoding="utf-8")
    print(f"exported {ckpt.name} -> {paths['pt']}")


def verify(path: str, n_heads: Optional[int] = None) -> None:
    """Check a shared_components.pt against the ModularForge contract; exit 1 listing what is wrong."""
    from forge_ds import export as export_mod

    try:
        problems = export_mod.verify(Path(path), n_heads=n_heads)
    except ForgeError as e:  # unreadable, truncated or altered: a failed verification, not a usage error
        problems = [str(e).removeprefix(f"{Path(path)}: ")]
    if problems:
        for problem in problems:
            print(f"FAIL {path}: {problem}")
        raise SystemExit(1)
    print(f"OK {path}: keys, shapes, fp32, finite, tie, pe, ffn_norm and strict load all match the contract")


def bench(*_args, **_flags) -> None:
    """Benchmarks: throughput vs a plain PyTorch loop (benchmarks/bench.py), or --quality (benchmarks/quality.py).
    `forge-ds bench --help` lists the flags."""
    _run_bench(["--help"])


def _run_bench(argv: list[str]) -> None:
    # The scripts parse their own flags (argparse), so `bench` bypasses fire and hands them the raw arguments.
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
    if not script.is_file():
        raise ForgeError(f"{script} not found; the benchmarks ship with the source tree, run from a checkout")
    spec = importlib.util.spec_from_file_location("forge_ds_bench", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def evaluate(path: str, batch_size: Optional[int] = None, max_batches: Optional[int] = None,
             split: Optional[str] = None, device: str = "auto", local_rank: Optional[int] = None,
             **overrides) -> None:
    """Loss and perplexity of the full model (shared + dummy experts) of a run or checkpoint folder, on the run's
    validation split or on --data.source=... (--split=val|train|all), alone or under a launcher. docs/MONITORING.md"""
    from forge_ds.evaluate import evaluate_checkpoint
    from forge_ds.metrics import configure_console

    data_overrides = {}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if section != "data" or not field:
            raise ForgeError(f"forge-ds evaluate: unknown option --{key}; it takes --batch_size, --max_batches, "
                             "--split, --device and --data.<field> (e.g. --data.source=held_out.txt)")
        data_overrides[field] = value
    env = distributed.detect(local_rank)
    configure_console(env.rank)
    if env.world_size > 1:
        from forge_ds.evaluate import resolve_device

        distributed.init(resolve_device(device))
    try:
        evaluate_checkpoint(path, batch_size, max_batches, split, device, data_overrides)
    finally:
        distributed.shutdown()


def sample(path: str, prompt: str = "", max_new_tokens: int = 50, temperature: float = 0.8, top_k: int = 50,
           seed: Optional[int] = None, device: str = "auto") -> None:
    """Generate text with the full model of a run or checkpoint folder and the run's tokenizer (a quick sanity
    check): --prompt="..." --max_new_tokens=50 --temperature=0.8 --top_k=50 [--seed=N]."""
    from forge_ds.evaluate import sample_checkpoint

    text, used_seed = sample_checkpoint(path, prompt, max_new_tokens, temperature, top_k, seed, device)
    print(f"(seed {used_seed})", file=sys.stderr)
    print(text, flush=True)


def convert_universal(checkpoint_dir: str, workers: int = 1) -> None:
    """Convert a ZeRO-1/2/3 checkpoint folder into DeepSpeed's universal format (`<folder>_universal/` beside it,
    plus `latest_universal`), offline. `train --resume` does this itself when the world size changed."""
    from forge_ds import checkpoint, universal

    ckpt = checkpoint.validate_checkpoint_dir(Path(checkpoint_dir).resolve())
    checkpoint.verify_manifest(ckpt)
    out = universal.convert(ckpt, workers=int(workers))
    print(f"converted {ckpt.name} -> {out}")


COMMANDS = {"train": train, "prepare": prepare, "check": check, "export": export, "verify": verify, "bench": bench,
            "evaluate": evaluate, "sample": sample, "convert-universal": convert_universal}


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    try:
        if argv[:1] == ["bench"]:
            return _run_bench(argv[1:])
        fire.Fire(COMMANDS, command=argv, name="forge-ds")
        code = 0
    except ForgeError as e:
        speaker = distributed.user_error_speaker()
        if speaker is not None:
            one_line = " ".join(part.strip() for part in str(e).splitlines())  # a quoted OS message may hold \n
            print(f"{USER_ERROR_PREFIX}{speaker}{one_line}", file=sys.stderr, flush=True)
        code = 2
    except TrainingDiverged as e:
        print(f"{USER_ERROR_PREFIX}rank {distributed.rank_hint()[0]}: {e}", file=sys.stderr, flush=True)
        code = 3
    except SystemExit as e:  # a command's own code (train stopped by a signal), or fire's usage errors and --help
        if not isinstance(e.code, (int, type(None))):
            raise
        code = e.code or 0
    distributed.end_process(code)


if __name__ == "__main__":
    main()
