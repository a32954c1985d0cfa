"""The Phase-1 model of the ModularForge contract (/work/shared/modularforge-contract.md), in plain torch.

`SharedComponents` is exactly the subtree ModularForge's Phase 2 loads (same keys, order, shapes, meaning);
`SharedTrainingModel` adds the L dummy experts Phase 1 trains with. This file knows nothing of DeepSpeed,
ranks or files: the engine wraps the module, the exporter reads `model.shared`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from forge_ds.errors import ForgeError

RECIPES = ("modularforge", "balanced")


def sinusoidal_table(max_seq_len: int, d_model: int) -> torch.Tensor:
    """[1, T, d] fp32: pe[p, 2i] = sin(p * 10000^(-2i/d)), pe[p, 2i+1] = cos(same)."""
    # Computed in fp64 then rounded once, so the table is the formula to fp32 rounding even at large p.
    pos = torch.arange(max_seq_len, dtype=torch.float64)[:, None]
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angle = pos * inv_freq
    pe = torch.zeros(max_seq_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # odd d: one fewer cosine column
    return pe.to(torch.float32).unsqueeze(0)


class PositionalEncoding(nn.Module):
    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        # Persistent: the contract ships `pos_encoding.pe` in the file, and Phase 2 loads it strictly.
        self.register_buffer("pe", sinusoidal_table(max_seq_len, d_model), persistent=True)


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of a CPU tensor, about 4x faster than torch's, from the same generator.

    torch's CPU dropout draws one float per element (`bernoulli_`, ~6 ns each): about a sixth of a CPU training
    step at the benchmark shape. Here each 64-bit draw gives four 16-bit lanes and an element is kept iff its lane
    is at or above p * 2^16, so the drop rate is p rounded to a multiple of 2^-16 (off by at most 2^-17: 0.1 becomes
    0.1000061) and kept values are scaled by 1 / (1 - that rate), so the expectation is exact.
    It draws from torch's default CPU generator, so seeding, resume and activation checkpointing's RNG replay
    treat it exactly as they treat torch's dropout.
    """
    dropped_lanes = round(p * 65536)
    if dropped_lanes >= 65536:
        return F.dropout(x, p, training=True)
    lanes = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None).view(torch.int16)
    keep = lanes[:x.numel()].view(x.shape) >= dropped_lanes - 32768
    return x * keep.to(x.dtype).mul_(65536 / (65536 - dropped_lanes))


class Dropout(nn.Dropout):
    """nn.Dropout (same state, same meaning) with `cpu_dropout` for CPU tensors; GPUs keep torch's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0 and x.device.type == "cpu":
            return cpu_dropout(x, self.p)
        return super().forward(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d_head) + causal mask) with dropout on the weights, times v; [B, H, S, d_head]."""
    if dropout == 0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    # torch's fused CPU kernel takes no dropout, so SDPA would run this same math with torch's slow mask;
    # written out, the weights get cpu_dropout. Softmax in fp32, as SDPA's kernels accumulate under bf16.
    S = q.shape[-2]
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)
    scores = scores.masked_fill_(torch.ones(S, S, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return cpu_dropout(weights, dropout) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)  # rows: q, k, v; head h owns rows h*dh..
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        q, k, v = (t.view(B, S, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for t in self.qkv_proj(x).split(d, dim=-1))
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        return self.out_dropout(self.out_proj(y.transpose(1, 2).reshape(B, S, d)))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        # Registration order fixes the state-dict order the contract lists.
        self.attn_norm = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_heads, dropout)
        self.ffn_norm = nn.LayerNorm(d_model)  # Phase 2's norm in front of its experts; unused in Phase 1

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.attention(self.attn_norm(h))


class SharedComponents(nn.Module):
    def __init__(self, vocab_size, d_model, n_heads, n_layers, max_seq_len, dropout):
        super().__init__()
        if d_model % n_heads:
            raise ForgeError(f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}; "
                             f"pick n_heads that divides d_model")
        self.token_embedding = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.pos_encoding = PositionalEncoding(max_seq_len, d_model)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, dropout) for _ in range(n_layers))
        self.output_norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied: one Parameter, two state-dict keys
        self.dropout = Dropout(dropout)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        S, T = input_ids.shape[1], self.pos_encoding.pe.shape[1]
        if S > T:
            raise ValueError(f"sequence length {S} exceeds max_seq_len {T}")
        tokens = self.token_embedding(input_ids)
        # Under bf16 DeepSpeed may leave buffers in fp32 (ZeRO-3 does); adding an fp32 table would promote the
        # activations and break the bf16 LayerNorms downstream, so follow the embedding's dtype.
        return self.dropout(tokens + self.pos_encoding.pe[:, :S].to(tokens.dtype))  # no sqrt(d) scaling

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.output_norm(h))


class ExpertFFN(nn.Module):
    """The dummy expert (index -1): h + dropout(fc2(dropout(gelu(fc1(norm(h))))))."""

    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.norm(h))))))  # exact GELU


def _layer(block: TransformerBlock, expert: ExpertFFN, h: torch.Tensor) -> torch.Tensor:
    return expert(block(h))


