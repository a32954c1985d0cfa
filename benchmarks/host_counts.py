"""The deterministic half of benchmarks/host_overhead.py: what one optimizer step asks of the host, counted rather
than timed (a shared 2-core machine times ±20% a round; these counts do not move).

- ATen ops dispatched (each one a kernel launch on a GPU), from torch.profiler;
- Python `call` events (sys.setprofile), split by the package of the called function;
- calls that would make the host wait for a GPU, counted by wrapping them, split by who called them (the first
  frame outside torch): `.item()`, `.cpu()`, `.tolist()`, `.numpy()`, `float()/int()/bool()` of a tensor,
  `torch.cuda.synchronize` / DeepSpeed's accelerator `synchronize()`, and DeepSpeed's timers that synchronize
  (ThroughputTimer with `synchronized`, SynchronizedWallClockTimer). On a CPU every tensor is on the host, so a
  `.cpu()` of a tensor that lives on the CPU on a GPU too is counted as well: the figure is an upper bound.
"""

from __future__ import annotations

import collections
import sys
from contextlib import contextmanager
from typing import Callable

# Reads of tensors that live on the host on a GPU run too (the sampler's permutation, the DataLoader's seed):
# counted, but under their own name, not as a device sync.
HOST_DATA_SITES = {"data.py:step_indices", "dataloader.py:__init__"}
_WRAPPED_TENSOR_METHODS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")


def package_of(filename: str) -> str:
    """forge_ds model (model.py, which the plain loop runs too) / forge_ds (the harness) / deepspeed / torch /
    loop (the plain loop in benchmarks/bench.py) / other."""
    if filename.endswith("/forge_ds/model.py"):
        return "forge_ds model"
    if "/forge_ds/" in filename:
        return "forge_ds"
    if "/deepspeed/" in filename:
        return "deepspeed"
    if "/torch/" in filename or "/torch_" in filename:
        return "torch"
    if filename.endswith("/bench.py"):
        return "loop"
    return "other"


def _caller() -> tuple[str, str]:
    """Whose code asked: (package, file:line) of the frame that made the call (torch's own, such as the
    single-tensor AdamW reading its step counter, count as torch's)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None:
        return "other", "?"
    name, function = frame.f_code.co_filename, frame.f_code.co_name
    site = f"{name.rsplit('/', 1)[-1]}:{function}"
    return ("host data" if site in HOST_DATA_SITES else package_of(name)), f"{site}:{frame.f_lineno}"


@contextmanager
def count_syncs(counts: collections.Counter):
    """While active, every would-be sync adds 1 to counts[(caller package, caller file:line, what)]."""
    import torch
    from deepspeed.accelerator import get_accelerator

    patched: list[tuple[object, str, object]] = []

    def wrap(owner, attr: str, label: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
        original = getattr(owner, attr)  # bound for an instance (the accelerator), plain for a class or module

        def counted(*args, **kwargs):
            if when(*args, **kwargs):
                counts[(*_caller(), label)] += 1
            return original(*args, **kwargs)

        patched.append((owner, attr, owner.__dict__.get(attr, None)))
        setattr(owner, attr, counted)

    for attr in _WRAPPED_TENSOR_METHODS:
        # bool() of a tensor with more than one element raises, it does not sync: count the one-element case only
        wrap(torch.Tensor, attr, f".{attr}()" if not attr.startswith("__") else f"{attr.strip('_')}(tensor)",
             when=(lambda t, *a, **k: t.numel() == 1) if attr == "__bool__" else (lambda *a, **k: True))
    wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
    accelerator = get_accelerator()
    wrap(accelerator, "synchronize", "accelerator.synchronize")
    # DeepSpeed's timers (ThroughputTimer when `synchronized`, SynchronizedWallClockTimer) sync through the
    # accelerator: counted there once, their call site (timer.py:start/stop) names them.
    try:
        yield counts
    finally:
        for owner, attr, original in reversed(patched):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


@contextmanager
def count_calls(counts: collections.Counter):
    """While active, every Python function call adds 1 to counts[package of the called function]."""
    by_file: dict[str, str] = {}

    def profiler(frame, event, arg):
        if event == "call":
            name = frame.f_code.co_filename
            pkg = by_file.get(name)
            if pkg is None:
                pkg = by_file[name] = package_of(name)
            counts[pkg] += 1

    sys.setprofile(profiler)
    try:
        yield counts
    finally:
        sys.setprofile(None)


def aten_ops(fn: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def per_step(counter: collections.Counter, steps: int) -> dict:
    return {(" / ".join(k) if isinstance(k, tuple) else k): v / steps for k, v in sorted(counter.items())}
