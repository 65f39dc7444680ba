"""Every collected test has exactly one tier (unit, distributed, system), and the tiers say what a test starts."""
from pathlib import Path

import pytest

from tests.conftest import TIERS, tier_of


def tiers(item) -> list[str]:
    return [m.name for m in item.iter_markers() if m.name in TIERS]


def test_every_collected_test_has_exactly_one_tier(request):
    items = request.session.items
    assert [i.nodeid for i in items if len(tiers(i)) != 1] == []
    by_id = {i.nodeid: tiers(i)[0] for i in items}
    here = {k: v for k, v in by_id.items() if k.startswith("tests/test_tiers.py::")}
    assert set(here.values()) == {"unit"} and len(here) == 2
    expected = {  # present when the session collected these modules (a run of one file collects only that file)
        "tests/test_model_tp.py::test_tp2_trains_like_tp1[mot]": "distributed",  # the module's tier
        "tests/test_trainer.py::test_resume_is_bitwise": "distributed",  # through the 'runs' fixture
        "tests/test_trainer.py::test_checkpoint_of_another_shape_is_refused": "unit",
        "tests/test_slurm.py::test_failed_stage_leaves_the_next_never_started": "system",  # slurm_cluster, indirectly
        "tests/test_sft.py::test_two_data_parallel_ranks_match_one": "distributed",  # its explicit mark
        "tests/test_bf16.py::test_selfcheck_runs_on_the_cpu": "system",
    }
    for nodeid, tier in expected.items():
        assert by_id.get(nodeid, tier) == tier, nodeid


class Item:
    """The three things tier_of reads from a collected test."""
    def __init__(self, module: str, marks=(), fixtures=()):
        self.path, self.nodeid, self.fixturenames = Path(f"tests/{module}.py"), f"tests/{module}.py::t", list(fixtures)
        self._marks = [getattr(pytest.mark, m).mark for m in marks]

    def iter_markers(self):
        return iter(self._marks)


def test_a_test_without_or_with_two_tiers_fails_collection():
    assert tier_of(Item("test_trainer", fixtures=["toy_data", "runs"])) == "distributed"
    assert tier_of(Item("test_launchers", fixtures=["reference_run", "slurm_cluster"])) == "system"
    assert tier_of(Item("test_config", marks=["system"], fixtures=["runs"])) == "system"  # explicit decides
    with pytest.raises(pytest.UsageError, match="no tier: add 'test_new' to MODULE_TIER"):
        tier_of(Item("test_new"))
    with pytest.raises(pytest.UsageError, match=r"more than one tier \(distributed, unit\)"):
        tier_of(Item("test_config", marks=["unit", "distributed"]))
