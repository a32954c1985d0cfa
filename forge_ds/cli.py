"""`forge-ds` commands. fire drives them; the flags of `train`, `check` and `prepare` come from one typed
description (options.RunOptions and config.Config), which also gives their types, allowed values, defaults and
`--help` (usage.py). The other commands' signatures are their CLI.

User mistakes raise ForgeError anywhere below; here they become one line `forge-ds: error: …` (rank 0 only) and
exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

import fire
from pydantic import BaseModel, ValidationError

from forge_ds import config as config_mod
from forge_ds import distributed, launch_env, package, usage
from forge_ds.errors import USER_ERROR_PREFIX, ForgeError, Interrupted, TrainingDiverged
from forge_ds.options import CheckOptions, RunOptions
from forge_ds.slurm_template import slurm_template


def _split_flags(command: str, options_type: type[BaseModel], flags: dict) -> tuple[BaseModel, dict, Optional[int]]:
    """(typed options, dotted config overrides, --local_rank) from fire's keyword arguments."""
    flags = dict(flags)
    local_rank = flags.pop("local_rank", None)  # the deepspeed launcher passes it; the environment wins
    overrides = {k: flags.pop(k) for k in list(flags) if "." in k}
    try:
        return options_type(**flags), overrides, local_rank
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ForgeError(f"command line: unknown option --{name}; config flags look like --model.d_model=256, "
                             f"see `forge-ds {command} --help`") from None
        raise ForgeError(f"command line: --{name}={first.get('input')!r} is invalid "
                         f"({first['msg'].removeprefix('Value error, ')}); see `forge-ds {command} --help`") from None


def train(**flags) -> None:
    """Train the shared components (Phase 1) and export them."""
    from forge_ds.metrics import configure_console
    from forge_ds.train import train as run_training

    opts, overrides, local_rank = _split_flags("train", RunOptions, flags)
    cfg, notes = config_mod.resolve(opts.config, overrides)
    env = launch_env.detect(local_rank)
    configure_console(env.rank)
    if env.is_main:
        print("resolved config:\n" + config_mod.to_yaml(cfg), flush=True)
    code = run_training(cfg, opts, env, notes)
    if code:
        raise SystemExit(code)


def check(**flags) -> None:
    """Every validation `train` does before its first step, without training: run it with train's flags before
    sbatch. It prepares the data, as train would (cached, so train reuses it): only the token counts tell whether
    the corpus fills a window."""
    from forge_ds import ds_config
    from forge_ds.preflight import preflight

    opts, overrides, local_rank = _split_flags("check", CheckOptions, flags)
    cfg, notes = config_mod.resolve(opts.config, overrides)
    for note in notes:
        print(note)
    env = launch_env.detect(local_rank)
    world = opts.world_size or env.world_size
    pf = preflight(cfg, opts, env, world, training=False)
    for note in pf.notes:
        print(note)
    print(f"data: {cfg.data.source}: {pf.meta['train_tokens']:,} train / {pf.meta['val_tokens']:,} val tokens in "
          f"{pf.prepared}")
    print(f"run directory: {pf.run_dir}" + (f", resuming from {pf.resume.target.name}" if pf.resume else ""))
    print(f"check passed: device {pf.device}, precision {pf.precision}, ZeRO-{ds_config.zero_stage(pf.ds)}, world "
          f"size {world}, {pf.sampler.steps_per_epoch} steps/epoch of global batch {pf.sampler.global_batch}")


def prepare(config: Optional[str] = None, **overrides) -> None:
    """Read the corpus, train (or reuse) the tokenizer, write the token files; prints the prepared folder."""
    from forge_ds import data
    from forge_ds import prepare as preparation

    cfg, notes = config_mod.resolve(None if config is None else str(config), overrides)
    for note in notes:
        print(note)
    prepared = preparation.for_config(cfg)
    meta = data.read_meta(prepared)
    print(f"prepared: {prepared} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab learned {meta['vocab_learned']})")


def plan(config: Optional[str] = None, nodes: int = 1, gpus_per_node: int = 8, gpu: Optional[str] = None,
         peak_tflops: Optional[float] = None, memory_gb: Optional[float] = None,
         intra_node_gbps: Optional[float] = None, inter_node_gbps: Optional[float] = None,
         mfu: Optional[float] = None, tokens: Optional[int] = None, global_batch: Optional[int] = None,
         **overrides) -> None:
    """Memory, communication and time per step for each ZeRO stage on N nodes x G GPUs, and the configuration it
    recommends (docs/SCALING.md). Takes train's config flags; nothing is prepared or launched.

    Flags:
    config: a YAML/JSON config file or a preset, as for train
    nodes: nodes in the job
    gpus_per_node: ranks per node
    gpu: a device of forge_ds/metrics.py's DEVICES table: H100 (SXM), "H100 PCIe", H200, "A100 40GB",
        "A100 80GB", L40S, A10G, cpu; default H100
    peak_tflops: per-GPU dense bf16 peak (with --memory_gb: a device not in the table)
    memory_gb: per-GPU memory
    intra_node_gbps: Gbit/s per direction between the GPUs of a node
    inter_node_gbps: Gbit/s per direction per GPU across nodes
    mfu: fraction of peak the kernels reach; default 0.24 (measured, docs/PERFORMANCE.md)
    tokens: training tokens when the data is not prepared (else meta.json; else bytes / 4)
    global_batch: sequences per optimizer step to hold; default batch_size x accumulation x ranks"""
    from forge_ds.plan_report import plan_command

    plan_command(config, nodes, gpus_per_node, gpu, peak_tflops, memory_gb, intra_node_gbps, inter_node_gbps, mfu,
                 tokens, global_batch, overrides)


