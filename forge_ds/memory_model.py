"""What a Phase-1 model holds, per rank: parameter counts, ZeRO model states, DeepSpeed's buffers, activations of
a micro-batch, and the bytes of a checkpoint and of the shared export. Pure arithmetic on the config; the planner
(plan.py) prices it, benchmarks/plan_check.py and tests/test_plan.py hold it against what a real run allocates,
hands to its collectives and writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# torch.save's zip container: a fixed part and one record (header, alignment, central directory, pickled name)
# per tensor. Measured on torch 2.13: 1.6 KB for one tensor, then ~320 B per tensor (1 to 100 tensors, 1 to 1e5
# elements each).
TORCH_SAVE_FIXED_BYTES = 1_300
TORCH_SAVE_PER_TENSOR_BYTES = 330
# safetensors: an 8-byte length, then a JSON header of ~90 B per tensor (name, dtype, shape, offsets).
SAFETENSORS_PER_TENSOR_BYTES = 90

STATE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# A CPU process's first training step grows its RSS by this much beyond the model's own tensors (autograd's and the
# math libraries' first use, the first logging): measured at plan_check.py's "tiny" shape, where the model's share
# is 1.7 MB, as 12.8 and 11.2 MiB on the two ranks of a 2-rank run (2026-12-04, the 2-core VM).
CPU_FIRST_STEP_RUNTIME_BYTES = 12 * 2**20


@dataclass(frozen=True)
class Shape:
    vocab: int
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    seq_len: int
    micro_batch: int
    dropout: float

    @classmethod
    def of(cls, cfg) -> "Shape":
        m = cfg.model
        return cls(m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.d_ff, m.max_seq_len, cfg.training.batch_size,
                   m.dropout)

    def tensors(self) -> list[tuple[int, bool]]:
        """(numel, trainable) of every parameter tensor of SharedTrainingModel, tied matrix once."""
        d, f, L = self.d_model, self.d_ff, self.n_layers
        shared = [(self.vocab * d, True)]
        for _ in range(L):
            # attn_norm w/b, qkv, out_proj; ffn_norm w/b is frozen (exported, never in Phase 1's forward)
            shared += [(d, True), (d, True), (3 * d * d, True), (d * d, True), (d, False), (d, False)]
        shared += [(d, True), (d, True)]
        experts = [(n, True) for _ in range(L) for n in (d, d, d * f, f, f * d, d)]
        return shared + experts

    @property
    def trainable(self) -> int:
        """Ψ: the parameters the optimizer steps (shared + temporary experts)."""
        return sum(n for n, t in self.tensors() if t)

    @property
    def frozen(self) -> int:
        return sum(n for n, t in self.tensors() if not t)

    @property
    def shared_export_numel(self) -> int:
        """Elements in shared_components.pt: the shared subtree (tied matrix once) plus the pe buffer."""
        d, L = self.d_model, self.n_layers
        return self.vocab * d + self.seq_len * d + L * (6 * d + 4 * d * d) + 2 * d


def optimizer_groups(shape: Shape) -> tuple[list[int], list[int]]:
    """Element counts of the "balanced" recipe's two AdamW groups in DeepSpeed's flat order (model.optimizer_groups:
    named_parameters order, tied matrix once, frozen ffn_norm out): decayed 2-D matrices; then the embedding, norms
    and biases."""
    d, f, L = shape.d_model, shape.d_ff, shape.n_layers
    decay = [n for _ in range(L) for n in (3 * d * d, d * d)] + [n for _ in range(L) for n in (d * f, f * d)]
    rest = [shape.vocab * d] + [d] * (2 * L) + [d, d] + [n for _ in range(L) for n in (d, d, f, d)]
    return decay, rest


def group_partition(numel: int, world: int) -> int:
    """Elements of one rank's partition of a flat group: DeepSpeed pads the group to a multiple of 2·N."""
    return ceil_div(numel, 2 * world) * 2


def straddle_grad_elements(shape: Shape, world: int, rank: int) -> int:
    """ZeRO-1/2 at N > 1: a parameter that crosses this rank's partition boundary keeps its whole gradient alive
    (the partition's narrow view holds the full storage). Measured on both ranks of a 2-rank run: rank 0 holds the
    embedding's other half, rank 1 likewise (benchmarks/plan_check.py)."""
    extra = 0
    for group in optimizer_groups(shape):
        size = group_partition(sum(group), world)
        lo, hi, start = rank * size, (rank + 1) * size, 0
        for n in group:
            end = start + n
            overlap = max(0, min(end, hi) - max(start, lo))
            if 0 < overlap < n:
                extra += n - overlap
            start = end
    return extra


