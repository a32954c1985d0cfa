"""Host-side cost per training step, without a GPU (issue 7).

On an H100 forge_ds's step was host-bound (docs/PERFORMANCE.md): the GPU idled while Python and DeepSpeed's
per-gradient bookkeeping launched ~4× the plain loop's kernels. That cost can be measured on any machine: train a
model so small that its arithmetic is negligible (d64, 12 layers, T32, batch 2, so the parameter-tensor count of
GPT-2 small) and count, per step, the ATen ops dispatched (each one a kernel launch on a GPU) and the wall time
(which is then host time). Each configuration runs in its own process, in interleaved rounds.

    python benchmarks/host_overhead.py                       # plain loop vs the shipped ZeRO configs, bf16
    python benchmarks/host_overhead.py --rounds 5 --json host.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings: bench, local_ranks

from local_ranks import run_ranks  # noqa: E402
SHAPE = ["--d_model", "64", "--n_heads", "4", "--n_layers", "12", "--d_ff", "128", "--vocab", "512",
         "--seq_len", "32", "--batch_size", "2"]


def variants(workdir: Path) -> dict[str, str | None]:
    """Name -> DeepSpeed JSON (None: the plain PyTorch loop). "DeepSpeed defaults" undoes forge_ds's host-cost
    choices (overlap_comm and contiguous_gradients off alone, no bf16 gradient scan) to show what they save."""
    from forge_ds.ds_config import load_ds_config

    ds_defaults = load_ds_config("zero2")
    ds_defaults["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
    ds_defaults["bf16"]["check_grad_overflow"] = True
    path = workdir / "zero2_deepspeed_defaults.json"
    path.write_text(json.dumps(ds_defaults))
    contiguous = load_ds_config("zero2")
    contiguous["zero_optimization"]["contiguous_gradients"] = True
    contiguous_path = workdir / "zero2_contiguous_gradients.json"
    contiguous_path.write_text(json.dumps(contiguous))
    return {"plain": None, "zero2 (DeepSpeed defaults)": str(path), "zero2 (contiguous grads)": str(contiguous_path),
            "zero2 (shipped)": "zero2", "zero1 (shipped)": "zero1", "zero0 (shipped)": "zero0"}


def child(name: str, ds: str | None, precision: str, workdir: Path, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench
    from forge_ds import distributed, launch_env, train
    from forge_ds.options import RunOptions
    from forge_ds.preflight import resolve_device

    torch.set_num_threads(1)  # the op count is what matters; one thread keeps the wall time comparable
    args = bench.parse(["--shape", "gpt2", *SHAPE, "--precision", precision, "--run_dir", str(workdir / "run"),
                        "--prepared_dir", str(workdir / "prepared")])
    env, cfg = launch_env.detect(), bench.build_config(args)
    device = resolve_device(cfg)
    distributed.init(device)
    run = train.setup(cfg, RunOptions(deepspeed_config=ds or "zero0", output_dir=args.run_dir, overwrite=True),
                      env, [])
    if ds is None:
        loop, counter = bench.PlainLoop(run, naive_attention=False, compile_model=False), [0]

        def do(n):
            for _ in range(n):
                loop.step(counter[0])
                counter[0] += 1
    else:
        train.save = lambda run: None

        def do(n):
            run.opts.stop_after_steps = n
            train.fit(run)
    do(5)  # warm-up: lazy allocations, first-call paths
    started = time.perf_counter()
    do(steps)
    wall = (time.perf_counter() - started) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        do(5)
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / 5
    return {"name": name, "aten_ops_per_step": ops, "wall_ms_per_step": wall * 1e3}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the configurations")
    p.add_argument("--steps", type=int, default=30, help="timed steps per process")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--_child", nargs=2, metavar=("NAME", "DS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="forge-host-")).resolve()
    if args._child:
        name, ds = args._child
        from forge_ds import distributed

        print("RESULT " + json.dumps(child(name, None if ds == "-" else ds, args.precision, workdir, args.steps)))
        distributed.end_process(0)  # as `forge-ds train` ends: no teardown abort (-6) after the result is out
        return {}

    from forge_ds import prepare

    prepare.prepare("builtin:pydoc", vocab_size=512, prepared_dir=str(workdir / "prepared"), show_progress=False)
    configs = variants(workdir)
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, ds in configs.items():
            child_run = run_ranks([sys.executable, __file__, "--_child", name, ds or "-", "--workdir", str(workdir),
                                   "--steps", str(args.steps), "--precision", args.precision], 1)
            line = next((l for l in child_run.outputs[0].splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"host_overhead: {name} failed ({child_run.failure()})")
            results[name].append(json.loads(line[len("RESULT "):]))
    plain = statistics.median(r["wall_ms_per_step"] for r in results["plain"])
    print(f"\nhost cost per step, {args.precision}, d64 L12 T32 B2 (compute negligible), {args.rounds} rounds, "
          f"{os.cpu_count()} cpus")
    print(f"{'configuration':<30}{'ATen ops/step':>15}{'wall ms/step (median)':>24}{'x plain':>9}")
    summary = {}
    for name, runs in results.items():
        wall = statistics.median(r["wall_ms_per_step"] for r in runs)
        ops = runs[0]["aten_ops_per_step"]
        summary[name] = {"aten_ops_per_step": ops, "wall_ms_per_step_median": wall,
                         "wall_ms_per_step_all": [r["wall_ms_per_step"] for r in runs], "over_plain": wall / plain}
        print(f"{name:<30}{ops:>15,.0f}{wall:>24.1f}{wall / plain:>9.2f}")
    report = {"benchmark": "host_overhead", "precision": args.precision, "rounds": args.rounds,
              "steps": args.steps, "date": time.strftime("%Y-%m-%d %H:%M"), "results": summary}
    out_path = Path(args.json) if args.json else workdir / "host_overhead.json"
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"json: {out_path}")
    return report


if __name__ == "__main__":
    main()
