"""The DeepSpeed engine and one optimizer step on it: build the model and engine, run the accumulation
micro-batches, and read back what the loop logs (gradient norm, fp16 loss scale) and the health checks it needs.

What DeepSpeed does not give us lives here, so the loop stays a loop: ZeRO-0 in fp32 steps torch's own AdamW,
which keeps no gradient norm; fp16 skips overflowing steps, where a long streak of them is divergence; dropout is
re-seeded per (step, slot) so a resumed run draws the uninterrupted run's masks.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch

from forge_ds import data, distributed, ds_config, faults
from forge_ds.config import Config
from forge_ds.errors import TrainingDiverged
from forge_ds.model import SharedTrainingModel, initialize, optimizer_groups


def build_model(cfg: Config, init_state: Optional[dict]) -> SharedTrainingModel:
    """The Phase-1 model, initialised by the recipe, then overwritten by `init_state` (an --init_from export)."""
    m = cfg.model
    model = SharedTrainingModel(m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.d_ff, m.max_seq_len, m.dropout,
                                activation_checkpointing=cfg.training.activation_checkpointing)
    initialize(model, cfg.training.recipe, cfg.training.seed)
    if init_state is not None:
        model.shared.load_state_dict(init_state, strict=True)
    return model


def lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up from 0, then cosine to 0 at the last step (the contract's schedule)."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))))
    return f


def build_engine(cfg: Config, model: SharedTrainingModel, ds: dict, total_steps: int):
    import deepspeed

    t = cfg.training
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=optimizer_groups(model, t.recipe, t.weight_decay), config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, t.warmup_steps)))
    if ds_config.zero_stage(ds) == 0 and distributed.world_size() == 1:
        # Alone there is nothing to all-reduce, but DeepSpeed's ZeRO-0 backward still copies every gradient into
        # a flat bucket, divides it by 1 and copies it back (engine.buffered_allreduce_fallback): ~4 ops and a
        # dozen Python calls per parameter tensor, every step. Skipping it is exact.
        engine.enable_backward_allreduce = False
    # DeepCompile (opt-in: "compile": {"deepcompile": true}, CUDA only) takes effect through engine.compile() alone.
    if t.compile or ds_config.deepcompile(ds):
        engine.compile()
    return engine


def dropout_seed(seed: int, step: int, slot: int) -> int:
    """Re-seeding per (step, micro-batch slot) makes a resumed run draw the uninterrupted run's masks. The slot is
    the micro-batch's place in the global batch (micro * world_size + rank, the sampler's order), not the rank:
    the same samples get the same masks at any world size, so a resume on another number of ranks continues
    the uninterrupted run's dropout too (given the same per-rank batch_size)."""
    return (seed * 1_000_003 + step * 7_919 + slot * 104_729) % (2**63)


def seed_dropout(seed: int, device: str) -> None:
    """Seed only the generator the forward draws dropout from. torch.manual_seed would also queue a seeding, with
    a formatted stack trace, for every accelerator type not initialised in this process (XPU, MTIA, and CUDA on a
    CPU run): about a millisecond of host time per micro-batch."""
    if device.startswith("cuda"):
        torch.cuda.manual_seed(seed)
    torch.default_generator.manual_seed(seed)


