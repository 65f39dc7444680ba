"""Batched rollouts and the frozen reference: one decoding loop for image and text answers together equals decoding
every prompt alone; GRPO refuses guidance (its log-probs are the conditional model's); the reference is the
policy's starting weights in the training dtype, and reading it from a checkpoint opens this rank's slice only."""
import json
import sys
from types import SimpleNamespace

import numpy as np

import pytest
import torch

from tests.scripts import rl_cases


def tiny_model(tok, layout, seed=1, **model):
    from megannm.config import ModelConfig
    from megannm.model.transformer import ModelArgs, NMMModel
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=160)
    return NMMModel(ModelArgs.from_config(ModelConfig(**{**cfg, **model}), tok.vocab), layout).eval()


# ---------------------------------------------------------------------------------------------------------------------
# one decoding loop for the whole rollout


def mixed_prompts(tok, n=4):
    """Text -> image prompts (short captions) and image -> text prompts (an image's codes), interleaved."""
    from megannm.toy import prompts as toy_prompts
    images = toy_prompts.toy_image(tok, n, np.random.default_rng(0))
    captions = toy_prompts.toy_caption(tok, n, np.random.default_rng(1))
    items = [it for pair in zip(images, captions) for it in pair]
    return [it.prompt.ids for it in items], [it.prompt.kind for it in items]


def test_batched_rollout_equals_one_by_one_greedy_decoding(layout, tok, monkeypatch):
    """Mixed image and text prompts of different lengths, text answers stopping at different steps: the batched
    decoding (one KV cache, prompts prefilled in slices of similar lengths, finished rows dropped) gives every row
    the tokens it gets decoded alone."""
    from megannm import decode as decode_module
    from megannm.generate import generate
    model = tiny_model(tok, layout, seed=2)  # a seed whose greedy captions differ from prompt to prompt
    prompts, kinds = mixed_prompts(tok)
    max_new = 6
    assert len({len(p) for p in prompts}) > 2 and set(kinds) == {"image", "text"}
    # stop ids the greedy captions reach at different steps: the 4th token of one caption, the 1st of another
    free = [generate(model, tok.vocab, [p], k, max_new)[0] for p, k in zip(prompts, kinds) if k == "text"]
    stops = (free[0][3], free[2][0])
    alone = [generate(model, tok.vocab, [p], k, max_new, stop_ids=stops, keep_stop=True)[0]
             for p, k in zip(prompts, kinds)]
    text_lengths = [len(a) for a, k in zip(alone, kinds) if k == "text"]
    assert len(set(text_lengths)) > 1 and min(text_lengths) < max_new, text_lengths
    assert all(len(a) == tok.vocab.image_grid for a, k in zip(alone, kinds) if k == "image")
    for batch_size in (len(prompts), 3):  # all at once, and under a memory cap
        together = generate(model, tok.vocab, prompts, kinds, max_new, stop_ids=stops, keep_stop=True, pad=True,
                            batch_size=batch_size)
        assert together == alone, batch_size
    monkeypatch.setattr(decode_module, "PREFILL_TOKENS", 80)  # an image prompt's rows prefill one at a time
    assert generate(model, tok.vocab, prompts, kinds, max_new, stop_ids=stops, keep_stop=True, pad=True) == alone
    # classifier-free guidance (generate / evaluate): the unconditional stream follows the image rows of the batch
    guided = generate(model, tok.vocab, prompts, kinds, max_new, cfg_scale=2.0, pad=True)
    for p, k, g in zip(prompts, kinds, guided):
        assert g == generate(model, tok.vocab, [p], k, max_new, cfg_scale=2.0)[0]
    assert guided != generate(model, tok.vocab, prompts, kinds, max_new, pad=True)  # guidance changed something


