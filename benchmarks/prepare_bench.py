"""Preparation at scale (issue 19): encode throughput against tokenizers' own encode_batch, peak memory per corpus
size, a run under a cgroup memory limit, and prepare + 50 training steps end to end.

    nice -n 10 python benchmarks/prepare_bench.py --sizes 0.25 0.5 1 --workdir /tmp/prep-bench

Every corpus comes from corpus_gen (varied, never repeated text); every size trains its tokenizer on the same
--tokenizer_train_bytes. Peak memory is the largest proportional set size of the `forge-ds prepare` process tree
(rss.py), anonymous and in total. Results print as they come and go to <workdir>/prepare_bench.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from corpus_gen import write_corpus  # noqa: E402
from rss import run_measured  # noqa: E402

GB = 1 << 30
ANCHOR = """
import sys, time, tokenizers
tok = tokenizers.Tokenizer.from_file(sys.argv[2])
tok.encode_special_tokens = True
nbytes, seconds, carry, batch = 0, 0.0, "", []
def encode(docs):
    global nbytes, seconds
    started = time.monotonic()
    tok.encode_batch(docs)  # results discarded; only this call is timed
    seconds += time.monotonic() - started
    nbytes += sum(len(d.encode()) for d in docs)
with open(sys.argv[1], encoding="utf-8") as f:  # the paragraphs, as forge-ds reads a .txt
    while chunk := f.read(1 << 20):
        parts = (carry + chunk).split("\\n\\n")
        carry = parts.pop()
        batch += [p for p in parts if p.strip()]
        while len(batch) >= 10_000:
            encode(batch[:10_000])
            batch = batch[10_000:]
encode(batch + ([carry] if carry.strip() else []))
print(nbytes, seconds)
"""


def prepare_cmd(corpus: Path, prepared: Path, args) -> list[str]:
    return [sys.executable, "-m", "forge_ds.cli", "prepare", f"--model.vocab_size={args.vocab}",
            f"--data.tokenizer_train_bytes={args.tokenizer_train_bytes}", f"--data.source={corpus}",
            f"--data.prepared_dir={prepared}"] + ([f"--data.num_proc={args.num_proc}"] if args.num_proc else [])


def corpus(workdir: Path, size_gb: float) -> Path:
    path = workdir / f"corpus-{size_gb:g}GB.txt"
    if not path.exists():
        started = time.monotonic()
        write_corpus(path, int(size_gb * GB))
        print(f"generated {path.name} in {time.monotonic() - started:.0f} s", flush=True)
    return path


def prepared_run(corpus_path: Path, prepared: Path, args, prefix: list[str] = ()) -> dict:
    result, peak, seconds = run_measured([*prefix, *prepare_cmd(corpus_path, prepared, args)], cwd=ROOT)
    if result.returncode != 0:
        return {"returncode": result.returncode, "stderr_tail": result.stderr[-1500:], "seconds": round(seconds, 1)}
    meta = json.loads((prepared / "meta.json").read_text())
    phases = meta["seconds"]
    return {"returncode": 0, "seconds": round(seconds, 1), "phases_s": phases,
            "peak_pss_mb": round(peak["Pss"] / 1e6), "peak_pss_anon_mb": round(peak["Pss_Anon"] / 1e6),
            "tokenizer_peak_rss_mb": round(meta.get("tokenizer_peak_rss", 0) / 1e6),
            "tokenizer_sample_mb": round(meta["tokenizer_sample_bytes"] / 1e6, 1),
            "text_mb": round(meta["text_bytes"] / 1e6, 1), "tokens": meta["train_tokens"] + meta["val_tokens"],
            "encode_mb_s": round(meta["text_bytes"] / 1e6 / phases["encode"], 2),
            "summary": (result.stderr.strip().splitlines() or ["(already prepared)"])[-1]}


def anchor(corpus_path: Path, prepared: Path) -> dict:
    """tokenizers' own encode_batch over the same documents, batches of 10k, in a process of its own."""
    out = subprocess.run([sys.executable, "-c", ANCHOR, str(corpus_path), str(prepared / "tokenizer.json")],
                         capture_output=True, text=True, check=True)
    nbytes, seconds = out.stdout.split()
    return {"anchor_mb_s": round(int(nbytes) / 1e6 / float(seconds), 2), "anchor_seconds": round(float(seconds), 1)}


