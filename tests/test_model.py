"""Specification tests for forge_ds.model against the ModularForge contract (tiny CPU models)."""

import math

import pytest
import torch
import torch.nn.functional as F

from forge_ds import model as M
from forge_ds.errors import ForgeError
from forge_ds.model import (SharedComponents, SharedTrainingModel, contract_keys, initialize, optimizer_groups,
                            reference_logits, sinusoidal_table)

V, D, H, L, FF, T = 64, 32, 4, 2, 64, 16


def tiny(dropout=0.0, **kw):
    torch.manual_seed(0)
    return SharedTrainingModel(V, D, H, L, FF, T, dropout, **kw)


def randomize(model, seed=1):
    """Every parameter random (norms included), so no ordering or bias bug hides behind ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))


def independent_logits(model, x):
    """The contract's forward, head by head, slicing qkv rows as the contract describes."""
    sd = {k: v.double() for k, v in model.shared.state_dict().items()}
    ex = [{k: v.double() for k, v in e.state_dict().items()} for e in model.temp_experts]
    d, S = sd["token_embedding.weight"].shape[1], x.shape[1]
    dh = d // model.shared.transformer_blocks[0].attention.n_heads

    def ln(t, w, b):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * w + b
    h = sd["token_embedding.weight"][x] + sd["pos_encoding.pe"][0, :S]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for l in range(len(ex)):
        p = f"transformer_blocks.{l}."
        a = ln(h, sd[p + "attn_norm.weight"], sd[p + "attn_norm.bias"])
        W = sd[p + "attention.qkv_proj.weight"]
        heads = []
        for hh in range(d // dh):
            rows = slice(hh * dh, (hh + 1) * dh)
            q, k, v = (a @ W[off:off + d][rows].T for off in (0, d, 2 * d))
            s = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(s, -1) @ v)
        h = h + torch.cat(heads, -1) @ sd[p + "attention.out_proj.weight"].T
        e = ex[l]
        z = ln(h, e["norm.weight"], e["norm.bias"]) @ e["fc1.weight"].T + e["fc1.bias"]
        z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # exact GELU
        h = h + z @ e["fc2.weight"].T + e["fc2.bias"]
    return ln(h, sd["output_norm.weight"], sd["output_norm.bias"]) @ sd["lm_head.weight"].T


