"""Throughput benchmark (issue 7): forge_ds's training loop beside a plain PyTorch loop, in the same process.

For one model shape / precision / ZeRO stage / world size it builds the real harness (`forge_ds.train.setup`: config
resolution, DeepSpeed engine, memmap windows, metrics) and runs the real loop (`forge_ds.train.fit`, checkpoint saves
switched off) in chunks of steps, interleaved with chunks of

  * plain: the same model class and init, torch.optim.AdamW with the same parameter groups, clipping and LR schedule,
    the same batches from the same memmap windows, no DeepSpeed (DDP when ranks > 1);
  * naive: the plain loop with attention written as matmul -> mask -> softmax -> matmul instead of SDPA.

Chunks run as triples (plain, ours, naive) after a warm-up, so machine noise hits all three alike; the harness
overhead is the median over triples of ours/plain tokens/s, reported with its spread. Also reported: step time
(median, spread), tokens/s, achieved TFLOP/s and MFU (forge_ds.metrics.flops_per_token; peak from --peak_tflops or the
GPU table), peak memory, per-rank model-state bytes beside the ZeRO formulas, the batch-fetch time, and (--launch)
the wall time from `forge-ds train` launch to its first optimizer step.

    python benchmarks/bench.py --shape cpu                         # CPU target: 1 process, fp32, ZeRO-0
    python benchmarks/bench.py --shape gpt2 --precision bf16 --zero 2       # GPU (see docs/PERFORMANCE.md)
    python benchmarks/bench.py --shape cpu --zero 3 --ranks 2
    forge-ds bench --shape cpu                                     # the same, through the CLI

Consolidation (export) memory is measured by benchmarks/export_memory.py, not here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a checkout without `pip install -e .` (e.g. a bare GPU machine) still imports forge_ds
sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings (quality, local_ranks), also under `forge-ds bench`

from local_ranks import job_env, run_ranks  # noqa: E402
from quality import versions  # noqa: E402

SHAPES = {  # d_model, n_heads, n_layers, d_ff, seq_len, vocab, per-rank batch
    "cpu": dict(d_model=256, n_heads=4, n_layers=4, d_ff=1024, seq_len=256, vocab=8192, batch_size=8),
    "gpt2": dict(d_model=768, n_heads=12, n_layers=12, d_ff=3072, seq_len=1024, vocab=50304, batch_size=16),
    "modularforge": dict(d_model=512, n_heads=8, n_layers=4, d_ff=2048, seq_len=512, vocab=16384, batch_size=32),
    "quality": dict(d_model=128, n_heads=4, n_layers=2, d_ff=512, seq_len=128, vocab=2048, batch_size=16),
}


# ------------------------------------------------------------------------------------------ model-state memory


def zero_formula_bytes(psi: int, stage: int, world: int, precision: str) -> tuple[float, str]:
    """Per-rank model-state bytes predicted for Adam, and the formula used.

    Mixed precision (bf16/fp16): 16Ψ = 2 param + 2 grad + 12 fp32 master/m/v (ZeRO paper). fp32: params and grads
    take 4 bytes; at stage 0 the params are the master copy (16Ψ); ZeRO-1/2 in DeepSpeed 0.19 keep a separate fp32
    master partition (a clone) beside the fp32 params, ZeRO-3 reuses the partition itself.
    """
    n = world
    if precision in ("bf16", "fp16"):
        table = {0: (16, 0, "16Ψ"), 1: (4, 12, "4Ψ + 12Ψ/N"), 2: (2, 14, "2Ψ + 14Ψ/N"), 3: (0, 16, "16Ψ/N")}
    else:
        table = {0: (16, 0, "16Ψ (fp32)"), 1: (8, 12, "8Ψ + 12Ψ/N (fp32)"), 2: (4, 16, "4Ψ + 16Ψ/N (fp32)"),
                 3: (0, 16, "16Ψ/N (fp32)")}
    full, part, text = table[stage]
    return psi * (full + part / n), text


def _tensors(obj, depth: int = 0):
    """Tensors reachable through lists/tuples/dicts (DeepSpeed keeps its flat buffers and partitions in those)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)


