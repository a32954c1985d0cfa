"""The layout docs/ARCHITECTURE.md promises: imports point down its layer list, one module reads the environment,
no module outgrows one sitting, and the small shared rules (atomic writes, quoted exceptions, perplexity) have
one home."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "forge_ds"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def layers() -> dict[str, int]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"```layers\n(.*?)```", text, re.S).group(1)
    return {name: int(line.split()[0]) for line in block.splitlines() if line.strip()
            for name in line.split()[1:]}


def imports_of(module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "forge_ds":
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("forge_ds."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("forge_ds.")}
    return found - {module}


def test_every_module_has_a_layer_in_the_architecture_doc():
    assert sorted(layers()) == MODULES


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_the_layers(module):
    layer = layers()
    upward = sorted(dep for dep in imports_of(module) if layer[dep] <= layer[module])
    assert not upward, f"{module} (layer {layer[module]}) imports {upward} from its own layer or above"


def test_only_launch_env_reads_environment_variables():
    # Reads only: setting a variable for a library in a worker (TOKENIZERS_PARALLELISM) decides nothing here.
    reads = r"os\.environ(?!\[[^\]]+\]\s*=[^=])|os\.getenv|getenv\("
    readers = sorted(m for m in MODULES if re.search(reads, (PACKAGE / f"{m}.py").read_text(encoding="utf-8")))
    assert readers == ["launch_env"]


@pytest.mark.parametrize("module", MODULES)
def test_no_module_outgrows_one_sitting(module):
    lines = len((PACKAGE / f"{module}.py").read_text(encoding="utf-8").splitlines())
    assert lines <= 400, f"{module}.py has {lines} lines; split it along a real seam"


def test_copied_rules_are_gone():
    """Each of these once had several copies that disagreed; now each lives in one module."""
    homes = {r"math\.exp\(min\(": "metrics", r"\.tmp-\{os\.getpid": "files", r"str\(e\)\.splitlines\(\)\[": None,
             r'" "\.join\(str\(\w+\)\.split\(\)\)': "errors"}
    for pattern, home in homes.items():
        users = sorted(m for m in MODULES if re.search(pattern, (PACKAGE / f"{m}.py").read_text(encoding="utf-8")))
        assert users == ([home] if home else []), (pattern, users)


def test_perplexity_has_one_rule_for_missing_and_huge_losses():
    import math

    from forge_ds.metrics import perplexity

    assert perplexity(None) is None
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(1e9) == pytest.approx(math.exp(50.0))


def test_describe_quotes_any_exception_on_one_line():
    from forge_ds.errors import describe

    assert describe(ValueError("")) == "ValueError"  # an empty message once raised IndexError in a formatter
    assert describe(OSError("disk\nfull  now")) == "OSError: disk full now"
    assert len(describe(RuntimeError("x" * 1000))) == len("RuntimeError: ") + 200
