"""A prepared-data folder with enough training windows for large GPU batches (benchmarks/gpu.sh, issue 17).

The embedded corpus holds 99 windows at GPT-2's T1024 and 198 at ModularForge's T512: fewer than a few steps of
B64 or B128. This copies a prepared folder (tokenizer, validation split, meta.json) and writes its train.bin as the
original training tokens repeated until it holds --windows windows of --seq_len + 1 tokens. The token statistics
stay real (the same text, again); throughput does not depend on what the tokens say. meta.json keeps the source
identity, so `prepare.prepare` reuses the folder as it is, and records the new train_tokens.

    python benchmarks/synthetic_tokens.py PREPARED OUT --seq_len 512 --windows 4096
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prepared", help="a prepared-data folder (train.bin, val.bin, tokenizer.json, meta.json)")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--seq_len", type=int, required=True)
    p.add_argument("--windows", type=int, required=True, help="training windows wanted")
    args = p.parse_args(argv)
    src, out = Path(args.prepared), Path(args.out)
    tokens = np.memmap(src / "train.bin", dtype=np.uint16, mode="r")
    wanted = args.windows * args.seq_len + 1
    out.mkdir(parents=True, exist_ok=True)
    for name in ("val.bin", "tokenizer.json"):
        shutil.copyfile(src / name, out / name)
    np.resize(np.asarray(tokens), max(wanted, len(tokens))).astype(np.uint16).tofile(out / "train.bin")
    meta = json.loads((src / "meta.json").read_text())
    meta["train_tokens"] = max(wanted, len(tokens))
    meta["synthetic"] = f"train.bin = {src / 'train.bin'} repeated to {meta['train_tokens']} tokens"
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: its presence marks the folder done
    print(f"{out}: {meta['train_tokens']:,} training tokens ({meta['train_tokens'] // args.seq_len:,} windows "
          f"at T{args.seq_len})")
    return out


if __name__ == "__main__":
    main()
