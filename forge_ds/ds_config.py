"""Find, load and resolve DeepSpeed JSON configs.

The shipped configs in ds_configs/ say "auto" for everything the training config already decides (batch sizes,
clipping, optimizer hyper-parameters, precision). resolve_ds_config fills those from the training config so there is
one source of truth; an explicit value that disagrees is a user mistake (ForgeError), never silently overridden either
way. forge_ds owns the LR schedule and the TensorBoard writer, so DeepSpeed's own "scheduler"/"tensorboard" are refused.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from forge_ds.errors import ForgeError
from forge_ds.package import shipped_dir

CONFIG_DIR = shipped_dir("ds_configs")  # in the package when installed, at the repository root in a checkout

_PRECISIONS = ("fp32", "bf16", "fp16")
_ADAM_TYPES = ("adam", "adamw")  # DeepSpeed matches optimizer names case-insensitively


def shipped_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def find_ds_config(name_or_path: str) -> Path:
    """An existing file path wins; otherwise a shipped name, with or without ".json"."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = name_or_path if name_or_path.endswith(".json") else name_or_path + ".json"
    shipped = CONFIG_DIR / name
    # A bare name only: "sub/zero2" must not escape CONFIG_DIR.
    if Path(name).name == name and shipped.is_file():
        return shipped
    raise ForgeError(
        f"DeepSpeed config {name_or_path!r} is neither an existing file nor a shipped config; "
        f"use a path or one of: {', '.join(shipped_names())}"
    )


