"""forge_ds.ds_config: shipped configs resolve to something DeepSpeed itself accepts, and user mistakes are ForgeErrors."""

import copy
import json

import pytest

from forge_ds.ds_config import (
    CONFIG_DIR,
    find_ds_config,
    load_ds_config,
    offloads_optimizer,
    resolve_ds_config,
    zero_stage,
)
from forge_ds.errors import ForgeError

SHIPPED = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
TRAIN = dict(micro_batch=4, grad_accum=3, world_size=2, max_grad_norm=1.0, lr=3e-4, weight_decay=0.1,
             precision="bf16", device="cpu", source="ds_configs/x.json")


def resolve(ds, **over):
    return resolve_ds_config(ds, **{**TRAIN, **over})


def base():
    return load_ds_config("zero2")


def _has_auto(obj):
    if isinstance(obj, dict):
        return any(_has_auto(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_auto(v) for v in obj)
    return obj == "auto"


class _DataParallel2:
    """Stands in for an mpu so DeepSpeedConfig checks train_batch_size against a world size of 2."""

    def get_data_parallel_world_size(self):
        return 2


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shipped_configs_parse_with_deepspeed(name, precision, monkeypatch):
    from deepspeed.runtime import config as ds_cfg
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = load_ds_config(name)
    assert "scheduler" not in raw and "tensorboard" not in raw
    resolved = resolve(raw, precision=precision)
    assert not _has_auto(resolved)
    assert _has_auto(raw), "resolve must not mutate its input"
    # DeepSpeedConfig takes the world size from the mpu only once dist.get_rank() works; without a process group
    # it silently falls back to world size 1. Faking get_rank is enough to exercise world_size=2.
    monkeypatch.setattr(ds_cfg.dist, "get_rank", lambda group=None: 0)
    parsed = DeepSpeedConfig(resolved, mpu=_DataParallel2())
    assert parsed.world_size == 2
    assert parsed.zero_optimization_stage == zero_stage(raw) == int(name[4])
    assert parsed.train_micro_batch_size_per_gpu == 4
    assert parsed.gradient_accumulation_steps == 3
    assert parsed.train_batch_size == 4 * 3 * 2
    assert parsed.bfloat16_config.enabled is (precision == "bf16")
    assert parsed.float16_config.enabled is False
    # ZeRO-0 without bf16 weights steps torch's AdamW unwrapped: the loop clips there, DeepSpeed does not
    assert parsed.gradient_clipping == (0.0 if name == "zero0" and precision == "fp32" else 1.0)
    assert parsed.optimizer_name == "adamw"
    assert parsed.optimizer_params["lr"] == 3e-4
    if name == "zero3_offload":
        assert parsed.zero_config.offload_optimizer.device == "cpu"
        assert parsed.zero_config.offload_param.device == "cpu"
        assert parsed.zero_config.offload_optimizer.pin_memory is True


def test_auto_values_filled():
    out = resolve(base(), precision="fp32", betas=(0.8, 0.95), eps=1e-6)
    assert out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 3
    assert out["train_batch_size"] == 24
    assert out["gradient_clipping"] == 1.0
    p = out["optimizer"]["params"]
    assert p == {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1, "torch_adam": True}
    assert out["bf16"]["enabled"] is False and out["fp16"]["enabled"] is False
    assert resolve(base(), precision="bf16")["bf16"]["enabled"] is True


def test_torch_adam_choice():
    assert resolve(base(), device="cpu")["optimizer"]["params"]["torch_adam"] is True
    assert resolve(base(), device="cuda")["optimizer"]["params"]["torch_adam"] is False
    off = load_ds_config("zero3_offload")
    assert offloads_optimizer(off) and not offloads_optimizer(base())
    assert resolve(off, device="cpu")["optimizer"]["params"]["torch_adam"] is False


@pytest.mark.parametrize("name,key", [("zero1", "overlap_comm"), ("zero2", "overlap_comm"), ("zero3", "overlap_comm"),
                                      ("zero1", "contiguous_gradients"), ("zero2", "contiguous_gradients")])
def test_reduction_helpers_only_with_ranks_to_reduce_across(name, key):
    assert resolve(load_ds_config(name), world_size=2)["zero_optimization"][key] is True
    assert resolve(load_ds_config(name), world_size=1, micro_batch=4, grad_accum=3)["zero_optimization"][
        key] is False
    explicit = load_ds_config(name)
    explicit["zero_optimization"][key] = True  # a user's explicit choice is kept
    assert resolve(explicit, world_size=1)["zero_optimization"][key] is True


def test_bf16_gradient_scan_off_unless_asked_for():
    """The loop itself stops on a non-finite loss or gradient norm; DeepSpeed's per-gradient scan is only cost."""
    assert resolve(base())["bf16"]["check_grad_overflow"] is False
    asked = base()
    asked["bf16"]["check_grad_overflow"] = True
    assert resolve(asked)["bf16"]["check_grad_overflow"] is True


def test_missing_precision_sections_added():
    ds = base()
    del ds["bf16"], ds["fp16"]
    out = resolve(ds, precision="bf16")
    assert out["bf16"] == {"enabled": True, "check_grad_overflow": False} and out["fp16"] == {"enabled": False}
    assert resolve(ds, precision="fp16", device="cuda")["fp16"] == {"enabled": True}


def test_explicit_matching_values_accepted():
    ds = base()
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=3, train_batch_size=24,
              gradient_clipping=1.0, bf16={"enabled": True}, fp16={"enabled": False})
    ds["optimizer"]["params"].update(lr=3e-4, weight_decay=0.1, betas=[0.5, 0.6], torch_adam=False)
    out = resolve(ds)
    assert out["train_batch_size"] == 24 and out["bf16"]["enabled"] is True
    assert out["optimizer"]["params"]["betas"] == [0.5, 0.6]  # explicit betas are kept
    assert out["optimizer"]["params"]["torch_adam"] is False  # explicit torch_adam is kept


