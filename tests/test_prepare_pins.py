"""The embedded corpus's prepared bytes are pinned: docs/QUALITY.md's figures and every parity test rest on them.

Recorded with the in-memory preparation (before streaming, issue 19). The tokenizer is pinned by its vocabulary
and merges, not by tokenizer.json's bytes, which vary with the tokenizers version.
"""

import hashlib
import json

import pytest

from forge_ds import prepare

PINS = {  # vocab size: (train.bin sha256, val.bin sha256, vocab sha256, merges sha256, prepared key)
    2048: ("2a08e34efeb9f01f8399b08f9dcbe63d6c56ccd13499c5662571928106b32986",
           "f9724eb1f5fa1b5b7bada608b438f3b74fbd12926159fd444841ab8389f9969f",
           "20123024ef07aae7874b18f153ed2c172832f25c256e3f478d07246075f7ee42",
           "c45b6bb30cf39072386d60aeb1873e5d3f2b2ce378f64440b9a131f256aa25db", "fdea7c2eb606f25a"),
    300: ("647cce06360c296d71896da146b0d9b8aa68cd5d3b5171d313f5bf961a731308",
          "66d50ab636bc81097c2e51a63c51bb9e6e52ce787877b4e6ead0f2758d8962ad",
          "bcad820db33c04e7c4dd1a417bad5bba10273a8fde7293698387c5c2bb5b4baf",
          "d8049f9dcef87cfc24ae1ede21436940ca7a3bc312db06180800d7d90d89ae1a", "12c411f1a4d14ffd"),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("vocab", sorted(PINS))
def test_embedded_corpus_prepares_to_the_pinned_bytes_tokenizer_and_key(vocab, tmp_path):
    train_sha, val_sha, vocab_sha, merges_sha, key = PINS[vocab]
    out = prepare.prepare("builtin:pydoc", vocab_size=vocab, root=str(tmp_path), show_progress=False)
    assert out.name == key  # the default cache key of existing prepared directories is unchanged
    assert _sha((out / "train.bin").read_bytes()) == train_sha
    assert _sha((out / "val.bin").read_bytes()) == val_sha
    model = json.loads((out / "tokenizer.json").read_text())["model"]
    assert _sha(json.dumps(model["vocab"], sort_keys=True).encode()) == vocab_sha
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    assert _sha("\n".join(merges).encode()) == merges_sha
