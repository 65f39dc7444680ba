"""The training loop: one engine, one model, a phase supplying batches and a loss.

``run(recipe)`` is what ``megannm train`` calls on every rank. It initialises the process groups (``parallel``),
builds the model and the DeepSpeed engine, resumes from ``latest`` or starts from ``init_from``, then steps, logs,
evaluates and saves atomically, and on a preemption signal saves and exits with ``signals.EXIT_PREEMPTED``.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Optional

import torch

from megannm import parallel
from megannm.config import Recipe, dump_recipe
from megannm.train import checkpoint, signals
from megannm.train.engine import build_engine
from megannm.train.logging import MetricsLogger
from megannm.vocab import Vocab


def load_vocab(recipe: Recipe) -> Vocab:
    if recipe.data.vocab:
        return Vocab.load(recipe.data.vocab)
    refs = recipe.data.train or recipe.data.valid
    if not refs:
        raise ValueError("recipe: data.train: no data set given and no data.vocab to build the model from")
    return Vocab.load(Path(refs[0].path) / "vocab.json")


def get_phase(recipe: Recipe, layout, vocab: Vocab):
    kind = recipe.phase.kind
    if kind == "pretrain":
        from megannm.phases.pretrain import PretrainPhase
        return PretrainPhase(recipe, layout, vocab)
    if kind == "sft":
        from megannm.phases.sft import SFTPhase
        return SFTPhase(recipe, layout, vocab)
    if kind == "grpo":
        from megannm.phases.grpo import GRPOPhase
        return GRPOPhase(recipe, layout, vocab)
    if kind == "dpo":
        from megannm.phases.dpo import DPOPhase
        return DPOPhase(recipe, layout, vocab)
    raise ValueError(f"recipe: phase.kind: unknown phase {kind!r}")


def build_model(recipe: Recipe, vocab: Vocab, layout):
    """The same seed on every rank before building: megatron-core slices each TP shard from one CPU master weight."""
    from megannm.model.transformer import ModelArgs, NMMModel
    torch.manual_seed(recipe.seed)
    args = ModelArgs.from_config(recipe.model, vocab, layout.tp)
    if layout.pp > 1:
        from megannm.model.pipeline import build_pipeline_module
        return args, build_pipeline_module(args, recipe, layout)
    return args, NMMModel(args)


def _to_device(batch: dict) -> dict:
    dev = parallel.device()
    return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    def __init__(self, recipe: Recipe, layout, source: str = "recipe"):
        self.recipe, self.layout, self.source = recipe, layout, source
        self.vocab = load_vocab(recipe)
        self.phase = get_phase(recipe, layout, self.vocab)
        self.args, module = build_model(recipe, self.vocab, layout)
        self.flops_per_token = self._flops(module)
        self.engine = build_engine(recipe, layout, module, pipeline=layout.pp > 1)
        self.run_dir = Path(recipe.logging.dir)
        self.ckpt_dir = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else self.run_dir / "checkpoints"
        self.step = 0
        self.consumed_samples = 0
        self.accum = recipe.grad_accum(layout.world_size)

    def _flops(self, module) -> float:
        seq = self.recipe.data.seq_len
        if hasattr(module, "flops_per_token"):
            return float(module.flops_per_token(seq))
        from megannm.model.transformer import NMMModel  # a pipeline stage: count the whole model's FLOPs
        return float(NMMModel.flops_per_token_of(self.args, seq))

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
        found = checkpoint.latest(self.ckpt_dir) if resume else None
        if found is not None:
            meta = checkpoint.read_meta(found)
            checkpoint.check_compatible(meta, self.args.to_dict(), self.vocab.fingerprint, str(found),
                                        layout=self.layout.to_dict())
            checkpoint.load(self.engine, found, self.layout)
            self.step, self.consumed_samples = int(meta["step"]), int(meta["consumed_samples"])
            return f"resumed from {found} at step {self.step}"
        init = self.recipe.checkpoint.init_from
        if init:
            from megannm.train.init import init_weights
            return init_weights(self, init)
        return None

    # steps --------------------------------------------------------------------------------------------------------
    def train_step(self, batches) -> dict:
        from megannm.phases.pretrain import reduce_stats
        own = getattr(self.phase, "train_step", None)
        if own is not None:  # a phase that owns the whole step (GRPO: a rollout, then several optimizer steps)
            return own(self, batches)
        prepare = getattr(self.phase, "prepare_step", None)
        if prepare is not None:  # a phase that sees the step's micro-batches up front (SFT: its global token count)
            batches = iter(prepare([next(batches) for _ in range(self.accum)]))
        if self.layout.pp > 1:
            from megannm.model.pipeline import pipeline_train_step
            return pipeline_train_step(self, batches)
        vec = None
        for _ in range(self.accum):
            loss, v = self.phase.micro_loss(self.engine, _to_device(next(batches)))
            self.engine.backward(loss)
            self.engine.step()
            vec = v if vec is None else vec + v
        return reduce_stats(vec)

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> dict:
        from megannm.phases.pretrain import reduce_stats
        if not batches:
            return {}
        if self.layout.pp > 1:
            from megannm.model.pipeline import pipeline_eval
            return pipeline_eval(self, batches)
        self.engine.eval()
        vec = None
        for b in batches:
            _, v = self.phase.micro_loss(self.engine, _to_device(b))
            vec = v if vec is None else vec + v
        self.engine.train()
        return reduce_stats(vec)

    def _should_exit(self, started: float) -> bool:
        """Megatron's --exit-interval / --exit-duration-in-mins; the wall-time test agrees across ranks."""
        s = self.recipe.schedule
        if s.exit_interval and self.step % s.exit_interval == 0:
            return True
        if s.exit_duration_minutes:
            t = torch.tensor([time.time() - started], device=parallel.device())
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
            (self.run_dir / "recipe.yaml").write_text(dump_recipe(r))
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


def run(recipe: Recipe, source: str = "recipe", resume: bool = False) -> int:
    """Entry point on every rank: returns the process exit code."""
    layout = parallel.init_parallel(recipe.parallel.tensor_parallel, recipe.parallel.pipeline_parallel)
    try:
        result = Trainer(recipe, layout, source).run(resume=resume or recipe.checkpoint.resume)
    finally:
        parallel.shutdown()
    return int(result.get("exit_code", 0))
