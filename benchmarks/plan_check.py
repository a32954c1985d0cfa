"""`forge-ds plan` against measurement: for each ZeRO stage and rank count, what the planner predicts beside what a
real DeepSpeed run holds, hands to its collectives and writes.

    nice -n 10 python benchmarks/plan_check.py                      # full stage x rank-count table (CPU, minutes)
    python benchmarks/plan_check.py --ranks 2 --stages zero0 zero3   # a subset
    python benchmarks/plan_check.py --json out.json

Per stage and rank count it measures, in one process per rank (every stage built in turn in the same process):
- model-state bytes per rank: storages held by the engine's parameters, gradients and optimizer, counted once each,
  just before an optimizer step (benchmarks/bench.py's `model_state_bytes`);
- the sizes DeepSpeed's communication logger (`comms_logger`, prof_all) records per collective over the timed steps;
- the bytes of the checkpoint folder and of the shared export that the run writes;
- the step time (the loop's own timer, median).
Then, in one lone process per shape, the peak RSS growth of a step above the RSS after `deepspeed.initialize`
(only the first engine of a process gives a clean figure: later ones reuse the heap the first one freed).
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

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench import model_state_bytes  # noqa: E402  (the one counting method, shared with the throughput bench)
from local_ranks import run_ranks  # noqa: E402

STAGES = ("zero0", "zero1", "zero2", "zero3")
# Shapes: "tiny" is the CI shape; "attention" puts most of a step's memory in CPU attention's B·H·T² scores;
# "calib" / "predict" are the two shapes of the step-time check (calibrate on one, predict the other).
SHAPES = {
    "tiny": dict(d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=32, vocab_size=300, batch_size=4),
    "attention": dict(d_model=64, n_heads=4, n_layers=2, d_ff=256, max_seq_len=256, vocab_size=300, batch_size=8),
    "calib": dict(d_model=128, n_heads=4, n_layers=2, d_ff=512, max_seq_len=128, vocab_size=2048, batch_size=8),
    "predict": dict(d_model=256, n_heads=4, n_layers=4, d_ff=1024, max_seq_len=256, vocab_size=2048, batch_size=4),
}
SHAPES["predict_ckpt"] = dict(SHAPES["predict"], activation_checkpointing=True)  # the same, layers recomputed


def overrides(shape: str, precision: str, prepared_dir: str, steps: int) -> dict:
    s = dict(SHAPES[shape])
    out = {"training.activation_checkpointing": s.pop("activation_checkpointing", False)}
    out.update({f"model.{k}": v for k, v in s.items() if k != "batch_size"})
    out.update({"training.batch_size": s["batch_size"], "training.precision": precision, "training.device": "cpu",
                "training.max_steps": steps, "training.warmup_steps": 1, "training.log_every": 1000,
                "training.eval_every": 100000, "training.checkpoint_every": 100000, "training.eval_max_batches": 1,
                "data.prepared_dir": prepared_dir})
    return out


def logged_ds_config(stage: str, workdir: Path, rank: int) -> str:
    """The shipped config plus DeepSpeed's communication logger (every collective, sizes kept per op)."""
    from forge_ds import ds_config

    ds = ds_config.load_ds_config(stage)
    ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    path = workdir / f"ds_{stage}_rank{rank}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> None:
    # Linux: "5" resets VmHWM to the current RSS, so the peak read later is this step's, not set-up's.
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def comms_record() -> dict:
    """{op name: {message bytes: count}} from DeepSpeed's logger, then cleared."""
    from deepspeed.comm import comm

    raw = comm.comms_logger.get_raw_data()
    comm.comms_logger.reset_data()
    return {op: {int(size): vals[0] for size, vals in sizes.items()} for op, sizes in raw.items()}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def measure_stage(args, stage: str, env, first: bool) -> dict:
    """Build this stage's engine, train `args.steps` steps, checkpoint, export; what it held, sent and wrote."""
    from forge_ds import distributed, train
    from forge_ds.config import resolve
    from forge_ds.options import RunOptions

    cfg = resolve(None, overrides(args.shape, args.precision, args.prepared_dir, args.steps + 1))[0]
    run_dir = Path(args.workdir) / f"run-{stage}-{env.world_size}"
    opts = RunOptions(deepspeed_config=logged_ds_config(stage, Path(args.workdir), env.rank),
                      output_dir=str(run_dir), overwrite=True)
    run = train.setup(cfg, opts, env, [])
    after_init = rss()
    comms_record()  # drop set-up's broadcasts: only the steps' traffic is compared
    states, engine_step, times = {}, run.engine.step, []

    def counting_step(*a, **kw):  # once, in the second step: the optimizer state exists from the first on
        states.update(model_state_bytes(run.engine))
        del run.engine.step  # the class's own again: the timed steps after this one count nothing
        return engine_step(*a, **kw)

    record = run.metrics.train_step

    def timed(step, loss, lr, grad_norm, step_time, *rest, **kw):
        times.append(step_time)
        return record(step, loss, lr, grad_norm, step_time, *rest, **kw)

    run.metrics.train_step = timed
    saved, train.save = train.save, lambda run: None  # the budget stop's checkpoint: the final one is measured
    if first:
        reset_peak_rss()
    run.opts.stop_after_steps = 1
    train.fit(run)
    step_peak_growth = peak_rss() - after_init if first else None
    comms_record()  # the first step may trace or allocate; the steady steps are compared
    run.opts.stop_after_steps, run.engine.step = None, counting_step
    train.fit(run)
    comms = comms_record()
    train.save = saved
    train.finish(run)  # final evaluation, checkpoint and export, as a finished run writes them
    run.metrics.close()
    ckpt = run_dir / "checkpoints" / f"step-{args.steps + 1:08d}"
    distributed.barrier()
    return {"stage": stage, "world_size": env.world_size, "rank": env.rank, "precision": run.precision,
            "model_state_bytes": states, "comms_per_step": {op: {s: c / args.steps for s, c in sizes.items()}
                                                           for op, sizes in comms.items()},
            "checkpoint_bytes": folder_bytes(ckpt),
            "checkpoint_files": {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()},
            "export_bytes": {ext: (run_dir / f"shared_components.{ext}").stat().st_size
                             for ext in ("pt", "safetensors")},
            "rss_after_init": after_init, "step_peak_rss_growth": step_peak_growth,
            # the first step pays one-time work, the second the counting above
            "step_time_median_s": statistics.median(times[2:] or times[1:])}


