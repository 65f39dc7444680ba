"""Shared fixtures: one tiny toy data set (world -> tokenizers -> shards) for every test that trains; and the tier
of every test (``unit``, ``distributed``, ``system``: the markers of pytest.ini), so that ``pytest -m unit`` works."""
import os
from pathlib import Path

import pytest

# Bitwise comparisons between runs (resume, requeue, launchers) need MKL's run-to-run reproducible code paths:
# without them a matmul's rounding may follow the alignment of its buffers, which differs from process to process.
# Every process a test starts inherits it.
os.environ.setdefault("MKL_CBWR", "AUTO")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """Paths of a tiny toy data set: raw JSONL, tokenizer bundle and shards (train, valid_seen, valid_heldout)."""
    from megannm.toy.demo import build_data
    out = tmp_path_factory.mktemp("toy")
    return build_data(out, n_train=400, n_valid=40, seed=0, workers=1, say=lambda *a: None)


@pytest.fixture(scope="module")
def tok(toy_data):
    """The toy data set's tokenizer bundle (a module may define its own ``tok``)."""
    from megannm.data.tokenize import Tokenizers
    return Tokenizers.load(toy_data["tokenizers"])


@pytest.fixture(scope="module")
def layout():
    """A world of one; one thread: tiny models gain nothing from two, and lose a lot on a busy machine (a module
    may define its own ``layout``)."""
    import torch
    from megannm.parallel import init_parallel
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield init_parallel(1, 1)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# tiers

TIERS = ("unit", "distributed", "system")  # in increasing order: a test takes the highest that applies
# Every test module's tier. A new module must be listed here (collection fails otherwise).
MODULE_TIER = {
    "test_bf16": "unit", "test_cli": "unit", "test_config": "unit", "test_convert": "unit", "test_demo": "unit",
    "test_errors": "unit", "test_geneval": "unit", "test_guard": "unit", "test_image_tokenizers": "unit",
    "test_launchers": "unit", "test_layers": "unit", "test_loader": "unit",
    "test_model": "unit", "test_model_tp": "distributed", "test_own_data": "unit", "test_phase_example": "unit",
    "test_pipeline": "unit", "test_plan": "unit", "test_plans": "unit", "test_readme": "unit",
    "test_reward_server": "unit", "test_rl": "unit", "test_rollout": "unit", "test_serve": "unit", "test_sft": "unit",
    "test_shards": "unit", "test_slurm": "unit", "test_sources": "unit", "test_tiers": "unit",
    "test_tokenizers": "unit", "test_toy": "unit", "test_trainer": "unit",
    "test_elastic": "distributed", "test_runs": "distributed",
    "test_flow": "unit", "test_flow_train": "distributed",
    "test_security": "unit",
}
# Fixtures that start several ranks or a cluster: a test that uses one (directly or through another fixture) takes
# its tier. Keyed by module where the name is a module's own fixture; None: the session fixtures of
# tests/slurm_cluster.py, wherever they are used.
FIXTURE_TIER = {
    (None, "slurm_cluster"): "system",  # a real slurmctld + slurmd on localhost
    (None, "reference_run"): "distributed",  # the tiny recipe on 2 torchrun ranks
    ("test_demo", "demo"): "system",  # `megannm demo` end to end
    ("test_bf16", "runs"): "distributed", ("test_convert", "runs"): "distributed",
    ("test_pipeline", "runs"): "distributed", ("test_trainer", "runs"): "distributed",
    ("test_plan", "measured"): "distributed", ("test_rl", "ranks"): "distributed",
}
# A test whose own body launches several ranks says so with an explicit mark (``@pytest.mark.distributed``); an
# explicit mark decides alone.


def tier_of(item) -> str:
    explicit = [m.name for m in item.iter_markers() if m.name in TIERS]
    if len(set(explicit)) > 1:
        raise pytest.UsageError(f"{item.nodeid}: more than one tier ({', '.join(sorted(set(explicit)))})")
    if explicit:
        return explicit[0]
    module = Path(item.path).stem
    if module not in MODULE_TIER:
        raise pytest.UsageError(f"{item.nodeid}: no tier: add {module!r} to MODULE_TIER in tests/conftest.py "
                                f"(one of {', '.join(TIERS)})")
    tiers = [MODULE_TIER[module]] + [FIXTURE_TIER.get((module, f)) or FIXTURE_TIER.get((None, f), "unit")
                                     for f in getattr(item, "fixturenames", ())]
    return max(tiers, key=TIERS.index)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item)
        if not any(m.name == tier for m in item.iter_markers()):
            item.add_marker(getattr(pytest.mark, tier))