@pytest.mark.parametrize("mutate, key, field", [
    (lambda d: d.update(train_micro_batch_size_per_gpu=8), "train_micro_batch_size_per_gpu", "training.batch_size"),
    (lambda d: d.update(gradient_accumulation_steps=1), "gradient_accumulation_steps", "training.gradient_accumulation_steps"),
    (lambda d: d.update(train_batch_size=12), "train_batch_size", "training.batch_size"),
    (lambda d: d.update(gradient_clipping=0.5), "gradient_clipping", "training.max_grad_norm"),
    (lambda d: d["optimizer"]["params"].update(lr=1e-3), "optimizer.params.lr", "training.learning_rate"),
    (lambda d: d["optimizer"]["params"].update(weight_decay=0.0), "optimizer.params.weight_decay",
     "training.weight_decay"),
    (lambda d: d["bf16"].update(enabled=False), "bf16.enabled", "training.precision"),
])
def test_contradictions_rejected(mutate, key, field):
    ds = base()
    mutate(ds)
    with pytest.raises(ForgeError) as e:
        resolve(ds)
    msg = str(e.value)
    assert key in msg and field in msg and "ds_configs/x.json" in msg and '"auto"' in msg
    assert "\n" not in msg


def test_bf16_enabled_with_fp32_precision_rejected():
    ds = base()
    ds["bf16"]["enabled"] = True
    with pytest.raises(ForgeError, match=r"bf16\.enabled=true contradicts training\.precision=fp32"):
        resolve(ds, precision="fp32")


def test_both_half_precisions_rejected():
    ds = base()
    ds["bf16"]["enabled"] = ds["fp16"]["enabled"] = True
    with pytest.raises(ForgeError, match="both true"):
        resolve(ds, device="cuda")


@pytest.mark.parametrize("stage", [7, -1, "2"])
def test_bad_zero_stage_rejected(stage):
    ds = base()
    ds["zero_optimization"]["stage"] = stage
    with pytest.raises(ForgeError, match="zero_optimization.stage"):
        resolve(ds)


