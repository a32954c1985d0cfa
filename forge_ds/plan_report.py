"""`forge-ds plan`'s command line and the text it prints: one row per stage (memory, communication, time), run
totals, the recommendation and the scaling line. Figures only; plan.py computes them."""

from __future__ import annotations

from forge_ds import memory_model as mm
from forge_ds.plan import Plan, hardware, make_plan, stops_helping

TRAIN_ONLY_OPTIONS = ("deepspeed_config", "output_dir", "resume", "overwrite", "stop_after_steps", "init_from",
                      "allow_schedule_change", "tensorboard_dir", "local_rank", "world_size")



def plan_command(config, nodes, gpus_per_node, gpu, peak_tflops, memory_gb, intra_gbps, inter_gbps, mfu, tokens,
                 global_batch, overrides: dict) -> None:
    """`forge-ds plan` after fire parsed it: the config (defaults < file < flags), the plan, the text (its --help
    is usage.py's, from cli.plan's signature and docstring)."""
    from forge_ds import config as config_mod

    overrides = dict(overrides)
    # train's run options may come along with a copied train command line; the plan covers every stage anyway.
    ignored = [key for key in TRAIN_ONLY_OPTIONS if overrides.pop(key, None) is not None]
    cfg, notes = config_mod.resolve(config, overrides)
    for note in notes + ([f"note: plan ignores train's run options: {', '.join('--' + k for k in ignored)}"]
                         if ignored else []):
        print(note)
    hw = hardware(gpu, peak_tflops, memory_gb, mfu, intra_gbps, inter_gbps)
    print(render(make_plan(cfg, nodes, gpus_per_node, hw, tokens, global_batch), cfg, hw, nodes, gpus_per_node))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _messages(comms: dict) -> str:
    """all_reduce: 1 x 42.0 MB + 2 x 4 B, … (the sizes a rank hands to each collective in one step)."""
    def size(n: int) -> str:
        return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n:,} B"
    parts = []
    for op, sizes in comms.items():
        counts: dict = {}
        for n in sizes:
            counts[n] = counts.get(n, 0) + 1
        parts.append(f"{op}: " + " + ".join(f"{c} x {size(n)}" for n, c in sorted(counts.items(), reverse=True)))
    return "; ".join(parts) or "none (one rank)"


def _activation_line(cfg, hw, micro: int, precision: str) -> str:
    shape = mm.Shape.of(cfg)
    shape = mm.Shape(shape.vocab, shape.d_model, shape.n_heads, shape.n_layers, shape.d_ff, shape.seq_len, micro,
                     shape.dropout)
    off, on = (mm.gib(mm.activations(shape, precision, hw.device, ckpt)["peak"]) for ckpt in (False, True))
    used = "on" if cfg.training.activation_checkpointing else "off"
    return (f"  activ.     micro-batch {micro}: {off:.2f} GiB without, {on:.2f} GiB with "
            f"--training.activation_checkpointing (the rows: {used})")


def render(plan: Plan, cfg, hw, nodes: int, gpus_per_node: int) -> str:
    m, t = cfg.model, cfg.training
    lines = [
        f"forge-ds plan: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size}, "
        f"T {m.max_seq_len}; Ψ = {mm.Shape.of(cfg).trainable:,} trainable parameters",
        f"  hardware   {nodes} node(s) x {gpus_per_node} {hw.name} = {plan.world} ranks; {hw.peak_flops / 1e12:,.3g} "
        f"TFLOP/s peak at MFU {hw.mfu:.2f}, {hw.memory_bytes / 1e9:.0f} GB, links {hw.intra_bytes_per_s * 8 / 1e9:,.0f}"
        f" / {hw.inter_bytes_per_s * 8 / 1e9:,.0f} Gbit/s intra / inter node",
        f"  batch      global {plan.global_batch} sequences held; activation checkpointing "
        f"{'on' if t.activation_checkpointing else 'off'}",
        "",
        f"  {'stage':<14}{'params':>8}{'grads':>8}{'optim':>8}{'buffers':>8}{'activ.':>8}{'total':>8}{'headroom':>9}"
        f"  {'comm MB':>9}{'wire MB':>9}{'comm':>8}{'exposed':>8}{'compute':>8}{'host':>8}{'step':>8}{'tok/s':>12}"
        f"  binds  (GiB per rank; s per optimizer step)",
    ]
    tokens_per_step = plan.global_batch * m.max_seq_len
    for r in plan.rows:
        mem = r.memory
        handed = sum(sum(sizes) for sizes in r.comms.values())
        lines.append(
            f"  {r.stage:<14}" + "".join(f"{mm.gib(mem[k]):>8.2f}" for k in ("params", "grads", "optimizer",
                                                                              "buffers", "activations", "total"))
            + f"{mm.gib(mem['headroom']):>9.2f}  {_mb(handed):>9}{_mb(r.wire_bytes):>9}{r.comm_s:>8.3f}"
            f"{r.exposed_comm_s:>8.3f}{r.compute_s:>8.3f}{r.host_s:>8.3f}{r.step_s:>8.3f}"
            f"{tokens_per_step / r.step_s:>12,.0f}  {r.binds}  (micro-batch {r.micro_batch} x {r.grad_accum}"
            + "".join(f"; {note}" for note in r.notes) + ")")
    best = plan.best
    lines += [
        "",
        f"  run        {plan.tokens:,} training tokens ({plan.tokens_source}); {plan.steps_per_epoch:,} steps/epoch; "
        f"{plan.total_steps:,} steps to max_steps: {_duration(best.step_s * plan.total_steps)} at {best.stage}",
        f"  files      checkpoint {mm.gib(plan.checkpoint_bytes['chosen']):.2f} GiB per save (all ranks' files, "
        f"{best.stage}); shared export {_mb(plan.export_bytes['pt'])} MB .pt + {_mb(plan.export_bytes['safetensors'])}"
        " MB .safetensors",
        f"  recommend  --deepspeed_config={best.stage} --training.batch_size={plan.micro_batch} "
        f"--training.gradient_accumulation_steps={plan.grad_accum} (global batch {plan.global_batch})",
        f"  why        {plan.reason}",
        _activation_line(cfg, hw, plan.micro_batch, plan.precision),
        f"  messages   {best.stage}, per rank per optimizer step: {_messages(best.comms)}",
    ]
    if plan.scaling:
        knee = stops_helping(plan.scaling)
        sweep = ", ".join(f"{n}: {_duration(s)} ({b})" for n, s, b in plan.scaling)
        lines.append(f"  scaling    time to max_steps by node count, global batch held: {sweep}")
        lines.append(f"  stops      past {knee} node(s) a doubling saves less than 10%"
                     + (" (a rank needs at least one sequence of the global batch)"
                        if knee == plan.scaling[-1][0] else ""))
    return "\n".join(lines)
