"""Entry point for `deepspeed launchers/train_shared.py [flags]`: the same command as `forge-ds train`.

The deepspeed launcher appends `--local_rank=N`; `forge-ds train` accepts it (the environment's LOCAL_RANK wins).
"""

import sys

from forge_ds.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
