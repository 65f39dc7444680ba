"""The training loop: one engine, one model, and a phase that supplies the data and the loss.

The ``Trainer`` is the one owner of a step. For every phase and layout it asks the phase for the step's work
(``Phase.step_work``: optimizer updates of ``accum`` micro-batches each), runs forward and backward through the
DeepSpeed engine (or ``PipelineEngine.train_batch`` with pipeline stages), steps the optimizer once per update and
the learning-rate schedule once per step, reduces the statistics over the data-parallel group, logs, evaluates,
saves atomically, and on a preemption signal saves and exits with ``signals.EXIT_PREEMPTED``.
``megannm.runner.run`` builds it on every rank.
"""
from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from megannm import parallel
from megannm.config import Recipe, dump_recipe
from megannm.fileio import atomic_write
from megannm.model.build import build_model
from megannm.train import checkpoint, signals
from megannm.train.engine import build_engine
from megannm.train.logging import MetricsLogger
from megannm.train.phase import Phase, StepContext
from megannm.train.stats import Stats
from megannm.vocab import Vocab


def load_vocab(recipe: Recipe) -> Vocab:
    if recipe.data.vocab:
        return Vocab.load(recipe.data.vocab)
    refs = recipe.data.train or recipe.data.valid
    if not refs:
        raise ValueError("recipe: data.train: no data set given and no data.vocab to build the model from")
    return Vocab.load(Path(refs[0].path) / "vocab.json")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@contextlib.contextmanager
def one_schedule_step(engine, updates: int):
    """Several optimizer updates, one learning-rate schedule step: DeepSpeed steps its scheduler at every optimizer
    step, so for a multi-update step it is detached for the updates and stepped once at the end."""
    sched = engine.lr_scheduler
    if updates <= 1 or sched is None:
        yield
        return
    engine.lr_scheduler = None
    try:
        yield
    finally:
        engine.lr_scheduler = sched
    sched.step()


