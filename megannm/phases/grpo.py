"""GRPO (DeepSeekMath, arXiv 2402.03300) with verifiable rewards, in both directions (text -> image, image -> text).

One training step of this phase is one rollout followed by several optimisation steps:

1. **Rollout.** Every data-parallel rank takes its own ``prompts_per_step / dp`` prompts and samples a group of
   ``group_size`` answers per prompt from the current policy with the KV-cached generator (``megannm.generate``;
   modality-constrained: an image answer is exactly one grid of codes, a text answer stops at ``<eos>``/``<|end|>``).
   Under ZeRO-3 the policy's parameters are partitioned, so its weights are first gathered
   (``deepspeed.zero.GatheredParameters``, one module at a time) into a plain copy that generates without any
   collective over the data-parallel group (ranks decode different numbers of steps). The tensor-parallel ranks of a
   group share their prompts and the sampled tokens (``generate`` broadcasts them).
2. **Rewards** from ``megannm.rewards`` (weighted sum, ``phase.options.rewards``), then group-relative advantages
   ``A = (r - mean(group)) / (std(group) + eps)`` (sample std, as TRL; ``scale_rewards: false`` drops the division,
   as Dr. GRPO). Every token of an answer gets its answer's advantage.
3. **Old and reference log-probs, once per rollout** (no gradient): ``log pi_old`` from the policy before any update
   (skipped when there is a single optimisation step: then ``pi_old`` is the current policy, detached), and
   ``log pi_ref`` from a frozen plain ``NMMModel``: the checkpoint ``checkpoint.init_from`` (the SFT model), or without
   one the policy's own seeded initial weights. Its parameters never receive a gradient.
4. **Optimisation**: ``ppo_epochs`` passes over the rollout, each in ``mini_batches`` mini-batches (one optimizer step
   each; the order is reshuffled after the first pass). Per answer token t::

       ratio_t = exp(log pi(t) - log pi_old(t))
       pg_t    = -min(ratio_t A, clip(ratio_t, 1 - clip_ratio, 1 + clip_ratio_high) A)
       kl_t    = exp(log pi_ref(t) - log pi(t)) - (log pi_ref(t) - log pi(t)) - 1      (k3, as in GRPO)
       loss    = sum over the mini-batch's answer tokens of (pg_t + kl_coef kl_t) / N_tokens

**Token normalisation: token-level, as DAPO (arXiv 2503.14476).** A mini-batch's loss is the sum over all its answer
tokens, on every data-parallel rank, divided by the number of those tokens (N_tokens, all-reduced over the data
group once per rollout); every token weighs the same, however long its answer. (The GRPO paper's per-answer mean
then mean over the group gives a long answer's tokens less weight each; for text -> image, where every answer is
exactly one grid of codes, the two coincide.) It is the SFT phase's normalisation too: each micro-batch's summed
loss is scaled by ``accum * dp / N_tokens`` so that DeepSpeed's division by the accumulation steps and its average
over data-parallel ranks leave exactly ``sum / N_tokens``.

Log-probs come from the head's vocab-parallel logits through megatron-core's ``vocab_parallel_cross_entropy`` (the
full vocabulary never gathers at TP > 1), divided by the sampling temperature, over the whole vocabulary: the policy
being optimised is the model's own distribution; the modality constraint (and classifier-free guidance, off by
default: ``cfg_scale: 1``) only shape which tokens are sampled. Entropy (of that distribution, per answer token) and
the KL are logged with the reward, its spread, each reward's mean, the clipped fraction and the ratio.

The learning-rate schedule advances once per rollout step (``schedule.*`` counts rollout steps), however many
optimizer steps a rollout makes.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megannm import parallel
from megannm.rewards import Combined, Prompt, make_samples

TOY_SOURCES = ("toy_image", "toy_caption", "toy_draw")


# ---------------------------------------------------------------------------------------------------------------------
# options


class GRPOOptions(BaseModel):
    """``phase.options`` of a GRPO recipe."""
    model_config = ConfigDict(extra="forbid")
    prompts: str = Field("toy_image", description="toy_image (caption -> picture), toy_caption (picture -> "
                                                  "caption), toy_draw (chat: 'draw a ...'), or a JSONL file of "
                                                  "records {parts|messages, answer_kind, answer}.")
    prompt_split: Literal["seen", "heldout", "all"] = Field("seen", description="Toy combinations to prompt with.")
    tokenizers: Optional[str] = Field(None, description="Tokenizer bundle; None = the folder of data.vocab.")
    rewards: Union[list[str], dict[str, float]] = Field(default_factory=lambda: ["toy_image"])
    group_size: int = Field(8, ge=2, description="Answers sampled per prompt.")
    prompts_per_step: int = Field(8, gt=0, description="Prompts per rollout over all data-parallel ranks.")
    ppo_epochs: int = Field(1, gt=0, description="Passes over each rollout.")
    mini_batches: int = Field(1, gt=0, description="Optimizer steps per pass; each is data.global_batch_size "
                                                   "answers.")
    clip_ratio: float = Field(0.2, gt=0, lt=1, description="Lower clip: ratio >= 1 - clip_ratio.")
    clip_ratio_high: Optional[float] = Field(None, gt=0, description="Upper clip (DAPO's clip-higher); None = "
                                                                     "clip_ratio.")
    kl_coef: float = Field(0.04, ge=0, description="Weight of the k3 KL to the reference; 0 = no reference.")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's std (false: Dr. GRPO).")
    adv_eps: float = Field(1e-4, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance for image answers (1 = off).")
    max_new_tokens: int = Field(32, gt=0, description="Longest text answer.")


def parse_options(cls, options: dict, phase: str):
    """Validate ``phase.options``; a bad key is one line ``phase.options.<key>: ...``."""
    try:
        return cls.model_validate(options or {})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "(top)"
        if err["type"] == "extra_forbidden":
            known = ", ".join(cls.model_fields)
            raise ValueError(f"recipe: phase.options.{key}: unknown option for phase {phase} (expected one of "
                             f"{known})") from None
        raise ValueError(f"recipe: phase.options.{key}: {err['msg']} (got {err.get('input')!r})") from None


# ---------------------------------------------------------------------------------------------------------------------
# the mathematics (pure tensor functions, tested against hand computations)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """rewards [P, G] (P prompts, G answers each) -> advantages [P, G]: (r - group mean) / (group std + eps), with
    the sample (unbiased) std; ``scale=False`` leaves r - mean."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased, GRPO's)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(ratio A, clip(ratio, 1 - low, 1 + high) A), the ratio, and where the clip is active
    (the clipped term is the smaller one, so the token's gradient is zero)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), ratio, (clipped < unclipped)


def token_loss(logp, old_logp, ref_logp, adv, clip_low: float, clip_high: float, kl_coef: float) -> dict:
    """Every per-token term of the objective (tensors shaped like ``logp``); ``ref_logp`` None = no KL term."""
    pg, ratio, clipped = clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    return {"loss": pg + kl_coef * kl, "pg": pg, "kl": kl, "ratio": ratio, "clipped": clipped.float()}


# ---------------------------------------------------------------------------------------------------------------------
# per-token log-probs through the vocab-parallel head


@contextlib.contextmanager
def _head_logits(module):
    """Capture the output layer's vocab-parallel logits [B, S, V_pad/tp] during a forward. The model's public
    outputs are the loss or the gathered logits; the head's ``output`` layer (``head.output.weight`` in the canonical
    names) is the last op, and its output is what megatron-core's vocab-parallel cross entropy takes."""
    box: list = []
    handle = module.head.output.register_forward_hook(lambda m, i, o: box.append(o))
    try:
        yield box
    finally:
        handle.remove()


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                            with_entropy: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p(label) [B, S] (differentiable) and the entropy [B, S] (detached) from vocab-parallel logits
    [B, S, V_pad/tp]; TP padding rows take no probability."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    v_local = logits.shape[-1]
    tp = ps.get_tensor_model_parallel_world_size()
    offset = ps.get_tensor_model_parallel_rank() * v_local
    if offset + v_local > vocab_size:
        ids = torch.arange(v_local, device=logits.device) + offset
        logits = logits.masked_fill(ids >= vocab_size, torch.finfo(logits.dtype).min)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            z = logits.detach()
            shift = z.max(-1).values
            if tp > 1:
                dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=parallel.tensor_group())
            e = torch.exp(z - shift[..., None])
            sums = torch.stack([e.sum(-1), (e * (z - shift[..., None])).sum(-1)])
            if tp > 1:
                dist.all_reduce(sums, group=parallel.tensor_group())
            # H = log Z - E_p[z - shift], with Z = sum exp(z - shift)
            entropy = sums[0].log() - sums[1] / sums[0]
    # megatron-core's cross entropy works on its input in place: hand it a tensor nobody else reads
    ce = vocab_parallel_cross_entropy(logits.clone(), labels)
    return -ce, entropy