def test_sampled_rollout_stays_on_the_model_device_and_refuses_bad_kinds(layout, tok):
    from megannm.generate import SamplingConfig, generate
    model = tiny_model(tok, layout)
    prompts, kinds = mixed_prompts(tok, 2)
    rows = generate(model, tok.vocab, prompts, kinds, 4, SamplingConfig(greedy=False, seed=3), pad=True)
    for r, k in zip(rows, kinds):
        if k == "image":
            assert len(r) == tok.vocab.image_grid and all(tok.vocab.image_start <= t < tok.vocab.image_end for t in r)
        else:
            assert 1 <= len(r) <= 4 and all(t < tok.vocab.text_size or t == tok.vocab.eos_id for t in r)
    with pytest.raises(ValueError, match="generate: kind must be text or image"):
        generate(model, tok.vocab, prompts, ["text", "audio", "text", "image"], 4)
    with pytest.raises(ValueError, match="generate: 1 kinds for 4 prompts"):
        generate(model, tok.vocab, prompts, ["text"], 4)


# ---------------------------------------------------------------------------------------------------------------------
# classifier-free guidance in GRPO


def test_grpo_refuses_guidance_naming_the_option(toy_data, tmp_path):
    """The policy, old and reference log-probs are the conditional model's: guided samples would be off-policy."""
    with pytest.raises(ValueError, match=r"phase\.options\.cfg_scale: GRPO samples on-policy, without "
                                         r"classifier-free guidance \(got cfg_scale=2, expected 1"):
        rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "cfg", cfg_scale=2.0)
    r = rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "cfg", cfg_scale=1.0, rollout_batch_size=5)
    assert r.phase.options.rollout_batch_size == 5


# ---------------------------------------------------------------------------------------------------------------------
# the frozen reference


def test_reference_is_the_policys_starting_weights_in_bf16(toy_data, layout, tmp_path):
    """bf16 training (ZeRO-1, fp32 master in the optimizer): the reference taken at step 0 is the live policy's
    bf16 weights bit for bit, while the policy itself moves in that step."""
    from megannm.config import recipe_from_dict
    from megannm.stage import build_trainer
    base = rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "bf16", steps=1, micro=4, prompts_per_step=2,
                           group_size=4, ppo_epochs=1, mini_batches=1, kl_coef=0.5, max_new_tokens=3)
    d = base.model_dump(mode="json")
    d.update(precision="bf16", parallel={**d["parallel"], "zero_stage": 1})
    r = recipe_from_dict(d, source="bf16", world_size=1)
    trainer = build_trainer(r, layout, source="bf16")
    start = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    assert trainer.phase.reference is None  # taken at the first step, after any init_from
    trainer.train_step(iter(()))
    ref = dict(trainer.phase.reference.named_parameters())
    assert set(ref) == set(start)
    for n, p in ref.items():
        assert p.dtype == torch.bfloat16 and not p.requires_grad and torch.equal(p, start[n]), n
    assert any(not torch.equal(p, start[n]) for n, p in trainer.engine.module.named_parameters())


