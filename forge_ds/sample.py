"""`forge-ds sample`: text from the full model of a run or checkpoint (a quick sanity check of what it learned)."""

from __future__ import annotations

from typing import Optional

import torch

from forge_ds import data
from forge_ds.errors import ForgeError
from forge_ds.evaluate import find_checkpoint, load_full_model, load_run_tokenizer, resolve_device
from forge_ds.model import SharedTrainingModel


@torch.no_grad()
def generate(model: SharedTrainingModel, tok, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0) -> str:
    """Prompt plus continuation as text, without <bos>/<eos>. Stops at <eos>; the context is cropped to the last
    max_seq_len tokens. temperature 0 is greedy; top_k 0 samples from the whole vocabulary."""
    device = next(model.parameters()).device
    tok.encode_special_tokens = True  # as in training: a literal "<eos>" in the prompt is text, not a boundary
    ids = [data.BOS_ID] + tok.encode(prompt, add_special_tokens=False).ids
    window = model.shared.pos_encoding.pe.shape[1]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids[-window:]], device=device))[0, -1].float().cpu()
        logits[0] = float("-inf")  # <pad> is never a target: the model learned nothing about it
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                logits[logits < torch.topk(logits, top_k).values[-1]] = float("-inf")
            nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        if nxt == data.EOS_ID:
            break
        ids.append(nxt)
    # Decoded as one sequence: byte-level BPE may join the prompt's last bytes with the first new token.
    return tok.decode(ids, skip_special_tokens=True)


def sample_checkpoint(path: str, prompt: str = "", max_new_tokens: int = 50, temperature: float = 0.8,
                      top_k: int = 50, seed: Optional[int] = None, device: str = "auto") -> tuple[str, int]:
    """(text, seed used). A missing seed draws a fresh one, reported so the sample can be reproduced."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ForgeError(f"--max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ForgeError(f"--temperature={temperature!r} must be a number >= 0 (0 = greedy)")
    if not isinstance(top_k, int) or top_k < 0:
        raise ForgeError(f"--top_k={top_k!r} must be an integer >= 0 (0 = no limit)")
    if seed is not None and not isinstance(seed, int):
        raise ForgeError(f"--seed={seed!r} must be an integer")
    seed = seed if seed is not None else int(torch.seed() % (2**31))
    ckpt = find_checkpoint(path)
    model, cfg, state = load_full_model(ckpt, resolve_device(device))
    tok, _ = load_run_tokenizer(ckpt, cfg, state)
    return generate(model, tok, str(prompt), max_new_tokens, float(temperature), top_k, seed), seed