def rank_main(args) -> None:
    import torch

    from forge_ds import distributed, launch_env

    torch.set_num_threads(args.threads)
    env = launch_env.detect()
    distributed.init("cpu")
    results = [measure_stage(args, stage, env, first=i == 0) for i, stage in enumerate(args.stages)]
    Path(args.json).with_suffix(f".rank{env.rank}.json").write_text(json.dumps(results, indent=1))
    distributed.end_process(0)


def measure(shape: str, ranks: int, stages: list[str], workdir: Path, precision: str, steps: int,
            threads: int) -> list[list[dict]]:
    """Run the measuring ranks; every rank's results, stage by stage."""
    from forge_ds import prepare

    prepared = workdir / f"prepared-v{SHAPES[shape]['vocab_size']}"
    prepare.prepare("builtin:pydoc", vocab_size=SHAPES[shape]["vocab_size"], prepared_dir=str(prepared),
                    show_progress=False)
    out = workdir / f"measured-{shape}-{ranks}.json"
    cmd = [sys.executable, __file__, "--_rank_child", "--shape", shape, "--precision", precision, "--steps",
           str(steps), "--threads", str(threads), "--workdir", str(workdir), "--prepared_dir", str(prepared),
           "--json", str(out), "--stages", *stages]
    result = run_ranks(cmd, ranks, omp_threads=threads)
    if not result.ok:
        raise SystemExit(f"plan_check: the measuring ranks failed ({result.failure()})")
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(ranks)]


def predicted(shape: str, precision: str, stage: str, world: int, rank: int) -> dict:
    """What the planner says for one measured run (CPU activations formula, this config's own ds JSON)."""
    from forge_ds import ds_config, memory_model as mm, plan
    from forge_ds.config import resolve

    cfg = resolve(None, overrides(shape, precision, "unused", 2))[0]
    s, n = mm.Shape.of(cfg), int(stage[-1])
    zero = dict(ds_config.load_ds_config(stage).get("zero_optimization") or {})
    states = mm.model_states(s, n, world, precision,
                             persistence_threshold=int(float(zero.get("stage3_param_persistence_threshold", 1e5))),
                             ranks=[rank])
    return {"model_state_bytes": states["params"] + states["grads"] + states["optimizer"],
            "comms": plan.collectives(s, n, world, precision, 1, zero),
            "checkpoint_bytes": mm.checkpoint_bytes(s, n, world, precision), "export_bytes": mm.export_bytes(s),
            # the first step at ZeRO-0 allocates the gradients and torch AdamW's two moments beside the activations
            "step_peak_growth": mm.activations(s, precision, "cpu", cfg.training.activation_checkpointing)["peak"]
            + mm.CPU_FIRST_STEP_RUNTIME_BYTES
            + (states["grads"] + states["optimizer"] if n == 0 else 0.0)}


