"""The post-training hook: consolidate only the shared subtree into ModularForge's layout, and check such files.

Writes `shared_components.pt` (plain fp32 tensors, exactly the contract's keys, in its order),
`shared_components.safetensors` (same tensors) and `shared_components.json` (metadata + sha256 of both).
Sources: a live engine at any ZeRO stage (fp32 master weights, gathered one parameter at a time, the dummy
experts never touched) or a checkpoint folder (shards.py: zero_to_fp32's layout, read one shared tensor at a time
from the memory-mapped shards).
"""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path
from typing import Optional

import torch

from forge_ds import distributed, faults
from forge_ds.errors import ForgeError, describe
from forge_ds.files import atomic_write_group, sha256_file, temp_path, write_safetensors_streamed
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
    dummy experts are never gathered. Returns the dict on rank 0, which writes it; the other ranks send rank 0
    their slices of each master (their dict holds empty placeholders), so they hold no copy of the weights.

    On CPU ranks, partitioned masters (ZeRO-1/2/3, and bf16 at ZeRO-0) go to rank 0 slice by slice, each straight
    into its place in the one tensor rank 0 keeps: DeepSpeed's safe_get_full_fp32_param would build a full copy on
    every rank (an all-reduce of a zero-filled buffer at ZeRO-1/2, a padded all-gather at ZeRO-3 that rank 0 must
    copy out of), up to twice the largest tensor at rank 0's peak in RAM."""
    from deepspeed.utils import safe_get_full_fp32_param

    params, main = dict(engine.module.shared.named_parameters()), distributed.is_main()
    # On GPUs DeepSpeed's full copies live in device memory and rank 0 copies each to the host once: its own
    # gather stays there (and NCCL point-to-point is not tested here).
    by_slices = distributed.collectives_on_host() and distributed.world_size() > 1

    def get(key: str) -> torch.Tensor:
        slices = _master_slices(params[key]) if by_slices else None
        if slices is not None:
            out = distributed.concat_on_main(*slices)
            return torch.empty(0) if out is None else out.view(getattr(params[key], "ds_shape", params[key].shape))
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


def _master_slices(param) -> Optional[tuple[torch.Tensor, list[int]]]:
    """(this rank's slice of the parameter's flattened fp32 master, every rank's slice length), when the slices lie
    in rank order over the default group; None otherwise (then DeepSpeed's own gather is used). Every rank gets
    the same answer, so every rank takes the same path."""
    world, rank = distributed.world_size(), distributed.rank()
    z3 = getattr(param, "_z3_optimizer", None)
    if z3 is not None:  # ZeRO-3: each rank holds ceil(numel / world) elements, the last rank's padded
        if distributed.world_size(z3._get_param_partition_group(param)) != world:
            return None
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(param).reshape(-1)
        sizes = [max(0, min(local.numel(), param.ds_numel - r * local.numel())) for r in range(world)]
        return local.narrow(0, 0, sizes[rank]), sizes
    if not hasattr(param, "_hp_mapping") or distributed.world_size(getattr(param, "_dp_group", None)) != world:
        return None
    # ZeRO-1/2 (and bf16 at ZeRO-0): a rank holds the fragment of this parameter that falls in its partition of the
    # flat fp32 buffer, or none of it.
    mapping = param._hp_mapping
    piece = mapping.get_hp_fragment().reshape(-1) if mapping is not None else torch.empty(0)
    start = mapping.lp_fragment_address.start if mapping is not None else 0
    layout = distributed.gather_object((start, piece.numel()))
    owned = [(s, n) for s, n in layout if n]
    if [s for s, _ in owned] != list(itertools.accumulate([0] + [n for _, n in owned[:-1]])) \
            or sum(n for _, n in owned) != param.numel():
        return None
    return piece, [n for _, n in layout]


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
        raise ForgeError(f"{ckpt}: cannot read the DeepSpeed shards ({describe(e)}); "
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


def metadata(cfg, state, world_size: int, val_loss: Optional[float], exported_weights: str, exported_step: int,
             **extra) -> dict:
    """The export's JSON, the same keys whoever exports: the end of training (exported_weights "final" or "best"),
    or `forge-ds export` offline ("checkpoint"). `cfg` is the run's Config, `state` its checkpoint.TrainState."""
    import deepspeed

    import forge_ds
    from forge_ds.metrics import perplexity

    return {"format": "modularforge.shared_components.v1", "model": cfg.model.model_dump(),
            "recipe": cfg.training.recipe, "exported_weights": exported_weights,
            "exported_step": exported_step, "tokenizer_sha256": state.tokenizer_sha256, "steps": state.step,
            "tokens_seen": state.tokens_seen, "final_train_loss": state.last_train_loss,
            "final_train_ppl": perplexity(state.last_train_loss), "final_val_loss": val_loss,
            "final_val_ppl": perplexity(val_loss), "best_val_loss": state.best_val_loss, "best_step": state.best_step,
            "zero_stage": state.zero_stage, "precision": state.precision, "world_size": world_size,
            # Module attributes, not package metadata: a source checkout on PYTHONPATH has no metadata.
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "forge_ds": forge_ds.__version__}, **extra}


