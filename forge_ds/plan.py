"""`forge-ds plan`: memory, communication and time per optimizer step for each ZeRO stage, before a job is
queued, and the configuration it recommends (`--deepspeed_config=auto` asks it too: plan_auto.py).

Memory and file sizes come from memory_model.py. Communication: the bytes each rank hands to each collective (what
DeepSpeed's comms logger records), the ring traffic derived from them, and their time at the given bandwidths.
Time: compute at an MFU, plus the communication the config does not overlap, against the host's per-step cost;
the larger binds. Every constant says where its figure comes from (docs/SCALING.md shows worked plans).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from forge_ds import memory_model as mm
from forge_ds.errors import ForgeError
from forge_ds.metrics import DEVICES, device_spec, flops_per_token

STAGES = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")
TIE = 0.02  # steps within 2% of each other count as equally fast
FIT_MARGIN = 0.10  # a stage "fits" with 10% of device memory to spare (allocator fragmentation, CUDA context)

# Host time per step, per parameter tensor, from docs/PERFORMANCE.md's host-overhead table (benchmarks/
# host_overhead.py, 2026-11-28, this 2-core VM: GPT-2 small's 147 parameter tensors, bf16, one thread). The plain
# loop (25.9 ms) is what every micro-batch's forward/backward dispatches; each stage adds its bookkeeping per step.
HOST_TENSORS_MEASURED = 147
HOST_PLAIN_S = 25.9e-3
HOST_STAGE_S = {0: 33.8e-3, 1: 30.1e-3, 2: 32.4e-3, 3: 32.4e-3}  # ZeRO-3 not measured: assumed ZeRO-2's
# The same host work drives a GPU at ~97 ms per GPT-2 step (H100 profile, docs/PERFORMANCE.md, DeepSpeed defaults)
# where this VM took 40.4 ms for the same configuration: kernel launches cost more than CPU op dispatch.
HOST_GPU_OVER_CPU = 97.0 / 40.4
# Per-collective latency (NCCL tree/ring start-up); an assumption, not measured here: 10 µs per hop, log2(N) hops.
COLLECTIVE_LATENCY_S = 10e-6
# DeepSpeedCPUAdam with offload: ~1.0 s per 1e9 parameters on one rank's host cores (assumption, not measured).
CPU_ADAM_S_PER_PARAM = 1.0e-9
PCIE_BYTES_PER_S = 25e9  # host<->device copies with offload (PCIe 4/5 x16, practical)


@dataclass
class Hardware:
    name: str
    peak_flops: float        # per rank
    memory_bytes: float      # per rank
    mfu: float
    intra_bytes_per_s: float
    inter_bytes_per_s: float
    device: str              # "cuda" or "cpu"


@dataclass
class Row:
    stage: str
    memory: dict
    comms: dict              # {op: [message bytes, ...]} per optimizer step, per rank
    wire_bytes: float
    comm_s: float
    exposed_comm_s: float
    compute_s: float
    host_s: float
    step_s: float
    binds: str
    fits: bool
    micro_batch: int = 0
    grad_accum: int = 0
    notes: list = field(default_factory=list)


def hardware(gpu: Optional[str], peak_tflops: Optional[float], memory_gb: Optional[float],
             mfu: Optional[float], intra_gbps: Optional[float], inter_gbps: Optional[float]) -> Hardware:
    """The device from the table (metrics.DEVICES) with any figure overridden by flag; Gbit/s for bandwidths."""
    name = gpu or ("custom" if peak_tflops and memory_gb else "H100 SXM")
    spec = device_spec(name) if name != "custom" else {"tflops": peak_tflops, "memory_gb": memory_gb, "mfu": 0.24,
                                                       "intra_gbps": 3600.0, "inter_gbps": 400.0}
    if spec is None:
        raise ForgeError(f"forge-ds plan: unknown --gpu={gpu!r}; use one of {', '.join(DEVICES)} or give "
                         "--peak_tflops=… --memory_gb=…")
    for flag, value in (("--peak_tflops", peak_tflops), ("--memory_gb", memory_gb), ("--mfu", mfu),
                        ("--intra_node_gbps", intra_gbps), ("--inter_node_gbps", inter_gbps)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ForgeError(f"forge-ds plan: {flag}={value!r} must be a positive number")
    if mfu is not None and mfu > 1:
        raise ForgeError(f"forge-ds plan: --mfu={mfu} is a fraction of peak; give a number in (0, 1]")
    return Hardware(name, (peak_tflops or spec["tflops"]) * 1e12, (memory_gb or spec["memory_gb"]) * 1e9,
                    mfu or spec["mfu"], (intra_gbps or spec["intra_gbps"]) * 1e9 / 8,
                    (inter_gbps or spec["inter_gbps"]) * 1e9 / 8, "cpu" if name == "cpu" else "cuda")


def _buckets(total: int, bucket: int) -> list[int]:
    bucket = max(1, int(bucket))
    return [bucket] * (total // bucket) + ([total % bucket] if total % bucket else [])


def collectives(shape: mm.Shape, stage: int, world: int, precision: str, grad_accum: int, zero: dict) -> dict:
    """Message bytes each rank hands to each DeepSpeed collective in one optimizer step (DeepSpeed 0.19.8 as
    recorded by its comms logger on gloo, alone too: all-reduce and reduce-scatter log the full input, all-gather
    this rank's partition). Checked in tests/test_plan.py and benchmarks/plan_check.py."""
    p, psi = mm.STATE_BYTES[precision], shape.trainable
    reduce_bucket = int(float(zero.get("reduce_bucket_size", 5e8)))
    if stage == 0:  # the engine all-reduces the whole gradient at the boundary, in 5e8-element buffers
        # In fp32 the optimizer is unwrapped and forge_ds clips with torch's clip_grad_norm_ on the averaged
        # gradients (engine.Stepper): no norm all-reduce of DeepSpeed's. bf16's FP16_Optimizer still sends one.
        norm = [] if precision == "fp32" else [4]
        return {"all_reduce": [n * p for n in _buckets(psi, 500_000_000)] + norm}
    if stage in (1, 2):
        micro = grad_accum if stage == 2 else 1  # ZeRO-2 reduces every micro-batch, ZeRO-1 at the boundary
        gathers = [mm.group_partition(sum(g), world) * p for g in mm.optimizer_groups(shape) if g and world > 1]
        out = {"all_reduce": [n * p for n in _buckets(psi, reduce_bucket)] * micro + [4, 4]}
        return {**out, "all_gather_into_tensor": gathers} if gathers else out
    # ZeRO-3: each parameter gathered once per micro-batch (kept for backward while the live parameters stay
    # under stage3_max_live_parameters), gradients reduce-scattered in reduce_bucket_size pieces.
    live = int(float(zero.get("stage3_max_live_parameters", 1e9)))
    passes = 1 if psi + shape.frozen <= live else 2
    gathers = _stage3_gathers(shape, world, p, zero) * passes * (world > 1)  # alone: none
    out = {"reduce_scatter_tensor": [n * p for n in _buckets(psi, reduce_bucket)] * grad_accum, "all_reduce": [8, 8]}
    return {**out, "all_gather_into_tensor": gathers * grad_accum} if gathers else out


def _stage3_gathers(shape: mm.Shape, world: int, p: int, zero: dict) -> list[int]:
    """ZeRO-3's all-gather messages in one forward: a parameter under the persistence threshold is gathered on its
    own; the others are fetched together, coalesced into messages of up to stage3_prefetch_bucket_size elements
    (measured: one 6.8 MB message for the 13 larger tensors of plan_check.py's "predict" shape)."""
    threshold = int(float(zero.get("stage3_param_persistence_threshold", 1e5)))
    bucket = int(float(zero.get("stage3_prefetch_bucket_size", 5e7)))
    single, coalesced, filled = [], [], 0
    for n, _ in shape.tensors():
        part = mm.ceil_div(n, world)
        if n <= threshold:
            single.append(part * p)
        elif coalesced and filled + part <= bucket:
            coalesced[-1] += part * p
            filled += part
        else:
            coalesced.append(part * p)
            filled = part
    return single + coalesced


def wire_bytes(comms: dict, world: int) -> float:
    """Ring traffic per rank: all-reduce 2(N−1)/N·S, reduce-scatter (N−1)/N·S, all-gather (N−1)·S of its part."""
    factor = {"all_reduce": 2 * (world - 1) / world, "reduce_scatter_tensor": (world - 1) / world,
              "all_gather_into_tensor": world - 1}
    return sum(factor.get(op, 1) * sum(sizes) for op, sizes in comms.items())


def comm_seconds(comms: dict, world: int, gpus_per_node: int, hw: Hardware) -> float:
    if world == 1:
        return 0.0
    bandwidth = hw.intra_bytes_per_s if world <= gpus_per_node else hw.inter_bytes_per_s
    calls = sum(len(sizes) for sizes in comms.values())
    return wire_bytes(comms, world) / bandwidth + calls * COLLECTIVE_LATENCY_S * math.ceil(math.log2(world))


def exposed_seconds(comms: dict, comm_s: float, compute_s: float, stage: int, world: int, overlap: bool) -> float:
    """The communication time a step waits for. With overlap_comm, ZeRO-2 reduces gradients beside backward (2/3
    of compute) and ZeRO-3 also prefetches its gathers beside forward; ZeRO-1/2's all-gather of the updated
    parameters comes after the optimizer step, and ZeRO-0/1 reduce once backward is done: exposed."""
    if not overlap or stage < 2 or comm_s == 0:
        return comm_s
    if stage == 3:
        return max(0.0, comm_s - compute_s)
    gathered = (world - 1) * sum(comms.get("all_gather_into_tensor", []))
    gather_s = comm_s * gathered / wire_bytes(comms, world)
    return gather_s + max(0.0, comm_s - gather_s - 2 / 3 * compute_s)


def host_seconds(shape: mm.Shape, stage: int, grad_accum: int, device: str) -> float:
    per_tensor_micro = HOST_PLAIN_S / HOST_TENSORS_MEASURED
    per_tensor_step = (HOST_STAGE_S[stage] - HOST_PLAIN_S) / HOST_TENSORS_MEASURED
    cost = len(shape.tensors()) * (per_tensor_micro * grad_accum + per_tensor_step)
    return cost * (HOST_GPU_OVER_CPU if device == "cuda" else 1.0)


def plan_row(name: str, shape: mm.Shape, world: int, gpus_per_node: int, precision: str, grad_accum: int,
             checkpointing: bool, hw: Hardware, ds: dict) -> Row:
    stage, offload = (3, True) if name == "zero3_offload" else (int(name[-1]), False)
    zero = dict(ds.get("zero_optimization") or {})
    zero["overlap_comm"] = zero.get("overlap_comm", "auto") in (True, "auto") and world > 1
    states = mm.model_states(shape, stage, world, precision, offload,
                             int(float(zero.get("stage3_param_persistence_threshold", 1e5))))
    act = mm.activations(shape, precision, hw.device, checkpointing)
    buffers = mm.deepspeed_buffers(shape, stage, world, precision, zero)
    total = states["params"] + states["grads"] + states["optimizer"] + buffers + act["peak"]
    memory = {**states, "buffers": buffers, "activations": act["peak"], "total": total,
              "headroom": hw.memory_bytes - total}
    comms = collectives(shape, stage, world, precision, grad_accum, zero)
    comm_s = comm_seconds(comms, world, gpus_per_node, hw)
    tokens = shape.micro_batch * shape.seq_len * grad_accum
    compute_s = tokens * flops_per_token(shape.trainable, shape.n_layers, shape.d_model, shape.seq_len) \
        / (hw.peak_flops * hw.mfu) * (4 / 3 if checkpointing else 1)  # recompute: one more forward
    exposed = exposed_seconds(comms, comm_s, compute_s, stage, world, zero["overlap_comm"])
    host_s = host_seconds(shape, stage, grad_accum, hw.device)
    notes = []
    if offload:
        moved = 2 * shape.trainable * mm.STATE_BYTES[precision] / world
        host_s += shape.trainable / world * CPU_ADAM_S_PER_PARAM + moved / PCIE_BYTES_PER_S
        notes.append(f"optimizer step on the host CPU (DeepSpeedCPUAdam), parameters over PCIe; "
                     f"{mm.gib(states['host']):.2f} GiB per rank in host memory")
    if hw.device == "cpu":  # one processor does it all, one after the other
        step_s, binds = compute_s + exposed + host_s, max(
            (("compute", compute_s), ("network", exposed), ("host", host_s)), key=lambda kv: kv[1])[0]
    else:
        device_s = compute_s + exposed
        step_s = max(device_s, host_s)
        binds = "host" if host_s > device_s else ("network" if exposed > compute_s else "compute")
    fits = total <= hw.memory_bytes * (1 - FIT_MARGIN)
    return Row(name, memory, comms, wire_bytes(comms, world), comm_s, exposed, compute_s, host_s, step_s,
               binds if fits else "memory", fits, shape.micro_batch, grad_accum, notes)


def corpus_tokens(cfg, tokens: Optional[int]) -> tuple[int, str]:
    """Training tokens: meta.json of the prepared data if it exists, else --tokens, else bytes ÷ 4 of a local
    corpus (stated as an assumption)."""
    from pathlib import Path

    from forge_ds import data, prepare

    d = cfg.data
    if tokens:
        return int(tokens), "--tokens"
    ident = prepare.source_identity(d.source, d.text_field, d.min_article_length, d.max_articles,
                                    cfg.model.vocab_size, d.val_fraction, d.split_seed, d.tokenizer,
                                    d.tokenizer_train_bytes)
    prepared = Path(d.prepared_dir) if d.prepared_dir else Path("data/prepared") / prepare.prepared_key(ident)
    if (prepared / "meta.json").is_file():
        return int(data.read_meta(prepared)["train_tokens"]), f"meta.json of {prepared}"
    path = Path(ident.get("path") or "")
    size = None
    if ident["kind"] == "pydoc":
        size = sum(len(text.encode()) for text in data.pydoc_topics().values())
    elif ident.get("path") and path.exists():
        size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    if size is not None:
        train_bytes = int(size * (1 - d.val_fraction))
        return train_bytes // 4, f"assumed: {train_bytes:,} training bytes ÷ 4, not prepared yet"
    raise ForgeError(f"forge-ds plan: {d.source} is not prepared and has no local bytes to count; give --tokens=N "
                     "(training tokens) or run `forge-ds prepare` first")


@dataclass
class Plan:
    rows: list
    world: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    tokens: int
    tokens_source: str
    checkpoint_bytes: dict
    export_bytes: dict
    best: Optional[Row]
    reason: str
    precision: str
    scaling: list            # (nodes, time to max_steps in s, binds) with the global batch held


def _split(global_batch: int, world: int, cfg, hw: Hardware, stage: str, gpus_per_node: int, ds: dict):
    """The largest micro-batch that fits at this stage and divides the per-rank share of the global batch."""
    share = global_batch // world
    t = cfg.training
    for micro in sorted((m for m in range(1, share + 1) if share % m == 0), reverse=True):
        shape = _shape(cfg, micro)
        if plan_row(stage, shape, world, gpus_per_node, _precision(cfg, hw), share // micro,
                    t.activation_checkpointing, hw, ds).fits:
            return micro, share // micro
    return None


def _shape(cfg, micro: int) -> mm.Shape:
    s = mm.Shape.of(cfg)
    return mm.Shape(s.vocab, s.d_model, s.n_heads, s.n_layers, s.d_ff, s.seq_len, micro, s.dropout)


def _precision(cfg, hw: Hardware) -> str:
    p = cfg.training.precision
    return ("fp32" if hw.device == "cpu" else "bf16") if p == "auto" else p


def make_plan(cfg, nodes: int, gpus_per_node: int, hw: Hardware, tokens: Optional[int] = None,
              global_batch: Optional[int] = None, stages=STAGES, sweep: bool = True) -> Plan:
    from forge_ds import ds_config

    for flag, value in (("--nodes", nodes), ("--gpus_per_node", gpus_per_node)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ForgeError(f"forge-ds plan: {flag}={value!r} must be a whole number of at least 1")
    for flag, value in (("--global_batch", global_batch), ("--tokens", tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ForgeError(f"forge-ds plan: {flag}={value!r} must be a whole number of at least 1")
    t, world = cfg.training, nodes * gpus_per_node
    gb = int(global_batch or t.batch_size * t.gradient_accumulation_steps * world)
    if gb % world:
        raise ForgeError(f"forge-ds plan: global batch {gb} does not split over {world} ranks; give "
                         f"--global_batch as a multiple of {world}")
    precision = _precision(cfg, hw)
    n_tokens, source = corpus_tokens(cfg, tokens)
    steps_per_epoch = mm.window_count(n_tokens, cfg.model.max_seq_len) // gb
    total_steps = t.max_steps or t.epochs_shared * max(1, steps_per_epoch)
    rows = []
    for name in stages:
        ds = ds_config.load_ds_config(name)
        split = _split(gb, world, cfg, hw, name, gpus_per_node, ds)
        micro, accum = split or (1, gb // world)
        rows.append(plan_row(name, _shape(cfg, micro), world, gpus_per_node, precision, accum,
                             t.activation_checkpointing, hw, ds))
    fitting = [r for r in rows if r.fits]
    fastest = min((r.step_s for r in fitting), default=None)
    # The lowest stage within TIE of the fastest: less sharding is less to go wrong (compile, placeholders).
    best = next((r for r in fitting if r.step_s <= fastest * (1 + TIE)), None)
    shape = mm.Shape.of(cfg)
    if best is None:
        _raise_fits_nowhere(rows, hw, world)
    scaling = _sweep(cfg, gpus_per_node, hw, gb, total_steps, best.stage) if sweep else []
    reason = (f"{best.stage} is the fastest stage (lowest within {TIE:.0%}) that fits with {FIT_MARGIN:.0%} "
              f"to spare ({mm.gib(best.memory['total']):.1f} of {hw.memory_bytes / 2**30:.1f} GiB); its step is "
              f"bound by {best.binds}")
    stage_n = 3 if best.stage == "zero3_offload" else int(best.stage[-1])
    ckpt = {s: mm.checkpoint_bytes(shape, int(s[-1]), world, precision) for s in STAGES[:4]}
    return Plan(rows, world, gb, best.micro_batch, best.grad_accum, steps_per_epoch, total_steps, n_tokens, source,
                {"chosen": mm.checkpoint_bytes(shape, stage_n, world, precision), **ckpt}, mm.export_bytes(shape),
                best, reason, precision, scaling)


def _raise_fits_nowhere(rows: list, hw: Hardware, world: int) -> None:
    closest = min(rows, key=lambda r: r.memory["total"])
    limit = hw.memory_bytes * (1 - FIT_MARGIN)
    raise ForgeError(f"forge-ds plan: the model fits no stage on {world} x {hw.name} ({hw.memory_bytes / 1e9:.0f} GB "
                     f"each): the smallest, {closest.stage} at micro-batch 1, needs "
                     f"{mm.gib(closest.memory['total']):.1f} GiB per rank where {mm.gib(limit):.1f} GiB ({1 - FIT_MARGIN:.0%}) is the limit, "
                     f"{mm.gib(closest.memory['total'] - limit):.1f} GiB too much; use more ranks, activation "
                     "checkpointing or a smaller model")


def _sweep(cfg, gpus_per_node: int, hw: Hardware, gb: int, total_steps: int, stage: str) -> list:
    """Time to max_steps at 1, 2, 4, … nodes, global batch held, until a rank would get no sample."""
    from forge_ds import ds_config

    ds, out, nodes = ds_config.load_ds_config(stage), [], 1
    while nodes * gpus_per_node <= gb and nodes <= 4096:
        world = nodes * gpus_per_node
        split = _split(gb, world, cfg, hw, stage, gpus_per_node, ds) if gb % world == 0 else None
        if split:
            row = plan_row(stage, _shape(cfg, split[0]), world, gpus_per_node, _precision(cfg, hw), split[1],
                           cfg.training.activation_checkpointing, hw, ds)
            out.append((nodes, row.step_s * total_steps, row.binds))
        nodes *= 2
    return out


def stops_helping(scaling: list, gain: float = 0.10) -> Optional[int]:
    """The node count past which doubling shortens the time to max_steps by less than `gain`."""
    for (n, t, _), (_, t_next, _) in zip(scaling, scaling[1:]):
        if t_next > t * (1 - gain):
            return n
    return scaling[-1][0] if scaling else None
