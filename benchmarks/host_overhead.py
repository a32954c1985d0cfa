"""Host-side cost per training step, without a GPU (issues 7 and 17).

On an H100 forge_ds's step was host-bound (docs/PERFORMANCE.md): the GPU idled while Python and DeepSpeed's
per-gradient bookkeeping launched ~4× the plain loop's kernels. That cost can be measured on any machine: train a
model so small that its arithmetic is negligible (d64, 12 layers, T32, batch 2, so the parameter-tensor count of
GPT-2 small) and count what one optimizer step asks of the host (benchmarks/host_counts.py): ATen ops (kernel
launches on a GPU), Python calls by package, and the calls that would make the host wait for a GPU, by caller.
Counts are per optimizer step at GA=1 and GA=4, on 1 and 2 ranks (2 ranks: overlap_comm and contiguous_gradients
on). Wall time per step (then host time) is timed in interleaved rounds, one process per configuration, and
reported as the median over rounds of each round's ratio to the plain loop.

    python benchmarks/host_overhead.py                          # counts + 9 wall rounds, bf16
    python benchmarks/host_overhead.py --rounds 0 --cases 1x1   # counts only, 1 rank GA=1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings: bench, host_counts, local_ranks

import host_counts  # noqa: E402
from local_ranks import run_ranks  # noqa: E402

SHAPE = ["--d_model", "64", "--n_heads", "4", "--n_layers", "12", "--d_ff", "128", "--vocab", "512",
         "--seq_len", "32", "--batch_size", "2"]
SHIPPED = {"plain": None, "zero0": "zero0", "zero0_autocast": "zero0_autocast", "zero1": "zero1", "zero2": "zero2",
           "zero3": "zero3"}


def variants(workdir: Path, names: list[str]) -> dict[str, str | None]:
    """Name -> DeepSpeed JSON (None: the plain PyTorch loop). Beside the shipped configs, what one lever is
    worth: DeepSpeed's synchronizing throughput timer back on, ZeRO-1 with its per-parameter gradient hooks
    alone (contiguous_gradients)."""
    from forge_ds.ds_config import load_ds_config

    def derived(base: str, edit=lambda ds: None) -> str:
        ds = load_ds_config(base)
        # As on a GPU, where DeepSpeed's FusedAdam steps all tensors at once: torch's fused AdamW (on a CPU
        # DeepSpeed builds torch's AdamW, whose CPU default loops per tensor and reads each step counter).
        ds["optimizer"]["params"]["fused"] = True
        edit(ds)
        path = workdir / f"{base}-{len(os.listdir(workdir))}.json"
        path.write_text(json.dumps(ds))
        return str(path)

    extra = {
        "zero2 +tput timer": lambda: derived("zero2", lambda ds: ds.update(
            timers={"throughput": {"enabled": True, "synchronized": True}})),
        "zero1 +hooks": lambda: derived("zero1", lambda ds: ds["zero_optimization"].update(
            contiguous_gradients=True)),
    }
    table = {}
    for name in names:
        if name == "plain":
            table[name] = None
        elif name in SHIPPED:
            table[name] = derived(SHIPPED[name])
        elif name in extra:
            table[name] = extra[name]()
        else:
            raise SystemExit(f"host_overhead: error: unknown configuration {name!r}; "
                             f"use {', '.join([*SHIPPED, *extra])}")
    return table


def child(ds: str | None, precision: str, ga: int, workdir: Path, steps: int, what: str) -> dict:
    import torch

    import bench
    from forge_ds import distributed, launch_env, train
    from forge_ds.config import resolve
    from forge_ds.options import RunOptions
    from forge_ds.preflight import resolve_device

    torch.set_num_threads(1)  # the op count is what matters; one thread keeps the wall time comparable
    args = bench.parse(["--shape", "gpt2", *SHAPE, "--precision", precision, "--run_dir",
                        str(workdir / f"run-{os.getpid()}"), "--prepared_dir", str(workdir / "prepared")])
    env = launch_env.detect()
    cfg = resolve(None, {**bench.run_overrides(args), "training.gradient_accumulation_steps": ga})[0]
    distributed.init(resolve_device(cfg))
    run = train.setup(cfg, RunOptions(deepspeed_config=ds or "zero0", output_dir=args.run_dir, overwrite=True),
                      env, [])
    if ds is None:
        loop, counter = bench.PlainLoop(run, naive_attention=False, compile_model=False, gpu_like=True), [0]

        def do(n):
            for _ in range(n):
                loop.step(counter[0])
                counter[0] += 1
    else:
        train.save = lambda run: None

        def do(n):
            run.opts.stop_after_steps = n
            train.fit(run)
    do(3)  # warm-up: lazy allocations, first-call paths
    if what == "wall":
        started = time.perf_counter()
        do(steps)
        return {"wall_ms_per_step": (time.perf_counter() - started) / steps * 1e3}
    calls, syncs = collections.Counter(), collections.Counter()
    ops = host_counts.aten_ops(lambda: do(steps)) / steps
    with host_counts.count_calls(calls):
        do(steps)
    with host_counts.count_syncs(syncs):
        do(steps)
    return {"aten_ops_per_step": ops, "python_calls_per_step": host_counts.per_step(calls, steps),
            "syncs_per_step": host_counts.per_step(syncs, steps)}


def launch(name: str, ds, ranks: int, ga: int, what: str, args, workdir: Path) -> dict:
    result = run_ranks([sys.executable, __file__, "--_child", ds or "-", what, "--ga", str(ga), "--workdir",
                        str(workdir), "--steps", str(args.steps if what == "wall" else args.count_steps),
                        "--precision", args.precision], ranks, omp_threads=1)
    line = next((l for l in result.outputs[0].splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"host_overhead: {name} ({ranks} rank(s), GA={ga}) failed ({result.failure()})")
    return json.loads(line[len("RESULT "):])


def by_package(syncs: dict) -> dict:
    """Sum a 'package / file:line / what' table by package."""
    out: dict = collections.defaultdict(float)
    for key, value in syncs.items():
        out[key.split(" / ")[0]] += value
    return dict(out)


def print_counts(case: str, table: dict) -> None:
    print(f"\n{case}: per optimizer step")
    print(f"{'configuration':<22}{'ATen ops':>10}{'Py calls':>10}  {'by package':<58}{'syncs (by caller)'}")
    for name, r in table.items():
        calls = r["python_calls_per_step"]
        by_pkg = " ".join(f"{k} {v:,.0f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]))
        syncs = " ".join(f"{k} {v:g}" for k, v in sorted(by_package(r["syncs_per_step"]).items()))
        print(f"{name:<22}{r['aten_ops_per_step']:>10,.0f}{sum(calls.values()):>10,.0f}  {by_pkg:<58}{syncs or '0'}")
    for name, r in table.items():
        if r["syncs_per_step"]:
            print(f"  syncs {name}: " + ", ".join(f"{k} {v:g}" for k, v in r["syncs_per_step"].items()))


def wall_rounds(configs: dict, args, workdir: Path) -> dict:
    """Each round runs every configuration once (own process, same order); the figure is the median of the
    rounds' ratios to the plain loop, which cancels the load the machine happens to carry in that round."""
    walls: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, ds in configs.items():
            walls[name].append(launch(name, ds, 1, 1, "wall", args, workdir)["wall_ms_per_step"])
    out = {}
    for name, series in walls.items():
        ratios = [w / p for w, p in zip(series, walls["plain"])]
        out[name] = {"wall_ms_per_step_all": series, "ratio_to_plain_all": ratios,
                     "ratio_to_plain_median": statistics.median(ratios),
                     "wall_ms_per_step_median": statistics.median(series)}
    print(f"\nwall per step, 1 rank GA=1, {args.rounds} interleaved rounds, {os.cpu_count()} cpus")
    print(f"{'configuration':<22}{'ms/step (median)':>18}{'x plain (median of rounds)':>30}{'  ratios':<10}")
    for name, r in out.items():
        print(f"{name:<22}{r['wall_ms_per_step_median']:>18.1f}{r['ratio_to_plain_median']:>30.3f}  "
              + " ".join(f"{x:.2f}" for x in r["ratio_to_plain_all"]))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="plain,zero0,zero0_autocast,zero1,zero2,zero3",
                   help="comma-separated: plain zero0 zero0_autocast zero1 zero2 zero3, 'zero2 +tput timer', "
                        "'zero1 +hooks'")
    p.add_argument("--wall_configs", default="plain,zero0,zero0_autocast,zero1,zero2",
                   help="the configurations timed in the wall rounds")
    p.add_argument("--cases", default="1x1,1x4,2x1,2x4", help="RANKSxGA cases for the counts ('' for none)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved wall rounds (1 rank, GA=1); 0 for none")
    p.add_argument("--steps", type=int, default=30, help="timed steps per wall process")
    p.add_argument("--count_steps", type=int, default=4, help="steps per count (each count is exact)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--ga", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--_child", nargs=2, metavar=("DS", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="forge-host-")).resolve()
    if args._child:
        ds, what = args._child
        from forge_ds import distributed

        result = child(None if ds == "-" else ds, args.precision, args.ga, workdir, args.steps, what)
        if distributed.is_main():
            print("RESULT " + json.dumps(result), flush=True)
        distributed.end_process(0)  # as `forge-ds train` ends: no teardown abort (-6) after the result is out
        return {}

    from forge_ds import prepare

    prepare.prepare("builtin:pydoc", vocab_size=512, prepared_dir=str(workdir / "prepared"), show_progress=False)
    configs = variants(workdir, [n.strip() for n in args.configs.split(",") if n.strip()])
    if "plain" not in configs:
        configs = {"plain": None, **configs}
    counts = {}
    for case in [c for c in args.cases.split(",") if c]:
        ranks, ga = (int(x) for x in case.split("x"))
        counts[case] = {name: launch(name, ds, ranks, ga, "counts", args, workdir) for name, ds in configs.items()}
        print_counts(f"{ranks} rank(s), GA={ga}, {args.precision}, d64 L12 T32 B2", counts[case])
    timed = {n: configs[n] for n in ["plain", *args.wall_configs.split(",")] if n in configs}
    wall = wall_rounds(timed, args, workdir) if args.rounds else {}
    report = {"benchmark": "host_overhead", "precision": args.precision, "rounds": args.rounds,
              "steps": args.steps, "date": time.strftime("%Y-%m-%d %H:%M"), "counts": counts, "wall": wall}
    out_path = Path(args.json) if args.json else workdir / "host_overhead.json"
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"json: {out_path}")
    return report


if __name__ == "__main__":
    main()
