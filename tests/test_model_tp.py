"""Tensor parallel 2 vs 1 on two real gloo ranks (torchrun): the same seeded model trains to the same losses.

One launch runs both cases (MoT and the dense twin) at TP=2 and then TP=1 (tests/scripts/model_tp.py).
"""
import json

import pytest

from tests.dist import run


@pytest.fixture(scope="module")
def results():
    out = run(["tests/scripts/model_tp.py"], nproc=2, launcher="torchrun", timeout=180)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["mot", "dense"])
def test_tp2_trains_like_tp1(results, case):
    tp2, tp1 = results[case]["tp2"], results[case]["tp1"]
    assert (tp2["tp"], tp1["tp"]) == (2, 1)
    assert (tp2["padded_vocab"], tp1["padded_vocab"]) == (512, 384)  # different padding, same numbers
    assert len(tp2["losses"]) == 6
    for step, (a, b) in enumerate(zip(tp2["losses"], tp1["losses"])):
        assert abs(a - b) < 1e-5, (case, step, a, b)
    for a, b in zip(tp2["image_losses"], tp1["image_losses"]):
        assert abs(a - b) < 1e-5
    assert tp2["image_losses"][1] == 0.0  # the text-only micro-batch: image modules ran on empty slices
    assert tp2["losses"][3] < tp2["losses"][0]  # the same micro-batch, one epoch later: it learned
    assert tp2["logits_shape"] == [2, 8, 273]  # gathered over TP, real vocabulary only
    assert max(abs(a - b) for a, b in zip(tp2["logits"], tp1["logits"])) < 1e-5
    assert tp2["tokens"] == tp1["tokens"]  # KV-cached greedy decoding
    assert tp2["replicated_max_diff"] == 0.0  # QK-norm weights (shared by heads split over TP) stay in sync
