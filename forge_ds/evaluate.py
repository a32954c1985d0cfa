"""Evaluation: the loss of a model over token windows, during training (the engine) and offline (`forge-ds evaluate`:
the FULL Phase-1 model, shared + dummy experts, back from a checkpoint).

The export holds the shared subtree only (no FFNs), so offline evaluation (and sample.py) reads the DeepSpeed
checkpoint instead: at ZeRO 1-3 through DeepSpeed's own zero_to_fp32 (every rank's shards, fp32 masters, in one
process), at ZeRO-0 from the module states; the frozen ffn_norm comes from frozen_params.safetensors and the position table from its formula,
as in the export. Offline it is plain torch, no engine: it runs alone or under any launcher (the ranks split the
windows exactly as training's evaluation does and all-reduce two sums).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from forge_ds import checkpoint, data, distributed, faults, launch_env, prepare
from forge_ds.config import Config
from forge_ds.errors import ForgeError, describe
from forge_ds.files import sha256_file
from forge_ds.metrics import perplexity
from forge_ds.model import SharedTrainingModel, sinusoidal_table
from forge_ds.tokens import token_dtype

SPLITS = ("val", "train", "all")


def find_checkpoint(path: str) -> Path:
    """A checkpoint folder, or the newest complete one of a run folder (or of its checkpoints/ folder)."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ForgeError(f"{p}: no such run or checkpoint folder; give a run directory (runs/<name>) or one of its "
                         "checkpoints/step-* folders")
    for root in (p / "checkpoints", p):
        if root.is_dir() and not (root / checkpoint.STATE_FILE).exists() and any(root.glob("step-*")):
            complete = checkpoint.complete_checkpoints(root)
            if not complete:
                raise ForgeError(f"{root}: no complete checkpoint (no step-* folder with a COMPLETE file); "
                                 "train until the first checkpoint_every, or pick a checkpoint folder")
            return complete[-1]
    if p.is_dir() and not any((p / name).exists() for name in (checkpoint.STATE_FILE, "config.yaml", "latest")) \
            and not any(p.glob("*model_states.pt")):
        raise ForgeError(f"{p}: neither a run folder (with checkpoints/) nor a checkpoint folder "
                         "(checkpoints/step-*); give one of those")
    return checkpoint.validate_checkpoint_dir(p)


