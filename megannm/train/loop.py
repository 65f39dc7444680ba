"""The training loop: one engine, one model, and a phase that supplies the data and the loss.

The ``Trainer`` is the one owner of a step. For every phase and layout it asks the phase for the step's work
(``Phase.step_work``: optimizer updates of ``accum`` micro-batches each), runs forward and backward through the
DeepSpeed engine (or ``PipelineEngine.train_batch`` with pipeline stages), steps the optimizer once per update and
the learning-rate schedule once per step, reduces the statistics over the data-parallel group, checks the step for
divergence (``guard``), logs, evaluates and saves atomically. ``megannm.stage.run_stage`` builds it on every rank.

Once per step, one all-reduce (max) over every rank carries what all ranks must agree on: the divergence guard's
evidence, a stop signal (preemption or Ctrl-C: save and exit with ``signals.EXIT_PREEMPTED`` / ``EXIT_INTERRUPTED``)
and the wall clock (``schedule.exit_duration_minutes``). Nothing is saved from a bad step; ``guard.max_bad_steps``
bad steps in a row raise ``guard.Diverged`` (exit code 3).

Nothing is written before the inputs are known good: the data is verified before the model is built, and the run
folder (``metrics.jsonl``, ``recipe.yaml``, TensorBoard) appears only once the checkpoint and the data are open. One
run per folder: the run holds ``runlock``'s lock on its logging and checkpoint folders from before it reads its
checkpoint until it exits (a folder it created only for the lock goes with it), and a live holder there stops a
second run before its model is built.
"""
from __future__ import annotations

import contextlib
import json
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from megannm import checkpoint as fmt
from megannm import parallel
from megannm.config import Recipe, dump_recipe
from megannm.data import verify
from megannm.data.shards import ShardError
from megannm.fileio import atomic_write
from megannm.model.build import build_model
from megannm.train import checkpoint, runlock, signals
from megannm.train.engine import build_engine
from megannm.train.guard import Diverged, Guard
from megannm.train.logging import MetricsLogger
from megannm.train.phase import Phase, StepContext
from megannm.train.stats import Stats
from megannm.vocab import Vocab


def load_vocab(recipe: Recipe, source: str = "recipe") -> Vocab:
    """``data.vocab``, or the vocabulary beside the first data set; a missing file is named by its recipe key."""
    d = recipe.data
    if d.vocab:
        if not Path(d.vocab).is_file():
            raise FileNotFoundError(f"{source}: data.vocab: {d.vocab}: vocabulary file not found")
        try:
            return Vocab.load(d.vocab)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise ValueError(f"{source}: data.vocab: {d.vocab}: not valid JSON of a vocabulary ({e})") from None
    sets = verify.datasets(d)
    if not sets:
        raise ValueError(f"{source}: data.train: no data set given and no data.vocab to build the model from")
    key, folder = sets[0]
    verify.read_manifest(key, folder, source)  # a missing folder is named as such, not as a missing vocab.json
    return Vocab.load(folder / "vocab.json")


