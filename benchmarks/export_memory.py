"""Peak memory of the export, offline (`forge-ds export <checkpoint>`) and live (the end of training, rank 0), against
the size of what it writes.

For each ZeRO stage asked for: train one step of the model (ModularForge's default shape unless told otherwise) on
2 CPU ranks through the harness, as `forge-ds train` runs it (setup, fit, finish: final evaluation, checkpoint,
export). On rank 0 a thread samples the resident set size (RSS) every millisecond from the start of the export's
gather (after the imports, engine start, the training step, the final evaluation and checkpoint) to the end of its
write; the "live export, rank 0" row is the peak growth above the RSS at the gather's start. That figure is what the
machine must find on top of what the process already holds, but glibc hands the export memory that training,
evaluation and the checkpoint freed, so it can be far below what the export needs; a second run per stage first
hands that free memory back to the system (malloc_trim) and measures the same: the "heap trimmed" row, the export's
own demand. Then, in a fresh process per measurement, the offline export of the first run's checkpoint under the
same sampler, above the RSS after imports; and the same for DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`
(all keys, materialised), the reference the export is tested against. Each row stands beside the bytes of the
shared fp32 tensors in the `shared_components.pt` it wrote (for zero_to_fp32, the offline export's).

RSS counts the pages of memory-mapped checkpoint files that were read (DeepSpeed's reader maps the optimizer
shards), so the figures are what the machine must hold, not just Python allocations. The "file-backed" column is the
part of the peak growth that was file pages (Linux): mapped checkpoint pages, and shared-library code run for the
first time in the process (a fixed few MiB: torch.load, torch.save, the kernels of the formula's position table);
the rest is anonymous memory.

    python benchmarks/export_memory.py                    # ZeRO-2 and ZeRO-3, d_model 512, 4 layers, vocab 16384
    python benchmarks/export_memory.py --stages 3 --d_model 1024 --vocab 32768 --json export_memory.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a checkout without `pip install -e .` still imports forge_ds
MiB = 2**20
RESULT = "export_memory result: "  # marks the one line a measuring process reports, among any warnings
LIVE = "live export, rank 0"
LIVE_TRIMMED = "live export, rank 0, heap trimmed"

from local_ranks import run_ranks  # a sibling: this script's folder is on sys.path


class PeakRss:
    """Peak RSS above the RSS at start(), sampled every millisecond by a thread until stop()."""

    def start(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.done, ready = threading.Event(), threading.Event()

        def sample():
            # The baseline is read from the running sampler: its own stack pages are not counted as growth.
            self.base = self.peak = self.proc.memory_info()
            ready.set()
            while not self.done.is_set():
                now = self.proc.memory_info()
                if now.rss > self.peak.rss:
                    self.peak = now
                time.sleep(0.001)

        self.sampler = threading.Thread(target=sample, daemon=True)
        self.sampler.start()
        ready.wait()
        self.started = time.perf_counter()

    def stop(self) -> dict:
        seconds = time.perf_counter() - self.started
        self.done.set()
        self.sampler.join()
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # ru_maxrss catches a spike shorter than the sampling interval, when it exceeds everything before it
        top = max(self.peak.rss, maxrss_after if maxrss_after > self.maxrss_before else 0)
        # Linux: resident file + shmem pages
        file_backed = getattr(self.peak, "shared", 0) - getattr(self.base, "shared", 0)
        return {"baseline_mib": self.base.rss / MiB, "peak_growth_mib": (top - self.base.rss) / MiB,
                "file_backed_mib": file_backed / MiB, "seconds": seconds}


def return_free_heap() -> None:
    """Hand the memory glibc keeps for reuse back to the system (a no-op without glibc). Measured after this, RSS
    growth is what the code needs, not hidden by its reuse of what earlier work (training, evaluation, the
    checkpoint) freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def train_overrides(work: Path, a) -> dict:
    return {"model.d_model": a.d_model, "model.n_layers": a.n_layers, "model.n_heads": a.n_heads,
            "model.d_ff": a.d_ff, "model.vocab_size": a.vocab, "model.max_seq_len": a.seq, "training.batch_size": 1,
            "training.max_steps": 1, "training.eval_max_batches": 1, "training.precision": "fp32",
            "training.device": "cpu", "data.source": str(work / "corpus.txt"),
            "data.prepared_dir": str(work / "prepared")}