def model_states(shape: Shape, stage: int, world: int, precision: str, offload: bool = False,
                 persistence_threshold: int = 100_000, ranks=None) -> dict:
    """Bytes per rank of parameters, gradients and optimizer state (Adam), by DeepSpeed 0.19.8's layout.

    Mixed precision: 16Ψ = 2 param + 2 grad + 12 fp32 master/m/v (ZeRO paper). fp32: params and grads take 4
    bytes; only ZeRO-0 steps the params themselves, every ZeRO stage keeps a separate fp32 master partition.
    ZeRO-1 in DeepSpeed 0.19.8 partitions the gradients as ZeRO-2 does (measured: equal bytes and equal
    collectives at 2 ranks). ZeRO-3 keeps parameters under stage3_param_persistence_threshold whole on every rank,
    beside its partition. ZeRO-1/2 also keep the whole gradient of a parameter that crosses a partition boundary
    (`straddle_grad_elements`); `ranks` picks whose figure (default: the fullest). With offload (zero3_offload) the
    optimizer state and the partitions live in host memory.
    """
    psi, n, p = shape.trainable, world, STATE_BYTES[precision]
    ranks = range(min(world, 64)) if ranks is None else ranks  # the fullest rank; boundaries repeat beyond 64
    master = 0 if precision == "fp32" and stage == 0 else 4
    part = {0: (1, 1, 1), 1: (1, n, n), 2: (1, n, n), 3: (n, n, n)}[stage]  # divisors: params, grads, optimizer
    params = (psi + shape.frozen) * p / part[0]
    if stage == 3:
        params += sum(k for k, _ in shape.tensors() if k <= persistence_threshold) * p * (world > 1)
    grads = psi * p / part[1]
    if stage in (1, 2) and world > 1:
        grads += max(straddle_grad_elements(shape, world, r) for r in ranks) * p
    optim = psi * (8 + master) / part[2]
    if offload:
        return {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "host": params + grads + optim}
    return {"params": params, "grads": grads, "optimizer": optim, "host": 0.0}


def deepspeed_buffers(shape: Shape, stage: int, world: int, precision: str, zero: dict) -> float:
    """Device bytes DeepSpeed adds beside the model states: the double reduce bucket with overlap_comm (ZeRO-1/2),
    or the prefetch bucket plus whole copies of parameters under the persistence threshold (ZeRO-3)."""
    p, psi = STATE_BYTES[precision], shape.trainable
    if world == 1 or stage == 0:
        return 0.0
    bucket = min(int(float(zero.get("reduce_bucket_size", 5e8))), psi)
    if stage in (1, 2):
        return 2.0 * bucket * p if zero.get("overlap_comm") else 0.0
    prefetch = min(int(float(zero.get("stage3_prefetch_bucket_size", 5e7))), psi)
    return (prefetch + bucket) * p


