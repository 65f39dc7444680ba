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