def token_logprobs(model, batch: dict, temperature: float = 1.0, with_entropy: bool = True):
    """Per-token log-probs (and entropies) of ``batch["labels"]`` under ``model`` (a DeepSpeed engine or a plain
    ``NMMModel``): [B, S] each, meaningful where ``batch["mask"]`` is 1."""
    module = getattr(model, "module", model)
    with _head_logits(module) as box:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"],
              labels=batch["labels"], loss_mask=batch["mask"])
    logits = box[-1].float() / temperature
    return vocab_parallel_logprobs(logits, batch["labels"], module.args.vocab_size, with_entropy)


def collate(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device=None) -> dict:
    """(prompt, answer) token lists -> a right-padded batch: ``input_ids``/``labels`` [B, S] (labels shifted by one),
    ``mask`` 1 on the labels that are answer tokens, position ids from 0, one document per row."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    s = max(len(x) for x in seqs) - 1
    b = len(seqs)
    ids = torch.full((b, s + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(b, s)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, len(p) - 1:len(p) - 1 + len(a)] = 1  # label j is token j + 1: the answer's tokens
    pos = torch.arange(s).expand(b, s).contiguous()
    out = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "mask": mask,
           "position_ids": pos, "document_ids": torch.zeros_like(pos)}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


# ---------------------------------------------------------------------------------------------------------------------
# prompts


@dataclass
class PromptItem:
    prompt: Prompt
    truth: object
    chat: bool = False  # a chat prompt: a text answer ends with <|end|>


def _user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def toy_prompts(tok, source: str, n: int, rng: np.random.Generator, split: str = "seen") -> list[PromptItem]:
    """``n`` prompts of a toy source with their true attributes."""
    from megannm.data import toy, toy_chat
    from megannm.generate import chat_prompt, image_prompt
    attrs = toy.sample_attrs(n, rng, split)
    if source == "toy_image":
        texts = [toy.caption(a, rng) for a in attrs]
        return [PromptItem(Prompt(image_prompt(tok, t), "image", t), a) for t, a in zip(texts, attrs)]
    if source == "toy_draw":
        texts = [toy_chat.draw_instruction(a, int(rng.integers(len(toy_chat.DRAW)))) for a in attrs]
        return [PromptItem(Prompt(chat_prompt(tok, [_user(t)], "image"), "image", t), a, chat=True)
                for t, a in zip(texts, attrs)]
    if source == "toy_caption":
        v = tok.vocab
        codes = v.image_ids(tok.image.encode(np.stack([toy.render(a, rng) for a in attrs]))).tolist()
        return [PromptItem(Prompt([v.bos_id, v.boi_id, *c, v.eoi_id], "text"), a) for c, a in zip(codes, attrs)]
    raise ValueError(f"recipe: phase.options.prompts: unknown toy source {source!r} (expected one of "
                     f"{', '.join(TOY_SOURCES)} or a JSONL file)")


def prompt_items(tok, source: str, n: int, seed: int, split: str = "seen") -> list[PromptItem]:
    """``n`` prompts of a toy source (seeded), or the first ``n`` of a JSONL prompt file: for tools (pairs, scoring)."""
    if source in TOY_SOURCES:
        return toy_prompts(tok, source, n, np.random.default_rng([seed, 17]), split)
    return JsonlPrompts(source).take(tok, list(range(n)))


class JsonlPrompts:
    """Prompts from a JSONL file: ``{"parts": [...]}`` (plain) or ``{"messages": [...]}`` (chat, up to the turn to
    answer), ``"answer_kind": "text"|"image"`` and ``"answer"`` (the truth, handed to the rewards as is): the format
    of ``megannm.data.toy_chat``'s ``eval_*.jsonl``. Image paths are relative to the file."""

    def __init__(self, path: str):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"recipe: phase.options.prompts: {path}: prompt file not found")
        self.records = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{n}: not valid JSON ({e.msg})") from None
            if r.get("answer_kind") not in ("text", "image"):
                raise ValueError(f"{self.path}:{n}: answer_kind must be 'text' or 'image' (got "
                                 f"{r.get('answer_kind')!r})")
            self.records.append((r, f"{self.path}:{n}"))
        if not self.records:
            raise ValueError(f"{self.path}: no prompts in the file")

    def take(self, tok, indices: list[int]) -> list[PromptItem]:
        from megannm.data.tokenize import encode_records
        v = tok.vocab
        chosen = [self.records[i % len(self.records)] for i in indices]
        docs = encode_records([r for r, _ in chosen], tok, self.path.parent, [w for _, w in chosen])
        out = []
        for (r, _), (ids, _) in zip(chosen, docs):
            ids = ids[:-1].tolist()  # drop <eos>: the prompt continues
            chat = "messages" in r
            if chat:
                ids.append(v.special("<|assistant|>"))
            if r["answer_kind"] == "image":
                ids.append(v.boi_id)
            out.append(PromptItem(Prompt(ids, r["answer_kind"]), r.get("answer"), chat=chat))
        return out


