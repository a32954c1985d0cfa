"""What a user sees: TensorBoard scalars, the console (tqdm on a terminal, plain lines in log files), metrics.jsonl,
the start block and the end-of-run summary. Rank 0 owns the one SummaryWriter (DeepSpeed's own TensorBoard monitor is
refused by ds_config.py, so there is never a second writer); other ranks get a silent logger.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import psutil
import torch

from forge_ds.files import atomic_write_text

# Per device: dense bf16 peak TFLOP/s, memory GB, default MFU for `forge-ds plan`, and the interconnect per
# direction in Gbit/s (intra: NVLink/PCIe between GPUs of a node; inter: the network per GPU). Each gives its source.
# Matched by substring of the device name, first hit wins: "H100 PCIe" before the "H100" its name also contains.
# The default MFU, 0.24: the plain eager PyTorch loop's kernels at GPT-2 small on an H100 (22.7% MFU with the GPU
# busy 95% of the wall, docs/PERFORMANCE.md); forge_ds's own host cost is modelled apart (plan.py).
DEVICES = {
    "H100 PCIe": dict(match=("H100 PCIe",), tflops=756.0, memory_gb=80, mfu=0.24, intra_gbps=512.0, inter_gbps=400.0,
                      source="NVIDIA H100 datasheet (PCIe: 756 TFLOPS bf16 dense, 80 GB HBM2e; PCIe Gen5 x16 64 GB/s)"),
    "H100 SXM": dict(match=("H100",), tflops=989.0, memory_gb=80, mfu=0.24, intra_gbps=3600.0, inter_gbps=400.0,
                     source="NVIDIA H100 datasheet (SXM5: 989 TFLOPS bf16 dense, 80 GB HBM3, NVLink 900 GB/s both "
                            "ways); 400 Gb/s NDR InfiniBand per GPU (DGX H100)"),
    "H200": dict(match=("H200",), tflops=989.0, memory_gb=141, mfu=0.24, intra_gbps=3600.0, inter_gbps=400.0,
                 source="NVIDIA H200 datasheet (SXM: 989 TFLOPS bf16 dense, 141 GB HBM3e, NVLink 900 GB/s)"),
    "A100 40GB": dict(match=("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB"), tflops=312.0, memory_gb=40,
                      mfu=0.24, intra_gbps=2400.0, inter_gbps=200.0,
                      source="NVIDIA A100 datasheet (312 TFLOPS bf16 dense, 40 GB HBM2, NVLink 600 GB/s); 200 Gb/s "
                             "HDR InfiniBand per GPU (DGX A100)"),
    "A100 80GB": dict(match=("A100",), tflops=312.0, memory_gb=80, mfu=0.24, intra_gbps=2400.0, inter_gbps=200.0,
                      source="NVIDIA A100 datasheet (312 TFLOPS bf16 dense, 80 GB HBM2e, NVLink 600 GB/s)"),
    "L40S": dict(match=("L40S",), tflops=362.0, memory_gb=48, mfu=0.24, intra_gbps=256.0, inter_gbps=200.0,
                 source="NVIDIA L40S datasheet (362 TFLOPS bf16 dense, 48 GB GDDR6, PCIe Gen4 x16)"),
    "A10G": dict(match=("A10G",), tflops=125.0, memory_gb=24, mfu=0.24, intra_gbps=256.0, inter_gbps=100.0,
                 source="NVIDIA A10 datasheet (125 TFLOPS bf16 dense, 24 GB GDDR6); AWS g5 networking"),
    # One CPU rank with one thread: 32 fp32 FLOP per cycle (two 256-bit FMA pipes) at ~2.5 GHz. MFU 0.24 is
    # measured on this 2-core AMD EPYC VM (benchmarks/plan_check.py "calib" shape, 2 ranks sharing the 2 cores,
    # ZeRO-0: 18.9 GFLOP/s per rank; one rank alone reached 0.31, docs/PERFORMANCE.md). Memory: the 24 GiB VM this
    # project runs its tests on; give --memory_gb for yours.
    "cpu": dict(match=(), tflops=0.08, memory_gb=24, mfu=0.24, intra_gbps=20.0, inter_gbps=10.0,
                source="x86-64 AVX2/AVX-512 core: 2 FMA x 8 fp32 x 2 FLOP x 2.5 GHz; MFU and memory measured here"),
}
PEAK_TFLOPS = {key: spec["tflops"] for spec in DEVICES.values() for key in spec["match"]}


def device_spec(name: str):
    """The table entry of a --gpu name (case-insensitive, by key or by a device-name substring), else None."""
    lowered = name.lower()
    for key, spec in DEVICES.items():
        if lowered == key.lower() or any(lowered == m.lower() for m in spec["match"]):
            return spec
    return None


def configure_console(rank: int) -> None:
    """Call once per process, before DeepSpeed is imported. Rank 0 speaks; every other rank prints only warnings
    and errors, each prefixed with its rank (N ranks repeating rank 0's lines would bury the one that matters)."""
    # DeepSpeed 0.19.8 calls these deprecated collectives on every ZeRO-3 step; nobody running us can act on it.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`"
                            r" is deprecated", category=FutureWarning)
    if rank == 0:
        return
    # Ordinary prints of other ranks (DeepSpeed's op builder, anything rank-unaware) repeat rank 0's; and
    # DeepSpeed's logger binds sys.stdout when it is created, so this also routes it away until re-pointed below.
    sys.stdout = open(os.devnull, "w", encoding="utf-8")
    from deepspeed.utils import logger as ds_logger

    prefix = f"[rank {rank}] "
    # A filter, not a level: the engine re-sets the level from the DS config's "log_level" after we return.
    ds_logger.addFilter(lambda record: record.levelno >= logging.WARNING)
    for handler in ds_logger.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
            handler.setFormatter(logging.Formatter(prefix + "[%(levelname)s] [%(filename)s:%(lineno)d] %(message)s"))
    plain = warnings.formatwarning
    warnings.formatwarning = lambda *args, **kwargs: prefix + plain(*args, **kwargs)