def live_rank(stage: int, run_dir: Path, trim: bool, a) -> None:
    """One rank of the training run, in this process, the way `forge-ds train` runs it. Rank 0 measures from the
    start of `export.gather_live` to the end of `export.write` (wrapped here, so forge_ds holds no measuring code),
    after `return_free_heap()` if `trim`, and prints the result."""
    import psutil  # noqa: F401  (imported before any measurement, as the offline readers import theirs)

    from forge_ds import config, distributed, launch_env
    from forge_ds.metrics import configure_console
    from forge_ds.options import RunOptions
    from forge_ds.train import train

    cfg = config.resolve(None, train_overrides(run_dir.parent, a))[0]
    env = launch_env.detect()
    configure_console(env.rank)  # before DeepSpeed is imported, as the CLI does
    from forge_ds import export

    rss, result = PeakRss(), {}
    gather_live, write = export.gather_live, export.write

    def measured_gather_live(*args, **kwargs):
        if env.is_main:
            if trim:
                return_free_heap()
            rss.start()
        return gather_live(*args, **kwargs)

    def measured_write(*args, **kwargs):  # rank 0 alone writes
        paths = write(*args, **kwargs)
        result.update(rss.stop())
        return paths

    export.gather_live, export.write = measured_gather_live, measured_write
    opts = RunOptions(deepspeed_config=f"zero{stage}", output_dir=str(run_dir), overwrite=True)
    code = train(cfg, opts, env, [])
    if env.is_main and not code:
        if result:
            print(RESULT + json.dumps(result), flush=True)
        else:
            print("export_memory: the run ended without export.gather_live and export.write both being called; "
                  "forge_ds.train.finish no longer exports through them, update live_rank", file=sys.stderr)
            code = 1
    distributed.end_process(code)  # as `forge-ds train` ends: no interpreter teardown of DeepSpeed's groups