def model_state_bytes(engine) -> dict:
    """Bytes this rank holds in parameters, gradients, optimizer state and DeepSpeed's flat/partition buffers,
    counting every storage once (views into one flat buffer count as that buffer)."""
    import torch

    seen: dict[int, int] = {}
    by_kind = {"params": 0, "grads": 0, "optimizer_state": 0, "other_optimizer_buffers": 0}

    def add(t, kind):
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or key == 0:
            return
        seen[key] = storage.nbytes()
        by_kind[kind] += storage.nbytes()

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", None), "params")  # ZeRO-3: this rank's partition; p.data is a placeholder
        add(p.data, "params")
    for p in engine.module.parameters():
        add(p.grad, "grads")
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for state in getattr(inner, "state", {}).values():
        for t in _tensors(state):
            add(t, "optimizer_state")
    for name, value in vars(opt).items():
        kind = "grads" if "grad" in name else "other_optimizer_buffers"
        for t in _tensors(value):
            add(t, kind)
    by_kind["total"] = sum(by_kind.values())
    return by_kind


def memory_now(device: str) -> float:
    import psutil
    import torch

    if device == "cuda":
        return float(torch.cuda.memory_allocated())
    return float(psutil.Process().memory_info().rss)


# ------------------------------------------------------------------------------------------ the loops


_CAUSAL_MASKS: dict = {}


def naive_attention_forward(self, x):
    """CausalSelfAttention written out: scores, mask, softmax, dropout, weighted sum (no fused kernel)."""
    import torch
    import torch.nn.functional as F

    B, S, d = x.shape
    q, k, v = (t.view(B, S, self.n_heads, d // self.n_heads).transpose(1, 2)
               for t in self.qkv_proj(x).split(d, dim=-1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.n_heads)
    key = (S, x.device)
    if key not in _CAUSAL_MASKS:  # built once, as a plain loop would hold it: not a cost of the naive attention
        _CAUSAL_MASKS[key] = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
    mask = _CAUSAL_MASKS[key]
    att = F.dropout(torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1), self.dropout, self.training)
    return self.out_dropout(self.out_proj((att @ v).transpose(1, 2).reshape(B, S, d)))


class PlainLoop:
    """The loop forge_ds replaces: model, AdamW, clip, LambdaLR, the same batches. No DeepSpeed."""

    def __init__(self, run, naive_attention: bool, compile_model: bool, gpu_like: bool = False):
        import torch

        from forge_ds.model import CausalSelfAttention, optimizer_groups
        from forge_ds.engine import build_model, lr_lambda

        cfg, t = run.cfg, run.cfg.training
        self.run, self.device = run, run.device
        model = build_model(cfg, None)  # the same class and initialisation as the harness builds
        if naive_attention:
            for m in model.modules():
                if isinstance(m, CausalSelfAttention):
                    m.forward = naive_attention_forward.__get__(m)
        model.to(self.device)
        self.model = model
        self.autocast = run.precision in ("bf16", "fp16")
        self.amp_dtype = torch.bfloat16 if run.precision == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if run.precision == "fp16" else None
        # Fused AdamW is torch's fastest on GPU; on CPU torch's default, which is what DeepSpeed's torch_adam builds.
        # gpu_like (benchmarks/host_overhead.py, a GPU's host cost on a CPU): fused AdamW and foreach clipping
        # on the CPU too, the launches the loop makes on a GPU, where CPU defaults would loop per tensor.
        self.gpu_like = gpu_like or self.device == "cuda"
        self.opt = torch.optim.AdamW(optimizer_groups(model, t.recipe, t.weight_decay), lr=t.learning_rate,
                                     betas=(0.9, 0.999), eps=1e-8, **({"fused": True} if self.gpu_like else {}))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(run.total_steps, t.warmup_steps))
        self.forward = model
        if run.env.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.forward = DDP(model, device_ids=[run.env.local_rank] if self.device == "cuda" else None)
        if compile_model:
            self.forward = torch.compile(self.forward)
        self.max_norm = t.max_grad_norm

    def step(self, step: int) -> float:
        import torch

        from forge_ds.evaluate import get_batch

        run, ga = self.run, self.run.cfg.training.gradient_accumulation_steps
        loss_sum = 0.0
        for micro in range(ga):
            x, y = get_batch(run.train_windows, run.sampler.micro_indices(step, run.env.rank, micro), self.device)
            with torch.autocast(self.device, dtype=self.amp_dtype, enabled=self.autocast):
                loss = self.forward(x, y)
            scaled = loss / ga
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.item()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm, foreach=self.gpu_like or None)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_sum / ga


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_chunk(fn, steps: int, device: str) -> tuple[float, list[float]]:
    """Wall seconds of `steps` steps and each step's own time."""
    per_step = []
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        per_step.append(time.perf_counter() - t0)
    return time.perf_counter() - started, per_step


