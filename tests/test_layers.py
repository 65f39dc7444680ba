"""The import rules of docs/architecture.md: ``lint-imports`` checks the contracts of ``.importlinter`` (layers only
point down, the toy world is never imported by the core, no cycles); the rule it cannot state, that nothing outside
``megannm/parallel.py`` touches process-group globals or ``torch.distributed``, is checked here on the source. Every
``import`` counts, also those inside functions (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "megannm"

# Imports of process groups and collectives: only parallel.py may make them.
COLLECTIVES = ("torch.distributed", "megatron.core.parallel_state")
COLLECTIVE_NAMES = {("megatron.core", "parallel_state"), ("torch", "distributed")}


def imports(path: Path):
    """(line, imported module, names) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, tuple(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: only inside hf_modeling (self-contained)
            yield node.lineno, ".", ()


SOURCES = sorted(p for p in ROOT.rglob("*.py") if "hf_modeling" not in p.parts)


def test_import_contracts_hold():
    """``.importlinter``'s contracts: layers point down (every top-level module placed in one), the core never imports
    the toy world, conversion never imports training, no import cycle inside a package."""
    lint = shutil.which("lint-imports")
    assert lint is not None, "import-linter is not installed: pip install -e .[test]"
    out = subprocess.run([lint, "--no-cache"], cwd=ROOT.parent, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_only_parallel_touches_process_groups():
    bad = []
    for path in SOURCES:
        if path.name == "parallel.py" and path.parent == ROOT:
            continue
        for line, module, names in imports(path):
            if module.startswith(COLLECTIVES) or any((module, n) in COLLECTIVE_NAMES for n in names):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: imports {module} {' '.join(names)}")
    assert not bad, "use megannm.parallel and the Layout's groups instead:\n" + "\n".join(bad)


@pytest.mark.parametrize("snippet, ok", [("import torch.distributed as dist", False),
                                         ("from megatron.core import parallel_state as ps", False),
                                         ("from torch import distributed", False),
                                         ("import torch", True)])
def test_the_process_group_check_can_fail(tmp_path, snippet, ok):
    f = tmp_path / "x.py"
    f.write_text(f"def f():\n    {snippet}\n")
    found = [m for _, m, names in imports(f) if m.startswith(COLLECTIVES)
             or any((m, n) in COLLECTIVE_NAMES for n in names)]
    assert (not found) == ok
