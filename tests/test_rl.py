"""RL alignment: GRPO and DPO against hand computations, the verifiable rewards, short runs that learn, real ranks.

Tiny models (hidden 32, 2 layers) on the session's tiny toy data set; GRPO answers are 3-token captions (an image
answer costs 64 decoding steps), scored by ``low_text`` (tests/scripts/rl_cases.py: the fraction of answer tokens
among the first 200 text ids), which a random model learns in a few steps. One 2-rank torchrun launch holds the
tensor-parallel and ZeRO-3 cases.
"""
import json
import math

import numpy as np
import pytest
import torch

from megannm import rewards
from tests import dist
from tests.scripts import rl_cases

SCRIPT = "tests/scripts/rl_cases.py"


def metrics(run_dir):
    from megannm.train.logging import read_metrics
    return [m for m in read_metrics(run_dir) if m.get("split") == "train"]


# ---------------------------------------------------------------------------------------------------------------------
# the objective, by hand


def test_group_advantages_by_hand():
    from megannm.phases.rl.objective import group_advantages
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.25, 0.5, 1.0]])
    adv = group_advantages(r, eps=1e-4)
    std0 = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    assert adv[0].tolist() == pytest.approx([0.5 / (std0 + 1e-4), -0.5 / (std0 + 1e-4)] * 1 + [-0.5 / (std0 + 1e-4),
                                             0.5 / (std0 + 1e-4)], rel=1e-6)
    assert adv[1].tolist() == [0.0] * 4  # a group of equal rewards teaches nothing
    m, s = 0.4375, float(np.std([0.0, 0.25, 0.5, 1.0], ddof=1))
    assert adv[2].tolist() == pytest.approx([(x - m) / (s + 1e-4) for x in (0.0, 0.25, 0.5, 1.0)], rel=1e-6)
    assert group_advantages(r, scale=False)[2].tolist() == pytest.approx([x - m for x in (0.0, 0.25, 0.5, 1.0)])


def test_clipping_and_kl_by_hand():
    from megannm.phases.rl.objective import token_loss
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7, 1.5])
    adv = torch.tensor([2.0, -1.0, 1.0, 3.0, -1.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2])
    logp = old + ratio.log()
    ref = torch.tensor([-1.2, -2.0, -0.3, -2.0, -1.0])
    t = token_loss(logp, old, ref, adv, clip_low=0.2, clip_high=0.28, kl_coef=0.1)
    # -min(r A, clip(r, 0.8, 1.28) A), token by token
    pg = [-min(1.5 * 2, 1.28 * 2), -min(0.5 * -1, 0.8 * -1), -min(1.1 * 1, 1.1 * 1), -min(0.7 * 3, 0.8 * 3),
          -min(1.5 * -1, 1.28 * -1)]
    assert t["pg"].tolist() == pytest.approx(pg, rel=1e-6)
    assert t["clipped"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # the clip binds only where it lowers the objective
    d = (ref - logp).tolist()
    kl = [math.exp(x) - x - 1 for x in d]
    assert t["kl"].tolist() == pytest.approx(kl, rel=1e-5)
    assert t["loss"].tolist() == pytest.approx([p + 0.1 * k for p, k in zip(pg, kl)], rel=1e-5)
    assert all(x >= 0 for x in t["kl"].tolist())


def test_answer_weights_by_hand():
    """Each answer's per-token weight and normaliser share: loss = sum_i w_i sum_t l_t / sum_i share_i."""
    from megannm.phases.rl.objective import answer_weights
    lengths, longest = np.array([2, 4, 1]), np.array([8, 8, 8])
    w, share = answer_weights(lengths, longest, "token")
    assert w.tolist() == [1, 1, 1] and share.tolist() == [2, 4, 1]  # sum_i sum_t l / sum_i |o_i|
    w, share = answer_weights(lengths, longest, "sequence")
    assert w.tolist() == [0.5, 0.25, 1.0] and share.tolist() == [1, 1, 1]  # 1/G sum_i 1/|o_i| sum_t l
    w, share = answer_weights(lengths, longest, "dr_grpo")
    assert w.tolist() == [0.125] * 3 and share.tolist() == [1, 1, 1]  # 1/G sum_i 1/L sum_t l
    w, share = answer_weights(lengths, longest, "sequence", keep=np.array([True, False, True]))
    assert w.tolist() == [0.5, 0.0, 1.0] and share.tolist() == [1, 0, 1]  # a dropped group: neither
    # the three on one mini-batch of per-token terms, against the formulas written out
    terms = [np.array([0.3, -0.1]), np.array([0.2, 0.2, -0.4, 0.1]), np.array([0.5])]
    for mode, want in (("token", (0.2 + 0.1 + 0.5) / 7), ("sequence", (0.2 / 2 + 0.1 / 4 + 0.5 / 1) / 3),
                       ("dr_grpo", (0.2 + 0.1 + 0.5) / (8 * 3))):
        w, share = answer_weights(lengths, longest, mode)
        assert sum(wi * t.sum() for wi, t in zip(w, terms)) / share.sum() == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown loss normalisation 'mean'"):
        answer_weights(lengths, longest, "mean")


def test_dpo_loss_by_hand():
    from megannm.phases.dpo import dpo_loss
    lc, lr_, rc, rr = (torch.tensor(x) for x in ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.0, -2.5]))
    loss, wc, wr = dpo_loss(lc, lr_, rc, rr, beta=0.5)
    z = [0.5 * ((-3.0 + 3.5) - (-4.0 + 3.0)), 0.5 * ((-5.0 + 4.0) - (-2.0 + 2.5))]
    assert loss.tolist() == pytest.approx([-math.log(1 / (1 + math.exp(-x))) for x in z], rel=1e-6)
    assert (wc - wr).tolist() == pytest.approx(z)


