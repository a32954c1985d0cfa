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
from forge_ds.errors import ForgeError

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


def train(config: Optional[str] = None, deepspeed_config: str = "zero2", output_dir: Optional[str] = None,
          resume=None, overwrite: bool = False, stop_after_steps: Optional[int] = None,
          init_from: Optional[str] = None, allow_schedule_change: bool = False,
          tensorboard_dir: Optional[str] = None, peak_tflops: Optional[float] = None,
          local_rank: Optional[int] = None, **overrides) -> None:
    """Train the shared components (Phase 1) and export them. `forge-ds train --help` lists every flag."""
    from forge_ds.train import RunOptions
    from forge_ds.train import train as run_training

    cfg, notes = _config(config, overrides)
    if stop_after_steps is not None and (not isinstance(stop_after_steps, int) or stop_after_steps < 1):
        raise ForgeError(f"--stop_after_steps={stop_after_steps!r} must be a positive integer")
    env = distributed.detect(local_rank)
    opts = RunOptions(config=config, deepspeed_config=str(deepspeed_config), output_dir=output_dir,
                      resume=None if resume in (None, False) else str(resume) if resume is not True else "auto",
                      overwrite=bool(overwrite), stop_after_steps=stop_after_steps, init_from=init_from,
                      allow_schedule_change=bool(allow_schedule_change), tensorboard_dir=tensorboard_dir,
                      peak_tflops=peak_tflops)
    if env.is_main:
        print("resolved config:\n" + config_mod.to_yaml(cfg), flush=True)
    code = run_training(cfg, opts, env, notes)
    if code:
        raise SystemExit(code)


def prepare(config: Optional[str] = None, **overrides) -> None:
    """Read the corpus, train (or reuse) the tokenizer, write uint16 token files; prints the prepared folder."""
    from forge_ds import data
    from forge_ds.train import prepare_data

    cfg, notes = _config(config, overrides)
    for note in notes:
        print(note)
    prepared = prepare_data(cfg)
    meta = data.read_meta(prepared)
    print(f"prepared: {prepared} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab learned {meta['vocab_learned']})")


def check(config: Optional[str] = None, deepspeed_config: str = "zero2", output_dir: Optional[str] = None,
          resume=None, overwrite: bool = False, init_from: Optional[str] = None, world_size: int = 1,
          local_rank: Optional[int] = None, **overrides) -> None:
    """Every validation `train` does before its first step, without training (run it before sbatch)."""
    from forge_ds import checkpoint, data, ds_config, export
    from forge_ds.train import RunOptions, check_run_dir, resolve_device, resolve_precision

    cfg, notes = _config(config, overrides)
    for note in notes:
        print(note)
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    t = cfg.training
    ds_path = ds_config.find_ds_config(str(deepspeed_config))
    ds_config.resolve_ds_config(ds_config.load_ds_config(str(deepspeed_config)), micro_batch=t.batch_size,
                                grad_accum=t.gradient_accumulation_steps, world_size=world_size,
                                max_grad_norm=t.max_grad_norm, lr=t.learning_rate, weight_decay=t.weight_decay,
                                precision=precision, device=device, source=str(ds_path))
    if cfg.data.tokenizer:
        data.load_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
    docs = data.load_documents(cfg.data.source, cfg.data.text_field, cfg.data.min_article_length,
                               cfg.data.max_articles)
    print(f"data: {cfg.data.source}: {len(docs)} documents")
    if output_dir:
        run_dir = Path(output_dir).resolve()
        check_run_dir(run_dir, RunOptions(resume=resume, overwrite=overwrite))
        if resume:
            target = checkpoint.find_resume_target(run_dir, "auto" if resume is True else str(resume))
            if target is not None:
                checkpoint.compare_configs(checkpoint.saved_config(target), cfg, allow_schedule_change=False)
                print(f"resume target: {target}")
    if init_from:
        problems = export.verify(Path(init_from), n_heads=cfg.model.n_heads)
        if problems:
            raise ForgeError(f"--init_from={init_from}: {problems[0]}")
    print(f"check passed: device {device}, precision {precision}, ZeRO-{ds_config.zero_stage(ds_config.load_ds_config(str(deepspeed_config)))}")


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

    problems = export_mod.verify(Path(path), n_heads=n_heads)
    if problems:
        for problem in problems:
            print(f"FAIL {path}: {problem}")
        raise SystemExit(1)
    print(f"OK {path}: keys, shapes, fp32, finite, tie, pe, ffn_norm and strict load all match the contract")


COMMANDS = {"train": train, "prepare": prepare, "check": check, "export": export, "verify": verify}


def main(argv: Optional[list[str]] = None) -> None:
    from forge_ds.train import TrainingDiverged

    try:
        fire.Fire(COMMANDS, command=argv if argv is not None else sys.argv[1:], name="forge-ds")
    except ForgeError as e:
        if distributed.rank_hint()[0] == 0:
            print(f"forge-ds: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except TrainingDiverged as e:
        print(f"forge-ds: error: rank {distributed.rank_hint()[0]}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
