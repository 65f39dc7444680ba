"""What the Trainer asks of a training objective: the ``Phase`` interface.

A phase supplies the data of a step and the loss of one micro-batch; the Trainer (``train/loop.py``) alone calls
backward, steps the optimizer and the learning-rate schedule, clips, evaluates, checks for divergence and saves, for
every phase, with and without a pipeline. A phase never touches the engine's optimizer or schedule.

One training step is a ``StepWork``: one or more optimizer *updates*, each a list of exactly ``accum`` micro-batches
(DeepSpeed's gradient-accumulation steps), plus statistics gathered while making them. The default is one update of
the next ``accum`` micro-batches of ``train_batches``; ``prepare`` sees them before the first forward (SFT counts the
step's loss tokens over the data-parallel group there). A phase that makes its own data overrides ``step_work``:
GRPO samples a rollout and returns ``ppo_epochs x mini_batches`` updates over it. The schedule advances once per
step whatever the number of updates.

A new objective is one file in ``megannm/phases/`` with a ``Phase`` subclass and one line in the registry of
``megannm/phases/__init__.py``. A phase that reads token shards builds its batches with ``data_iterator``, which
honours every key of the recipe's ``data`` section and the tensor-parallel layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal

import torch

from megannm.train.stats import Stats


@dataclass
class StepContext:
    """What a phase may know about the run when it makes a step's work."""
    engine: Any  # the DeepSpeed engine (the policy, for phases that sample from it)
    model_args: Any  # ModelArgs
    step: int  # the step about to be made (0-based)
    accum: int  # micro-batches per optimizer update on this rank


@dataclass
class StepWork:
    updates: list[list[dict]]  # optimizer updates, each its micro-batches (dicts of tensors)
    stats: Stats = field(default_factory=Stats)  # sums gathered while making them (e.g. rollout rewards)


class Phase:
    """Base class of every objective; subclasses set ``name`` and implement ``loss`` and ``summarize``."""
    name: ClassVar[str] = "phase"
    # True when the objective is ``lm_loss`` over (labels, loss_mask): what a pipeline's last stage computes
    pipeline: ClassVar[bool] = False

    @classmethod
    def check(cls, recipe, source: str = "recipe") -> None:
        """Before any process starts (``megannm check`` and ``train``): what the phase can verify of its options
        without the model or the data (names it resolves, files it reads), as one line naming ``source``."""

    def __init__(self, recipe, layout, vocab):
        self.recipe, self.layout, self.vocab = recipe, layout, vocab

    def attach(self, engine, model_args) -> None:
        """Called once the engine exists, before the first step (e.g. to build a frozen reference model)."""

    # data ---------------------------------------------------------------------------------------------------------
    def train_batches(self, consumed_samples: int) -> Iterator[dict]:
        """This rank's micro-batches from ``consumed_samples`` on (empty for phases that make their own)."""
        return iter(())

    def eval_batches(self) -> list[dict]:
        return []

    def prepare(self, micro_batches: list[dict]) -> list[dict]:
        """The micro-batches of one update, before the first forward; returns what the loss will see."""
        return micro_batches

    def step_work(self, ctx: StepContext, batches: Iterator[dict]) -> StepWork:
        return StepWork([self.prepare([next(batches) for _ in range(ctx.accum)])])

    # objective ----------------------------------------------------------------------------------------------------
    def loss(self, model, batch: dict) -> tuple[torch.Tensor, Stats]:
        """The loss to back-propagate for one micro-batch (DeepSpeed divides it by ``accum`` and averages over the
        data-parallel ranks) and its contribution to the step's statistics."""
        raise NotImplementedError

    def lm_stats(self, loss: torch.Tensor, model_stats: dict) -> Stats:
        """For pipeline phases: the statistics of one micro-batch from ``lm_loss``'s (loss, stats)."""
        raise NotImplementedError

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """The step's global sums (over micro-batches, updates and data-parallel ranks) -> the logged values."""
        raise NotImplementedError


def data_iterator(recipe, layout, vocab, split: Literal["train", "valid"] = "train",
                  consumed: int = 0) -> Iterator[dict]:
    """This rank's micro-batches of the recipe's ``data.train`` (infinite, from ``consumed`` global samples on) or
    ``data.valid`` (finite: each data set in stored order, at most ``logging.eval_batches`` micro-batches per data
    set, the same count on every data-parallel rank).

    Every ``data`` key is honoured: ``seq_len``, ``micro_batch_size``, ``global_batch_size``, ``seed``, ``pack``,
    ``caption_dropout``, ``plan_dir``, ``prefetch`` and ``balance``; the plans of the whole stage
    (``schedule.train_steps`` global batches) are built up front. Training data is read by the first rank of each
    tensor-parallel group only and broadcast to the others, so a TP group sees identical batches."""
    from megannm.data.loader import build_eval_batches, build_train_iterator
    d = recipe.data
    if split == "valid":
        if not d.valid:
            return iter(())
        return iter(build_eval_batches([(r.path, r.weight) for r in d.valid], vocab, seq_len=d.seq_len,
                                       micro_batch_size=d.micro_batch_size, dp_rank=layout.dp_rank,
                                       dp_size=layout.dp, num_batches=recipe.logging.eval_batches, pack=d.pack))
    if split != "train":
        raise ValueError(f"data_iterator: split must be 'train' or 'valid' (got {split!r})")
    # with pipeline stages a step's micro-batches go to train_batch as one list: read the next step's during this
    # one (data.prefetch 0: no thread at all)
    prefetch = d.prefetch
    if prefetch and layout.pp > 1:
        prefetch = max(prefetch, recipe.grad_accum(layout.world_size))
    return build_train_iterator([(r.path, r.weight) for r in d.train], vocab, seq_len=d.seq_len,
                                micro_batch_size=d.micro_batch_size, global_batch_size=d.global_batch_size,
                                dp_rank=layout.dp_rank, dp_size=layout.dp, seed=d.seed, consumed_samples=consumed,
                                pack=d.pack, caption_dropout=d.caption_dropout, plan_dir=d.plan_dir,
                                plan_samples=recipe.schedule.train_steps * d.global_batch_size, prefetch=prefetch,
                                tp_group=layout.tp_group, balance=d.balance)
