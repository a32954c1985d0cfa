"""Phase-1 quality benchmark (issue 9): validation loss at fixed steps on the pydoc corpus, through the real harness.

Trains ModularForge's small Phase-1 config (d128 H4 L2 F512 V2048 T128, dropout 0.1, global batch 16, AdamW lr 1e-3,
wd 0.01, warm-up 20, cosine to 0, clip 1.0, fp32) with `forge-ds train` as real processes (DeepSpeed engine, 1 or N
ranks), evaluates every 100 steps, and prints the validation loss / perplexity at steps 100, 300, 500, 600, 1000,
1500 beside the "learned nothing" lines: the unigram entropy of the training and validation streams, and the
validation cross-entropy of the training unigram distribution (what a model that learned only token frequencies
scores on the validation split).

    python benchmarks/quality.py --steps 1500 --recipe balanced --seeds 42
    python benchmarks/quality.py --steps 600 --recipe modularforge --seeds 1,2
    python benchmarks/quality.py --steps 300 --ranks 2 --zero 3           # global batch held: 8 per rank
    forge-ds bench --quality --steps 600                                  # the same, through the CLI

Any `--model.* / --training.* / --data.*` flag is passed on to `forge-ds train` (e.g. --training.warmup_steps=100).
The schedule length is --steps (`--training.max_steps`), so a 600-step run is a full 600-step cosine, not the first
600 steps of a longer one. Output: a table on stdout and a JSON file (--json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a checkout without `pip install -e .` (e.g. a bare GPU machine) still imports forge_ds
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling local_ranks.py, also when loaded by bench.py

from local_ranks import run_ranks

REPORT_STEPS = (100, 300, 500, 600, 1000, 1500)
GLOBAL_BATCH = 16

# The config, as `forge-ds train` flags on top of the cpu_demo preset (which already holds these values;
# spelled out so the benchmark does not drift if the preset changes).
CONFIG = ["--model.d_model=128", "--model.n_heads=4", "--model.n_layers=2", "--model.d_ff=512",
          "--model.vocab_size=2048", "--model.max_seq_len=128", "--model.dropout=0.1",
          "--training.learning_rate=1e-3", "--training.weight_decay=0.01", "--training.warmup_steps=20",
          "--training.max_grad_norm=1.0", "--training.precision=fp32", "--training.device=cpu",
          "--training.gradient_accumulation_steps=1", "--data.source=builtin:pydoc", "--data.val_fraction=0.1",
          "--data.split_seed=0"]

# ModularForge's validation loss on this config (issue 9, its own trainer), for the comparison column.
MODULARFORGE_REFERENCE = {"modularforge": {600: [6.304, 6.306], 1500: [5.445, 5.467, 5.546]},
                          "balanced": {600: [5.288], 1500: [4.166]}}


def unigram_lines(prepared: Path) -> dict:
    """Entropies (nats) that mark "predicts token frequencies and nothing more"."""
    from forge_ds import data
    from forge_ds.tokens import file_dtype

    train = np.fromfile(prepared / "train.bin", dtype=file_dtype(prepared / "train.bin"))
    val = np.fromfile(prepared / "val.bin", dtype=file_dtype(prepared / "val.bin"))
    vocab = data.read_meta(prepared)["vocab_size"]
    counts = np.bincount(train, minlength=vocab).astype(np.float64)
    # Add-one over the model's vocabulary (never over all 65536 ids of a uint16 file: that would hand a third of the mass to
    # ids the model cannot emit), only so a validation token unseen in training has a finite cost.
    p_train = (counts + 1) / (counts.sum() + len(counts))
    # The loss scores targets, i.e. every token but a window's first; the stream is close enough to that.
    cross = float(-np.log(p_train[val]).mean())
    return {"train_unigram_entropy": data.unigram_entropy(prepared / "train.bin"),
            "val_unigram_entropy": data.unigram_entropy(prepared / "val.bin"),
            "val_cross_entropy_of_train_unigram": cross}


def data_counts(prepared: Path, seq_len: int, global_batch: int) -> dict:
    from forge_ds import data

    meta = data.read_meta(prepared)
    train_w = len(data.TokenWindows(prepared / "train.bin", seq_len))
    val_w = len(data.TokenWindows(prepared / "val.bin", seq_len))
    return {"train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"],
            "train_documents": meta["n_documents"]["train"], "val_documents": meta["n_documents"]["val"],
            "train_windows": train_w, "val_windows": val_w, "steps_per_epoch": train_w // global_batch}


def read_curve(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(validation loss by step, training-batch loss by step) from the run's metrics.jsonl."""
    val, train = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "val/loss" in m:
            val[m["step"]] = m["val/loss"]
        if "train/loss" in m:
            train[m["step"]] = m["train/loss"]
    return val, train