# ---------------------------------------------------------------------------------------------------------------------
# sampling and scoring (shared with the DPO pair builder)


@dataclass
class Scored:
    items: list[PromptItem]  # one per answer (a prompt repeated group_size times)
    answers: list[list[int]]  # answer ids as trained: an image's codes, a text's tokens and its stop token
    rewards: torch.Tensor  # [n] total
    parts: dict = field(default_factory=dict)  # reward name -> [n]


def sample_and_score(model, tok, items: list[PromptItem], combined: Combined, sampling, cfg_scale: float = 1.0,
                     max_new_tokens: int = 32) -> Scored:
    """Generate one answer per item (text and image answers each in one ``generate`` call) and score each."""
    from megannm.generate import generate
    v = tok.vocab
    end = v.special("<|end|>")
    answers: list = [None] * len(items)
    for kind in ("image", "text"):
        idx = [i for i, it in enumerate(items) if it.prompt.kind == kind]
        if not idx:
            continue
        rows = generate(model, v, [items[i].prompt.ids for i in idx], kind, max_new_tokens=max_new_tokens,
                        sampling=sampling, cfg_scale=cfg_scale, stop_ids=(end,), keep_stop=True, pad=True)
        for i, r in zip(idx, rows):
            answers[i] = r
    stops = {v.eos_id, end}
    samples = [None] * len(items)
    for kind in ("image", "text"):
        idx = [i for i, it in enumerate(items) if it.prompt.kind == kind]
        rows = [[t for t in answers[i] if t not in stops] for i in idx]
        for i, s in zip(idx, make_samples(tok, rows, kind) if idx else []):
            samples[i] = s
    totals, parts = [], {n: [] for n in combined.names}
    for it, s in zip(items, samples):
        total, each = combined.score(it.prompt, s, it.truth)
        totals.append(total)
        for n, x in each.items():
            parts[n].append(x)
    return Scored(items, answers, torch.tensor(totals, dtype=torch.float64),
                  {n: torch.tensor(x, dtype=torch.float64) for n, x in parts.items()})