def _read_weights(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every key of SharedTrainingModel, from DeepSpeed's files. DeepSpeed's reader narrates every shard on
    stdout and stderr, on every rank; its failures arrive as exceptions, so the narration is dropped."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if zero_stage == 0:
            path = ckpt / "mp_rank_00_model_states.pt"
            try:
                # DeepSpeed's own file: plain containers, tensors and numbers only (DeepSpeed 0.19.8), so the safe
                # unpickler reads it. Under bf16 these are the bf16 weights the run itself evaluated with.
                return torch.load(path, map_location="cpu", weights_only=True)["module"]
            except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
                raise ForgeError(f"{path}: cannot read the ZeRO-0 model states ({type(e).__name__}); "
                                 "the checkpoint is damaged") from None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        except (FileNotFoundError, ValueError, RuntimeError, EOFError, KeyError) as e:
            raise ForgeError(f"{ckpt}: cannot read the DeepSpeed shards ({type(e).__name__}: {e}); "
                             "the checkpoint is incomplete or damaged") from None


def load_full_model(ckpt: Path, device: str = "cpu") -> tuple[SharedTrainingModel, Config, checkpoint.TrainState]:
    """The trained model, fp32, in eval mode (dropout off), with the config and state saved beside it."""
    cfg, state = checkpoint.saved_config(ckpt), checkpoint.read_state(ckpt)
    m = cfg.model
    model = SharedTrainingModel(m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.d_ff, m.max_seq_len, 0.0)
    weights = {k: v.detach().to(torch.float32) for k, v in _read_weights(ckpt, state.zero_stage).items()}
    weights["shared.pos_encoding.pe"] = sinusoidal_table(m.max_seq_len, m.d_model)
    weights.update({f"shared.{k}": v.to(torch.float32) for k, v in checkpoint.read_frozen(ckpt).items()})
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ForgeError(f"{ckpt}: the weights do not fit the model in its config.yaml "
                         f"({describe(e)}); the checkpoint is damaged or from another model") from None
    return model.to(device).eval(), cfg, state


def load_run_tokenizer(ckpt: Path, cfg: Config, state: checkpoint.TrainState):
    """The tokenizer.json the run copied into its folder, checked against the checkpoint's record of it."""
    path = ckpt.parent.parent / "tokenizer.json"
    if not path.is_file():
        raise ForgeError(f"{path}: missing; evaluate/sample need the run folder a checkpoint sits in "
                         "(runs/<name>/checkpoints/step-*), with its tokenizer.json")
    if state.tokenizer_sha256 and sha256_file(path) != state.tokenizer_sha256:
        raise ForgeError(f"{path} differs from the tokenizer {ckpt.name} was trained with (sha256 in "
                         f"{checkpoint.STATE_FILE}); restore the run's tokenizer.json")
    return prepare.load_tokenizer(str(path), cfg.model.vocab_size), path


@torch.no_grad()
def mean_loss(model, windows: data.TokenWindows, batch_size: int, device: str, max_batches: Optional[int],
              stop_requested: Optional[Callable[[], bool]] = None, progress: bool = False) -> Optional[float]:
    """Token-weighted mean loss of `model` (a DeepSpeed engine during training, a plain module offline) over the
    split, or None when `stop_requested()` (called before each batch, on every rank: it must agree across ranks)
    said to stop. Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively), so short
    ranks repeat a window with weight zero. `progress`: a bar on stderr, refreshed every few seconds."""
    rank, world = distributed.rank(), distributed.world_size()
    indices = list(range(len(windows)))
    per_rank = math.ceil(len(indices) / world)
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    n_batches = batches_per_rank(len(windows), world, batch_size, max_batches)
    model.eval()
    loss_sum = tokens = 0.0
    for b in tqdm(range(n_batches), desc="evaluate", unit="batch", disable=not progress, mininterval=5.0,
                  file=sys.stderr):
        if stop_requested is not None and stop_requested():
            model.train()
            return None
        faults.point("eval_batch")  # tests: a slow evaluation, for Ctrl-C to land in
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1.0 if chunk else 0.0
        x, y = get_batch(windows, chunk or [0], device)
        n = float((y != 0).sum()) * weight
        loss_sum += float(model(x, y)) * n
        tokens += n
    model.train()
    total_loss, total_tokens = distributed.all_reduce([loss_sum, tokens])
    return total_loss / max(total_tokens, 1.0)


def batches_per_rank(n_windows: int, world: int, batch_size: int, max_batches: Optional[int]) -> int:
    n_batches = math.ceil(math.ceil(n_windows / world) / batch_size)
    return min(n_batches, max_batches) if max_batches else n_batches


def get_batch(windows: data.TokenWindows, indices: list[int], device: str):
    return data.to_device(data.stack_windows(windows, indices), device)


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ForgeError(f"--device={device!r} is not one of auto, cpu, cuda")
    return launch_env.pick_device(device, "--device", "--device")


# ------------------------------------------------------------------------------------------------------- evaluate


def _prepared_split(cfg: Config, split: str, tokenizer_sha: str) -> Optional[Path]:
    """The run's own prepared token file, when it is still where training left it (relative to this directory)."""
    d = cfg.data
    try:
        folder = Path(d.prepared_dir) if d.prepared_dir else Path("data/prepared") / prepare.prepared_key(
            prepare.source_identity(d.source, d.text_field, d.min_article_length, d.max_articles, cfg.model.vocab_size,
                                    d.val_fraction, d.split_seed, d.tokenizer, d.tokenizer_train_bytes))
        if (folder / "meta.json").is_file() and data.read_meta(folder)["tokenizer_sha256"] == tokenizer_sha:
            return folder / f"{split}.bin"
    except (ForgeError, OSError, KeyError):
        pass  # moved, deleted or the source is gone: tokenize again below
    return None


def _tokenize(cfg: Config, split: str, tok, out: Path) -> Path:
    """The documents of one split (or all), encoded exactly as prepare.prepare encodes them."""
    d = cfg.data
    docs = prepare.load_documents(d.source, d.text_field, d.min_article_length, d.max_articles)
    if split != "all":
        train_docs, val_docs = prepare.split_documents(docs, d.val_fraction, d.split_seed)
        docs = val_docs if split == "val" else train_docs
    prepare.encode_documents(docs, tok, cfg.model.vocab_size).tofile(out)
    return out


def evaluate_checkpoint(path: str, batch_size: Optional[int] = None, max_batches: Optional[int] = None,
                        split: Optional[str] = None, device: str = "auto", data_overrides: Optional[dict] = None,
                        show: bool = True) -> dict:
    """Loss and perplexity of the full model over a split; on every rank (collective when ranks > 1).

    Args:
        data_overrides: `data.*` fields replacing the run's (e.g. {"source": "other.txt"}).
        split: "val", "train" or "all"; default "val" for the run's own source, "all" for another source.
    Returns:
        The result dict that is also printed as the last line of JSON (rank 0).
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ForgeError(f"--batch_size={batch_size!r} must be a positive integer")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ForgeError(f"--max_batches={max_batches!r} must be a positive integer (omit it for the whole split)")
    if split is not None and split not in SPLITS:
        raise ForgeError(f"--split={split!r} is not one of {', '.join(SPLITS)}")
    device = resolve_device(device)
    ckpt = find_checkpoint(path)
    model, cfg, state = load_full_model(ckpt, device)
    tok, tok_path = load_run_tokenizer(ckpt, cfg, state)
    run_source = cfg.data.source
    for key, value in (data_overrides or {}).items():
        try:
            setattr(cfg.data, key, value)
        except ValueError as e:  # pydantic: unknown field or wrong type
            reason = e.errors()[0]["msg"] if hasattr(e, "errors") else describe(e)
            raise ForgeError(f"--data.{key}={value!r} is invalid ({reason}); "
                             "see `forge-ds train --help` for the data fields") from None
    own_data = not data_overrides
    split = split or ("val" if cfg.data.source == run_source else "all")
    with tempfile.TemporaryDirectory(prefix="forge-ds-eval-") as tmp:
        tokenizer_sha = state.tokenizer_sha256 or sha256_file(tok_path)
        bin_path = (_prepared_split(cfg, split, tokenizer_sha) if own_data and split != "all" else None) \
            or _tokenize(cfg, split, tok, Path(tmp) / f"{split}.bin")
        windows = data.TokenWindows(bin_path, cfg.model.max_seq_len, token_dtype(cfg.model.vocab_size))
        batch = batch_size or cfg.training.batch_size
        loss = mean_loss(model, windows, batch, device, max_batches, progress=show and distributed.is_main())
        unigram = data.unigram_entropy(bin_path, token_dtype(cfg.model.vocab_size))
        result = {"checkpoint": str(ckpt), "step": state.step, "zero_stage": state.zero_stage,
                  "source": cfg.data.source, "split": split, "tokens": windows.n_tokens, "windows": len(windows),
                  "seq_len": cfg.model.max_seq_len, "batch_size": batch, "max_batches": max_batches,
                  "ranks": distributed.world_size(), "loss": loss, "ppl": perplexity(loss),
                  "unigram_entropy": unigram, "unigram_ppl": math.exp(unigram)}
        del windows  # its memmap must close before the temporary folder goes
    if show and distributed.is_main():
        print(f"checkpoint  {ckpt} (step {state.step}, ZeRO-{state.zero_stage}, trained on {state.world_size} "
              f"rank(s)); evaluated on {result['ranks']} rank(s)")
        print(f"data        {cfg.data.source} [{split}]: {result['tokens']:,} tokens, {result['windows']:,} windows "
              f"of {cfg.model.max_seq_len}" + (f", first {max_batches} batch(es) of {batch} per rank"
                                                if max_batches else ""))
        print(f"loss        {loss:.4f}  perplexity {result['ppl']:.2f}  (full model: shared + dummy experts)")
        print(f"unigram     entropy {unigram:.4f} nats (perplexity {result['unigram_ppl']:.2f}): the loss of the best "
              "predictor that ignores context")
        print(json.dumps(result), flush=True)
    return result