def smoothed(train: dict[int, float], step: int, width: int = 20) -> float | None:
    """Mean training-batch loss over the `width` steps ending at `step` (single batches are noisy)."""
    window = [train[s] for s in range(step - width + 1, step + 1) if s in train]
    return sum(window) / len(window) if window else None


def run_training(run_dir: Path, args: list[str], ranks: int, log: Path) -> float:
    """`forge-ds train` as `ranks` processes with env:// variables (what a launcher does); returns wall seconds."""
    started = time.time()
    result = run_ranks([sys.executable, "-m", "forge_ds.cli", "train", *args], ranks, cwd=run_dir.parent, log=log)
    if not result.ok:
        message = result.user_error()
        if message:  # bad input (a training flag, say): forge-ds train's own one line, said once
            from forge_ds.errors import ForgeError

            raise ForgeError(message)
        raise SystemExit(f"quality: forge-ds train failed ({result.failure(15)}); log {log}")
    return time.time() - started


def flag_value(flags: list[str], key: str, default):
    """The last `--key=value` among pass-through flags (the last one wins in `forge-ds train` too)."""
    values = [f.split("=", 1)[1] for f in flags if f.startswith(f"--{key}=")]
    return values[-1] if values else default


def fmt(x: float | None, width: int = 7) -> str:
    return f"{x:{width}.3f}" if x is not None else " " * (width - 1) + "-"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)  # accepted from `forge-ds bench`
    p.add_argument("--steps", type=int, default=600, help="schedule length (training.max_steps); default 600")
    p.add_argument("--recipe", default="balanced", choices=["balanced", "modularforge"])
    p.add_argument("--seeds", default="42", help="comma-separated training seeds, one run each; default 42")
    p.add_argument("--ranks", type=int, default=1, help="processes (data-parallel ranks); default 1")
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage; default 0")
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"per-rank batch; default {GLOBAL_BATCH} // ranks, holding the global batch at {GLOBAL_BATCH}")
    p.add_argument("--prepared_dir", default=None, help="prepared pydoc data (default: "
                   "<workdir>/data/prepared-v<vocab>)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench-quality"), help="run folders go here")
    p.add_argument("--tag", default=None, help="name for this configuration in the JSON (default: recipe)")
    p.add_argument("--json", default=None, help="output JSON (default <workdir>/<tag>-<steps>.json)")
    args, extra = p.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith(("--model.", "--training.", "--data."))]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    per_rank = args.batch_size or GLOBAL_BATCH // args.ranks
    if per_rank * args.ranks != GLOBAL_BATCH:
        print(f"note: global batch {per_rank * args.ranks}, not the issue's {GLOBAL_BATCH}")
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    tag = args.tag or args.recipe
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    seq_len = int(flag_value(extra, "model.max_seq_len", 128))
    # An explicit folder per vocabulary: the unigram lines below must read the very tokens the runs trained on.
    prepared = Path(args.prepared_dir or workdir / "data" / f"prepared-v{flag_value(extra, 'model.vocab_size', 2048)}")
    prepared = prepared.resolve()

    runs = []
    for seed in seeds:
        run_dir = workdir / f"{tag}-{args.steps}-r{args.ranks}z{args.zero}-s{seed}"
        flags = [*CONFIG, f"--training.batch_size={per_rank}", f"--training.recipe={args.recipe}",
                 f"--training.seed={seed}", f"--training.max_steps={args.steps}", "--training.eval_every=100",
                 f"--training.checkpoint_every={args.steps + 1}", "--training.keep_checkpoints=1",
                 "--training.log_every=100", f"--deepspeed_config=zero{args.zero}", f"--output_dir={run_dir}",
                 "--overwrite", f"--data.prepared_dir={prepared}", *extra]
        print(f"[{tag} seed {seed}] forge-ds train {' '.join(flags)}", flush=True)
        wall = run_training(run_dir, flags, args.ranks, workdir / f"{run_dir.name}.log")
        val, train = read_curve(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        runs.append({"seed": seed, "run_dir": str(run_dir), "wall_s": round(wall, 1),
                     "mean_tokens_per_s": summary.get("mean_tokens_per_s"),
                     "val_loss": {str(k): v for k, v in sorted(val.items())},
                     "train_loss_mean20": {str(k): smoothed(train, k) for k in sorted(val)}})
        print(f"[{tag} seed {seed}] {wall:.0f} s, val loss at the end {val[max(val)]:.4f}", flush=True)

    lines = unigram_lines(prepared)
    counts = data_counts(prepared, seq_len, per_rank * args.ranks)
    steps = sorted({s for s in REPORT_STEPS if s <= args.steps} | {args.steps})
    report = {"benchmark": "quality", "tag": tag, "recipe": args.recipe, "schedule_steps": args.steps,
              "ranks": args.ranks, "zero_stage": args.zero, "per_rank_batch": per_rank, "extra_flags": extra,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()} {platform.processor()} "
              f"{os.cpu_count()} cpus", "versions": versions(), "data": counts, **lines, "runs": runs,
              "reference_modularforge_val": MODULARFORGE_REFERENCE.get(args.recipe, {})}
    by_step = {s: [r["val_loss"].get(str(s)) for r in runs] for s in steps}
    report["val_loss_mean"] = {str(s): statistics.mean(v) for s, v in by_step.items() if None not in v}
    report["val_loss_spread"] = {str(s): (max(v) - min(v)) for s, v in by_step.items() if None not in v}

    print(f"\nquality: {tag} (recipe {args.recipe}), schedule {args.steps} steps, {args.ranks} rank(s) ZeRO-"
          f"{args.zero}, batch {per_rank}x{args.ranks}; validation loss (ppl) by step")
    print("seed   " + "".join(f"{s:>16}" for s in steps) + "    wall")
    for r in runs:
        cells = []
        for s in steps:
            v = r["val_loss"].get(str(s))
            cells.append(f"{v:8.3f} ({math.exp(v):5.0f})" if v is not None else " " * 15 + "-")
        print(f"{r['seed']:<7}" + "".join(f"{c:>16}" for c in cells) + f"  {r['wall_s']:5.0f}s")
    if len(runs) > 1:
        print("mean   " + "".join(f"{fmt(report['val_loss_mean'].get(str(s)), 16)}" for s in steps))
        print("spread " + "".join(f"{fmt(report['val_loss_spread'].get(str(s)), 16)}" for s in steps))
    print(f"learned nothing: unigram entropy train {lines['train_unigram_entropy']:.3f}, val "
          f"{lines['val_unigram_entropy']:.3f}; validation cross-entropy of the training unigram "
          f"{lines['val_cross_entropy_of_train_unigram']:.3f} nats")
    print(f"data: {counts['train_tokens']:,} train tokens -> {counts['train_windows']} windows, "
          f"{counts['val_tokens']:,} val tokens -> {counts['val_windows']} windows, "
          f"{counts['steps_per_epoch']} steps/epoch at global batch {per_rank * args.ranks}")
    out = Path(args.json) if args.json else workdir / f"{tag}-{args.steps}-r{args.ranks}z{args.zero}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"json: {out}")
    return report


def versions() -> dict:
    """Module versions (package metadata is missing when forge_ds runs from a checkout on PYTHONPATH)."""
    import deepspeed
    import torch

    import forge_ds

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "forge_ds": forge_ds.__version__}


if __name__ == "__main__":
    # Through the CLI, as `forge-ds bench --quality`: bad input is one line and exit 2.
    from forge_ds.cli import main as cli_main

    cli_main(["bench", "--quality", *sys.argv[1:]])
