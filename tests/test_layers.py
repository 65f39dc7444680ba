"""The import rules of docs/architecture.md, checked on the source: layers only point down, the toy world is never
imported by the core, and nothing outside ``megannm/parallel.py`` touches process-group globals or
``torch.distributed``. Every ``import`` counts, also those inside functions (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "megannm"

# Lower ranks are lower layers; a module may import its own unit or units of a LOWER rank only.
RANKS = {
    "fileio": 0, "vocab": 0, "parallel": 0, "config": 0,
    "model": 1, "data": 1,
    "checkpoint": 2,
    "convert": 3,
    "opened": 3.5,
    "train": 4, "generate": 4,
    "rewards": 5,
    "phases": 6,
    "runner": 7, "evaluate": 7, "slurm": 7, "plan": 7,
    "toy": 8,
    "cli": 9, "__main__": 10,
}
# Imports of process groups and collectives: only parallel.py may make them.
COLLECTIVES = ("torch.distributed", "megatron.core.parallel_state")
COLLECTIVE_NAMES = {("megatron.core", "parallel_state"), ("torch", "distributed")}


def unit_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "megannm"


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


def megannm_targets(module: str, names: tuple) -> list[str]:
    if module == "megannm":  # from megannm import parallel, vocab, ...
        return list(names)
    if module.startswith("megannm."):
        return [module.split(".")[1]]
    return []


SOURCES = sorted(p for p in ROOT.rglob("*.py") if "hf_modeling" not in p.parts)


def test_every_unit_has_a_rank():
    units = {unit_of(p) for p in SOURCES} - {"megannm"}
    assert units <= set(RANKS), f"give these a layer in RANKS and docs/architecture.md: {sorted(units - set(RANKS))}"


def test_imports_point_down():
    bad = []
    for path in SOURCES:
        src = unit_of(path)
        if src == "megannm":
            continue
        for line, module, names in imports(path):
            for dst in megannm_targets(module, names):
                if dst != src and dst in RANKS and RANKS[dst] >= RANKS[src]:
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {src} imports {dst}")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_the_core_never_imports_the_toy_world():
    bad = [f"{p.relative_to(ROOT.parent)}:{line}" for p in SOURCES if unit_of(p) not in ("toy", "cli")
           for line, module, names in imports(p) if "toy" in megannm_targets(module, names)]
    assert not bad


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