def export(checkpoint_dir: str, out: Optional[str] = None, overwrite: bool = False) -> None:
    """Write the shared-only export from a checkpoint folder (or a run folder: its newest complete checkpoint),
    offline, in one process, at any ZeRO stage and world size."""
    from forge_ds import checkpoint
    from forge_ds import export as export_mod
    from forge_ds.config import modularforge_yaml
    from forge_ds.files import atomic_write_text
    from forge_ds.preflight import check_writable_dir

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
    out_dir = Path(str(out)).resolve() if out else ckpt.parent.parent / f"export-{ckpt.name}"
    check_writable_dir(out_dir, "--out")
    if (out_dir / f"{export_mod.EXPORT_STEM}.pt").exists() and not overwrite:
        raise ForgeError(f"{out_dir} already holds an export; pass --overwrite or another --out")
    m = cfg.model
    weights = export_mod.gather_from_checkpoint(ckpt, m.n_layers, m.max_seq_len, m.d_model,
                                                checkpoint.read_frozen(ckpt), state.zero_stage)
    meta = export_mod.metadata(cfg, state, state.world_size, state.last_val_loss, "checkpoint", state.step,
                               source_checkpoint=str(ckpt))
    paths = export_mod.write(weights, out_dir, meta)
    run_dir = ckpt.parent.parent
    if (run_dir / "tokenizer.json").is_file() and out_dir != run_dir:
        shutil.copyfile(run_dir / "tokenizer.json", out_dir / "tokenizer.json")
    atomic_write_text(out_dir / "modularforge.yaml", modularforge_yaml(cfg))
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

    root = package.checkout_root()
    if root is None:
        raise ForgeError(f"forge-ds bench needs a source checkout ({package.source()} is installed without "
                         "benchmarks/); run it from a clone of the repository")
    script = root / "benchmarks" / "bench.py"
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
    env = launch_env.detect(local_rank)
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
    from forge_ds.sample import sample_checkpoint

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


COMMANDS = {"train": train, "prepare": prepare, "check": check, "plan": plan, "export": export, "verify": verify,
            "bench": bench,
            "evaluate": evaluate, "sample": sample, "convert-universal": convert_universal,
            "slurm-template": slurm_template}
# The commands whose flags come from the typed description, and which description.
TYPED_FLAGS = {"train": (RunOptions, True), "check": (CheckOptions, True), "prepare": (None, True)}


def _launcher_argv(argv: list[str]) -> list[str]:
    """DeepSpeed's launcher runs `python -m forge_ds --local_rank=N <command> ...`: its flag comes before the
    script's arguments. Move it behind the command, where train, check and evaluate take it."""
    if argv and argv[0].startswith(("--local_rank=", "--local-rank=")):
        return [*argv[1:2], "--local_rank=" + argv[0].partition("=")[2], *argv[2:]]
    return argv


def main(argv: Optional[list[str]] = None) -> None:
    argv = _launcher_argv(list(argv if argv is not None else sys.argv[1:]))
    if argv[:1] == ["--version"]:
        print(package.source())
        return
    try:
        if argv[:1] == ["bench"]:
            return _run_bench(argv[1:])
        if not argv or argv[0] in ("--help", "-h") or (argv[0] in COMMANDS and {"--help", "-h"} & set(argv[1:])):
            print(usage.command_help(argv[0] if argv and argv[0] in COMMANDS else None, COMMANDS, TYPED_FLAGS))
            code = 0
        else:
            fire.Fire(COMMANDS, command=argv, name="forge-ds")
            code = 0
    except ForgeError as e:
        speaker = launch_env.user_error_speaker()
        if speaker is not None:
            one_line = " ".join(part.strip() for part in str(e).splitlines())  # a quoted OS message may hold \n
            print(f"{USER_ERROR_PREFIX}{speaker}{one_line}", file=sys.stderr, flush=True)
        code = 2
    except TrainingDiverged as e:
        print(f"{USER_ERROR_PREFIX}rank {launch_env.rank_hint()[0]}: {e}", file=sys.stderr, flush=True)
        code = 3
    except (KeyboardInterrupt, Interrupted) as e:  # Ctrl-C: one line, what was kept, no traceback
        if launch_env.user_error_speaker() is not None:
            line = str(e) or "stopped by Ctrl-C; nothing half-written was kept"
            print(f"forge-ds: {line}", file=sys.stderr, flush=True)
        code = 130
    except BrokenPipeError:  # `forge-ds train --help | head`: the reader left, nothing more to say
        code = 0
    except SystemExit as e:  # a command's own code (train stopped by a signal), or fire's usage errors
        if not isinstance(e.code, (int, type(None))):
            raise
        code = e.code or 0
    distributed.end_process(code)


if __name__ == "__main__":
    main()
