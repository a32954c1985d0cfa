"""Where this forge_ds came from and where its shipped files live, in a wheel and in a source checkout alike.

The DeepSpeed configs and the SLURM templates have one copy each, at the repository root (`ds_configs/`, `slurm/`),
where users read and copy them. setup.py maps those folders into the package, so a wheel carries them as
`forge_ds/ds_configs/` and `forge_ds/slurm/`; a checkout (editable install or PYTHONPATH) has them only at the root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from forge_ds import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """The folder of shipped files `name` (ds_configs, slurm): inside the package when installed from a wheel,
    else at the root of the checkout this package is imported from."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


def checkout_root() -> Optional[Path]:
    """The source checkout this package is imported from, or None for an installed wheel. Both markers are ours:
    site-packages may hold some other distribution's top-level `benchmarks/`."""
    root = PACKAGE_DIR.parent
    return root if (root / "setup.py").is_file() and (root / "benchmarks" / "bench.py").is_file() else None


def source() -> str:
    """What `forge-ds --version` and env.txt say: which forge_ds runs, and from where (a stale editable install or
    a checkout on PYTHONPATH shadowing the wheel you meant is visible at once)."""
    return f"forge_ds {__version__} from {PACKAGE_DIR}"


def sources_report(per_rank: list[str]) -> list[str]:
    """One line per distinct source() among the ranks (index = rank), naming its ranks: on a cluster, a node with
    another install of forge_ds stands out."""
    ranks: dict[str, list[int]] = {}
    for rank, text in enumerate(per_rank):
        ranks.setdefault(text, []).append(rank)
    return [f"{text} (rank{'s' if len(rs) > 1 else ''} {_spans(rs)})" for text, rs in ranks.items()]


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2 5": a thousand ranks from one install stay one short line."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return " ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