def verify_data(recipe: Recipe, layout, vocab: Vocab, source: str = "recipe") -> None:
    """The recipe's data sets checked before anything is built (``megannm.data.verify``, by ``data.verify``), every
    rank reading its share; one all-reduce makes every rank raise for the same problem, which rank 0 prints."""
    found = verify.check_manifests(recipe.data, vocab, source)
    units, mode = verify.work_units(found, recipe.data.verify, layout.world_size)
    failed = verify.first_problem(units, mode, layout.rank, layout.world_size)
    t = torch.tensor([float(len(units) - failed[0]) if failed else 0.0], device=parallel.device())
    parallel.all_reduce(t, op="max")  # the max picks the first failing unit in unit order
    if float(t) == 0:
        return
    i = len(units) - int(t)
    if layout.rank == 0:
        raise ShardError(f"{source}: {units[i].key}: "
                         f"{failed[1] if failed and failed[0] == i else verify.check_unit(units[i], mode)}")
    e = ShardError(f"{source}: {units[i].key}: {units[i].path}: failed verification (rank 0 says how)")
    e.silent = True
    raise e


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
        self.run_dir = Path(recipe.logging.dir)
        self.ckpt_dir = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else self.run_dir / "checkpoints"
        runlock.check([self.run_dir, self.ckpt_dir], layout)  # another live run there: refused before the build
        verify_data(recipe, layout, vocab, source)  # before the engine: a bad shard costs seconds, not a build
        self.args, module = build_model(recipe, vocab, layout)
        self.flops_per_token = float(module.flops_per_token(recipe.data.seq_len))
        self.engine = build_engine(recipe, layout, module, pipeline=layout.pp > 1)
        self.phase.attach(self.engine, self.args)
        self.device = parallel.device()
        self.step = 0
        self.consumed_samples = 0
        self.accum = recipe.grad_accum(layout.world_size)
        self.guard = Guard(recipe.guard, layout.rank, layout.world_size, loss_scaled=recipe.precision == "fp16")
        # A checkpoint saved at step s holds the weights that step s + 1 runs on: it is known good only once a
        # good step has run on it. Pruning spares the newest known-good one; a divergence names it.
        self.last_checkpoint: Optional[Path] = None  # the newest checkpoint of this run's weights (saved or resumed)
        self.good_checkpoint: Optional[Path] = None  # the newest one whose weights have passed a good step

    # metadata -----------------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"recipe": self.recipe.model_dump(mode="json"), "recipe_source": self.source,
                "model_args": self.args.to_dict(), "vocab": self.vocab.to_dict(), "layout": self.layout.to_dict(),
                "zero_stage": self.recipe.parallel.zero_stage, "consumed_samples": self.consumed_samples,
                "phase": self.recipe.phase.kind, "data_seed": self.recipe.data.seed, "guard": self.guard.state()}

    def save(self) -> Path:
        self._check_weights()
        good = self.good_checkpoint
        self.last_checkpoint = checkpoint.save(self.engine, self.ckpt_dir, self.step, self.meta(), self.layout,
                                               keep_last=self.recipe.checkpoint.keep_last,
                                               client_state={"step": self.step,
                                                             "consumed_samples": self.consumed_samples},
                                               spare=good.name if good is not None else None)
        return self.last_checkpoint

    def _check_weights(self) -> None:
        """No checkpoint of weights that are not finite. The guard's gradient check cannot see a bad update under
        ZeRO-0 (DeepSpeed computes no norm there) until the next step's loss; a save may come first. One pass over
        this rank's parameters (its partitions under ZeRO-3) and one all-reduce, on saves only."""
        local = [getattr(p, "ds_tensor", p).isfinite().all() for p in self.engine.module.parameters()]
        finite = torch.stack(local).all().to(self.device) if local else torch.tensor(True, device=self.device)
        t = (~finite).double().reshape(1) * float(self.layout.world_size - self.layout.rank)
        parallel.all_reduce(t, op="max")
        if float(t):
            self._diverged(f"non-finite weights on rank {self.layout.world_size - int(t)}, so nothing was saved")

    def _diverged(self, why: Optional[str] = None):
        """Stop every rank; ``latest`` goes back to the newest known-good checkpoint, so that a plain ``--resume``
        (or a requeue) continues from weights that trained well, not from those the first bad step ran on: these are
        marked ``diverged`` (resuming passes them by). Without a known-good checkpoint of this run, ``latest`` names
        the newest one saved before it, or is removed (``--resume`` then starts afresh)."""
        good, suspect = self.good_checkpoint, self.last_checkpoint
        fallback = None  # without a good checkpoint of this run: the newest older one, saved before it
        if suspect is not None and suspect != good:
            bad = fmt.diverged(self.ckpt_dir) | {suspect.name}
            older = [p for p in fmt.complete(self.ckpt_dir) if p.name < suspect.name and p.name not in bad]
            fallback = older[-1] if good is None and older else None
            if self.layout.rank == 0:
                fmt.mark_diverged(self.ckpt_dir, suspect.name)
                if good is not None or fallback is not None:
                    fmt.write_latest(self.ckpt_dir, (good or fallback).name)
                else:
                    fmt.remove_latest(self.ckpt_dir)
        e = Diverged(self.guard.stop_message(self.step, good, suspect, why, fallback))
        e.silent = self.layout.rank != 0  # every rank stops; one prints
        raise e

    def restore(self, resume: bool) -> list[tuple[str, str]]:
        """Resume from ``latest`` (exact: optimizer, schedule, data position, RNG) or start from ``init_from``;
        returns (event, detail) notes for the log."""
        c = self.recipe.checkpoint
        found = (checkpoint.resume(self.engine, self.ckpt_dir, self.args, self.layout, self.vocab,
                                   fallback=c.fallback) if resume else None)
        if found is not None:
            path, meta, skipped = found
            self.step, self.consumed_samples = int(meta["step"]), int(meta["consumed_samples"])
            self.guard.load_state(meta.get("guard"))
            self.last_checkpoint = path
            changed = self._recipe_learning_rate()
            return [("fallback", f"skipped {s}") for s in skipped] + [
                ("resumed", f"resumed from {path} at step {self.step}")] + (
                [("elastic", meta["elastic"])] if meta.get("elastic") else []) + (
                [("schedule", changed)] if changed else [])
        if c.init_from:
            from megannm.train.load import init_from
            return [("initialised", init_from(self.engine, self.args, self.layout, self.vocab, c.init_from))]
        return []

    def _recipe_learning_rate(self) -> Optional[str]:
        """After a resume, the recipe's ``optimizer.lr`` rather than the one saved in the schedule's state (a run
        resumed after a divergence usually lowers it, and DeepSpeed would restore the old one without a word); the
        schedule keeps its position. Returns a note for the log when they differed."""
        sched = getattr(self.engine, "lr_scheduler", None)
        lr = self.recipe.optimizer.lr
        if not hasattr(sched, "lr_lambdas") or all(b == lr for b in sched.base_lrs):
            return None
        saved = sched.base_lrs[0]
        sched.base_lrs = [lr] * len(sched.base_lrs)
        for group, f in zip(sched.optimizer.param_groups, sched.lr_lambdas):
            group["lr"] = lr * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
        return f"optimizer.lr is {lr:g} in the recipe and {saved:g} in the checkpoint: the recipe's applies"

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

    def train_step(self, batches) -> tuple[dict, list]:
        """One step: (the phase's logged values, this rank's guard evidence for the step's all-reduce)."""
        self.engine.train()
        ctx = StepContext(engine=self.engine, model_args=self.args, step=self.step, accum=self.accum)
        work = self.phase.step_work(ctx, batches)
        sums = work.stats
        grad_norms = []
        with one_schedule_step(self.engine, len(work.updates)):
            for update in work.updates:
                sums += self._update(update)
                grad_norms.append(self.engine.get_global_grad_norm())  # a device tensor: no host sync here
        evidence = self.guard.evidence(sums, grad_norms)  # this rank's own sums, before the reduction mixes them
        return self.phase.summarize(sums.reduce(self.layout.dp_group)), evidence

    def _agree(self, values: list) -> list[float]:
        """The step's one all-reduce (max) over every rank and its one copy to the host."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).to(self.device) for v in values])
        parallel.all_reduce(t, op="max")
        return t.cpu().tolist()

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

    def _should_exit(self, elapsed: float) -> bool:
        """Megatron's --exit-interval / --exit-duration-in-mins (``elapsed``: the slowest rank's, agreed)."""
        s = self.recipe.schedule
        if s.exit_interval and self.step % s.exit_interval == 0:
            return True
        return bool(s.exit_duration_minutes) and elapsed >= 60 * s.exit_duration_minutes

    def run(self, resume: bool = False) -> dict:
        r = self.recipe
        with signals.installed(), runlock.held([self.run_dir, self.ckpt_dir], self.layout) as taken_over:
            if self.layout.rank == 0:  # the folders are this run's now: what killed runs left is litter
                checkpoint.reclaim(self.ckpt_dir, self.run_dir)
            notes = [("lock", note) for note in taken_over] + self.restore(resume)
            batches = self.phase.train_batches(self.consumed_samples)
            eval_batches = self.phase.eval_batches()
            # the inputs are open and checked: only now does the run folder get its files
            logger = MetricsLogger(self.run_dir, enabled=self.layout.rank == 0, tensorboard=r.logging.tensorboard,
                                   progress_bar=r.logging.progress_bar, total_steps=r.schedule.train_steps,
                                   initial_step=self.step, description=r.name)
            try:
                if self.layout.rank == 0:
                    atomic_write(self.run_dir / "recipe.yaml", dump_recipe(r))
                logger.event(self.step, "start", layout=self.layout.describe(), zero=r.parallel.zero_stage,
                             params=sum(p.numel() for p in self.engine.module.parameters()))
                for what, detail in notes:
                    logger.event(self.step, what, detail=detail)
                return self._steps(logger, batches, eval_batches)
            finally:
                logger.close()

    def _steps(self, logger: MetricsLogger, batches, eval_batches: list[dict]) -> dict:
        r = self.recipe
        tokens_per_step = r.data.global_batch_size * r.data.seq_len
        last: dict = {}
        exit_code = 0
        started = time.time()
        while self.step < r.schedule.train_steps:
            t0 = time.perf_counter()
            skipped = self.engine.skipped_steps
            stats, evidence = self.train_step(batches)
            dt = time.perf_counter() - t0
            self.step += 1
            self.consumed_samples += r.data.global_batch_size
            request, elapsed, *agreed = self._agree([signals.code(), time.time() - started, *evidence])
            verdict = self.guard.judge(self.step, agreed, stats.get("loss"))
            tps = tokens_per_step / dt
            tflops = self.flops_per_token * tps / 1e12
            stats.update(lr=self.engine.get_lr()[0], tokens_per_s=tps, step_time_s=dt, tflops=tflops,
                         mfu=tflops / (r.logging.peak_tflops * self.layout.world_size),
                         consumed_samples=self.consumed_samples, bad_steps=self.guard.bad_steps,
                         skipped_steps=self.engine.skipped_steps,  # DeepSpeed's: overflow skips included
                         max_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
            if verdict.grad_norm is not None:
                stats["grad_norm"] = verdict.grad_norm
            if not verdict.bad:  # this step ran on the newest checkpoint's weights and they trained well
                self.good_checkpoint = self.last_checkpoint
            last = stats
            logger.advance()
            final = self.step == r.schedule.train_steps
            if self.step % r.logging.interval == 0 or final or verdict.bad:
                logger.log(self.step, stats)
            if verdict.bad:
                self._bad_step(logger, verdict, self.engine.skipped_steps - skipped)
                if verdict.stop or final:  # the run may not end on a bad step: nothing would be left to save
                    logger.event(self.step, "diverged", last_good=str(self.good_checkpoint))
                    self._diverged(None if verdict.stop else f"the last step was bad ({verdict.reason})")
                if request:  # stop as asked, but keep the bad state out of the checkpoints
                    exit_code = signals.exit_code(request)
                    logger.event(self.step, "preempted" if exit_code == signals.EXIT_PREEMPTED else "interrupted",
                                 signal=signals.received(), saved=None,
                                 resume_from=str(self.good_checkpoint or self.last_checkpoint))
                    break
                continue
            if r.logging.eval_interval and self.step % r.logging.eval_interval == 0 and eval_batches:
                logger.log(self.step, self.evaluate(eval_batches), prefix="eval")
            if not final and self._should_exit(elapsed):
                path = self.save()
                logger.event(self.step, "exit", reason="exit_interval/exit_duration", saved=str(path))
                break
            if request:
                path = self.save()
                exit_code = signals.exit_code(request)
                logger.event(self.step, "preempted" if exit_code == signals.EXIT_PREEMPTED else "interrupted",
                             signal=signals.received(), saved=str(path))
                break
            if final or (r.checkpoint.save_interval and self.step % r.checkpoint.save_interval == 0):
                path = self.save()
                logger.event(self.step, "saved", path=str(path))
        if exit_code == 0 and eval_batches and not (r.logging.eval_interval
                                                     and self.step % r.logging.eval_interval == 0):
            logger.log(self.step, self.evaluate(eval_batches), prefix="eval")
        logger.event(self.step, "done" if exit_code == 0 else "exit", code=exit_code)
        last["exit_code"] = exit_code
        return last

    def _bad_step(self, logger: MetricsLogger, verdict, skipped: int) -> None:
        """Log a bad step; at the first of a streak, keep the last checkpoint saved before it from pruning for good,
        whatever keep_last says (the newest known-good one is spared by every prune anyway)."""
        logger.event(self.step, "bad_step", reason=verdict.reason, streak=f"{verdict.streak}/"
                     f"{self.recipe.guard.max_bad_steps or 'inf'}", skipped_by_deepspeed=skipped)
        if verdict.streak == 1 and self.layout.rank == 0 and self.last_checkpoint is not None:
            fmt.protect(self.ckpt_dir, self.last_checkpoint.name)
