"""`--deepspeed_config=auto` for train and check: the planner (plan.py) picks the ZeRO stage and offload for this
run's model, batch, world size and device; rank 0 decides and every rank follows; a resume keeps the saved stage."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from forge_ds.errors import ForgeError
from forge_ds.metrics import DEVICES
from forge_ds.plan import hardware, make_plan


def choose_stage(cfg, world_size: int, device: str, gpu_name: Optional[str] = None,
                 memory_gb: Optional[float] = None) -> tuple[str, str, int]:
    """`--deepspeed_config=auto`: (shipped config name, one-line reason, the planner's micro-batch). Only the stage
    and offload are chosen; the run keeps its configured batch."""
    hw = hardware("cpu" if device == "cpu" else (gpu_name or "H100 SXM"), None, memory_gb, None, None, None)
    t = cfg.training
    gb = t.batch_size * t.gradient_accumulation_steps * world_size
    try:
        plan = make_plan(cfg, 1, world_size, hw, tokens=1, global_batch=gb, sweep=False)
    except ForgeError as e:
        raise ForgeError(str(e).replace("forge-ds plan: ", "--deepspeed_config=auto: ", 1)) from None
    return plan.best.stage, plan.reason, plan.micro_batch


def _this_device(device: str, world_size: int) -> tuple[str, float]:
    """(table key, memory GB per rank) of the device this process trains on."""
    if device == "cpu":
        import psutil

        return "cpu", psutil.virtual_memory().total / 1e9 / max(1, world_size)
    import torch

    name = torch.cuda.get_device_name()
    key = next((k for k, spec in DEVICES.items() if any(m in name for m in spec["match"])), "H100 SXM")
    return key, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9


def _saved_choice(opts, run_dir_of: Callable[[], Path]) -> Optional[str]:
    """On resume: the stage (and offload) the run was saved with, so `auto` never changes a run's layout."""
    import json

    from forge_ds import checkpoint, ds_config

    if not opts.resume:
        return None
    run_dir = run_dir_of()
    target = checkpoint.find_resume_target(run_dir, opts.resume)
    if target is None:  # nothing to resume yet: a fresh run, planned as one
        return None
    stage = checkpoint.read_state(target).zero_stage
    saved_ds = run_dir / "ds_config.json"
    offload = saved_ds.is_file() and ds_config.offloads_optimizer(json.loads(saved_ds.read_text()))
    return "zero3_offload" if stage == 3 and offload else f"zero{stage}"


def settle_auto(cfg, opts, world_size: int, env, device: str, run_dir_of: Callable[[], Path],
                start_group: bool) -> Optional[str]:
    """`--deepspeed_config=auto` for train and check: replace it in `opts` by the planner's choice and return the
    reason (printed before the start block); None when the config is not `auto`. Under launched ranks rank 0
    decides and broadcasts; a resume keeps the saved stage."""
    if opts.deepspeed_config != "auto":
        return None
    from forge_ds import distributed

    def decide() -> tuple[str, str]:
        saved = _saved_choice(opts, run_dir_of)
        if saved:
            return saved, f"deepspeed_config=auto: {saved}, the stage this run was saved with (resume keeps it)"
        key, memory_gb = _this_device(device, world_size)
        name, reason, micro = choose_stage(cfg, world_size, device, key, memory_gb)
        return name, (f"deepspeed_config=auto: {name}: {reason}; batch kept at {cfg.training.batch_size} per rank "
                      f"(the planner's micro-batch: {micro})")

    if start_group and env.world_size > 1:  # launched ranks: one decision, rank 0's
        distributed.init(device)
        name, line = distributed.on_main(decide)
    else:
        name, line = decide()
    opts.deepspeed_config = name
    return line