def test_fp16_on_cpu_rejected():
    with pytest.raises(ForgeError, match="fp16 is not supported on CPU .*--training.precision=bf16 or fp32"):
        resolve(base(), precision="fp16", device="cpu")
    ds = base()
    ds["fp16"]["enabled"] = True
    with pytest.raises(ForgeError, match="fp16 is not supported on CPU"):
        resolve(ds, precision="fp32", device="cpu")


def test_scheduler_rejected():
    ds = base()
    ds["scheduler"] = {"type": "WarmupLR", "params": {}}
    with pytest.raises(ForgeError, match="remove 'scheduler' from ds_configs/x.json"):
        resolve(ds)


def test_tensorboard_and_other_optimizers_rejected():
    ds = base()
    ds["tensorboard"] = {"enabled": True, "output_path": "tb"}
    with pytest.raises(ForgeError, match="--tensorboard_dir"):
        resolve(ds)
    ds["tensorboard"]["enabled"] = False
    resolve(ds)  # a disabled section is harmless
    ds["optimizer"]["type"] = "Lamb"
    with pytest.raises(ForgeError, match="optimizer.type"):
        resolve(ds)


def test_resolve_does_not_mutate_input():
    ds = base()
    before = copy.deepcopy(ds)
    resolve(ds)
    assert ds == before


def test_malformed_json(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{\n  "train_batch_size": "auto",\n  "bf16": {"enabled": true,}\n}\n')
    with pytest.raises(ForgeError) as e:
        load_ds_config(str(bad))
    assert f"{bad}:3:" in str(e.value)


def test_missing_name_lists_shipped():
    with pytest.raises(ForgeError) as e:
        find_ds_config("zero9")
    for name in SHIPPED:
        assert name in str(e.value)


def test_find_shipped_and_paths(tmp_path):
    assert find_ds_config("zero3") == CONFIG_DIR / "zero3.json"
    assert find_ds_config("zero3.json") == CONFIG_DIR / "zero3.json"
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"train_batch_size": "auto"}))
    assert find_ds_config(str(own)) == own
    assert load_ds_config(str(own)) == {"train_batch_size": "auto"}


@pytest.mark.parametrize("given, wanted", [
    (None, None), ("9.0", None), ("7.5 8.0+PTX", None),
    ("9.0a", "9.0"), ("8.0;9.0a;10.0f+PTX", "8.0;9.0;10.0+PTX"), ("9.0 9.0a", "9.0")])
def test_arch_list_made_parseable_for_deepspeed_op_builds(given, wanted):
    """Hopper/Blackwell images set TORCH_CUDA_ARCH_LIST=9.0a; DeepSpeed 0.19.8's JIT builder (FusedAdam, the first
    GPU step) dies parsing it, so launch_env.set_cuda_arch_list rewrites it to the plain architecture."""
    from forge_ds.launch_env import deepspeed_safe_arch_list

    update = deepspeed_safe_arch_list(given)
    assert update == ({"TORCH_CUDA_ARCH_LIST": wanted} if wanted else {})
    for cc in filter(None, (update.get("TORCH_CUDA_ARCH_LIST") or given or "").replace(" ", ";").split(";")):
        tuple(int(part.split("+")[0]) for part in cc.split("."))  # DeepSpeed 0.19.8's parse, on what it will see


def test_throughput_timer_sync_off_unless_asked_for():
    """DeepSpeed's throughput timer synchronizes the device at every forward() and step(); forge_ds never prints
    its samples/s. A config that configures it keeps its choice."""
    from deepspeed.runtime.config import DeepSpeedConfig

    out = resolve(base(), world_size=1, micro_batch=4, grad_accum=3)
    assert out["timers"] == {"throughput": {"enabled": False}}
    assert DeepSpeedConfig(out).timers_config.enabled is False
    asked = base()
    asked["timers"] = {"throughput": {"enabled": True, "synchronized": True}}
    assert resolve(asked)["timers"]["throughput"] == {"enabled": True, "synchronized": True}