def _write_checkpoints(tok, layout, tmp_path):
    """A random model as a consolidated folder and as a TP=2 DeepSpeed checkpoint (module files), with ZeRO
    optimizer partitions beside them that the reference must never open."""
    from megannm.checkpoint import consolidated
    from megannm.convert.deepspeed import write_deepspeed
    model = tiny_model(tok, layout, seed=4, num_kv_heads=2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in ("embedding.embed_tokens.weight", "head.output.weight"):  # canonical: unpadded vocabulary rows
        state[k] = state[k][:tok.vocab.size].clone()
    c = consolidated.Consolidated(state, consolidated.normalise_args(model.args, tok.vocab), tok.vocab,
                                  {"kind": "test"})
    consolidated.write(c, tmp_path / "cons")
    write_deepspeed(c, tmp_path / "ds", tp=2)
    tag = next(p for p in (tmp_path / "ds").iterdir() if p.is_dir())
    for name in ("zero_pp_rank_0_mp_rank_01_optim_states.pt", "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt"):
        torch.save({"never": "read"}, tag / name)
    return c, model, tag


def test_reference_reads_only_this_ranks_slice(layout, tok, tmp_path):
    """Rank 1 of TP=2: from a DeepSpeed checkpoint it opens its own mp_rank_01 module file and nothing of rank 0
    nor any optimizer partition; from a consolidated folder it gets the same slice; refusals say what to do."""
    from megannm.checkpoint import CheckpointError, integrity
    from megannm.checkpoint import canonical as reshard
    from megannm.checkpoint.consolidated import normalise_args
    from megannm.phases.rl.reference import reference_state
    c, model, tag = _write_checkpoints(tok, layout, tmp_path)
    args = normalise_args(c.args, tok.vocab, tp=2)
    rank1 = SimpleNamespace(tp=2, tp_rank=1)
    names = [n for n, _ in model.named_parameters()]  # the module's names (the same at every TP size)

    opened, recording = [], [True]
    sys.addaudithook(lambda event, a: opened.append(str(a[0])) if recording[0] and event == "open"
                     and isinstance(a[0], str) and str(tmp_path) in a[0] else None)
    try:
        state, where = reference_state(tmp_path / "ds", args, rank1, tok.vocab, names)
    finally:
        recording[0] = False
    files = {p.rsplit("/", 1)[-1] for p in opened if p.endswith(".pt")}
    assert files == {"mp_rank_01_model_states.pt"}, opened
    assert where.endswith("mp_rank_01_model_states.pt")

    want = {}
    for name in names:
        want[name] = reshard.shard_tensor(name, c.state[name], 2, 1, args.padded_vocab_size)
    assert set(state) == set(want)
    for name in names:
        assert torch.equal(state[name], want[name]), name
    from_folder, _ = reference_state(tmp_path / "cons", args, rank1, tok.vocab, names)
    for name in names:
        assert torch.equal(from_folder[name], want[name]), name

    with pytest.raises(CheckpointError, match=r"saved at tp=2 pp=1 and this run has tp=1 pp=1: convert it "
                                              r"\(megannm convert .* OUT --to consolidated\)"):
        reference_state(tmp_path / "ds", normalise_args(c.args, tok.vocab, 1), SimpleNamespace(tp=1, tp_rank=0),
                        tok.vocab, names)
    module = torch.load(tag / "mp_rank_01_model_states.pt", weights_only=False)
    module["module"] = {k: torch.empty(0, dtype=v.dtype) for k, v in module["module"].items()}  # ZeRO-3's
    torch.save(module, tag / "mp_rank_01_model_states.pt")
    meta = json.loads((tag / "megannm.json").read_text())  # as ZeRO-3 would have recorded it
    meta["files"].update(integrity.record(tag, ["mp_rank_01_model_states.pt"]))
    (tag / "megannm.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"mp_rank_01_model_states.pt: holds no weights .* empty placeholder, "
                                              r"as ZeRO-3 saves them\): convert it"):
        reference_state(tmp_path / "ds", args, rank1, tok.vocab, names)


def test_reference_from_a_checkpoint_in_the_training_dtype(layout, tok, tmp_path):
    """After a resume the reference is read from init_from: a TP=1 DeepSpeed checkpoint's module file, cast to the
    training dtype on the device, equal to the saved weights (bf16: their bf16 rounding)."""
    import dataclasses
    from megannm.convert.deepspeed import write_deepspeed
    from megannm.checkpoint.consolidated import normalise_args
    from megannm.checkpoint import canonical as reshard
    from megannm.phases.rl.reference import load_reference
    c, _, _ = _write_checkpoints(tok, layout, tmp_path)
    write_deepspeed(c, tmp_path / "ds1", tp=1)
    args = dataclasses.replace(normalise_args(c.args, tok.vocab, 1), params_dtype="bfloat16")
    ref = load_reference(tmp_path / "ds1", args, layout, tok.vocab, torch.device("cpu"))
    for name, p in ref.named_parameters():
        full = reshard.shard_tensor(name, c.state[name], 1, 0, args.padded_vocab_size)
        assert p.dtype == torch.bfloat16 and torch.equal(p, full.to(torch.bfloat16)), name