def test_sequence_logprobs_cover_answer_tokens_only(layout, tok):
    from megannm.model.transformer import ModelArgs, NMMModel
    from megannm.config import ModelConfig
    from megannm.phases.dpo import sequence_logprobs
    from megannm.phases.rl.logprobs import collate
    torch.manual_seed(0)
    model = NMMModel(ModelArgs.from_config(ModelConfig(hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=64,
                                                       max_seq_len=64), tok.vocab), layout).eval()
    prompts, answers = [[1, 2, 3, 4], [5, 6]], [[7, 8], [9, 10, 11]]
    b = collate(prompts, answers, tok.vocab.pad_id)
    got = sequence_logprobs(model, b)
    with torch.no_grad():
        for i, (p, a) in enumerate(zip(prompts, answers)):
            lp = torch.log_softmax(model(torch.tensor([p + a]))[0].float(), -1)
            want = sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(a))
            assert float(got[i]) == pytest.approx(want, abs=1e-4)


def test_left_padded_decoding_matches_decoding_by_length(layout, tok):
    """Rollouts decode prompts of different lengths together (``generate(pad=True)``): same answers as one batch per
    prompt length."""
    from megannm.config import ModelConfig
    from megannm.generate import generate
    from megannm.model.transformer import ModelArgs, NMMModel
    from megannm.toy import prompts as toy_prompts
    torch.manual_seed(1)
    model = NMMModel(ModelArgs.from_config(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                                                       max_seq_len=96), tok.vocab), layout).eval()
    prompts = [it.prompt.ids for it in toy_prompts.toy_image(tok, 6, np.random.default_rng(0))]
    assert len({len(p) for p in prompts}) > 1
    for kind in ("image", "text"):
        assert generate(model, tok.vocab, prompts, kind, 8, pad=True) == generate(model, tok.vocab, prompts, kind, 8)


# ---------------------------------------------------------------------------------------------------------------------
# the phase's gradient