def load_ds_config(name_or_path: str) -> dict:
    path = find_ds_config(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ForgeError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the file") from None
    except OSError as e:
        raise ForgeError(f"{path}: cannot read DeepSpeed config ({e.strerror}); check the path") from None
    if not isinstance(data, dict):
        raise ForgeError(f"{path}: top level must be a JSON object, got {type(data).__name__}; wrap it in {{...}}")
    return data


def zero_stage(ds: dict) -> int:
    zero = ds.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def offloads_optimizer(ds: dict) -> bool:
    zero = ds.get("zero_optimization") or {}
    off = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    return isinstance(off, dict) and str(off.get("device", "none")).lower() not in ("none", "")


def _same(a, b) -> bool:
    # Floats from JSON (e.g. 3e-4) and from the CLI may differ in the last bit; ints/bools compare exactly.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return False


def _fill(section: dict, key: str, value, *, where: str, field: str, flag: str, source: str, shown=None) -> None:
    """Missing or "auto" -> value; an explicit equal value is kept; anything else is a contradiction."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif not _same(current, value):
        raise ForgeError(
            f"{source}: {where}={json.dumps(current)} contradicts {field}={shown or json.dumps(value)}; "
            f'set it to "auto" or change {flag}'
        )


def _section(ds: dict, key: str, source: str) -> dict:
    sec = ds.setdefault(key, {})
    if not isinstance(sec, dict):
        raise ForgeError(f"{source}: '{key}' must be a JSON object, got {json.dumps(sec)}; fix the file")
    return sec


def resolve_ds_config(ds: dict, *, micro_batch: int, grad_accum: int, world_size: int, max_grad_norm: float,
                      lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                      precision: str, device: str, source: str = "<ds config>") -> dict:
    ds = copy.deepcopy(ds)  # the caller's dict stays as loaded (it is logged/saved verbatim)
    if precision not in _PRECISIONS:
        raise ForgeError(f"training.precision={precision!r} is not one of {', '.join(_PRECISIONS)}; "
                         "fix --training.precision")

    # Things forge_ds does itself: two LR schedules or two SummaryWriters would fight each other.
    if "scheduler" in ds:
        raise ForgeError("forge_ds sets the LR schedule from the training config (warm-up + cosine); "
                         f"remove 'scheduler' from {source}")
    tb = ds.get("tensorboard")
    if isinstance(tb, dict) and tb.get("enabled") is True:
        raise ForgeError(f"{source}: tensorboard.enabled=true but forge_ds writes TensorBoard itself; "
                         "remove 'tensorboard' and use --tensorboard_dir")

    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ForgeError(f"{source}: zero_optimization.stage={json.dumps(stage)} is not a ZeRO stage; use 0, 1, 2 or 3")

    # Batch geometry and clipping. Missing keys count as "auto" so DeepSpeed never derives them on its own.
    common = dict(source=source)
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, where="train_micro_batch_size_per_gpu",
          field="training.batch_size", flag="--training.batch_size", **common)
    _fill(ds, "gradient_accumulation_steps", grad_accum, where="gradient_accumulation_steps",
          field="training.gradient_accumulation_steps", flag="--training.gradient_accumulation_steps", **common)
    _fill(ds, "train_batch_size", micro_batch * grad_accum * world_size, where="train_batch_size",
          field=f"training.batch_size*training.gradient_accumulation_steps*world_size({micro_batch}*{grad_accum}*{world_size})",
          flag="--training.batch_size/--training.gradient_accumulation_steps", **common)
    clip_auto = ds.get("gradient_clipping", "auto") == "auto"
    _fill(ds, "gradient_clipping", max_grad_norm, where="gradient_clipping",
          field="training.max_grad_norm", flag="--training.max_grad_norm", **common)

    # Optimizer. No section means the caller hands its own optimizer to deepspeed.initialize.
    if "optimizer" in ds:
        opt = _section(ds, "optimizer", source)
        if str(opt.get("type", "")).lower() not in _ADAM_TYPES:
            raise ForgeError(f"{source}: optimizer.type={json.dumps(opt.get('type'))} is not supported; "
                             'use "AdamW" or "Adam" (or remove the optimizer section)')
        params = _section(opt, "params", source)
        _fill(params, "lr", lr, where="optimizer.params.lr", field="training.learning_rate", flag="--training.learning_rate", **common)
        _fill(params, "weight_decay", weight_decay, where="optimizer.params.weight_decay",
              field="training.weight_decay", flag="--training.weight_decay", **common)
        # betas/eps have no training-config knob beyond the defaults, so an explicit value in the JSON is kept.
        if params.get("betas", "auto") == "auto":
            params["betas"] = list(betas)
        if params.get("eps", "auto") == "auto":
            params["eps"] = eps
        if params.get("torch_adam", "auto") == "auto":
            # FusedAdam needs CUDA; on CPU torch's AdamW is the fast path. With optimizer offload DeepSpeed must
            # pick DeepSpeedCPUAdam, which torch_adam=True would override.
            params["torch_adam"] = device == "cpu" and not offloads_optimizer(ds)

    # Precision: "auto", a missing "enabled" or a missing section all follow training.precision.
    bf16_key = "bfloat16" if "bfloat16" in ds and "bf16" not in ds else "bf16"  # DeepSpeed's legacy alias
    secs = {"bf16": _section(ds, bf16_key, source), "fp16": _section(ds, "fp16", source)}
    if secs["bf16"].get("enabled") is True and secs["fp16"].get("enabled") is True:
        raise ForgeError(f"{source}: {bf16_key}.enabled and fp16.enabled are both true; "
                         'set both to "auto" and pick one with --training.precision')
    # Checked before the contradiction test so an fp16 request on CPU always gets the actionable message.
    if device == "cpu" and (precision == "fp16" or secs["fp16"].get("enabled") is True):
        raise ForgeError("fp16 is not supported on CPU (DeepSpeed: 'Type fp16 is not supported on your device'); "
                         "use --training.precision=bf16 or fp32")
    autocast = _torch_autocast(ds, precision, source)
    if stage == 0 and (precision == "fp32" or autocast) and clip_auto:
        # ZeRO-0 without DeepSpeed's low-precision weights steps torch's AdamW unwrapped; DeepSpeed would clip per
        # tensor there (runtime/utils.clip_grad_norm_) and forge_ds compute the norm for the log again. The loop
        # clips instead, once, with torch's foreach clip_grad_norm_, which returns that norm (engine.Stepper).
        # Only "auto" moves: an explicit gradient_clipping in the JSON is DeepSpeed's to apply.
        ds["gradient_clipping"] = 0.0
    for name, sec in secs.items():
        key = bf16_key if name == "bf16" else name
        # Under torch_autocast the weights stay fp32: DeepSpeed's bf16/fp16 weights and their wrapper stay off.
        _fill(sec, "enabled", precision == name and not autocast, where=f"{key}.enabled",
              field="training.precision" + (" under torch_autocast" if autocast else ""),
              shown=precision, flag="--training.precision", **common)
    # bf16 has no loss scale to back off, and the loop stops on a non-finite loss or gradient norm by itself, so
    # DeepSpeed's per-gradient inf/NaN scan (on by default) only costs: ~6 small kernels per parameter tensor and
    # a host sync every step; on an H100 that was ~16 ms of host time per GPT-2-small step (docs/PERFORMANCE.md).
    if secs["bf16"].get("check_grad_overflow", "auto") == "auto":
        secs["bf16"]["check_grad_overflow"] = False

    # DeepSpeed's throughput timer (on unless configured) synchronizes the device at every forward() and step()
    # (deepspeed/utils/timer.py ThroughputTimer.start/stop, `if self.config.synchronized`), twice a micro-batch, to
    # print a samples/s forge_ds never shows (steps_per_print is off). A config that asks for it keeps it.
    timers = _section(ds, "timers", source)
    if "throughput" not in timers:
        timers["throughput"] = {"enabled": False}
    _check_deepcompile(ds, device, source)

    # Both serve the gradient reduction across ranks: overlap_comm overlaps it with backward, contiguous_gradients
    # copies every gradient into the reduction bucket as it is made (one copy and one Python hook per parameter
    # tensor). Alone there is nothing to reduce, and both are pure host cost (benchmarks/host_overhead.py).
    for key in ("overlap_comm", "contiguous_gradients"):
        if isinstance(zero, dict) and zero.get(key) == "auto":
            zero[key] = world_size > 1
    return ds


def deepcompile(ds: dict) -> bool:
    comp = ds.get("compile")
    return isinstance(comp, dict) and comp.get("deepcompile") is True


def _check_deepcompile(ds: dict, device: str, source: str) -> None:
    """DeepCompile (DeepSpeed's compiled ZeRO passes) builds on CUDA kernels and streams; on CPU it fails deep
    inside engine.compile(). Opt-in and experimental, so only the request is checked, not the stage."""
    if deepcompile(ds):
        if device != "cuda":
            raise ForgeError(f'{source}: compile.deepcompile=true needs a CUDA GPU (this run is on {device}); '
                             'remove the "compile" section or run on a GPU')


def _torch_autocast(ds: dict, precision: str, source: str) -> bool:
    """DeepSpeed's torch_autocast section: fp32 weights, torch.autocast around forward, the optimizer unwrapped.
    "enabled" and "dtype" follow training.precision ("auto"); fp32 has nothing to autocast to."""
    sec = ds.get("torch_autocast")
    if not isinstance(sec, dict):
        return False
    if sec.get("enabled") == "auto":  # on wherever there is a lower precision to cast to
        sec["enabled"] = precision != "fp32"
    if sec.get("enabled") is not True:
        if sec.get("dtype") == "auto":
            del sec["dtype"]  # DeepSpeed parses the dtype even of a section that is off
        return False
    if precision == "fp32":
        raise ForgeError(f"{source}: torch_autocast.enabled=true but training.precision=fp32; use "
                         "--training.precision=bf16 (or fp16) or remove the torch_autocast section")
    names = {"bf16": ("bfloat16", "bf16"), "fp16": ("float16", "fp16", "half")}[precision]
    dtype = sec.get("dtype", "auto")
    if dtype == "auto":
        sec["dtype"] = names[0]
    elif dtype not in names:
        raise ForgeError(f"{source}: torch_autocast.dtype={json.dumps(dtype)} contradicts "
                         f'training.precision={precision}; set it to "auto" or change --training.precision')
    return True
