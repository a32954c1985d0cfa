"""The post-training hook: consolidate only the shared subtree into ModularForge's layout, and check such files.

Writes `shared_components.pt` (plain fp32 tensors, exactly the contract's keys, in its order),
`shared_components.safetensors` (same tensors) and `shared_components.json` (metadata + sha256 of both).
Sources: a live engine at any ZeRO stage (fp32 master weights, gathered one parameter at a time, the dummy
experts never touched) or a checkpoint folder (shards.py: zero_to_fp32's layout, read one shared tensor at a time
from the memory-mapped shards).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Optional

import torch

from forge_ds import distributed
from forge_ds.errors import ForgeError
from forge_ds.files import sha256_file
from forge_ds.model import SharedComponents, contract_keys, sinusoidal_table

EXPORT_STEM = "shared_components"
TIED = ("lm_head.weight", "token_embedding.weight")


def _frozen_keys(n_layers: int) -> list[str]:
    return [f"transformer_blocks.{l}.ffn_norm.{p}" for l in range(n_layers) for p in ("weight", "bias")]


def _assemble(get, n_layers: int, max_seq_len: int, d_model: int, frozen: dict[str, torch.Tensor]) -> dict:
    """Contract-ordered dict: trainable tensors from `get(key)`, frozen ones from their fp32 record, `pe` from the
    formula (DeepSpeed casts buffers to bf16 with the module, so the live buffer may be rounded)."""
    state = {}
    for key in contract_keys(n_layers):
        if key == "pos_encoding.pe":
            state[key] = sinusoidal_table(max_seq_len, d_model)
        elif key == TIED[0]:
            state[key] = state[TIED[1]]  # the same tensor: torch.save keeps one storage, and the tie survives a load
        elif key in frozen:
            state[key] = frozen[key].detach().to(torch.float32).cpu().clone()
        else:
            # detach: a tensor filled by copy_ from a partition that requires grad would be saved requiring it too
            state[key] = get(key).detach()
    return state


def gather_live(engine, n_layers: int, max_seq_len: int, d_model: int, frozen: dict[str, torch.Tensor]) -> dict:
    """Collective (every rank calls it in the same order). Reads each shared parameter's fp32 master copy; the
    dummy experts are never gathered. Returns the dict on rank 0, which writes it; the other ranks take part in
    each gather and drop the result (their dict holds empty placeholders), so they hold no copy of the weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    params, main = dict(engine.module.shared.named_parameters()), distributed.is_main()

    def get(key: str) -> torch.Tensor:
        full = safe_get_full_fp32_param(params[key])
        if not main:
            return torch.empty(0)
        if full is None:  # ZeRO-0 in fp32: the parameter itself is the master copy
            return params[key].detach().to(torch.float32).cpu().clone()
        out = full.detach().to(torch.float32).cpu()
        # DeepSpeed gathers into a fresh buffer (.cpu() copies it again from an accelerator). Only a view into a
        # larger one (ZeRO-3's padded gather on the CPU) needs a copy: torch.save would write the whole buffer.
        return out if out.untyped_storage().nbytes() == out.numel() * out.element_size() else out.clone()

    return _assemble(get, n_layers, max_seq_len, d_model, frozen)


