"""Tensor parallel 2 vs 1 on two real gloo ranks (torchrun): the same seeded model trains to the same losses.

One launch runs every case (MoT, the dense twin, MoT with continuous images) at TP=2 and then TP=1
(tests/scripts/model_tp.py).
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


def test_tp2_trains_continuous_images_like_tp1(results):
    """Latent slots in, velocities out, the flow loss: the replicated latent modules see the same inputs on every
    tensor rank, so TP 2 gives TP 1's numbers."""
    tp2, tp1 = results["flow"]["tp2"], results["flow"]["tp1"]
    assert (tp2["tp"], tp1["tp"]) == (2, 1)
    assert len(tp2["losses"]) == 6
    for a, b in zip(tp2["losses"] + tp2["image_losses"], tp1["losses"] + tp1["image_losses"]):
        assert abs(a - b) < 1e-5, (a, b)
    assert tp2["image_losses"][1] == 0.0  # text only: no slot, no flow loss
    assert tp2["image_losses"][0] > 0.5  # the flow loss of unit-variance latents and noise, velocity head at zero
    assert tp2["image_losses"][3] < tp2["image_losses"][0]  # the same micro-batch one epoch later: it learned
    assert tp2["logits_shape"] == [2, 8, 273]
    assert max(abs(a - b) for a, b in zip(tp2["logits"] + tp2["velocity"], tp1["logits"] + tp1["velocity"])) < 1e-5
    assert max(abs(v) for v in tp2["velocity"]) > 1e-3  # the velocity head learned something to compare
    assert tp2["replicated_max_diff"] == 0.0  # the latent modules too
