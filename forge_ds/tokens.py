"""The token-id contract shared by preparation and every reader: special ids and the token files' dtype.

Kept apart from data.py (which imports torch) so preparation's worker processes start without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0, 1, 2, 3 (contract)
BOS_ID, EOS_ID = 2, 3
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # below it the byte alphabet alone overflows the model's embedding


def token_dtype(vocab_size: int) -> np.dtype:
    """The one place that decides a token file's element type: uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def file_dtype(bin_path) -> np.dtype:
    """The dtype of a prepared .bin, as its meta.json records it; files written before the field existed (and
    without a meta.json beside them) are uint16."""
    import json

    meta = Path(bin_path).parent / "meta.json"
    if meta.is_file():
        return np.dtype(json.loads(meta.read_text()).get("dtype", "uint16"))
    return np.dtype(np.uint16)
