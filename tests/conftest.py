"""Shared fixtures: one tiny toy data set (world -> tokenizers -> shards) for every test that trains."""
import os

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
