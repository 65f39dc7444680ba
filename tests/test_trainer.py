"""The trainer on real DeepSpeed engines and real gloo ranks: layouts agree, resume is exact, saves are atomic.

Launches are shared: one single-process run for the references, one 2-rank run (the deepspeed launcher) for TP=2,
ZeRO-3, resume, the empty-modality cases and the cross-rank parts of the divergence guard and of saving and loading,
one 4-rank torchrun for TP 2 x DP 2 with ZeRO-3.
"""
import json
import math
import subprocess
import sys

import pytest

from tests import dist

SCRIPT = "tests/scripts/trainer_cases.py"


def load(out, name):
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    shards = str(toy_data["shards"])
    dist.run([SCRIPT, str(out), shards, "ref:mot", "ref:dense"], nproc=1, launcher="single")
    dist.run([SCRIPT, str(out), shards, "tp2:mot", "tp2:dense", "zero:3", "resume:1", "empty:0", "empty:1",
              "empty:2", "empty:3", "guard:nan", "guard:signal", "guard:enospc", "guard:shard", "guard:resume"],
             nproc=2, launcher="deepspeed")
    dist.run([SCRIPT, str(out), shards, "tp2dp2z3", "empty:3@2", "empty:2@2"], nproc=4, launcher="torchrun")
    return out


@pytest.mark.parametrize("arch", ["mot", "dense"])
def test_tp2_matches_tp1(runs, arch):
    ref, tp2 = load(runs, f"ref_{arch}")["losses"], load(runs, f"tp2_{arch}")["losses"]
    assert len(ref) == len(tp2) == 4
    assert ref[-1] < ref[0] - 0.3  # it learns
    assert tp2 == pytest.approx(ref, rel=0, abs=1e-5)


def test_mot_and_dense_differ(runs):
    assert load(runs, "ref_mot")["losses"][1:] != load(runs, "ref_dense")["losses"][1:]


def test_zero3_over_two_ranks_matches_one_rank(runs):
    ref, z3 = load(runs, "ref_mot")["losses"], load(runs, "zero3")["losses"]
    assert z3 == pytest.approx(ref, rel=0, abs=1e-5)


def test_zero3_params_partitioned_and_tp2dp2_trains_and_saves(runs):
    r = load(runs, "tp2dp2z3")
    assert r["losses"] == pytest.approx(load(runs, "ref_mot")["losses"], rel=0, abs=1e-5)
    # ZeRO-3 shards: one model and one optimizer file per (data rank, tensor rank)
    for dp in (0, 1):
        for tp in (0, 1):
            assert f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt" in r["files"]
    assert "megannm.json" in r["files"]