def profile_chunk(name: str, fn, device: str, top: int = 12) -> dict:
    """torch.profiler over one chunk: how much of the wall the GPU was busy, and the ops that cost the most host
    time (a loop whose GPU idles between kernels is bound by Python / launch overhead, not by the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    device_self = [getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events]
    busy = sum(device_self) / 1e6  # µs -> s; kernels on overlapping streams count twice, so an upper bound
    print(f"\nprofile ({name}): wall {wall * 1e3:.1f} ms, GPU kernels {busy * 1e3:.1f} ms "
          f"({busy / wall * 100:.0f}% of the wall)" if device == "cuda" else f"\nprofile ({name}): wall {wall * 1e3:.1f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    if device == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=60))
    return {"wall_s": wall, "gpu_kernel_s": busy if device == "cuda" else None}


# ------------------------------------------------------------------------------------------ one rank's benchmark


def run_overrides(args) -> dict:
    """The training config of every forge_ds run the benchmark makes (timed in-process, or launched), as
    section.field values."""
    return {"model.d_model": args.d_model, "model.n_heads": args.n_heads, "model.n_layers": args.n_layers,
            "model.d_ff": args.d_ff, "model.max_seq_len": args.seq_len, "model.vocab_size": args.vocab,
            "model.dropout": 0.1, "training.batch_size": args.batch_size, "training.max_steps": 1_000_000,
            "training.warmup_steps": 20, "training.learning_rate": 3e-4, "training.precision": args.precision,
            "training.device": args.device, "training.compile": args.compile or args.compile_ours,
            "training.activation_checkpointing": args.activation_checkpointing,
            "training.eval_every": 10**9, "training.checkpoint_every": 10**9, "training.log_every": 10**9,
            "data.source": "builtin:pydoc", "data.prepared_dir": args.prepared_dir}


def build_config(args):
    from forge_ds.config import resolve

    return resolve(None, run_overrides(args))[0]


def rank_main(args) -> dict | None:
    import torch

    from forge_ds import distributed, launch_env, train
    from forge_ds.metrics import flops_per_token, peak_flops
    from forge_ds.options import RunOptions
    from forge_ds.evaluate import get_batch
    from forge_ds.preflight import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    env = launch_env.detect()
    cfg = build_config(args)
    device = resolve_device(cfg)
    distributed.init(device)
    distributed.barrier()
    baseline = memory_now(device)  # after imports and process-group start: model state is growth above this
    opts = RunOptions(deepspeed_config=args.deepspeed_config or f"zero{args.zero}", output_dir=args.run_dir, overwrite=True,
                      peak_tflops=args.peak_tflops)
    run = train.setup(cfg, opts, env, [])
    train.save = lambda run: None  # the loop's checkpoint at the end of each chunk is not what we time

    inner_times = []  # each step's time as the loop itself measures it (forward/backward/step/all-reduce)
    record = run.metrics.train_step

    def recording_train_step(step, loss, lr, grad_norm, step_time, *rest, **kw):
        inner_times.append(step_time)
        return record(step, loss, lr, grad_norm, step_time, *rest, **kw)

    run.metrics.train_step = recording_train_step

    def ours_chunk(steps):
        run.opts.stop_after_steps = steps
        return train.fit(run)

    # Model state is counted just before an optimizer step, when parameters, gradients and optimizer state are all
    # alive (between steps DeepSpeed frees or zeroes the gradients); the last warm-up step's count is kept.
    states = {}
    engine_step = run.engine.step

    def counting_step(*a, **kw):
        states.update(model_state_bytes(run.engine))
        return engine_step(*a, **kw)

    run.engine.step = counting_step
    ours_warm, _ = time_chunk(lambda: ours_chunk(args.warmup), 1, device)
    del run.engine.step
    ours_growth = memory_now(device) - baseline
    # ZeRO-3 leaves empty placeholders in numel(); ds_numel is the full size there.
    psi = sum(getattr(p, "ds_numel", p.numel()) for p in run.engine.module.parameters() if p.requires_grad)
    stage = run.engine.zero_optimization_stage()  # the JSON's, which --deepspeed_config may have chosen
    formula, formula_text = zero_formula_bytes(psi, stage, env.world_size, run.precision)

    before_plain = memory_now(device)
    plain = PlainLoop(run, naive_attention=False, compile_model=args.compile)
    naive = PlainLoop(run, naive_attention=True, compile_model=args.compile)
    step_counter = {"plain": run.state.step, "naive": run.state.step}

    def plain_step(loop, key):
        loop.step(step_counter[key])
        step_counter[key] += 1

    for _ in range(args.warmup):
        plain_step(plain, "plain")
        plain_step(naive, "naive")
    plain_growth = (memory_now(device) - before_plain) / 2  # two plain-style models of equal size

    results = {"plain": [], "ours": [], "naive": []}
    per_step = {"plain": [], "ours": [], "naive": []}
    peaks = {"plain": 0.0, "ours": 0.0, "naive": 0.0}
    for _ in range(args.pairs):
        for name, fn in (("plain", lambda: plain_step(plain, "plain")),
                         ("ours", None), ("naive", lambda: plain_step(naive, "naive"))):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if name == "ours":
                # fit runs the whole chunk; the wall time includes its logging, per-step times come from its timer.
                del inner_times[:]
                wall, _ = time_chunk(lambda: ours_chunk(args.steps_per_chunk), 1, device)
                steps = list(inner_times)
            else:
                wall, steps = time_chunk(fn, args.steps_per_chunk, device)
            results[name].append(wall / args.steps_per_chunk)
            per_step[name].extend(steps)
            if device == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
    if device != "cuda":
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        peaks = {"process_peak_rss": peak_rss}

    profiles = {}
    if args.profile and env.rank == 0:
        profiles["ours"] = profile_chunk("forge_ds, one chunk", lambda: ours_chunk(args.steps_per_chunk), device)
        profiles["plain"] = profile_chunk(
            "plain torch, one chunk", lambda: [plain_step(plain, "plain") for _ in range(args.steps_per_chunk)], device)

    # batch fetch: what get_batch costs per step at this shape (main-process memmap reads)
    fetch = []
    for i in range(50):
        t0 = time.perf_counter()
        get_batch(run.train_windows, run.sampler.micro_indices(i, env.rank, 0), device)
        sync(device)
        fetch.append(time.perf_counter() - t0)

    tokens_per_step = run.sampler.global_batch * cfg.model.max_seq_len
    fpt = flops_per_token(psi, cfg.model.n_layers, cfg.model.d_model, cfg.model.max_seq_len)
    peak = peak_flops(device, args.peak_tflops)
    ratios = [p / o for p, o in zip(results["plain"], results["ours"])]
    naive_ratios = [n / o for n, o in zip(results["naive"], results["ours"])]
    if env.rank:
        return None

    def summary(name):
        times = results[name]
        med = statistics.median(times)
        tps = tokens_per_step / med
        return {"step_time_median_s": med, "step_time_min_s": min(times), "step_time_max_s": max(times),
                "step_time_iqr_s": _iqr(per_step[name]), "tokens_per_s": tps,
                "achieved_tflops_per_rank": tps * fpt / env.world_size / 1e12,
                "mfu": tps * fpt / (env.world_size * peak) if peak else None}

    report = {
        "benchmark": "throughput", "shape": {k: getattr(args, k) for k in
                                             ("d_model", "n_heads", "n_layers", "d_ff", "seq_len", "vocab",
                                              "batch_size")},
        "precision": run.precision, "zero_stage": stage, "world_size": env.world_size, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "compile": args.compile, "compile_ours_only": args.compile_ours,
        "activation_checkpointing": args.activation_checkpointing,
        "optimizer": type(getattr(run.engine.optimizer, "optimizer", run.engine.optimizer)).__name__,
        "tokens_per_step": tokens_per_step, "trainable_params": psi, "flops_per_token": fpt,
        "peak_flops_per_rank": peak, "pairs": args.pairs, "steps_per_chunk": args.steps_per_chunk,
        "warmup_steps": args.warmup, "warmup_wall_s": ours_warm,
        "ours": summary("ours"), "plain": summary("plain"), "naive_attention": summary("naive"),
        "ours_over_plain_tokens_per_s": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                         "per_pair": ratios},
        "ours_over_naive_tokens_per_s": {"median": statistics.median(naive_ratios), "min": min(naive_ratios),
                                         "max": max(naive_ratios)},
        # The loop's own step timer (forward/backward/step/all-reduce) against the chunk's wall time per step: the
        # difference is what logging, metrics and the loop's bookkeeping cost.
        "ours_step_time_by_loop_timer_median_s": statistics.median(per_step["ours"]),
        "memory": {"kind": "cuda allocated" if device == "cuda" else "process RSS",
                   "peak_bytes": peaks, "ours_growth_after_warmup_bytes": ours_growth,
                   "plain_growth_after_warmup_bytes": plain_growth},
        "model_state_bytes_per_rank": states, "zero_formula": formula_text, "zero_formula_bytes": formula,
        "model_state_over_formula": states["total"] / formula if formula else None,
        "batch_fetch_s": {"median": statistics.median(fetch), "max": max(fetch)},
        "profile": profiles,
    }
    return report


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


# ------------------------------------------------------------------------------------------ launch timing


def launch_to_first_step(args, runs: int) -> list[dict]:
    """Wall time from starting `forge-ds train` to its first optimizer step (data already prepared)."""
    out = []
    for i in range(runs):
        run_dir = Path(args.run_dir).parent / f"launch-{i}"
        cmd = [sys.executable, "-m", "forge_ds.cli", "train", f"--output_dir={run_dir}", "--overwrite",
               f"--deepspeed_config={args.deepspeed_config or f'zero{args.zero}'}", "--stop_after_steps=1",
               *[f"--{k}={v}" for k, v in {**run_overrides(args), "training.log_every": 1}.items()]]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        marks = {}
        for line in proc.stdout:
            now = time.perf_counter() - started
            if line.startswith("forge-ds train:") and "setup_done_s" not in marks:
                marks["setup_done_s"] = now
            if line.startswith("step 1/") and "first_step_s" not in marks:
                marks["first_step_s"] = now
        proc.wait()
        if proc.returncode or "first_step_s" not in marks:
            raise SystemExit(f"bench: launch timing run failed (exit {proc.returncode}): {' '.join(cmd)}")
        marks["command"] = " ".join(cmd)
        out.append(marks)
    return out


# ------------------------------------------------------------------------------------------ driver


def print_table(r: dict) -> None:
    s = r["shape"]
    print(f"\nbench: d{s['d_model']} H{s['n_heads']} L{s['n_layers']} F{s['d_ff']} T{s['seq_len']} V{s['vocab']} "
          f"B{s['batch_size']}/rank, {r['precision']}, ZeRO-{r['zero_stage']}, {r['world_size']} rank(s), "
          f"{r['device']} ({r['device_name']}, {r['torch_threads']} threads), optimizer {r['optimizer']}")
    print(f"{'loop':<18}{'tokens/s':>12}{'step median':>14}{'min..max':>20}{'TFLOP/s/rank':>14}{'MFU':>8}")
    for name in ("ours", "plain", "naive_attention"):
        x = r[name]
        mfu = f"{x['mfu'] * 100:7.1f}%" if x["mfu"] is not None else "     n/a"
        label = {"ours": "forge_ds (fit)", "plain": "plain torch", "naive_attention": "naive attention"}[name]
        print(f"{label:<18}{x['tokens_per_s']:>12,.0f}{x['step_time_median_s'] * 1e3:>11.1f} ms"
              f"{x['step_time_min_s'] * 1e3:>10.1f}..{x['step_time_max_s'] * 1e3:<8.1f}"
              f"{x['achieved_tflops_per_rank']:>14.4f}{mfu}")
    q, n = r["ours_over_plain_tokens_per_s"], r["ours_over_naive_tokens_per_s"]
    print(f"ours/plain tokens/s: median {q['median']:.3f} (min {q['min']:.3f}, max {q['max']:.3f}) over "
          f"{r['pairs']} interleaved pairs of {r['steps_per_chunk']} steps")
    print(f"ours/naive-attention tokens/s: median {n['median']:.3f} (min {n['min']:.3f}, max {n['max']:.3f})")
    if "ours_step_time_by_loop_timer_median_s" in r:
        print(f"ours: step median {r['ours_step_time_by_loop_timer_median_s'] * 1e3:.1f} ms by the loop's own timer "
              f"(forward/backward/step/all-reduce) vs {r['ours']['step_time_median_s'] * 1e3:.1f} ms wall per step")
    ms = r["model_state_bytes_per_rank"]
    print(f"model state per rank: {ms['total'] / 2**20:.1f} MiB (params {ms['params'] / 2**20:.1f}, grads "
          f"{ms['grads'] / 2**20:.1f}, optimizer {ms['optimizer_state'] / 2**20:.1f}, other "
          f"{ms['other_optimizer_buffers'] / 2**20:.1f}) vs {r['zero_formula']} = {r['zero_formula_bytes'] / 2**20:.1f}"
          f" MiB (x{r['model_state_over_formula']:.2f}); Ψ = {r['trainable_params']:,}")
    m = r["memory"]
    print(f"memory ({m['kind']}): growth after engine+warm-up {m['ours_growth_after_warmup_bytes'] / 2**20:.1f} MiB "
          f"(ours), {m['plain_growth_after_warmup_bytes'] / 2**20:.1f} MiB (plain); peak "
          + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in m["peak_bytes"].items()))
    f = r["batch_fetch_s"]
    print(f"batch fetch (get_batch, memmap, main process): median {f['median'] * 1e3:.3f} ms = "
          f"{f['median'] / r['ours']['step_time_median_s'] * 100:.2f}% of a step")
    for i, l in enumerate(r.get("launch", [])):
        print(f"launch to first optimizer step (run {i + 1}): {l['first_step_s']:.1f} s (setup done at "
              f"{l.get('setup_done_s', float('nan')):.1f} s)")


def _cuda_version():
    import torch

    return torch.version.cuda


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu", help="preset shape; flags below override")
    for key in ("d_model", "n_heads", "n_layers", "d_ff", "seq_len", "vocab", "batch_size"):
        p.add_argument(f"--{key}", type=int, default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--deepspeed_config", default=None,
                   help="a DeepSpeed JSON (path or shipped name) instead of ds_configs/zero<--zero>.json")
    p.add_argument("--ranks", type=int, default=1, help="processes on this machine (one per GPU)")
    p.add_argument("--pairs", type=int, default=7, help="interleaved (plain, ours, naive) chunks after warm-up")
    p.add_argument("--steps_per_chunk", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per loop before the pairs")
    p.add_argument("--compile", action="store_true", help="training.compile=true; the plain loops torch.compile")
    p.add_argument("--compile_ours", action="store_true",
                   help="training.compile=true for forge_ds only: the plain loops stay eager (compiled forge_ds "
                        "against the plain eager loop)")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peak_tflops", type=float, default=None, help="per-rank peak for MFU (GPU table otherwise)")
    p.add_argument("--profile", action="store_true", help="after timing, profile one chunk of each loop (rank 0)")
    p.add_argument("--launch", type=int, default=0, help="also time N launches of `forge-ds train` to step 1")
    p.add_argument("--workdir", default=None, help="scratch folder (prepared data, run dirs); default a temp dir")
    p.add_argument("--json", default=None, help="output JSON path (default <workdir>/bench.json)")
    p.add_argument("--_rank_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepared_dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.warmup = max(2, args.warmup)  # the optimizer state exists from the first step on; counted at the last
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quality" in argv:
        import quality

        return quality.main(argv)
    args = parse(argv)
    if args._rank_child:
        from forge_ds import distributed

        report = rank_main(args)
        if report is not None:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        distributed.end_process(0)  # a rank exits as `forge-ds train` does: no teardown abort (-6) after the work
        return report

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="forge-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.prepared_dir = args.prepared_dir or str(workdir / f"prepared-v{args.vocab}")
    args.run_dir = str(workdir / "run")
    args.json = str(Path(args.json).resolve()) if args.json else str(workdir / "bench.json")
    # Tokenize once, outside every timing (the one-time cost a real job pays in `forge-ds prepare`).
    from forge_ds import prepare

    prepare.prepare("builtin:pydoc", vocab_size=args.vocab, prepared_dir=args.prepared_dir, show_progress=False)
    child = argv + [  # argparse keeps the last of repeated flags
        f"--run_dir={args.run_dir}", f"--prepared_dir={args.prepared_dir}", f"--json={args.json}"]
    started = time.time()
    # This script again, as the ranks (one process: no rank variables); rank 0's output shows as it comes.
    ranks = run_ranks([sys.executable, __file__, *child, "--_rank_child"], args.ranks, echo=True)
    if not ranks.ok:
        if ranks.user_error():  # bad input: its one line is already on screen, echoed from rank 0
            raise SystemExit(2)
        raise SystemExit(f"bench: the benchmark process failed ({ranks.failure()})")
    report = json.loads(Path(args.json).read_text())
    if args.launch:
        report["launch"] = launch_to_first_step(args, args.launch)
    report.update({"command": " ".join(["python benchmarks/bench.py", *argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
                   "machine": f"{platform.node()}, {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f} at end",
                   "wall_s": round(time.time() - started, 1),
                   "versions": {"cuda": _cuda_version(), **versions()}})
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"json: {args.json}")
    return report


if __name__ == "__main__":
    # Through the CLI, as `forge-ds bench`: bad input is one line and exit 2 here too, in the ranks as well.
    from forge_ds.cli import main as cli_main

    cli_main(["bench", *sys.argv[1:]])