def first_update(trainer):
    """One GRPO step through the real Trainer, watched: the initial weights, the rollout, the gradient of the first
    optimizer update (every micro-batch of it accumulated), the logged values and the engine.step calls."""
    eng, phase = trainer.engine, trainer.phase
    init = {n: p.detach().clone() for n, p in eng.module.named_parameters()}
    rollouts, grads = [], {}
    rollout = phase.rollout
    phase.rollout = lambda step: rollouts.append(rollout(step)) or rollouts[-1]
    step, calls = eng.step, [0]

    def snapshot_then_step(*a, **k):
        calls[0] += 1
        if calls[0] == trainer.accum:
            grads.update({n: p.grad.detach().clone() for n, p in eng.module.named_parameters()})
        return step(*a, **k)

    eng.step = snapshot_then_step
    stats, _ = trainer.train_step(iter(()))  # (logged values, guard evidence)
    return init, rollouts[0], grads, stats, calls[0]


def test_first_step_gradient_is_the_advantage_weighted_policy_gradient(toy_data, layout, tmp_path):
    """Ratio 1 (first optimisation step) and reference = policy (no init_from: the seeded initial weights): the
    clipped, KL-penalised objective's gradient must be -(1/N) sum_i A_i sum_t grad log pi(t), N the answer tokens of
    the mini-batch (token-level normalisation)."""
    from megannm.model.build import build_model
    from megannm.stage import build_trainer
    r = rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "grad", steps=1, micro=4, prompts_per_step=2,
                        group_size=4, ppo_epochs=2, mini_batches=1, kl_coef=0.5, max_new_tokens=4)
    trainer = build_trainer(r, layout, source="grad")
    assert trainer.accum == 2
    init, (scored, adv, _), grads, stats, calls = first_update(trainer)
    assert stats["optimizer_steps"] == 2 and calls == 4

    assert adv.abs().sum() > 0
    _, model = build_model(r, trainer.vocab, layout)
    model.load_state_dict(init)
    total, n_tokens = 0.0, sum(len(a) for a in scored.answers)
    for it, a, A in zip(scored.items, scored.answers, adv.tolist()):
        p = it.prompt.ids
        lp = torch.log_softmax(model(torch.tensor([p + a]))[0].float(), -1)
        total = total + A * sum(lp[len(p) - 1 + j, t] for j, t in enumerate(a))
    (-total / n_tokens).backward()
    for n, p in model.named_parameters():
        want, got = p.grad, grads[n]
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-7 + 1e-4 * float(want.abs().max())), n
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


@rewards.register("half_constant")
def half_constant(prompt, sample, truth) -> float:
    """0.5 for every answer to a prompt whose ids sum to an even number (a group of equal rewards), low_text for
    the others: some groups for dynamic sampling to drop, some to keep."""
    return 0.5 if sum(prompt.ids) % 2 == 0 else rl_cases.low_text(prompt, sample, truth)