def test_resume_is_bitwise(runs):
    straight, resumed = load(runs, "straight")["losses"], load(runs, "resumed")["losses"]
    assert len(straight) == len(resumed) == 6
    assert straight == resumed  # bitwise: same floats after stop + resume at step 3
    events = [json.loads(x) for x in (runs / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resumed" for e in events)


@pytest.mark.parametrize("case", ["empty_z0_tp1", "empty_z1_tp1", "empty_z2_tp1", "empty_z3_tp1", "empty_z3_tp2",
                                  "empty_z2_tp2"])
def test_rank_without_image_tokens_trains(runs, case):
    r = load(runs, case)
    # random targets: a tiny freshly initialised model scores about ln(vocabulary) on them, both steps
    assert len(r["losses"]) == 2 and all(abs(x - math.log(r["vocab_size"])) < 0.5 for x in r["losses"]), r
    if r["checksums"] is not None:  # the weights stayed identical on both data-parallel ranks
        assert r["checksums"][0] == r["checksums"][1]


def test_tensorboard_event_files_hold_the_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(runs / "ref_mot" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/text_loss", "train/image_loss", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "train/tflops", "train/mfu", "eval/loss"):
        assert tag in tags, tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx(load(runs, "ref_mot")["losses"], rel=1e-6)


def _recipe(tmp_path, toy_data, name, **extra):
    shards = toy_data["shards"]
    text = f"""
name: {name}
seed: 3
model: {{hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: 96}}
parallel: {{zero_stage: 1}}
data: {{train: [{{path: {shards / 'train'}}}], seq_len: 80, micro_batch_size: 2, global_batch_size: 4}}
schedule: {{train_steps: 6, warmup_steps: 1}}
checkpoint: {{save_interval: 2, keep_last: 2}}
logging: {{dir: {tmp_path / name}, interval: 1, progress_bar: false}}
"""
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def killed(tmp_path_factory, toy_data):
    """A run SIGKILLed in the middle of its step-4 save (fault injection after DeepSpeed wrote its files)."""
    tmp_path = tmp_path_factory.mktemp("killed")
    recipe = _recipe(tmp_path, toy_data, "killed")
    out = dist.run(["-m", "megannm", "train", str(recipe)], nproc=1, launcher="single", check=False,
                   MEGANNM_FAULT="save_mid:4")
    out.half_written = (tmp_path / "killed" / "checkpoints" / ".tmp-step00000004").exists()  # before any next run
    return tmp_path, recipe, out


def test_checkpoint_of_another_shape_is_refused(killed):
    tmp_path, recipe, _ = killed
    out = subprocess.run([sys.executable, "-m", "megannm", "train", str(recipe), "--resume",
                          "model.hidden_size=64"], capture_output=True, text=True, timeout=120, cwd=dist.REPO,
                         env=dist.base_env())
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "model parameter hidden" in last and "step00000002" in last, last


@pytest.mark.parametrize("key, theirs", [("norm_reorder", True), ("eps", 1e-6), ("qk_norm", False)])
def test_check_compatible_names_a_structural_key_that_differs(key, theirs):
    """Resume and init_from (DeepSpeed and consolidated) refuse weights whose structure differs, naming the key;
    training settings may change between stages."""
    from megannm.checkpoint import CheckpointError, check_compatible
    from megannm.model.args import STRUCTURAL, ModelArgs
    assert key in STRUCTURAL
    ours = ModelArgs(hidden=32, layers=2, heads=4, kv_heads=4, ffn=64, vocab_size=300, padded_vocab_size=384,
                     image_start=200, image_end=296).to_dict()
    layout = {"tp": 1, "pp": 1}
    meta = {"vocab": {"fingerprint": "abc"}, "layout": layout, "model_args": ours}
    where = "ckpt/step00000002"
    check_compatible(dict(meta, model_args=dict(ours, z_loss=1e-4, rope_theta=5e5)), ours, "abc", where, layout)
    with pytest.raises(CheckpointError) as e:
        check_compatible(dict(meta, model_args=dict(ours, **{key: theirs})), ours, "abc", where, layout)
    assert str(e.value) == (f"{where}: model parameter {key} is {theirs!r} in the checkpoint, {ours[key]!r} in the "
                            f"recipe")


def test_sigkill_during_save_leaves_previous_checkpoint(killed):
    from megannm import checkpoint
    tmp_path, recipe, out = killed
    assert out.returncode == -9, out.stderr[-2000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000002"
    assert out.half_written  # the half-written save, invisible to loaders (the next run into the folder reclaims it)
    assert checkpoint.latest(ckpts).name == "step00000002"
    # and it is loadable: resume finishes the run from step 2 and cleans the half-written folder away
    dist.run(["-m", "megannm", "train", str(recipe), "--resume"], nproc=1, launcher="single")
    events = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] == 2
    assert checkpoint.latest(ckpts).name == "step00000006"
    assert not list(ckpts.glob(".tmp-*"))


def _guard(runs, kind):
    return [json.loads((runs / f"guard_{kind}.rank{r}.json").read_text()) for r in (0, 1)]


def test_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(runs):
    """Rank 1 alone gets a NaN loss from step 2: both ranks stop at step 4 (3 bad steps), name rank 1, save nothing
    after step 1 (which the first bad step ran on: not known good), and only rank 0 prints."""
    r0, r1 = _guard(runs, "nan")
    assert r0["error"] == r1["error"] == "Diverged" and r0["message"] == r1["message"]
    assert r0["message"].startswith("diverged at step 4: 3 bad steps in a row"), r0["message"]
    assert "the first at step 2: non-finite loss on rank 1" in r0["message"]
    assert r0["message"].endswith("last good checkpoint: none (" + str(runs) + "/guard_nan/checkpoints/step00000001 "
                                  "holds the weights the first bad step ran on; latest removed: --resume starts "
                                  "afresh)"), r0["message"]
    assert (r0["silent"], r1["silent"]) == (False, True)
    assert [t for t in r0["tags"] if t.startswith("step")] == ["step00000001"] and "protected" in r0["tags"]
    assert "diverged" in r0["tags"] and "latest" not in r0["tags"]


def test_preemption_signal_on_one_rank_saves_on_every_rank(runs):
    r0, r1 = _guard(runs, "signal")
    assert r0["exit_code"] == r1["exit_code"] == 124 and r0["step"] == r1["step"] == 2
    assert "step00000002" in r0["tags"]


def test_full_disk_on_one_rank_fails_the_save_on_every_rank(runs):
    r0, r1 = _guard(runs, "enospc")
    assert r0["error"] == r1["error"] == "SaveError" and (r0["silent"], r1["silent"]) == (True, False)
    assert "rng/rank00001.pt: cannot save the checkpoint of step 2: No space left on device" in r1["message"]
    assert "step00000001 is untouched" in r1["message"]
    assert [t for t in r0["tags"] if t.startswith(("step", ".tmp"))] == ["step00000001"]  # the temporary one removed


def test_data_verification_is_shared_and_agreed(runs):
    r0, r1 = _guard(runs, "shard")
    assert r0["error"] == r1["error"] == "ShardError" and (r0["silent"], r1["silent"]) == (False, True)
    assert "data.valid[0].path" in r0["message"] and "guard_shard_data/shard-00000.zst: document 0" in r0["message"]


def test_a_corrupt_file_found_by_rank_1_stops_the_resume_on_every_rank(runs):
    r0, r1 = _guard(runs, "resume")
    assert r0["error"] == r1["error"] == "CorruptCheckpoint" and (r0["silent"], r1["silent"]) == (False, True)
    assert "_optim_states.pt: corrupt (crc32" in r0["message"], r0["message"]