def write(state: dict, out_dir: Path, metadata: dict) -> dict[str, Path]:
    """Rank 0 only. All three files or none: each is written under a temporary name, then all are renamed, so a
    crash or Ctrl-C never leaves a half-written or mismatched export in place. Nothing but `state` is held while
    writing: the whole dict is torch.save's floor, and the export adds nothing to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{EXPORT_STEM}.{ext}" for ext in ("pt", "safetensors", "json")}
    faults.point("export_before_write")

    def write_json(tmp: Path) -> None:
        # The checksums are of the temporary files: the renames do not change a byte.
        sums = {paths[ext].name: sha256_file(temp_path(paths[ext])) for ext in ("pt", "safetensors")}
        tmp.write_text(json.dumps({**metadata, "sha256": sums, "keys": list(state)}, indent=2), encoding="utf-8")

    atomic_write_group({
        paths["pt"]: lambda tmp: torch.save(state, tmp),
        # safetensors has no shared storage: the tied matrix is written twice there (equal values).
        paths["safetensors"]: lambda tmp: write_safetensors_streamed(state, tmp, {"format": "pt"}),
        paths["json"]: write_json})
    return paths


def load_export(path: Path) -> dict[str, torch.Tensor]:
    """Our own load of an export: weights_only or safetensors, checksum checked when the JSON is beside it."""
    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"{path}: no such export file; give the path of a shared_components.pt")
    if path.stat().st_size == 0:
        raise ForgeError(f"{path}: the file is empty (0 bytes); truncated, or not a forge_ds export")
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
        raise ForgeError(f"{path}: cannot load ({describe(e)}); "
                         "the file is truncated or not a forge_ds export") from None
    if not isinstance(state, dict):
        raise ForgeError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return state


def check_init_tokenizer(init_from: Optional[str], tokenizer_sha256: str) -> None:
    """--init_from: an export's embedding rows belong to the tokenizer it was trained with (its sha256 is in the
    JSON beside it); this run's token ids would index other rows, silently. Known only after data preparation.
    An export without its JSON has nothing to compare and is taken as it is (load_export accepts it too)."""
    if not init_from:
        return
    path = Path(init_from).resolve()
    try:
        theirs = json.loads(path.with_suffix(".json").read_text(encoding="utf-8")).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError):
        return
    if theirs and theirs != tokenizer_sha256:
        beside = path.parent / "tokenizer.json"
        fix = (f"train with its tokenizer (--data.tokenizer={beside}, and another --data.prepared_dir)"
               if beside.is_file() else "train with the tokenizer it was made with")
        raise ForgeError(f"--init_from={path}: the export was trained with another tokenizer (sha256 {theirs[:12]}…, "
                         f"this run's {tokenizer_sha256[:12]}…); {fix}, or start without --init_from")


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
    path = Path(path)
    state = load_export(path)
    problems = []
    vocab, d, max_seq_len, n_layers = infer_shape(state)
    keys, expected = list(state), contract_keys(n_layers)
    if path.suffix == ".safetensors":  # the format stores its keys sorted: their order is not ours to check there
        keys, expected = sorted(keys), sorted(expected)
    if keys != expected:
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
        problems.append(f"strict load into SharedComponents failed: {describe(e)}")
    return problems