class SharedTrainingModel(nn.Module):
    def __init__(self, vocab_size, d_model, n_heads, n_layers, d_ff, max_seq_len, dropout,
                 activation_checkpointing=False):
        super().__init__()
        self.shared = SharedComponents(vocab_size, d_model, n_heads, n_layers, max_seq_len, dropout)
        self.temp_experts = nn.ModuleList(ExpertFFN(d_model, d_ff, dropout) for _ in range(n_layers))
        self.activation_checkpointing = activation_checkpointing
        # ffn_norm is exported but never in Phase 1's forward. Frozen, it gets no grad, stays out of the
        # optimizer (weight decay would otherwise shrink it away from ones every step), and DeepSpeed's
        # gradient hooks never wait for a grad that cannot arrive.
        for block in self.shared.transformer_blocks:
            block.ffn_norm.requires_grad_(False)

    def forward(self, input_ids, targets=None):
        """Logits [B, S, V] if targets is None, else mean cross-entropy over non-pad (non-0) targets."""
        h = self.shared.embed(input_ids)
        for block, expert in zip(self.shared.transformer_blocks, self.temp_experts):
            if self.activation_checkpointing and self.training:
                # Non-reentrant: works with inputs that need no grad and restores the RNG for dropout.
                h = checkpoint(_layer, block, expert, h, use_reentrant=False)
            else:
                h = _layer(block, expert, h)
        logits = self.shared.head(h)
        if targets is None:
            return logits
        # NaN if every target is pad (0/0); the data pipeline never produces such a batch.
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=0)

    def shared_parameter_count(self) -> int:
        # parameters() yields the tied matrix once; pe is a buffer; frozen ffn_norm is not trainable.
        return sum(p.numel() for p in self.shared.parameters() if p.requires_grad)

    def temp_parameter_count(self) -> int:
        return sum(p.numel() for p in self.temp_experts.parameters() if p.requires_grad)


def contract_keys(n_layers: int) -> list[str]:
    """The contract's shared-subtree keys, in the contract's order."""
    keys = ["token_embedding.weight", "pos_encoding.pe"]
    for l in range(n_layers):
        b = f"transformer_blocks.{l}."
        keys += [b + "attn_norm.weight", b + "attn_norm.bias", b + "attention.qkv_proj.weight",
                 b + "attention.out_proj.weight", b + "ffn_norm.weight", b + "ffn_norm.bias"]
    return keys + ["output_norm.weight", "output_norm.bias", "lm_head.weight"]


@torch.no_grad()
def reference_logits(model: SharedTrainingModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The contract's forward written out with matmuls and an explicit causal mask (eval math, no dropout)."""
    s = model.shared
    S = input_ids.shape[1]

    def norm(x, ln):
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    mask = torch.full((S, S), float("-inf"), device=input_ids.device).triu(1)
    h = s.token_embedding.weight[input_ids] + s.pos_encoding.pe[:, :S]
    for block, expert in zip(s.transformer_blocks, model.temp_experts):
        B, _, d = h.shape
        H = block.attention.n_heads
        q, k, v = (norm(h, block.attn_norm) @ block.attention.qkv_proj.weight.T).split(d, dim=-1)
        q, k, v = (t.reshape(B, S, H, d // H).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // H) + mask, dim=-1)
        h = h + (att @ v).transpose(1, 2).reshape(B, S, d) @ block.attention.out_proj.weight.T
        x = F.gelu(norm(h, expert.norm) @ expert.fc1.weight.T + expert.fc1.bias)
        h = h + x @ expert.fc2.weight.T + expert.fc2.bias
    return norm(h, s.output_norm) @ s.lm_head.weight.T


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ForgeError(f"unknown init/optimizer recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


@torch.no_grad()
def initialize(model: SharedTrainingModel, recipe: str, seed: int) -> None:
    """Initialise in place. "modularforge": ModularForge's own init. "balanced": same, then rescaled (below)."""
    _check_recipe(recipe)
    torch.manual_seed(seed)
    # ModularForge's order: modules() visits the tied lm_head last, so Xavier overwrites the embedding's
    # normal(0, 0.02) and the shared matrix ends Xavier-uniform, pad row included.
    for m in model.shared.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
            m.weight[0].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    for e in model.temp_experts:
        for fc in (e.fc1, e.fc2):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)
        nn.init.ones_(e.norm.weight)
        nn.init.zeros_(e.norm.bias)
    if recipe == "balanced":
        # The sinusoidal table has amplitude ~1 and the contract adds it unscaled (no sqrt(d)), so a
        # 0.02-std (or Xavier ~0.01-0.03) embedding is drowned by position: the model barely sees tokens.
        # std 0.7 puts token and position on the same footing.
        s = model.shared
        nn.init.normal_(s.token_embedding.weight, 0.0, 0.7)
        # Pad row zeroed: pad is never a target (ignore_index=0), so its head row only needs a neutral
        # logit, and a pad input then carries position only, as padding_idx intends.
        s.token_embedding.weight[0].zero_()
        # The head is tied, so the 0.7-std rows would give logits of std ~0.7*sqrt(d) for a unit-variance
        # normed h. Gain 1/(0.7*sqrt(d)) brings them back to std ~1; the forward math is unchanged.
        s.output_norm.weight.fill_(1.0 / (0.7 * math.sqrt(s.token_embedding.embedding_dim)))


def optimizer_groups(model: SharedTrainingModel, recipe: str, weight_decay: float) -> list[dict]:
    """AdamW param groups: only "params" and "weight_decay" keys (DeepSpeed's optimizers reject others).

    Each trainable parameter appears exactly once: named_parameters() yields the tied matrix once.
    """
    _check_recipe(recipe)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if recipe == "modularforge":
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    # "balanced": decay only the 2-D projection matrices. Decaying the tied embedding shrinks the 0.7-std
    # rows the recipe chose; decaying norms and biases pulls them toward 0, not toward their ones/zeros.
    emb = model.shared.token_embedding.weight
    decay = [p for _, p in params if p.ndim >= 2 and p is not emb]
    no_decay = [p for _, p in params if p.ndim < 2 or p is emb]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
