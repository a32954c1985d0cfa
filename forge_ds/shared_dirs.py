"""Start-up check that every rank sees the run directory and the prepared data that rank 0 sees.

Rank 0 prepares the data and writes checkpoints into the run directory; every other rank reads the token files
and, at ZeRO 1-3, writes its own checkpoint shards beside rank 0's. On nodes that do not share those directories
the run would fail later with a misleading "no meta.json" or, worse, write checkpoints that no node holds whole.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

from forge_ds import distributed
from forge_ds.errors import ForgeError

MARK = ".forge-ds-shared-check"


def _sees(folder: Path, nonce: str) -> bool:
    try:
        return (folder / f"{MARK}-{nonce}").read_text() == nonce
    except OSError:
        return False


def check_same_dirs(**folders: Path) -> None:
    """Raise ForgeError on every rank unless each rank reads the marker rank 0 wrote into each folder (collective;
    nothing to do on one rank). Creates the folders on rank 0."""
    if distributed.world_size() == 1:
        return
    nonce = distributed.broadcast_object(secrets.token_hex(8) if distributed.is_main() else None)
    if distributed.is_main():
        for folder in folders.values():
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{MARK}-{nonce}").write_text(nonce)
    distributed.barrier()
    views = {name: (_sees(Path(f), nonce), str(Path(f).resolve())) for name, f in folders.items()}
    seen = distributed.gather_object((socket.gethostname(), views))
    if distributed.is_main():
        for folder in folders.values():
            (Path(folder) / f"{MARK}-{nonce}").unlink(missing_ok=True)
    blind = [(rank, host, name, where) for rank, (host, views) in enumerate(seen)
             for name, (ok, where) in views.items() if not ok]
    if blind:
        rank, host, name, where = blind[0]
        more = f" (and {len(blind) - 1} more such views)" if len(blind) > 1 else ""
        raise ForgeError(f"rank {rank} (host {host}) does not see the {name} directory that rank 0 wrote into "
                         f"{seen[0][1][name][1]!r}: it looks in {where!r}{more}; put --output_dir and "
                         "--data.prepared_dir on a filesystem every node mounts at the same path (absolute paths)")