def frozen_reference(recipe, layout, vocab, args):
    """The frozen reference: a plain ``NMMModel`` from ``checkpoint.init_from`` at this TP size, or (without one)
    rebuilt from the recipe's seed, i.e. the policy's own initial weights. No gradient ever reaches it."""
    with torch.random.fork_rng(devices=[]):
        if recipe.checkpoint.init_from:
            from megannm.convert.deepspeed import load_model
            model, _ = load_model(recipe.checkpoint.init_from, layout, vocab=vocab)
        else:
            from megannm.train.loop import build_model
            _, model = build_model(recipe, vocab, layout)
    if recipe.precision == "bf16":  # as the engine holds the policy: equal at the start, half the memory
        model.to(torch.bfloat16)
    model.requires_grad_(False)
    return model.eval()


class PolicyCopy:
    """The policy's weights in a plain ``NMMModel`` for sampling under ZeRO-3, refreshed before every rollout by
    gathering the partitioned parameters module by module (every rank of the data group joins each gather)."""

    def __init__(self, engine, args):
        from megannm.model.transformer import NMMModel
        with torch.random.fork_rng(devices=[]):
            self.model = NMMModel(args, seed=0)
        self.model.to(next(engine.module.parameters()).dtype).requires_grad_(False).eval()
        self.engine = engine

    @torch.no_grad()
    def refresh(self):
        import deepspeed
        mine = dict(self.model.named_parameters())
        src = self.engine.module
        groups = [src.embedding, *src.layers, src.head]
        for g in groups:
            named = list(g.named_parameters())
            prefix = next(n for n, m in src.named_modules() if m is g)
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                for n, p in named:
                    mine[f"{prefix}.{n}"].copy_(p.data)
        return self.model