@pytest.mark.parametrize("mode, dynamic", [("sequence", False), ("dr_grpo", False), ("token", True)])
def test_each_loss_normalisation_gives_the_hand_computed_gradient(toy_data, layout, tmp_path, mode, dynamic):
    """As above, for the other normalisations and for dynamic sampling: the first optimizer step's gradient must be
    -(1/N) sum_i keep_i A_i w_i sum_t grad log pi(t) with, over the mini-batch's G answers o_i: sequence w = 1/|o_i|,
    N = G; dr_grpo w = 1/L (L = max_new_tokens), N = G and A not divided by the group's std; token w = 1,
    N = sum_i keep_i |o_i|, keep_i = 0 for a group of equal rewards (dynamic sampling), else 1."""
    from megannm.model.build import build_model
    from megannm.stage import build_trainer
    g, max_new = 4, 4
    r = rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "norm", steps=1, micro=4, prompts_per_step=4,
                        group_size=g, ppo_epochs=2, mini_batches=1, kl_coef=0.5, max_new_tokens=max_new,
                        rewards=["half_constant"], loss_normalisation=mode, dynamic_sampling=dynamic)
    assert r.phase.options.std_scaled == (mode != "dr_grpo")
    trainer = build_trainer(r, layout, source="norm")
    init, (scored, adv, _), grads, stats, calls = first_update(trainer)
    assert calls == 2 * trainer.accum

    grouped = scored.rewards.view(-1, g)
    if mode == "dr_grpo":
        assert adv.tolist() == pytest.approx((grouped - grouped.mean(1, keepdim=True)).reshape(-1).tolist(), abs=1e-6)
    equal = [bool((grp == grp[0]).all()) for grp in grouped]
    keep = [not (dynamic and e) for e in equal for _ in range(g)]
    if dynamic:
        assert 0 < sum(equal) < len(equal), "the test needs groups to drop and groups to keep"
        assert stats["dropped_groups"] == sum(equal) / len(equal)
    else:
        assert "dropped_groups" not in stats
    lengths = [len(a) for a in scored.answers]
    weight = {"token": lambda n: 1.0, "sequence": lambda n: 1.0 / n, "dr_grpo": lambda n: 1.0 / max_new}[mode]
    norm = sum(k * (n if mode == "token" else 1) for k, n in zip(keep, lengths))
    _, model = build_model(r, trainer.vocab, layout)
    model.load_state_dict(init)
    total = 0.0
    for it, a, A, k in zip(scored.items, scored.answers, adv.tolist(), keep):
        if not k:
            continue
        p = it.prompt.ids
        lp = torch.log_softmax(model(torch.tensor([p + a]))[0].float(), -1)
        total = total + A * weight(len(a)) * sum(lp[len(p) - 1 + j, t] for j, t in enumerate(a))
    (-total / norm).backward()
    for n, p in model.named_parameters():
        want, got = p.grad, grads[n]
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-7 + 1e-4 * float(want.abs().max())), n
    assert sum(float(x.abs().sum()) for x in grads.values()) > 0


def test_dr_grpo_refuses_std_scaled_advantages(toy_data, tmp_path):
    with pytest.raises(ValueError, match=r"phase\.options\.scale_rewards: Dr\. GRPO does not divide advantages"):
        rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "bad", loss_normalisation="dr_grpo",
                        scale_rewards=True)
    r = rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "ok", loss_normalisation="sequence",
                        scale_rewards=False)
    assert not r.phase.options.std_scaled


# ---------------------------------------------------------------------------------------------------------------------
# short runs


def test_short_grpo_run_raises_the_reward_and_the_reference_never_changes(toy_data, layout, tmp_path):
    from megannm.model.build import build_model
    from megannm.stage import build_trainer
    r = rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "learn", steps=12, micro=32, lr=3e-2,
                        prompts_per_step=4, group_size=8, ppo_epochs=1, mini_batches=1, kl_coef=0.01)
    trainer = build_trainer(r, layout, source="learn")
    trainer.run()
    rewards = [m["reward"] for m in metrics(tmp_path / "learn")]
    assert len(rewards) == 12
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25, rewards
    for key in ("kl", "entropy", "clip_frac", "reward/low_text", "pg_loss", "lr"):
        assert key in metrics(tmp_path / "learn")[-1]
    ref = trainer.phase.reference
    _, fresh = build_model(r, trainer.vocab, layout)  # the policy's initial weights
    for (n, p), q in zip(ref.named_parameters(), fresh.parameters()):
        assert not p.requires_grad and torch.equal(p, q), n
    moved = sum(float((p.detach() - q).abs().sum()) for p, q in zip(trainer.engine.module.parameters(),
                                                                    fresh.parameters()))
    assert moved > 0