def activations(shape: Shape, precision: str, device: str, checkpointing: bool) -> dict:
    """Bytes of one micro-batch's activations at the step's peak: what autograd saves, plus the largest transient.

    Per layer, counting the tensors autograd keeps (model.py's forward): 8 of B·T·d in the training dtype (the layer
    input, attn_norm's output, the qkv projection (3), the scaled q, the re-laid-out attention output, the expert's
    norm output), 3 dropout masks of B·T·d (attention output, expert output, embedding), and of B·T·d_ff: fc1's
    output (kept by GELU), the dropped values (kept by fc2) and their mask.
    CPU attention with dropout writes softmax·dropout out (model.causal_attention) and keeps the fp32 softmax, the
    mask and the dropped weights: (4 + 2b)·B·H·T² bytes. GPU SDPA (flash / memory-efficient) keeps no T² term,
    only a log-sum-exp per row, and torch's fused dropout keeps 1-byte masks.
    """
    s, b = shape, STATE_BYTES[precision]
    btd, btf, bhtt = s.micro_batch * s.seq_len * s.d_model, s.micro_batch * s.seq_len * s.d_ff, \
        s.micro_batch * s.n_heads * s.seq_len ** 2
    cpu = device == "cpu"
    dropout = s.dropout > 0
    mask = b if cpu else 1  # our CPU dropout multiplies by a mask of the input's dtype; torch's GPU kernel: bool
    masks_td = 3 if dropout else 0  # attention output, expert output, embedding (the last one counted per layer)
    per_layer = btd * (8 * b + masks_td * mask) + btf * (2 * b + (mask if dropout else 0))
    if cpu and dropout:
        per_layer += bhtt * (4 + 2 * b)
        transient = 2 * bhtt * 4  # backward: grad of the dropped weights and of the softmax, fp32-wide
    else:
        per_layer += s.micro_batch * s.n_heads * s.seq_len * 4
        transient = 0
    btv = s.micro_batch * s.seq_len * s.vocab
    head = 2 * btd * b + btv * 4  # output_norm in/out, log_softmax's fp32 output
    # Start of backward: the loss's gradient and log_softmax's input gradient, both fp32 whatever the training dtype.
    transient = max(transient, btv * 8)
    if checkpointing:
        # Each layer keeps only its input; one layer's activations exist again while it is recomputed.
        saved = s.n_layers * btd * b + per_layer + head
    else:
        saved = s.n_layers * per_layer + head
    return {"saved": float(saved), "transient": float(transient), "peak": float(saved + transient)}


# Each DeepSpeed checkpoint file also pickles its client state, config and bookkeeping: ~6 torch.save fixed parts.
DS_FILE_OVERHEAD_BYTES = 6 * TORCH_SAVE_FIXED_BYTES
FORGE_CHECKPOINT_FILES_BYTES = 3_000  # forge_state.json, config.yaml, manifest.json, the safetensors header


def checkpoint_bytes(shape: Shape, stage: int, world: int, precision: str) -> float:
    """Bytes of one checkpoint folder, all ranks' files: DeepSpeed's model-state and optimizer files plus forge_ds's
    small ones. The module's state dict is written in the training dtype with the pe buffer (fp32); the optimizer
    holds the fp32 master (when separate) and Adam's m and v, partitioned across the ranks' files at ZeRO-1/2/3."""
    psi, p, n_tensors = shape.trainable, STATE_BYTES[precision], len(shape.tensors())
    # ZeRO-3's module files hold placeholders only; its weights live in the optimizer files' fp32 partitions.
    module = 0 if stage == 3 else (psi + shape.frozen) * p + shape.seq_len * shape.d_model * 4
    master = 0 if precision == "fp32" and stage == 0 else 4
    optim = psi * (8 + master)
    if stage == 0:  # one file: the module's tensors, and torch AdamW's m, v and step for each of them
        files, records = 1, (n_tensors + 1) + 3 * n_tensors
    elif stage in (1, 2):  # the module file, and per rank the flat fp32/m/v partitions of the two groups
        files, records = 1 + world, (n_tensors + 1) + 6 * world
    else:  # per rank a module file of placeholders and an optimizer file
        files, records = 2 * world, (n_tensors + 1) * world + 6 * world
    return (module + optim + shape.frozen * 4 + FORGE_CHECKPOINT_FILES_BYTES + files * DS_FILE_OVERHEAD_BYTES
            + records * TORCH_SAVE_PER_TENSOR_BYTES)


def export_bytes(shape: Shape) -> dict:
    """shared_components.pt (tied matrix stored once) and .safetensors (no shared storage: twice), fp32."""
    n_keys = 2 + 6 * shape.n_layers + 3
    numel = shape.shared_export_numel
    return {"pt": numel * 4 + TORCH_SAVE_FIXED_BYTES + n_keys * TORCH_SAVE_PER_TENSOR_BYTES,
            "safetensors": (numel + shape.vocab * shape.d_model) * 4 + 8 + n_keys * SAFETENSORS_PER_TENSOR_BYTES}


def gib(n: float) -> float:
    return n / 2**30


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def window_count(tokens: int, seq_len: int) -> int:
    """data.TokenWindows: stride seq_len, the last partial window dropped."""
    return max(0, (tokens - 1) // seq_len)


def isclose_rel(a: float, b: float) -> float:
    return abs(a - b) / b if b else math.inf
