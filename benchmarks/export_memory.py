"""Peak memory of the offline export (`forge-ds export <checkpoint>`) against the size of what it writes.

For each ZeRO stage asked for: train one step of the model (ModularForge's default shape unless told otherwise) on
2 CPU ranks with a checkpoint, then, in a fresh process per measurement, read the resident set size (RSS) after the
imports (the baseline), run the export while a thread samples RSS every millisecond, and report the peak growth
above the baseline next to the bytes of the shared fp32 tensors. The same is measured for DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` (all keys, materialised), the reference the export is tested against.

RSS counts the pages of memory-mapped checkpoint files that were read (DeepSpeed's reader maps the optimizer
shards), so the figures are what the machine must hold, not just Python allocations. The "file-backed" column is the
part of the peak growth that was file pages (Linux): mapped checkpoint pages, and shared-library code run for the
first time in the process (a fixed few MiB: torch.load, torch.save, the kernels of the formula's position table).

    python benchmarks/export_memory.py                    # ZeRO-2 and ZeRO-3, d_model 512, 4 layers, vocab 16384
    python benchmarks/export_memory.py --stages 3 --d_model 1024 --vocab 32768
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(work: Path, stage: int, a) -> Path:
    corpus = work / "corpus.txt"
    if not corpus.exists():
        words = "the cat sat on a mat while a dog ran in the park and we ate bread with jam".split()
        corpus.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(400)) for i in range(60)))
    run = work / f"zero{stage}"
    args = [sys.executable, "-m", "forge_ds.cli", "train", f"--model.d_model={a.d_model}",
            f"--model.n_layers={a.n_layers}", f"--model.n_heads={a.n_heads}", f"--model.d_ff={a.d_ff}",
            f"--model.vocab_size={a.vocab}", f"--model.max_seq_len={a.seq}", "--training.batch_size=1",
            "--training.max_steps=1", "--training.eval_max_batches=1", "--training.precision=fp32",
            "--training.device=cpu", f"--data.source={corpus}", f"--data.prepared_dir={work / 'prepared'}",
            f"--deepspeed_config=zero{stage}", f"--output_dir={run}"]
    port, procs = str(_free_port()), []
    for rank in range(a.ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(a.ranks),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"training the ZeRO-{stage} checkpoint failed:\n{outputs[0][-3000:]}")
    return run / "checkpoints" / "step-00000001"


def measure(kind: str, ckpt: Path, out: Path) -> dict:
    """Runs in a fresh process: imports, baseline, then the read under a 1 ms RSS sampler."""
    import psutil
    import torch  # noqa: F401  (imported before the baseline, as every reader needs it)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from forge_ds.cli import main

    proc = psutil.Process()
    base = proc.memory_info()
    baseline = base.rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            now = proc.memory_info()
            if now.rss > peak[0].rss:
                peak[0] = now
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if kind == "forge-ds export":
        main(["export", str(ckpt), f"--out={out}", "--overwrite"])
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        del state
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss catches a spike shorter than the sampling interval, when it exceeds everything before it
    top = max(peak[0].rss, maxrss_after if maxrss_after > maxrss_before else 0)
    file_backed = getattr(peak[0], "shared", 0) - getattr(base, "shared", 0)  # Linux: resident file + shmem pages
    return {"baseline_mib": baseline / MiB, "peak_growth_mib": (top - baseline) / MiB,
            "file_backed_mib": file_backed / MiB, "seconds": seconds}


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
    p.add_argument("--measure", nargs=3, metavar=("KIND", "CKPT", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure[0], Path(a.measure[1]), Path(a.measure[2]))))
        return
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}")
    print(f"model: d_model {a.d_model}, {a.n_layers} layers, d_ff {a.d_ff}, vocab {a.vocab}, T {a.seq}; "
          f"checkpoints written by {a.ranks} CPU ranks, fp32")
    work = Path(tempfile.mkdtemp(prefix="forge-export-mem-"))
    try:
        rows = []
        for stage in (int(s) for s in a.stages.split(",")):
            ckpt = make_checkpoint(work, stage, a)
            out = work / f"export{stage}"
            for kind in ("forge-ds export", "zero_to_fp32 (all keys)"):
                res = subprocess.run([sys.executable, __file__, "--measure", kind, str(ckpt), str(out)], cwd=ROOT,
                                     capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                if res.returncode:
                    raise SystemExit(res.stdout[-2000:] + res.stderr[-3000:])
                rows.append((stage, kind, json.loads(res.stdout.strip().splitlines()[-1])))
            measured = sizes(ckpt, out / "shared_components.pt")  # the same files for both readers
            for _, _, r in rows[-2:]:
                r.update(measured)
        print(f"{'ZeRO':>4}  {'reader':<24} {'peak RSS growth':>16} {'file-backed':>12} {'shared fp32':>12} "
              f"{'ratio':>6} {'checkpoint':>11} {'optim files':>12} {'time':>6}")
        for stage, kind, r in rows:
            print(f"{stage:>4}  {kind:<24} {r['peak_growth_mib']:>12.1f} MiB {r['file_backed_mib']:>8.1f} MiB "
                  f"{r['shared_fp32_mib']:>8.1f} MiB {r['peak_growth_mib'] / r['shared_fp32_mib']:>6.2f} "
                  f"{r['checkpoint_mib']:>7.1f} MiB {r['optim_files_mib']:>8.1f} MiB {r['seconds']:>5.1f}s")
        print("(peak RSS growth: above the process's RSS after imports; baseline "
              f"{rows[0][2]['baseline_mib']:.0f} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