def peak_flops(device: str, override_tflops: Optional[float]) -> Optional[float]:
    if override_tflops:
        return override_tflops * 1e12
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def perplexity(loss: Optional[float]) -> Optional[float]:
    """exp(loss), capped at e^50 so a diverging run logs a large finite number instead of overflowing; None stays
    None (no loss measured yet)."""
    return None if loss is None else math.exp(min(loss, 50.0))


def flops_per_token(trainable_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """6·P for the matmuls forward+backward plus 12·L·d·T for attention scores (PaLM's accounting)."""
    return 6 * trainable_params + 12 * n_layers * d_model * seq_len


class Metrics:
    """Rank 0 writes; elsewhere every method is a no-op so the loop needs no `if rank == 0`."""

    def __init__(self, run_dir: Path, tb_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 log_every: int, tokens_per_step: int, samples_per_step: int, flops_per_tok: float, peak: Optional[float],
                 world_size: int, device: str, fp16: bool, terminal: bool, eval_every: int = 0,
                 eval_batches: int = 0, grad_accum: int = 1):
        self.enabled = enabled
        self.total_steps, self.log_every = total_steps, log_every
        self.tokens_per_step, self.flops_per_tok, self.peak = tokens_per_step, flops_per_tok, peak
        self.samples_per_step = samples_per_step
        self.world_size, self.device, self.fp16 = world_size, device, fp16
        self.start_time = time.time()
        self.steps_timed, self.time_in_steps = 0, 0.0
        self.eval_every, self.eval_batches, self.grad_accum = eval_every, eval_batches, grad_accum
        self.evals_timed, self.time_in_evals = 0, 0.0
        self.peak_rss = 0.0
        self.writer = self.bar = self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # flush_secs: a watcher of a live run sees points within seconds, not torch's default two minutes.
        # purge_step: on resume, TensorBoard hides what an interrupted run logged after the checkpoint we resume
        # from, so a step is never drawn twice.
        self.writer = SummaryWriter(log_dir=str(tb_dir), flush_secs=10,
                                    purge_step=start_step + 1 if start_step else None)
        self.jsonl = self._open_jsonl(run_dir / "metrics.jsonl", start_step)
        if terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    @staticmethod
    def _open_jsonl(path: Path, start_step: int):
        """Append, but first drop lines an interrupted run logged after the checkpoint we resume from, so each
        step appears once (the TensorBoard writer does the same with purge_step)."""
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        return open(path, "a", encoding="utf-8")

    def _scalars(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **{k: v for k, v in values.items() if v is not None}}) + "\n")
        self.jsonl.flush()

    def train_step(self, step: int, loss: float, lr: float, grad_norm: Optional[float], step_time: float,
                   epoch: float, loss_scale: Optional[float] = None, skipped_steps: Optional[int] = None) -> None:
        self.steps_timed += 1
        self.time_in_steps += step_time
        rss = psutil.Process().memory_info().rss / 2**30
        self.peak_rss = max(self.peak_rss, rss)
        if not self.enabled:
            return
        tokens_per_s = self.tokens_per_step / step_time if step_time > 0 else 0.0
        values = {
            "train/loss": loss, "train/ppl": perplexity(loss), "opt/lr": lr, "opt/grad_norm": grad_norm,
            "perf/tokens_per_s": tokens_per_s, "perf/tokens_per_s_per_rank": tokens_per_s / self.world_size,
            "perf/samples_per_s": self.samples_per_step / step_time if step_time > 0 else 0.0,
            "perf/step_time_s": step_time, "mem/cpu_rss_gb": rss, "progress/epoch": epoch,
        }
        if self.peak:
            values["perf/mfu"] = tokens_per_s * self.flops_per_tok / (self.world_size * self.peak)
        if self.device == "cuda":
            values["mem/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            values["mem/gpu_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
        if self.fp16:
            values["fp16/loss_scale"], values["fp16/skipped_steps"] = loss_scale, skipped_steps
        self._scalars(step, values)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        elif step % self.log_every == 0 or step == self.total_steps:
            eta = self.eta_s(step)
            print(f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.3e} tok/s {tokens_per_s:,.0f} "
                  f"eta {eta:,.0f}s", flush=True)

    def evaluation_time(self, seconds: float) -> None:
        self.evals_timed += 1
        self.time_in_evals += seconds

    def eta_s(self, step: int) -> float:
        """Seconds to the end of the schedule: the steps left and the evaluations left (every eval_every-th step
        before the last, and the final one). Before the first evaluation is timed, an evaluation batch is
        costed as a third of a micro-batch's step (a forward without backward and optimizer)."""
        step_s = self.time_in_steps / max(self.steps_timed, 1)
        evals_left = 0
        if self.eval_every:  # multiples of eval_every after `step` and before the last step, plus the final one
            evals_left = max(0, (self.total_steps - 1) // self.eval_every - step // self.eval_every) + 1
        eval_s = (self.time_in_evals / self.evals_timed if self.evals_timed
                  else self.eval_batches * step_s / (3 * self.grad_accum))
        return (self.total_steps - step) * step_s + evals_left * eval_s

    def evaluation(self, step: int, val_loss: float) -> None:
        if not self.enabled:
            return
        self._scalars(step, {"val/loss": val_loss, "val/ppl": perplexity(val_loss)})
        message = f"eval step {step}: val loss {val_loss:.4f} ppl {perplexity(val_loss):.2f}"
        (self.bar.write if self.bar is not None else print)(message)

    def text(self, tag: str, body: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, f"```\n{body}\n```", 0)

    def hparams(self, hparams: dict, final_val_loss: Optional[float], step: int) -> None:
        """The hparams view's session, written by our one writer: SummaryWriter.add_hparams would open a second
        event file in a sub-run, and the HParams dashboard reads the metric from this run's scalars anyway."""
        if not (self.enabled and final_val_loss is not None):
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        metric = {"hparam/val_loss": final_val_loss}
        for summary in hparams_summaries(flat, metric):
            self.writer.file_writer.add_summary(summary, step)
        self.writer.add_scalar("hparam/val_loss", final_val_loss, step)

    def summary(self, run_dir: Path, extra: dict) -> dict:
        """End of run: JSON in the run directory and a short console block (rank 0)."""
        wall = time.time() - self.start_time
        tokens = self.steps_timed * self.tokens_per_step
        mean_tps = tokens / self.time_in_steps if self.time_in_steps else 0.0
        summary = {"wall_time_s": round(wall, 2), "steps_this_run": self.steps_timed, "tokens_this_run": tokens,
                   "mean_tokens_per_s": round(mean_tps, 1),
                   "mfu": mean_tps * self.flops_per_tok / (self.world_size * self.peak) if self.peak else None,
                   "peak_cpu_rss_gb": round(self.peak_rss, 3),
                   "peak_gpu_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None,
                   **extra}
        if not self.enabled:
            return summary
        if self.bar is not None:
            self.bar.close()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print("run summary:\n" + "\n".join(f"  {k}: {v}" for k, v in summary.items()), flush=True)
        return summary

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