def test_shared_state_dict_keys_and_shapes_match_contract():
    sd = SharedComponents(V, D, H, L, T, 0.0).state_dict()
    assert list(sd) == contract_keys(L)
    assert contract_keys(L)[-1] == "lm_head.weight"
    shapes = {"token_embedding.weight": (V, D), "pos_encoding.pe": (1, T, D), "output_norm.weight": (D,),
              "output_norm.bias": (D,), "lm_head.weight": (V, D)}
    for l in range(L):
        p = f"transformer_blocks.{l}."
        shapes.update({p + "attn_norm.weight": (D,), p + "attn_norm.bias": (D,), p + "ffn_norm.weight": (D,),
                       p + "ffn_norm.bias": (D,), p + "attention.qkv_proj.weight": (3 * D, D),
                       p + "attention.out_proj.weight": (D, D)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_training_model_keys_are_shared_then_temp_experts():
    expert = ["norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    expected = ["shared." + k for k in contract_keys(L)] + [
        f"temp_experts.{l}.{k}" for l in range(L) for k in expert]
    sd = tiny().state_dict()
    assert list(sd) == expected
    assert sd["temp_experts.0.fc1.weight"].shape == (FF, D) and sd["temp_experts.0.fc1.bias"].shape == (FF,)
    assert sd["temp_experts.1.fc2.weight"].shape == (D, FF) and sd["temp_experts.1.fc2.bias"].shape == (D,)


def test_lm_head_is_the_embedding_parameter():
    s = tiny().shared
    assert s.lm_head.weight is s.token_embedding.weight
    assert s.lm_head.weight.data_ptr() == s.token_embedding.weight.data_ptr()
    sd = s.state_dict()
    assert torch.equal(sd["lm_head.weight"], sd["token_embedding.weight"])


def test_pe_is_a_persistent_buffer_equal_to_the_formula():
    s = tiny().shared
    assert "pos_encoding.pe" in s.state_dict()
    assert all(n != "pos_encoding.pe" for n, _ in s.named_parameters())
    assert all(p is not s.pos_encoding.pe for p in s.parameters())
    pe = s.pos_encoding.pe
    for p in (0, 1, 7, T - 1):
        for i in range(D // 2):
            ang = p * 10000 ** (-2 * i / D)
            assert abs(pe[0, p, 2 * i].item() - math.sin(ang)) < 1e-6
            assert abs(pe[0, p, 2 * i + 1].item() - math.cos(ang)) < 1e-6
    assert torch.equal(sinusoidal_table(T, D), pe)
    assert sinusoidal_table(5, 7).shape == (1, 5, 7)  # odd d works


def test_sdpa_logits_match_reference_and_independent_tiny():
    m = tiny(dropout=0.1).eval()  # eval must switch every dropout off
    randomize(m)
    x = torch.randint(0, V, (3, T))
    x[0, :3] = 0  # pad inputs too
    got = m(x)
    assert got.shape == (3, T, V)
    assert (got - reference_logits(m, x)).abs().max() <= 1e-5
    assert (got.double() - independent_logits(m, x)).abs().max() <= 1e-5
    # shorter sequences use pe[:, :S] and stay causal: a prefix's logits do not depend on later tokens
    assert (m(x[:, :5]) - got[:, :5]).abs().max() <= 1e-5


@pytest.mark.parametrize("recipe", ["modularforge", "balanced"])
def test_sdpa_logits_match_at_contract_default_sizes(recipe):
    torch.manual_seed(0)
    m = SharedTrainingModel(16384, 512, 8, 4, 2048, 512, 0.1).eval()
    initialize(m, recipe, seed=42)
    x = torch.randint(1, 16384, (1, 64))
    with torch.no_grad():
        got = m(x)
    assert (got - reference_logits(m, x)).abs().max() <= 1e-5
    assert (got.double() - independent_logits(m, x)).abs().max() <= 1e-5


def test_loss_is_mean_cross_entropy_over_non_pad_targets():
    m = tiny().eval()
    randomize(m)
    x = torch.randint(1, V, (2, T))
    y = torch.randint(1, V, (2, T))
    y[0, :5] = 0
    y[1, -3:] = 0
    logits = m(x)
    keep = y != 0
    expected = F.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(m(x, y), expected, atol=1e-6)
    # and the pad positions really are ignored, not just folded into the mean
    assert not torch.allclose(m(x, y), F.cross_entropy(logits.flatten(0, 1), y.flatten().clamp(min=1)))


def test_ffn_norm_gets_no_grad_no_optimizer_slot_and_never_moves():
    m = tiny().train()
    initialize(m, "modularforge", seed=0)
    ffn = [p for b in m.shared.transformer_blocks for p in b.ffn_norm.parameters()]
    for recipe in M.RECIPES:
        grouped = {id(p) for g in optimizer_groups(m, recipe, 0.1) for p in g["params"]}
        assert not grouped & {id(p) for p in ffn}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(optimizer_groups(m, "modularforge", 0.1), lr=1e-2)
    x = torch.randint(1, V, (2, T))
    for _ in range(3):
        opt.zero_grad()
        m(x, x.roll(-1, 1)).backward()
        assert all(p.grad is None for p in ffn)
        opt.step()
    for b in m.shared.transformer_blocks:
        assert torch.equal(b.ffn_norm.weight, torch.ones(D))
        assert torch.equal(b.ffn_norm.bias, torch.zeros(D))
    # guard: the others did train
    assert not torch.equal(before["shared.output_norm.weight"], m.shared.output_norm.weight)


@pytest.mark.parametrize("recipe", ["modularforge", "balanced"])
def test_optimizer_groups_cover_each_trainable_parameter_once(recipe):
    m = tiny()
    groups = optimizer_groups(m, recipe, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters() if p.requires_grad}
    assert all(set(g) == {"params", "weight_decay"} for g in groups)
    torch.optim.AdamW(groups, lr=1e-3)  # raises if a parameter is in two groups
    if recipe == "modularforge":
        assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01
    else:
        no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        assert id(m.shared.token_embedding.weight) in no_decay
        assert id(m.shared.output_norm.weight) in no_decay and id(m.temp_experts[0].fc1.bias) in no_decay
        decay = {id(p) for g in groups if g["weight_decay"] == 0.01 for p in g["params"]}
        assert id(m.shared.transformer_blocks[0].attention.qkv_proj.weight) in decay
        assert id(m.temp_experts[1].fc2.weight) in decay


def test_unknown_recipe_is_a_user_error():
    with pytest.raises(ForgeError):
        initialize(tiny(), "xavier", 0)
    with pytest.raises(ForgeError):
        optimizer_groups(tiny(), "xavier", 0.0)
    with pytest.raises(ForgeError):
        SharedTrainingModel(V, 30, 4, L, FF, T, 0.0)


def test_modularforge_init_ends_xavier_on_the_shared_matrix():
    v, d = 2048, 128
    m = SharedTrainingModel(v, d, 4, 1, 256, T, 0.0)
    initialize(m, "modularforge", seed=3)
    w = m.shared.token_embedding.weight
    assert abs(w.std().item() / math.sqrt(2 / (v + d)) - 1) < 0.03
    assert w[0].abs().sum() > 0  # Xavier overwrote the zeroed pad row, as ModularForge does
    bound = math.sqrt(6 / (v + d))
    assert w.abs().max() <= bound
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones(d)) and torch.equal(mod.bias, torch.zeros(d))
    e = m.temp_experts[0]
    assert abs(e.fc1.weight.std().item() / math.sqrt(2 / d) - 1) < 0.05
    assert torch.equal(e.fc1.bias, torch.zeros(256)) and torch.equal(e.fc2.bias, torch.zeros(d))


def test_balanced_init_scales_embedding_and_output_gain():
    v, d = 2048, 128
    m = SharedTrainingModel(v, d, 4, 1, 256, T, 0.0)
    initialize(m, "balanced", seed=3)
    w = m.shared.token_embedding.weight
    assert abs(w[1:].std().item() - 0.7) < 0.01
    assert torch.equal(w[0], torch.zeros(d))
    assert torch.allclose(m.shared.output_norm.weight, torch.full((d,), 1 / (0.7 * math.sqrt(d))))
    assert torch.equal(m.shared.output_norm.bias, torch.zeros(d))
    with torch.no_grad():  # the gain keeps initial logits O(1) despite the big tied matrix
        assert 0.3 < m(torch.randint(1, v, (2, T))).std().item() < 3


@pytest.mark.parametrize("recipe", ["modularforge", "balanced"])
def test_initialize_is_deterministic_per_seed(recipe):
    a, b, c = tiny(), tiny(), tiny()
    torch.manual_seed(123)  # global RNG state before the call must not matter
    initialize(a, recipe, seed=7)
    initialize(b, recipe, seed=7)
    initialize(c, recipe, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["shared.token_embedding.weight"], sc["shared.token_embedding.weight"])


def test_parameter_counts_count_tied_matrix_once_and_skip_pe_and_ffn_norm():
    m = tiny()
    assert m.shared_parameter_count() == V * D + L * (2 * D + 3 * D * D + D * D) + 2 * D
    assert m.temp_parameter_count() == L * (2 * D + FF * D + FF + D * FF + D)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_same_loss_and_grads(dropout, monkeypatch):
    plain, ckpt = tiny(dropout), tiny(dropout, activation_checkpointing=True)
    randomize(plain)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = M.checkpoint
    monkeypatch.setattr(M, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = torch.randint(1, V, (2, T))
    y = x.roll(-1, 1)
    losses = []
    for m in (plain, ckpt):
        torch.manual_seed(5)  # same dropout masks; non-reentrant checkpoint replays the RNG on recompute
        loss = m.train()(x, y)
        loss.backward()
        losses.append(loss)
    assert len(calls) == L and all(k.get("use_reentrant") is False for k in calls)
    assert torch.equal(losses[0], losses[1])
    gp, gc = dict(plain.named_parameters()), dict(ckpt.named_parameters())
    for n, p in gp.items():
        if p.requires_grad:
            assert torch.allclose(p.grad, gc[n].grad, atol=1e-6), n
    ckpt.eval()(x)
    assert len(calls) == L  # no checkpointing outside training


# ---------------------------------------------------------------- dropout on CPU (cpu_dropout, causal_attention)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_drops_at_rate_p_and_scales_kept_values_to_keep_the_mean(p):
    n = 1 << 20
    torch.manual_seed(0)  # statistical bounds below, on a fixed draw: the test cannot flake
    out = M.cpu_dropout(torch.ones(n), p)
    rate = round(p * 65536) / 65536  # p on the 2^-16 grid the mask uses
    assert abs(rate - p) <= 2 ** -17
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n), dropped  # binomial, 5 sigma
    kept = out[out != 0]
    assert torch.all(kept == torch.tensor(1 / (1 - rate), dtype=torch.float32))  # exactly one scale, unbiased
    assert abs(out.double().mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)


def test_cpu_dropout_is_seeded_by_torch_and_its_gradient_is_the_mask():
    x = torch.randn(3, 1000, requires_grad=True)
    torch.manual_seed(7)
    a = M.cpu_dropout(x, 0.3)
    torch.manual_seed(7)
    b = M.cpu_dropout(x, 0.3)
    c = M.cpu_dropout(x, 0.3)  # the generator moved on
    assert torch.equal(a, b) and not torch.equal(b, c)
    g = torch.randn_like(x)
    a.backward(g)
    assert torch.allclose(x.grad, g * (a / x).detach(), rtol=1e-6)  # dropped elements get no gradient
    assert M.cpu_dropout(torch.ones(8, dtype=torch.bfloat16), 0.5).dtype == torch.bfloat16


def test_model_dropout_modules_use_the_cpu_mask_in_training_only():
    m = tiny(dropout=0.5)
    kinds = {type(mod) for mod in m.modules() if isinstance(mod, torch.nn.Dropout)}
    assert kinds == {M.Dropout}  # every dropout site of the contract: embedding, attention output, expert (2x)
    x = torch.ones(4, 4096)
    torch.manual_seed(1)
    expected = M.cpu_dropout(x, 0.5)
    torch.manual_seed(1)
    assert torch.equal(m.shared.dropout.train()(x), expected)
    assert torch.equal(m.shared.dropout.eval()(x), x)


def qkv(S=16, heads=2, dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, S, dh, generator=g, requires_grad=True) for _ in range(3)]


def test_written_out_cpu_attention_equals_sdpa_when_nothing_is_dropped():
    q, k, v = qkv()
    # p below half a lane (2^-17) drops nothing, so the CPU training path runs with an all-ones mask.
    ours = M.causal_attention(q, k, v, 1e-6)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ours, sdpa, atol=1e-6)
    g = torch.randn_like(ours)
    grads_ours = torch.autograd.grad(ours, (q, k, v), g)
    grads_sdpa = torch.autograd.grad(sdpa, (q, k, v), g)
    for a, b in zip(grads_ours, grads_sdpa):
        assert torch.allclose(a, b, atol=1e-5)


def test_cpu_attention_dropout_falls_on_the_weights_and_is_unbiased():
    q, k, v = (t.detach() for t in qkv(S=6, heads=1, dh=4))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.manual_seed(0)
    draws = torch.stack([M.causal_attention(q, k, v, 0.5) for _ in range(4000)])
    # Position 0 attends to itself only, with weight 1: dropped, or kept and scaled by exactly 2.
    first = draws[:, 0, 0, 0]
    assert {tuple(r.tolist()) for r in first.unique(dim=0)} == {(0.0,) * 4, tuple((2 * v[0, 0, 0]).tolist())}
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert torch.all((mean - reference).abs() <= 5 * stderr + 1e-6)