def _pairs(tok, n, seed):
    """Synthetic preferences on caption prompts: chosen answers from the first 200 text ids, rejected from the rest."""
    from megannm.toy import prompts as toy_prompts
    rng = np.random.default_rng(seed)
    items = toy_prompts.toy_caption(tok, n, rng)
    return [{"prompt": it.prompt.ids, "chosen": rng.integers(0, 200, 2).tolist(),
             "rejected": rng.integers(200, tok.vocab.text_size, 2).tolist(), "reward_chosen": 1.0,
             "reward_rejected": 0.0} for it in items]


def test_short_dpo_run_learns_the_preference_and_keeps_the_reference(toy_data, layout, tok, tmp_path):
    from megannm.phases.rl.pairs import write_pairs
    from megannm.model.build import build_model
    from megannm.stage import build_trainer
    write_pairs(tmp_path / "pairs", _pairs(tok, 64, 0), {"vocab_fingerprint": tok.vocab.fingerprint})
    r = rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "dpo", steps=8, micro=16, lr=1e-2,
                        global_batch=16, kind="dpo", pairs=str(tmp_path / "pairs"), beta=0.5)
    trainer = build_trainer(r, layout, source="dpo")
    trainer.run()
    m = metrics(tmp_path / "dpo")
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the start
    assert m[-1]["loss"] < 0.5 and m[-1]["accuracy"] >= 0.9 and m[-1]["margin"] > m[0]["margin"]
    _, fresh = build_model(r, trainer.vocab, layout)
    assert all(torch.equal(p, q) for p, q in zip(trainer.phase.reference.parameters(), fresh.parameters()))


def test_build_pairs_ranks_by_the_verifier_and_drops_ties(toy_data, layout, tok):
    from megannm.generate import SamplingConfig
    from megannm.phases.rl.pairs import build_pairs
    from megannm.rewards import Combined
    from megannm.toy import prompts as toy_prompts
    from megannm.model.build import build_model
    r = rl_cases.recipe(toy_data["tokenizers"], str(toy_data["tokenizers"]), "pairs")
    _, model = build_model(r, tok.vocab, layout)
    items = toy_prompts.toy_caption(tok, 12, np.random.default_rng(1))
    pairs, ties = build_pairs(model, tok, items, Combined(["low_text"]), SamplingConfig(greedy=False, seed=3),
                              max_new_tokens=2)
    assert len(pairs) + ties == 12 and ties > 0 and pairs
    for p in pairs:
        assert p["reward_chosen"] > p["reward_rejected"]
        assert p["chosen"] != p["rejected"]


# ---------------------------------------------------------------------------------------------------------------------
# rewards


def test_rewards_score_the_truth_at_one_and_a_wrong_attribute_lower(toy_data, tok):
    from megannm.rewards import Combined, Prompt, Sample, get, make_samples
    from megannm.toy import world as toy
    a = toy.Attrs("triangle", "blue", "large", "top left")
    wrong = toy.Attrs("triangle", "red", "large", "top left")
    p = Prompt([], "text")
    cap = get("toy_caption")
    assert cap(p, Sample([], "text", text=toy.caption(a)), a) == 1.0
    assert cap(p, Sample([], "text", text=toy.caption(wrong)), a) == 0.75
    assert cap(p, Sample([], "text", text="a blue or red triangle"), a.as_dict()) == 0.25  # ambiguous colour: none
    assert get("toy_caption_colour")(p, Sample([], "text", text=toy.caption(wrong)), a) == 0.0

    # pictures: through the image tokenizer and back, as generated answers are
    raw = toy_data["raw"]
    rec = json.loads((raw / "train.jsonl").read_text().splitlines()[0])
    truth = toy.Attrs(**rec["attrs"])
    from PIL import Image
    img = np.asarray(Image.open(raw / next(x["image"] for x in rec["parts"] if "image" in x)).convert("RGB"))
    ids = tok.vocab.image_ids(tok.image.encode(img[None])[0]).tolist()
    sample = make_samples(tok, [ids], "image")[0]
    im = get("toy_image")
    assert im(Prompt([], "image"), sample, truth) == 1.0
    other = next(c for c in toy.COLOURS if c != truth.colour)
    assert im(Prompt([], "image"), sample, toy.Attrs(truth.kind, other, truth.size, truth.position)) == 0.75
    assert im(Prompt([], "image"), Sample([], "image", image=np.zeros((32, 32, 3), np.uint8)), truth) == 0.0

    fmt = get("toy_format")
    assert fmt(p, sample, truth) == 1.0
    assert fmt(p, make_samples(tok, [ids[:-1]], "image")[0], truth) == 0.0  # one code short of a grid
    assert fmt(p, Sample([], "text", text=toy.caption(a)), a) == 1.0
    assert fmt(p, Sample([], "text", text="a shape somewhere"), a) == 0.0

    both = Combined({"toy_image": 1.0, "format": 0.5})
    assert both(Prompt([], "image"), sample, truth) == 1.5
    assert both.score(Prompt([], "image"), sample, truth)[1] == {"toy_image": 1.0, "format": 1.0}
    assert Combined(["tests.scripts.rl_cases:low_text"])(p, Sample([5, 300], "text"), None) == 0.5
    with pytest.raises(ValueError, match="unknown reward 'no_such'"):
        Combined(["no_such"])


