"""`python -m forge_ds ...` is `forge-ds ...`; the launch command of an installed forge_ds needs nothing else:

    deepspeed --num_gpus N --module forge_ds train --config=...

DeepSpeed's launcher then runs `python -u -m forge_ds --local_rank=I train ...` on every rank; cli.main accepts the
leading --local_rank.
"""

from forge_ds.cli import main

main()