class Trainer:
    def __init__(self, recipe: Recipe, layout, phase: Phase, vocab: Vocab, source: str = "recipe"):
        self.recipe, self.layout, self.phase, self.vocab, self.source = recipe, layout, phase, vocab, source
        if layout.pp > 1 and not phase.pipeline:  # (the recipe schema refuses this first; a phase built by hand)
            raise ValueError(f"recipe: parallel.pipeline_parallel: phase {phase.name} cannot run with pipeline "
                             f"stages (got pipeline_parallel={layout.pp}, expected 1)")
        self.args, module = build_model(recipe, vocab, layout)
        self.flops_per_token = float(module.flops_per_token(recipe.data.seq_len))
        self.engine = build_engine(recipe, layout, module, pipeline=layout.pp > 1)
        self.phase.attach(self.engine, self.args)
        self.device = parallel.device()
        self.run_dir = Path(recipe.logging.dir)
        self.ckpt_dir = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else self.run_dir / "checkpoints"
        self.step = 0
        self.consumed_samples = 0
        self.accum = recipe.grad_accum(layout.world_size)

    # metadata -----------------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"recipe": self.recipe.model_dump(mode="json"), "recipe_source": self.source,
                "model_args": self.args.to_dict(), "vocab": self.vocab.to_dict(), "layout": self.layout.to_dict(),
                "zero_stage": self.recipe.parallel.zero_stage, "consumed_samples": self.consumed_samples,
                "phase": self.recipe.phase.kind, "data_seed": self.recipe.data.seed}

    def save(self) -> Path:
        return checkpoint.save(self.engine, self.ckpt_dir, self.step, self.meta(), self.layout,
                               keep_last=self.recipe.checkpoint.keep_last,
                               client_state={"step": self.step, "consumed_samples": self.consumed_samples})

    def restore(self, resume: bool) -> Optional[str]:
        """Resume from ``latest`` (exact: optimizer, schedule, data position, RNG) or start from ``init_from``."""
        found = checkpoint.resume(self.engine, self.ckpt_dir, self.args, self.layout, self.vocab) if resume else None
        if found is not None:
            path, meta = found
            self.step, self.consumed_samples = int(meta["step"]), int(meta["consumed_samples"])
            return f"resumed from {path} at step {self.step}"
        init = self.recipe.checkpoint.init_from
        if init:
            from megannm.train.load import init_from
            return init_from(self.engine, self.args, self.layout, self.vocab, init)
        return None

    # steps --------------------------------------------------------------------------------------------------------
    def _update(self, micro_batches: list[dict]) -> Stats:
        """One optimizer update: forward and backward of each micro-batch, DeepSpeed steps at the last one."""
        if len(micro_batches) != self.accum:
            raise RuntimeError(f"phase {self.phase.name}: an update has {len(micro_batches)} micro-batches, the "
                               f"engine accumulates {self.accum} (data.global_batch_size / (micro_batch_size x dp))")
        if self.layout.pp > 1:
            from megannm.train.pipeline import train_update
            return train_update(self.engine, self.phase, self.layout, micro_batches)
        sums = Stats()
        for batch in micro_batches:
            loss, stats = self.phase.loss(self.engine, to_device(batch, self.device))
            self.engine.backward(loss)
            self.engine.step()
            sums += stats
        return sums

    def train_step(self, batches) -> dict:
        self.engine.train()
        ctx = StepContext(engine=self.engine, model_args=self.args, step=self.step, accum=self.accum)
        work = self.phase.step_work(ctx, batches)
        sums = work.stats
        with one_schedule_step(self.engine, len(work.updates)):
            for update in work.updates:
                sums += self._update(update)
        return self.phase.summarize(sums.reduce(self.layout.dp_group))

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> dict:
        if not batches:
            return {}
        if self.layout.pp > 1:
            from megannm.train.pipeline import eval_batches
            sums = eval_batches(self.engine, self.phase, self.layout, batches)
        else:
            self.engine.eval()
            sums = Stats()
            for b in batches:
                sums += self.phase.loss(self.engine, to_device(b, self.device))[1]
            self.engine.train()
        return self.phase.summarize(sums.reduce(self.layout.dp_group))

    def _should_exit(self, started: float) -> bool:
        """Megatron's --exit-interval / --exit-duration-in-mins; the wall-time test agrees across ranks."""
        s = self.recipe.schedule
        if s.exit_interval and self.step % s.exit_interval == 0:
            return True
        if s.exit_duration_minutes:
            t = torch.tensor([time.time() - started], device=self.device)
            parallel.all_reduce(t, op="max")
            return float(t) >= 60 * s.exit_duration_minutes
        return False

    def run(self, resume: bool = False) -> dict:
        r = self.recipe
        signals.install()
        note = self.restore(resume)
        is_log_rank = self.layout.rank == 0
        logger = MetricsLogger(self.run_dir, enabled=is_log_rank, tensorboard=r.logging.tensorboard,
                               progress_bar=r.logging.progress_bar, total_steps=r.schedule.train_steps,
                               initial_step=self.step, description=r.name)
        logger.event(self.step, "start", layout=self.layout.describe(), zero=r.parallel.zero_stage,
                     params=sum(p.numel() for p in self.engine.module.parameters()))
        if note:
            logger.event(self.step, note.split(" from ")[0], detail=note)
        if is_log_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "recipe.yaml", dump_recipe(r))
        batches = self.phase.train_batches(self.consumed_samples)
        eval_batches = self.phase.eval_batches()
        tokens_per_step = r.data.global_batch_size * r.data.seq_len
        last: dict = {}
        exit_code = 0
        started = time.time()
        while self.step < r.schedule.train_steps:
            t0 = time.perf_counter()
            stats = self.train_step(batches)
            dt = time.perf_counter() - t0
            self.step += 1
            self.consumed_samples += r.data.global_batch_size
            tps = tokens_per_step / dt
            tflops = self.flops_per_token * tps / 1e12
            stats.update(lr=self.engine.get_lr()[0], tokens_per_s=tps, step_time_s=dt, tflops=tflops,
                         mfu=tflops / (r.logging.peak_tflops * self.layout.world_size),
                         consumed_samples=self.consumed_samples,
                         max_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
            gn = self.engine.get_global_grad_norm()
            if gn is not None:
                stats["grad_norm"] = float(gn)
            last = stats
            logger.advance()
            if self.step % r.logging.interval == 0 or self.step == r.schedule.train_steps:
                logger.log(self.step, stats)
            if r.logging.eval_interval and self.step % r.logging.eval_interval == 0 and eval_batches:
                logger.log(self.step, self.evaluate(eval_batches), prefix="eval")
            final = self.step == r.schedule.train_steps
            if not final and self._should_exit(started):
                path = self.save()
                logger.event(self.step, "exit", reason="exit_interval/exit_duration", saved=str(path))
                break
            if signals.preempted():
                path = self.save()
                logger.event(self.step, "preempted", signal=signals.received(), saved=str(path))
                exit_code = signals.EXIT_PREEMPTED
                break
            if final or (r.checkpoint.save_interval and self.step % r.checkpoint.save_interval == 0):
                path = self.save()
                logger.event(self.step, "saved", path=str(path))
        if exit_code == 0 and eval_batches and not (r.logging.eval_interval
                                                     and self.step % r.logging.eval_interval == 0):
            logger.log(self.step, self.evaluate(eval_batches), prefix="eval")
        logger.event(self.step, "done" if exit_code == 0 else "exit", code=exit_code)
        logger.close()
        last["exit_code"] = exit_code
        return last