def test_deepcompile_needs_cuda():
    ds = base()
    ds["compile"] = {"deepcompile": True}
    with pytest.raises(ForgeError, match="compile.deepcompile=true needs a CUDA GPU"):
        resolve(ds, device="cpu")
    assert resolve(ds, device="cuda")["compile"] == {"deepcompile": True}


def test_torch_autocast_keeps_fp32_weights_and_follows_precision():
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = load_ds_config("zero0")
    ds["torch_autocast"] = {"enabled": True, "dtype": "auto"}
    out = resolve(ds, world_size=1, micro_batch=4, grad_accum=3, precision="bf16")
    assert out["torch_autocast"]["dtype"] == "bfloat16"
    assert out["bf16"]["enabled"] is False and out["fp16"]["enabled"] is False  # no DeepSpeed bf16 weights
    parsed = DeepSpeedConfig(out)
    assert parsed.torch_autocast_enabled and not parsed.bfloat16_config.enabled
    with pytest.raises(ForgeError, match="torch_autocast.enabled=true but training.precision=fp32"):
        resolve(ds, precision="fp32")
    ds["torch_autocast"]["dtype"] = "float16"
    with pytest.raises(ForgeError, match="torch_autocast.dtype=\"float16\" contradicts training.precision=bf16"):
        resolve(ds)
    ds["torch_autocast"]["dtype"] = "bfloat16"
    ds["bf16"]["enabled"] = True
    with pytest.raises(ForgeError, match="bf16.enabled=true contradicts training.precision under torch_autocast"):
        resolve(ds)


def test_shipped_autocast_config_follows_precision():
    from deepspeed.runtime.config import DeepSpeedConfig

    bf16 = resolve(load_ds_config("zero0_autocast"), world_size=1, micro_batch=4, grad_accum=3)
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and bf16["bf16"]["enabled"] is False
    assert DeepSpeedConfig(bf16).torch_autocast_enabled
    fp32 = resolve(load_ds_config("zero0_autocast"), world_size=1, micro_batch=4, grad_accum=3, precision="fp32")
    assert fp32["torch_autocast"]["enabled"] is False and not DeepSpeedConfig(fp32).torch_autocast_enabled


def test_forge_ds_clips_at_zero0_without_a_wrapper_and_never_twice():
    """torch's foreach clip_grad_norm_ (the loop's) instead of DeepSpeed's per-tensor one where the optimizer is
    unwrapped; DeepSpeed clips everywhere else, and whenever the JSON says so explicitly."""
    import torch

    from forge_ds.engine import grad_norm_of

    z0 = dict(world_size=1, micro_batch=4, grad_accum=3)
    assert resolve(load_ds_config("zero0"), precision="fp32", **z0)["gradient_clipping"] == 0.0
    assert resolve(load_ds_config("zero0_autocast"), **z0)["gradient_clipping"] == 0.0
    assert resolve(load_ds_config("zero0"), precision="bf16", **z0)["gradient_clipping"] == 1.0  # FP16_Optimizer
    assert resolve(base(), precision="fp32")["gradient_clipping"] == 1.0
    explicit = load_ds_config("zero0")
    explicit["gradient_clipping"] = 1.0
    assert resolve(explicit, precision="fp32", **z0)["gradient_clipping"] == 1.0
    # the same clipped gradients and norm as DeepSpeed's path
    torch.manual_seed(0)
    ours, theirs = (torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 8)
    for model in (ours, theirs):
        model(x).pow(2).sum().mul(100).backward()
    norm = grad_norm_of(ours, clip_to=1.0)
    # deepspeed.runtime.utils.clip_grad_norm_ (which needs a process group), written out: per-tensor norms,
    # their L2 total, then grads *= max_norm / (total + 1e-6) when that is below 1
    reference = float(sum(p.grad.float().norm() ** 2 for p in theirs.parameters()) ** 0.5)
    for p in theirs.parameters():
        p.grad.mul_(1.0 / (reference + 1e-6))
    assert norm.item() > 1.0 and abs(norm.item() - reference) < 1e-4 * reference
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