def gather_from_checkpoint(ckpt: Path, n_layers: int, max_seq_len: int, d_model: int,
                           frozen: dict[str, torch.Tensor], zero_stage: int) -> dict:
    """Offline, one process: zero_to_fp32's reconstruction, streamed (forge_ds.shards), shared keys only."""
    if zero_stage == 0:
        return _gather_stage0(ckpt, n_layers, max_seq_len, d_model, frozen)
    from forge_ds.shards import ZeroShards

    try:
        shards = ZeroShards(ckpt)
        return _assemble(lambda key: shards.get(f"shared.{key}"), n_layers, max_seq_len, d_model, frozen)
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise ForgeError(f"{ckpt}: cannot read the DeepSpeed shards ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                         "the checkpoint is incomplete or damaged") from None


def _gather_stage0(ckpt, n_layers, max_seq_len, d_model, frozen) -> dict:
    path = ckpt / "mp_rank_00_model_states.pt"
    try:
        # DeepSpeed's own file, but only plain containers, tensors and numbers (checked on 0.19.8, fp32 and bf16),
        # so the safe unpickler reads it: a checkpoint folder from elsewhere cannot run code here.
        module = torch.load(path, map_location="cpu", weights_only=True)["module"]
    except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise ForgeError(f"{path}: cannot read the ZeRO-0 model states ({type(e).__name__}); damaged checkpoint") from None
    if any(p.dtype != torch.float32 for p in module.values()):
        # The module holds bf16 copies; exporting them would silently round the weights. The fp32 masters live
        # in DeepSpeed's optimizer state, which only a live engine reads reliably.
        raise ForgeError(f"{ckpt}: a ZeRO-0 bf16 checkpoint holds only bf16 module weights; the fp32 masters are "
                         "exported at the end of training (or resume it and let it finish), not offline")
    return _assemble(lambda k: module[f"shared.{k}"].to(torch.float32).clone(), n_layers, max_seq_len, d_model, frozen)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_safetensors_save(state: dict, path: Path, metadata: dict[str, str]) -> None:
    """What safetensors' `save_file` writes, byte for byte (8-byte little-endian header length, compact JSON header
    padded with spaces to 8 bytes, the tensors end to end sorted by dtype then name: by name here, all fp32), but
    streamed from `state`: save_file refuses the tied matrix's shared storage, and an untied copy to please it
    would cost as much memory again as the embedding."""
    header, offset = {"__metadata__": metadata}, 0
    for name in sorted(state):
        tensor = state[name]
        if tensor.dtype != torch.float32:
            raise ForgeError(f"{name}: {tensor.dtype}; the export holds fp32 tensors only")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in sorted(state):
            f.write(state[name].detach().contiguous().numpy())  # the tensor's own memory, no bytes copy
    os.replace(tmp, path)


def write(state: dict, out_dir: Path, metadata: dict) -> dict[str, Path]:
    """Rank 0 only. Temporary names, then renames: a crash never leaves a half-written export in place. Nothing but
    `state` is held while writing: the whole dict is torch.save's floor, and the export adds nothing to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{EXPORT_STEM}.{ext}" for ext in ("pt", "safetensors", "json")}
    distributed.fault_point("export_before_write")
    _atomic_torch_save(state, paths["pt"])
    # safetensors has no shared storage: the tied matrix is written twice there (equal values).
    _atomic_safetensors_save(state, paths["safetensors"], {"format": "pt"})
    meta = dict(metadata)
    meta["sha256"] = {paths["pt"].name: sha256_file(paths["pt"]), paths["safetensors"].name: sha256_file(paths["safetensors"])}
    meta["keys"] = list(state)
    tmp = paths["json"].with_name(f".{paths['json'].name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, paths["json"])
    return paths


def load_export(path: Path) -> dict[str, torch.Tensor]:
    """Our own load of an export: weights_only or safetensors, checksum checked when the JSON is beside it."""
    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"{path}: no such export file; give the path of a shared_components.pt")
    meta_path = path.with_suffix(".json")
    if meta_path.is_file():
        try:
            expected = json.loads(meta_path.read_text(encoding="utf-8")).get("sha256", {}).get(path.name)
        except ValueError:
            expected = None
        if expected and sha256_file(path) != expected:
            raise ForgeError(f"{path}: sha256 differs from {meta_path.name} (truncated or altered); re-export it")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip / pickle errors come in many types
        raise ForgeError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         "the file is truncated or not a forge_ds export") from None
    if not isinstance(state, dict):
        raise ForgeError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return state


def infer_shape(state: dict) -> tuple[int, int, int, int]:
    """(vocab_size, d_model, max_seq_len, n_layers) read off the tensors."""
    try:
        vocab, d = state["token_embedding.weight"].shape
        max_seq_len = state["pos_encoding.pe"].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise ForgeError(f"export lacks the embedding or position table ({e}); not a shared-components file") from None
    n_layers = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    return vocab, d, max_seq_len, n_layers


def verify(path: Path, n_heads: Optional[int] = None) -> list[str]:
    """Every way a file can break the contract, as a list of problems (empty = good)."""
    state = load_export(path)
    problems = []
    vocab, d, max_seq_len, n_layers = infer_shape(state)
    expected = contract_keys(n_layers)
    if list(state) != expected:
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        problems.append(f"keys differ from the contract (missing {missing[:4]}, unexpected {extra[:4]})"
                        if missing or extra else "keys are in a different order than the contract")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{key}: not a tensor")
        elif tensor.dtype != torch.float32:
            problems.append(f"{key}: dtype {tensor.dtype}, expected torch.float32")
        elif tensor.numel() == 0:
            problems.append(f"{key}: empty tensor (a ZeRO-3 placeholder?)")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{key}: holds NaN or inf")
    if problems:
        return problems
    if not torch.equal(state[TIED[0]], state[TIED[1]]):
        problems.append("lm_head.weight differs from token_embedding.weight (the tie is broken)")
    pe = sinusoidal_table(max_seq_len, d)
    if state["pos_encoding.pe"].shape != pe.shape or (state["pos_encoding.pe"] - pe).abs().max() > 1e-5:
        problems.append("pos_encoding.pe differs from the sinusoidal formula")
    for key in _frozen_keys(n_layers):
        want = torch.ones(d) if key.endswith("weight") else torch.zeros(d)
        if state.get(key) is not None and not torch.equal(state[key], want):
            problems.append(f"{key}: moved from its init ({'ones' if key.endswith('weight') else 'zeros'}); "
                            "Phase 1 must not train ffn_norm")
    heads = n_heads or next(h for h in (8, 4, 2, 1) if d % h == 0)
    module = SharedComponents(vocab, d, heads, n_layers, max_seq_len, 0.0)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        problems.append(f"strict load into SharedComponents failed: {str(e).splitlines()[0]}")
    return problems