# ---------------------------------------------------------------------------------------------------------------------
# the phase


class _Sums:
    """Named sums, reduced over the data-parallel group in one all-reduce."""

    def __init__(self):
        self.v: dict[str, float] = {}

    def add(self, key: str, x) -> None:
        self.v[key] = self.v.get(key, 0.0) + float(x)

    def reduce(self) -> dict:
        keys = sorted(self.v)
        t = torch.tensor([self.v[k] for k in keys], dtype=torch.float64, device=parallel.device())
        parallel.all_reduce(t, group=parallel.data_group())
        return dict(zip(keys, t.cpu().tolist()))


@contextlib.contextmanager
def one_schedule_step(engine):
    """Several optimizer steps, one learning-rate schedule step: DeepSpeed steps its scheduler at every optimizer
    step, so it is detached for the inner steps and stepped once at the end."""
    sched = engine.lr_scheduler
    engine.lr_scheduler = None
    try:
        yield
    finally:
        engine.lr_scheduler = sched
    if sched is not None:
        sched.step()


class GRPOPhase:
    name = "grpo"
    options_model = GRPOOptions

    def __init__(self, recipe, layout, vocab):
        self.recipe, self.layout, self.vocab = recipe, layout, vocab
        self.opts = o = parse_options(self.options_model, recipe.phase.options, self.name)
        if layout.pp != 1:
            raise ValueError(f"recipe: parallel.pipeline_parallel: phase {self.name} runs at pipeline size 1 "
                             f"(got {layout.pp})")
        d = recipe.data
        if o.prompts_per_step % layout.dp:
            raise ValueError(f"recipe: phase.options.prompts_per_step: must divide by the data-parallel size (got "
                             f"{o.prompts_per_step}, dp={layout.dp}): a group stays on one rank")
        answers = o.prompts_per_step * o.group_size
        if answers != d.global_batch_size * o.mini_batches:
            raise ValueError(f"recipe: phase.options.prompts_per_step: prompts_per_step x group_size answers must "
                             f"fill mini_batches optimizer steps of data.global_batch_size (got {o.prompts_per_step} "
                             f"x {o.group_size} = {answers}, expected {o.mini_batches} x {d.global_batch_size} = "
                             f"{o.mini_batches * d.global_batch_size})")
        try:
            self.rewards = Combined(o.rewards)
        except ValueError as e:
            raise ValueError(f"recipe: phase.options.rewards: {str(e).removeprefix('rewards: ')}") from None
        self.tok = self._tokenizers()
        self.source = None if o.prompts in TOY_SOURCES else JsonlPrompts(o.prompts)
        self.reference = None
        self.policy_copy = None

    def _tokenizers(self):
        from megannm.data.tokenize import Tokenizers
        folder = self.opts.tokenizers or (str(Path(self.recipe.data.vocab).parent) if self.recipe.data.vocab
                                          else None)
        if folder is None:
            raise ValueError(f"recipe: phase.options.tokenizers: phase {self.name} needs the tokenizer bundle (to "
                             f"build prompts and decode answers): set it, or data.vocab to the bundle's vocab.json")
        tok = Tokenizers.load(folder)
        self.vocab.check_same(tok.vocab.fingerprint, "the recipe's vocabulary", folder)
        return tok

    # the loop's interface -----------------------------------------------------------------------------------------
    def train_batches(self, consumed_samples: int):
        return iter(())  # the phase makes its own batches (rollouts) in train_step

    def eval_batches(self) -> list:
        return []

    def prompts_for(self, step: int) -> list[PromptItem]:
        """This rank's prompts of rollout ``step``: a pure function of (seed, step, data-parallel rank)."""
        o, lay = self.opts, self.layout
        n = o.prompts_per_step // lay.dp
        if self.source is None:
            rng = np.random.default_rng([self.recipe.data.seed, step, lay.dp_rank])
            return toy_prompts(self.tok, o.prompts, n, rng, o.prompt_split)
        total = len(self.source.records)
        first = step * o.prompts_per_step + lay.dp_rank * n
        epoch = first // total
        order = np.random.default_rng([self.recipe.data.seed, epoch]).permutation(total)
        return self.source.take(self.tok, [int(order[(first + k) % total]) for k in range(n)])

    def sampling(self, step: int):
        from megannm.generate import SamplingConfig
        o = self.opts
        seed = int(np.random.default_rng([self.recipe.data.seed, step, self.layout.dp_rank, 1]).integers(2 ** 62))
        return SamplingConfig(greedy=False, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, seed=seed)

    def _policy_for_sampling(self, trainer):
        if self.recipe.parallel.zero_stage < 3:
            return trainer.engine.module
        if self.policy_copy is None:
            self.policy_copy = PolicyCopy(trainer.engine, trainer.args)
        return self.policy_copy.refresh()

    def rollout(self, trainer, step: int) -> tuple[Scored, torch.Tensor, _Sums]:
        """Sample the groups, score them, and compute advantages [n] (groups contiguous)."""
        o = self.opts
        prompts = self.prompts_for(step)
        items = [it for it in prompts for _ in range(o.group_size)]
        scored = sample_and_score(self._policy_for_sampling(trainer), self.tok, items, self.rewards,
                                  self.sampling(step), o.cfg_scale, o.max_new_tokens)
        grouped = scored.rewards.view(len(prompts), o.group_size)
        adv = group_advantages(grouped, o.adv_eps, o.scale_rewards).reshape(-1).float()
        sums = _Sums()
        for k, x in (("groups", len(prompts)), ("zero_std_groups", (grouped.std(1) == 0).sum()),
                     ("answers", len(items)), ("reward", scored.rewards.sum()), ("reward_sq", (grouped ** 2).sum()),
                     ("answer_tokens", sum(len(a) for a in scored.answers)),
                     *((f"reward/{n}", x.sum()) for n, x in scored.parts.items())):
            sums.add(k, x)
        return scored, adv, sums

    def train_step(self, trainer, batches=None) -> dict:
        """The Trainer's hook: one rollout, then ppo_epochs x mini_batches optimizer steps."""
        o = self.opts
        if self.reference is None and o.kl_coef > 0:
            self.reference = frozen_reference(self.recipe, self.layout, self.vocab, trainer.args)
        t0 = time.perf_counter()
        scored, adv, sums = self.rollout(trainer, trainer.step)
        t1 = time.perf_counter()
        orders, counts = self._passes(scored, trainer.step)
        old, ref = self._fixed_logprobs(trainer.engine, scored, orders[0])
        self._optimise(trainer.engine, scored, adv, orders, counts, old, ref, sums)
        out = self._stats(sums.reduce(), o.ppo_epochs * o.mini_batches)
        out.update(rollout_s=t1 - t0, optimise_s=time.perf_counter() - t1)  # this rank's
        return out

    def _passes(self, scored: Scored, step: int) -> tuple[list[np.ndarray], torch.Tensor]:
        """The order of the answers in every pass (the first as sampled, later ones shuffled) and the normaliser of
        every (pass, mini-batch): its answer tokens summed over the whole data-parallel group."""
        o, n = self.opts, len(scored.answers)
        per_mini = n // o.mini_batches
        orders = [np.arange(n)] + [np.random.default_rng([self.recipe.data.seed, step, self.layout.dp_rank, 2, e])
                                   .permutation(n) for e in range(1, o.ppo_epochs)]
        lengths = np.array([len(a) for a in scored.answers])
        counts = torch.tensor([[lengths[order[m * per_mini:(m + 1) * per_mini]].sum() for m in range(o.mini_batches)]
                               for order in orders], dtype=torch.float64, device=parallel.device())
        parallel.all_reduce(counts, group=parallel.data_group())
        return orders, counts.cpu()

    def _micro_batch(self, scored: Scored, idx) -> dict:
        return collate([scored.items[i].prompt.ids for i in idx], [scored.answers[i] for i in idx],
                       self.vocab.pad_id, parallel.device())

    @property
    def _single_update(self) -> bool:
        """One optimizer step per rollout: pi_old is the current policy, detached; no separate forward needed."""
        return self.opts.ppo_epochs * self.opts.mini_batches == 1

    @torch.no_grad()
    def _fixed_logprobs(self, engine, scored: Scored, order) -> tuple[dict, dict]:
        """log pi_old and log pi_ref of every answer's tokens, once per rollout (answer index -> tokens' values)."""
        old, ref = {}, {}
        if self._single_update and self.reference is None:
            return old, ref
        mbs = self.recipe.data.micro_batch_size
        for s in range(0, len(order), mbs):
            idx = order[s:s + mbs]
            b = self._micro_batch(scored, idx)
            for store, model in ((old, None if self._single_update else engine), (ref, self.reference)):
                if model is not None:
                    lp, _ = token_logprobs(model, b, self.opts.temperature, with_entropy=False)
                    _scatter(store, idx, lp, b["mask"])
        return old, ref

    def _optimise(self, engine, scored: Scored, adv, orders, counts, old: dict, ref: dict, sums: _Sums) -> None:
        o, dp, mbs = self.opts, self.layout.dp, self.recipe.data.micro_batch_size
        per_mini = len(scored.answers) // o.mini_batches
        accum = per_mini // mbs
        high = o.clip_ratio_high if o.clip_ratio_high is not None else o.clip_ratio
        engine.train()
        with one_schedule_step(engine):
            for e, order in enumerate(orders):
                for m in range(o.mini_batches):
                    # DeepSpeed divides by accum and averages over dp: what is left is sum / N_tokens
                    scale = accum * dp / float(counts[e, m]) if counts[e, m] > 0 else 0.0
                    for s in range(m * per_mini, (m + 1) * per_mini, mbs):
                        idx = order[s:s + mbs]
                        b = self._micro_batch(scored, idx)
                        logp, entropy = token_logprobs(engine, b, o.temperature)
                        on = b["mask"] > 0
                        old_lp = logp.detach() if self._single_update else _gather(old, idx, on, logp)
                        ref_lp = _gather(ref, idx, on, logp) if self.reference is not None else None
                        a = adv[torch.as_tensor(idx)].to(logp.device)[:, None].expand_as(logp)
                        t = token_loss(logp, old_lp, ref_lp, a, o.clip_ratio, high, o.kl_coef)
                        loss = torch.where(on, t["loss"], 0.0).sum() * scale
                        engine.backward(loss)
                        engine.step()
                        sums.add("loss", float(loss.detach()) / (accum * dp))
                        sums.add("tokens", on.sum())
                        for k in ("pg", "kl", "ratio", "clipped"):
                            sums.add(k, torch.where(on, t[k].detach(), 0.0).sum())
                        sums.add("entropy", torch.where(on, entropy, 0.0).sum())

    def _stats(self, s: dict, opt_steps: int) -> dict:
        n, tok = max(s["answers"], 1.0), max(s["tokens"], 1.0)
        mean = s["reward"] / n
        out = {"loss": s["loss"] / opt_steps, "reward": mean,
               "reward_std": max(s["reward_sq"] / n - mean ** 2, 0.0) ** 0.5,
               "zero_std_groups": s["zero_std_groups"] / max(s["groups"], 1.0),
               "answer_len": s["answer_tokens"] / n, "pg_loss": s["pg"] / tok, "kl": s["kl"] / tok,
               "entropy": s["entropy"] / tok, "clip_frac": s["clipped"] / tok, "ratio": s["ratio"] / tok,
               "optimizer_steps": opt_steps}
        for k in s:
            if k.startswith("reward/"):
                out[k] = s[k] / n
        return out


def _scatter(store: dict, idx, values: torch.Tensor, mask: torch.Tensor) -> None:
    for row, i in enumerate(idx):
        store[int(i)] = values[row][mask[row] > 0].detach()


def _gather(store: dict, idx, on: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Stored per-answer log-probs back into a micro-batch's [B, S] layout; elsewhere ``fill`` (the current log-probs,
    detached): ratio 1 and KL 0 off the answer tokens, never an overflow to multiply by zero."""
    out = fill.detach().clone()
    for row, i in enumerate(idx):
        out[row][on[row]] = store[int(i)].to(out.dtype)
    return out
