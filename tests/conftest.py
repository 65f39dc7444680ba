"""Shared fixtures: one tiny toy data set (world -> tokenizers -> shards) for every test that trains."""
import pytest


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """Paths of a tiny toy data set: raw JSONL, tokenizer bundle and shards (train, valid_seen, valid_heldout)."""
    from megannm.toy.demo import build_data
    out = tmp_path_factory.mktemp("toy")
    return build_data(out, n_train=400, n_valid=40, seed=0, workers=1, say=lambda *a: None)