def grad_norm_of(module: torch.nn.Module, clip_to: float = 0.0) -> Optional[torch.Tensor]:
    """Global L2 norm of the gradients held in `module` (ZeRO-0: every rank holds the full, averaged gradients),
    before clipping them to `clip_to` (0: no clipping). Left on the device: the loop reads it with the loss, in
    the step's one host read."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return None
    if clip_to > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip_to, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


class Stepper:
    """One optimizer step over `grad_accum` micro-batches, and what the loop reads after it."""

    def __init__(self, engine, cfg: Config, precision: str, zero_stage: int, rank: int, world_size: int,
                 device: str):
        self.engine, self.precision, self.device = engine, precision, device
        self.seed, self.grad_accum = cfg.training.seed, cfg.training.gradient_accumulation_steps
        self.max_skipped_steps = cfg.training.max_skipped_steps
        self.rank, self.world_size = rank, world_size
        # ZeRO-0 without DeepSpeed's low-precision weights (fp32, or torch_autocast) steps torch's own AdamW,
        # unwrapped, which keeps no gradient norm (get_global_grad_norm() is None).
        self.own_grad_norm = zero_stage == 0 and getattr(engine, "optimizer", None) is getattr(
            engine, "basic_optimizer", False)
        # There DeepSpeed's clipping is off unless the JSON set it (ds_config.resolve_ds_config): the loop clips,
        # with torch's foreach clip_grad_norm_, which also returns the pre-clip norm the log shows.
        self.clip_to = (cfg.training.max_grad_norm if self.own_grad_norm and engine.gradient_clipping() == 0
                        else 0.0)
        self.pre_clip_norm: Optional[torch.Tensor] = None
        nan_at = faults.value("nan_at_step")  # tests: poison one step's loss
        self.nan_at = int(nan_at) if nan_at is not None else None
        self.overflow_run = 0

    def step(self, batches: Iterator, step: int) -> torch.Tensor:
        """Forward/backward over the micro-batches of step `step` + 1; DeepSpeed steps at the boundary. Returns this
        rank's mean loss as a device tensor: reading it per micro-batch (`loss.item()`) would make the host wait for
        the device GA times a step; `read` reads it once, after the step is queued."""
        engine, loss_sum, skipped_before = self.engine, None, self.skipped_steps()
        for micro in range(self.grad_accum):
            seed_dropout(dropout_seed(self.seed, step, micro * self.world_size + self.rank), self.device)
            x, y = data.to_device(next(batches), self.device)
            loss = engine(x, y)
            faults.point("train_step", step=step + 1)  # tests: a rank dies or hangs mid-step
            if self.nan_at == step + 1:
                loss = loss * float("nan")
            engine.backward(loss)
            if self.own_grad_norm and micro == self.grad_accum - 1:
                # all-reduced by backward(), not yet clipped
                self.pre_clip_norm = grad_norm_of(engine.module, self.clip_to)
            engine.step()
            # float64, as the Python float it replaces: the logged and saved loss keeps its digits
            loss_sum = loss.detach().double() if loss_sum is None else loss_sum.add_(loss.detach())
        self.overflow_run = self.overflow_run + 1 if self.skipped_steps() > skipped_before else 0
        return loss_sum.div_(self.grad_accum) if self.grad_accum > 1 else loss_sum

    def read(self, local_loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool, Optional[float]]:
        """The step's one host read: (mean loss over ranks, whether any rank was asked to stop, gradient norm).
        Loss and stop flag travel in one all-reduce; the norm (the same on every rank) joins them for the read."""
        if self.world_size > 1:
            summed = distributed.all_reduce_tensor(
                torch.stack([local_loss, local_loss.new_tensor(float(stop_requested))]))
        else:  # alone: nothing to agree on, and every op here is a launch on a GPU
            summed = local_loss.reshape(1)
        norm = self.engine.get_global_grad_norm()
        norm = self.pre_clip_norm if norm is None else norm
        if isinstance(norm, torch.Tensor):
            values = torch.cat([summed, norm.detach().reshape(1).to(summed)]).tolist()
            norm = values.pop()
        else:
            values = summed.tolist()
        total, stop = values[0], values[1] > 0 if self.world_size > 1 else stop_requested
        return total / self.world_size, stop, None if norm is None else float(norm)

    def check_health(self, step: int, train_loss: float, grad_norm: Optional[float],
                     last_good: Callable[[], str]) -> None:
        """TrainingDiverged on a non-finite loss or norm, or (fp16) on too long a streak of overflow-skipped steps:
        now and then a skip is normal, many in a row is divergence."""
        if not math.isfinite(train_loss) or (grad_norm is not None and not math.isfinite(grad_norm)
                                             and self.precision != "fp16"):
            raise TrainingDiverged(f"non-finite {'loss' if not math.isfinite(train_loss) else 'gradient norm'} at "
                                   f"step {step}; {last_good()}")
        if self.overflow_run > self.max_skipped_steps:
            raise TrainingDiverged(f"fp16: {self.overflow_run} steps in a row skipped for gradient overflow, the "
                                   f"last at step {step} (training.max_skipped_steps={self.max_skipped_steps}); "
                                   f"{last_good()}")

    def skipped_steps(self) -> Optional[int]:
        return getattr(self.engine, "skipped_steps", 0)

    def loss_scale(self) -> Optional[float]:
        # ZeRO-1/2/3 optimizers expose both names; ZeRO-0's FP16_Optimizer only `loss_scale` (DeepSpeed 0.19.8).
        optimizer = getattr(self.engine, "optimizer", None)
        scale = getattr(optimizer, "loss_scale", None)
        scale = scale if isinstance(scale, (int, float, torch.Tensor)) else getattr(optimizer, "cur_scale", None)
        return float(scale) if scale is not None else None