def expand(comms: dict) -> dict:
    """{op: {size: count}} (the logger's shape, per step) -> {op: sorted sizes}, small scalars included."""
    return {op: sorted(s for size, count in sizes.items() for s in [int(size)] * round(count))
            for op, sizes in comms.items() if op in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")}


def compare(results: list[dict], shape: str, precision: str) -> list[dict]:
    rows = []
    for r in results:
        p = predicted(shape, precision, r["stage"], r["world_size"], r["rank"])
        rows.append({
            "stage": r["stage"], "ranks": r["world_size"],
            "model_state": (r["model_state_bytes"]["total"], p["model_state_bytes"]),
            "checkpoint": (r["checkpoint_bytes"], p["checkpoint_bytes"]),
            "export_pt": (r["export_bytes"]["pt"], p["export_bytes"]["pt"]),
            "export_safetensors": (r["export_bytes"]["safetensors"], p["export_bytes"]["safetensors"]),
            "step_peak_growth": (r["step_peak_rss_growth"], p["step_peak_growth"]),
            "comms_equal": expand(r["comms_per_step"]) == {op: sorted(v) for op, v in p["comms"].items()},
            "comms_measured": expand(r["comms_per_step"]), "comms_predicted": p["comms"],
            "step_time_s": r["step_time_median_s"]})
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'stage':<7}{'ranks':>6}  {'model state meas/pred':>24}  {'checkpoint':>22}  {'export .pt':>20}  "
          f"{'step peak RSS growth MiB':>26}  comms equal  step s")
    for r in rows:
        def pair(key, scale=1.0):
            m, p = r[key]
            return "-" if m is None else f"{m / scale:,.0f}/{p / scale:,.0f} x{m / p:.3f}"
        print(f"{r['stage']:<7}{r['ranks']:>6}  {pair('model_state'):>24}  {pair('checkpoint'):>22}  "
              f"{pair('export_pt'):>20}  {pair('step_peak_growth', 2**20):>26}  {str(r['comms_equal']):>11}  "
              f"{r['step_time_s']:.3f}")


def step_time_check(calib_s: float, predict_s: float, precision: str = "fp32") -> dict:
    """Calibrate the planner's CPU MFU on the "calib" shape's measured ZeRO-0 step, then predict "predict"'s."""
    from forge_ds import ds_config, memory_model as mm, plan
    from forge_ds.config import resolve

    ds = ds_config.load_ds_config("zero0")

    def row(shape: str, mfu: float):
        cfg = resolve(None, overrides(shape, precision, "unused", 2))[0]
        hw = plan.hardware("cpu", None, None, mfu, None, None)
        return plan.plan_row("zero0", mm.Shape.of(cfg), 1, 1, precision, 1, False, hw, ds)

    at_peak = row("calib", 1.0)
    mfu = at_peak.compute_s / (calib_s - at_peak.host_s - at_peak.exposed_comm_s)
    predicted = row("predict", mfu).step_s
    return {"calibrated_mfu": mfu, "calib_measured_s": calib_s, "predict_measured_s": predict_s,
            "predict_predicted_s": predicted, "measured_over_predicted": predict_s / predicted}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=3,
                   help="steps after the first (whose traffic and time are not compared)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--step_time", action="store_true",
                   help="instead: calibrate the step time on the calib shape, predict the predict shape (1 rank)")
    p.add_argument("--rounds", type=int, default=3, help="--step_time: alternating measurements of each shape")
    p.add_argument("--prepared_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_rank_child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args._rank_child:
        return rank_main(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="forge-plan-check-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.step_time:
        # Alternating rounds, medians: a load that comes and goes on a shared machine hits both shapes alike.
        times = {"calib": [], "predict": []}
        for _ in range(args.rounds):
            for shape in times:
                times[shape].append(measure(shape, 1, ["zero0"], workdir, args.precision, args.steps,
                                            args.threads)[0][0]["step_time_median_s"])
        report = step_time_check(statistics.median(times["calib"]), statistics.median(times["predict"]),
                                 args.precision)
        report["rounds"] = times
        print(json.dumps(report, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return report
    rows = []
    for ranks in args.ranks:
        measured = measure(args.shape, ranks, args.stages, workdir, args.precision, args.steps, args.threads)
        rows += compare(measured[0], args.shape, args.precision)
    print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "precision": args.precision, "rows": rows,
                                               "date": time.strftime("%Y-%m-%d %H:%M"),
                                               "load_avg": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