def train_and_measure_live(work: Path, stage: int, trim: bool, a) -> tuple[Path, dict]:
    """Runs the ranks; returns the run folder and rank 0's live-export figures."""
    corpus = work / "corpus.txt"
    if not corpus.exists():
        words = "the cat sat on a mat while a dog ran in the park and we ate bread with jam".split()
        corpus.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(400)) for i in range(60)))
    run_dir = work / f"zero{stage}{'-trimmed' if trim else ''}"
    shape = [f"--{k}={getattr(a, k)}" for k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab", "seq")]
    ranks = run_ranks([sys.executable, __file__, "--live", str(stage), str(run_dir), str(int(trim)), *shape],
                      a.ranks, cwd=work, omp_threads=1)
    if not ranks.ok:
        raise SystemExit(f"training the ZeRO-{stage} run failed ({ranks.failure(60)})")
    return run_dir, reported(ranks.outputs[0])


def measure(kind: str, ckpt: Path, out: Path) -> dict:
    """Runs in a fresh process: imports, baseline, then the read under the 1 ms RSS sampler."""
    import psutil  # noqa: F401
    import torch  # noqa: F401  (imported before the baseline, as every reader needs it)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from forge_ds.cli import main

    rss = PeakRss()
    rss.start()
    if kind == "forge-ds export":
        main(["export", str(ckpt), f"--out={out}", "--overwrite"])
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        del state
    return rss.stop()


def measure_offline(kind: str, ckpt: Path, out: Path) -> dict:
    res = run_ranks([sys.executable, __file__, "--measure", kind, str(ckpt), str(out)], 1, cwd=ROOT)
    if not res.ok:
        raise SystemExit(f"measuring {kind} failed ({res.failure(60)})")
    return reported(res.outputs[0])


def reported(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    if not lines:
        raise SystemExit(f"export_memory: no result line in the measuring process's output:\n{output[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def sizes(ckpt: Path, export_pt: Path) -> dict:
    import torch

    shared = torch.load(export_pt, map_location="cpu", weights_only=True)
    seen, shared_bytes = set(), 0
    for t in shared.values():
        if t.untyped_storage().data_ptr() not in seen:  # the tied matrix is stored once
            seen.add(t.untyped_storage().data_ptr())
            shared_bytes += t.numel() * t.element_size()
    files = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
    optim = sum(f.stat().st_size for f in ckpt.glob("*optim_states.pt"))
    return {"shared_fp32_mib": shared_bytes / MiB, "checkpoint_mib": files / MiB, "optim_files_mib": optim / MiB}


def print_table(rows: list[dict]) -> None:
    print(f"{'ZeRO':>4}  {'reader':<34} {'peak RSS growth':>16} {'file-backed':>12} {'shared fp32':>12} "
          f"{'ratio':>6} {'checkpoint':>11} {'optim files':>12} {'time':>6} {'baseline':>10}")
    for r in rows:
        print(f"{r['zero_stage']:>4}  {r['reader']:<34} {r['peak_growth_mib']:>12.1f} MiB "
              f"{r['file_backed_mib']:>8.1f} MiB {r['shared_fp32_mib']:>8.1f} MiB {r['ratio']:>6.2f} "
              f"{r['checkpoint_mib']:>7.1f} MiB {r['optim_files_mib']:>8.1f} MiB {r['seconds']:>5.1f}s "
              f"{r['baseline_mib']:>6.0f} MiB")
    print("peak RSS growth is above the baseline: for the offline readers the process's RSS after imports; for the "
          "live rows rank 0's RSS when the export's gather starts (after imports, engine start, the training step, "
          "the final evaluation and checkpoint), the heap's free memory handed back to the system first in the "
          "'heap trimmed' rows. The ratio is the growth over the shared fp32 tensors in the shared_components.pt "
          "that run wrote.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="2,3")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--d_ff", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--workdir", default=None, help="runs, checkpoints and exports go here and are kept "
                   "(default: a temporary folder, removed at the end)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--measure", nargs=3, metavar=("KIND", "CKPT", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--live", nargs=3, metavar=("STAGE", "RUN_DIR", "TRIM"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(RESULT + json.dumps(measure(a.measure[0], Path(a.measure[1]), Path(a.measure[2]))), flush=True)
        return
    if a.live:
        live_rank(int(a.live[0]), Path(a.live[1]), a.live[2] == "1", a)
        return
    command = f"python {' '.join(sys.argv)}"
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}"
    print(f"command: {command}")
    print(f"machine: {machine}")
    print(f"model: d_model {a.d_model}, {a.n_layers} layers, d_ff {a.d_ff}, vocab {a.vocab}, T {a.seq}; "
          f"checkpoints written by {a.ranks} CPU ranks, fp32")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="forge-export-mem-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for stage in (int(s) for s in a.stages.split(",")):
            # The untrimmed run's checkpoint is the one the offline readers read.
            run_dir, live = train_and_measure_live(work, stage, False, a)
            trimmed_dir, trimmed = train_and_measure_live(work, stage, True, a)
            ckpt = run_dir / "checkpoints" / "step-00000001"
            out = work / f"export{stage}"
            measured = [(kind, measure_offline(kind, ckpt, out), out)
                        for kind in ("forge-ds export", "zero_to_fp32 (all keys)")]  # both against the export's file
            measured += [(LIVE, live, run_dir), (LIVE_TRIMMED, trimmed, trimmed_dir)]
            for kind, figures, written in measured:
                size = sizes(ckpt, written / "shared_components.pt")
                rows.append({"zero_stage": stage, "reader": kind, **figures, **size,
                             "ratio": figures["peak_growth_mib"] / size["shared_fp32_mib"],
                             "export_file": str(written / "shared_components.pt")})
        print_table(rows)
        if a.json:
            from quality import versions

            report = {"benchmark": "export_memory", "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
                      "machine": machine, "versions": versions(), "ranks": a.ranks,
                      "shape": {k: getattr(a, k) for k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab", "seq")},
                      "rows": rows}
            Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
            print(f"json: {Path(a.json).resolve()}")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