def own_memory_cgroup() -> Path | None:
    """This process's cgroup-v1 memory directory, when it is writable (root, v1 hierarchy); else None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return folder if (folder / "memory.limit_in_bytes").exists() else None
    return None


def limited_run(corpus_path: Path, prepared: Path, limit: int, args) -> dict:
    parent = own_memory_cgroup()
    if parent is None:
        return {"skipped": "no writable cgroup-v1 memory controller for this process"}
    group = parent / f"forge-prepare-bench-{int(time.time())}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        # The shell joins the group, then becomes the preparation: every process it starts is limited too.
        prefix = ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh"]
        result = prepared_run(corpus_path, prepared, args, prefix)
        result.update(limit_mb=round(limit / 1e6), cgroup_max_usage_mb=round(
            int((group / "memory.max_usage_in_bytes").read_text()) / 1e6), failcnt=int(
            (group / "memory.failcnt").read_text()))
        return result
    finally:
        group.rmdir()


def train_steps(corpus_path: Path, prepared: Path, workdir: Path, args) -> dict:
    """`forge-ds train` at the cpu_demo shape on the prepared corpus (found by its identity: same flags)."""
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "forge_ds.cli", "train", "--config=cpu_demo",
                          *prepare_cmd(corpus_path, prepared, args)[4:], f"--training.max_steps={args.steps}",
                          f"--output_dir={workdir / 'run'}", "--overwrite", "--training.eval_every=1000000",
                          "--training.checkpoint_every=1000000", "--training.log_every=10",
                          "--training.eval_max_batches=10"],  # the final evaluation, not the whole split
                         cwd=ROOT, capture_output=True, text=True)
    return {"train_returncode": out.returncode, "train_seconds": round(time.monotonic() - started, 1),
            "train_tail": (out.stdout + out.stderr).strip().splitlines()[-3:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[0.25], help="corpus sizes in GiB, unlimited runs")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/forge-prepare-bench"))
    p.add_argument("--vocab", type=int, default=2048, help="cpu_demo's, so the end-to-end run can train on it")
    p.add_argument("--tokenizer_train_bytes", type=int, default=64 << 20)
    p.add_argument("--num_proc", type=int, default=None, help="default: every core this process may use")
    p.add_argument("--limited_gb", type=float, default=0,
                   help="corpus size for the cgroup-limited run; 0: none; -1: 1.5x the limit, in 0.05 GiB steps")
    p.add_argument("--limit_factor", type=float, default=1.25, help="limit = factor x the largest run's peak")
    p.add_argument("--steps", type=int, default=50, help="training steps end to end; 0: none")
    p.add_argument("--tokenizer_sweep", type=int, nargs="*", default=[],
                   help="tokenizer sample sizes in MiB: the smallest corpus prepared once each, for the tokenizer "
                        "training's peak memory and time against its sample")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    report, started = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}, time.monotonic()
    for size in args.sizes:
        path, prepared = corpus(args.workdir, size), args.workdir / f"prepared-{size:g}GB"
        run = prepared_run(path, prepared, args)
        if run["returncode"] == 0:
            run.update(anchor(path, prepared))
            run["encode_vs_anchor"] = round(run["encode_mb_s"] / run["anchor_mb_s"], 3)
        report["runs"][f"{size:g}GB"] = run
        print(f"{size:g} GiB: {json.dumps(run)}", flush=True)
    if args.tokenizer_sweep:
        report["tokenizer_sweep"] = tokenizer_sweep(args)
    largest = max(args.sizes)
    if args.steps:
        report["end_to_end"] = train_steps(corpus(args.workdir, largest), args.workdir / f"prepared-{largest:g}GB",
                                           args.workdir, args)
        print(f"end to end: {json.dumps(report['end_to_end'])}", flush=True)
    if args.limited_gb:
        report["limited"] = limited(args, report["runs"][f"{largest:g}GB"]["peak_pss_mb"])
        print(f"limited: {json.dumps(report['limited'])}", flush=True)
    report["total_seconds"] = round(time.monotonic() - started)
    (args.workdir / "prepare_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"total {report['total_seconds']} s; {args.workdir / 'prepare_bench.json'}")


def tokenizer_sweep(args) -> list[dict]:
    smallest, rows = min(args.sizes), []
    for mib in args.tokenizer_sweep:
        swept = argparse.Namespace(**{**vars(args), "tokenizer_train_bytes": mib << 20})
        run = prepared_run(corpus(args.workdir, smallest), args.workdir / f"prepared-{smallest:g}GB-tok{mib}", swept)
        rows.append({"sample_mib": mib, **{k: run.get(k) for k in (
            "returncode", "tokenizer_sample_mb", "tokenizer_peak_rss_mb", "peak_pss_mb", "peak_pss_anon_mb")},
            "tokenizer_s": run.get("phases_s", {}).get("tokenizer")})
        print(f"tokenizer sample {mib} MiB: {json.dumps(rows[-1])}", flush=True)
    return rows


def limited(args, peak_mb: float) -> dict:
    """Prepare a corpus larger than the memory limit; its token files must equal an unlimited run's."""
    limit = int(args.limit_factor * peak_mb * 1e6)
    if args.limited_gb < 0:
        args.limited_gb = math.ceil(1.5 * limit / GB * 20) / 20
    path = corpus(args.workdir, args.limited_gb)
    free = args.workdir / f"prepared-{args.limited_gb:g}GB"
    if not (free / "meta.json").exists():
        prepared_run(path, free, args)
    capped = args.workdir / f"prepared-{args.limited_gb:g}GB-limited"
    result = limited_run(path, capped, limit, args)
    result["corpus_over_limit"] = round(path.stat().st_size / limit, 2)
    if result.get("returncode") == 0:
        result["files_equal_unlimited"] = all(filecmp.cmp(capped / n, free / n, shallow=False)
                                              for n in ("train.bin", "val.bin", "tokenizer.json"))
    return result


if __name__ == "__main__":
    main()