def test_bad_options_name_the_key(toy_data, layout, tmp_path):
    """Options are typed by the recipe schema (refused at load, before any process starts); reward names are
    resolved when the phase is built."""
    from megannm.phases.grpo import GRPOPhase
    from megannm.vocab import Vocab
    vocab = Vocab.load(toy_data["tokenizers"] / "vocab.json")
    with pytest.raises(ValueError, match=r"phase\.options\.group_sise: unknown option"):
        rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "bad", group_sise=4)
    with pytest.raises(ValueError, match=r"phase\.options\.clip_ratio: "):
        rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "bad", clip_ratio=1.5)
    r = rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "bad", rewards={"toy_image": 1.0, "nope": 0.5})
    with pytest.raises(ValueError, match=r"phase\.options\.rewards: unknown reward 'nope'"):
        GRPOPhase(r, layout, vocab)
    with pytest.raises(ValueError, match=r"phase\.options\.prompts_per_step: .* 3 x 4 = 12, expected 2 x 8 = 16"):
        rl_cases.recipe(tmp_path, str(toy_data["tokenizers"]), "bad", prompts_per_step=3, global_batch=8)


# ---------------------------------------------------------------------------------------------------------------------
# real ranks


@pytest.fixture(scope="module")
def ranks(toy_data, layout, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_ranks")
    tokenizers = str(toy_data["tokenizers"])
    rl_cases.run_case(out, tokenizers, "ref")  # one process, in this one
    dist.run([SCRIPT, str(out), tokenizers, "tp2", "z3"], nproc=2, launcher="torchrun")
    return out


def _load(out, case, rank):
    return json.loads((out / f"{case}.rank{rank}.json").read_text())


def test_grpo_at_tp2_matches_one_process(ranks):
    ref, tp = _load(ranks, "ref", 0)["stats"], _load(ranks, "tp2", 0)["stats"]
    assert len(ref) == len(tp) == 2
    for a, b in zip(ref, tp):
        assert b["reward"] == a["reward"]  # the same sampled answers
        for key in ("loss", "kl", "entropy", "pg_loss", "clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert ref[-1]["kl"] > 0  # the policy moved away from the reference


def test_grpo_under_zero3_runs_and_ranks_agree(ranks):
    r0, r1 = _load(ranks, "z3", 0), _load(ranks, "z3", 1)
    assert (r0["dp_rank"], r1["dp_rank"]) == (0, 1)
    assert r0["checksum"] == r1["checksum"]  # the gathered weights after two GRPO steps
    assert not r0["ref_requires_grad"] and not r1["ref_requires_grad"]
    stats = r0["stats"]
    assert len(stats) == 2 and all(math.isfinite(s["loss"]) and s["optimizer_steps"] == 4 for s in stats)
