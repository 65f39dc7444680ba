"""``megannm selfcheck [--gpu] [--out DIR]``: does this machine train, sample and export in bf16?

One line per item, each ``ok``, ``FAIL`` or ``skipped: no GPU``, in under 8 minutes on one GPU:

- the device; a small toy data set (the embedded world, built on the spot);
- one short bf16 run of each phase at a small shape (pretrain on packed rows, SFT, GRPO, DPO), losses finite;
- the attention backends those runs used (flex_attention for packed rows and fused SDPA on a GPU, SDPA on the CPU);
- sampling in both directions from the bf16 pretraining checkpoint, on the device, with a seeded generator there;
- that checkpoint converted to Hugging Face and its logits compared with megannm's;
- GPU only: peak GPU memory of a bf16 step against ``megannm plan``'s estimate, and tokens/s and MFU of a dense
  and a MoT step at a shape that keeps the GPU busy.

On a machine without a GPU everything but the last items runs on the CPU (``tests/test_bf16.py``), and the GPU
items print ``skipped: no GPU``. ``tools/gpu_check.sh`` runs it with ``--gpu``. ``phase_recipe`` is the small recipe
of each phase, which the bf16 tests share. It lives with the toy world because its data, prompts and checker are
the toy world's.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from megannm import rewards

SKIPPED = "skipped: no GPU"


class Skip(Exception):
    """An item that does not apply here; its message is the line's status."""


# ---------------------------------------------------------------------------------------------------------------------
# the small recipes


def phase_recipe(kind: str, data: dict, out: Path, name: str = "", precision: str = "bf16", steps: int = 3,
                 tp: int = 1, pp: int = 1, zero: int = 1, world: int = 1, **extra) -> dict:
    """A recipe dict of phase ``kind`` (pretrain | sft | grpo | dpo) at a small shape over ``data``
    (``megannm.toy.demo.build_data``'s paths); ``extra``: ``section__key=value`` overrides."""
    shards, tok = Path(data["shards"]), Path(data["tokenizers"])
    d = {
        "name": name or kind, "seed": 7, "precision": precision,
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 128,
                  "max_seq_len": 160, "z_loss": 1e-4},
        "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "zero_stage": zero},
        "data": {"train": [{"path": str(shards / "train")}], "valid": [{"path": str(shards / "valid_seen")}],
                 "seq_len": 80, "micro_batch_size": 2, "global_batch_size": 4 * max(1, world // (tp * pp)),
                 "pack": True},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"train_steps": steps, "warmup_steps": 1},
        "checkpoint": {"keep_last": 2},
        "logging": {"dir": str(out / (name or kind)), "interval": 1, "eval_batches": 1, "progress_bar": False,
                    "tensorboard": False},
    }
    if kind == "sft":
        d["phase"] = {"kind": "sft"}
        d["data"].update(train=[{"path": str(shards / "sft_train")}], valid=[{"path": str(shards / "sft_valid")}],
                         seq_len=160)
    elif kind == "grpo":
        answers = d["data"]["global_batch_size"]
        d["phase"] = {"kind": "grpo", "options": {"prompts": "toy_caption", "rewards": ["selfcheck_low_ids"],
                                                  "tokenizers": str(tok), "group_size": 4,
                                                  "prompts_per_step": answers // 4, "max_new_tokens": 4,
                                                  "kl_coef": 0.1}}
        d["data"] = {"vocab": str(tok / "vocab.json"), "seq_len": 160, "micro_batch_size": 2,
                     "global_batch_size": answers}
    elif kind == "dpo":
        d["phase"] = {"kind": "dpo", "options": {"pairs": str(out / "pairs"), "beta": 0.5}}
        d["data"] = {"vocab": str(tok / "vocab.json"), "seq_len": 160, "micro_batch_size": 2,
                     "global_batch_size": d["data"]["global_batch_size"]}
    for k, v in extra.items():
        section, key = k.split("__")
        d.setdefault(section, {})[key] = v
    return d


@rewards.register("selfcheck_low_ids")
def low_ids(prompt, sample, truth) -> float:
    """A reward that an untrained model already earns unevenly (so GRPO's advantages and update are not zero): the
    fraction of the answer's tokens among the lower half of the text ids."""
    return sum(i < LOW_IDS for i in sample.ids) / max(len(sample.ids), 1)


LOW_IDS = 128


def write_toy_pairs(tokenizers: Path, folder: Path, n: int = 16, seed: int = 0) -> Path:
    """Synthetic DPO pairs on the toy world's caption prompts: chosen answers from the first text ids, rejected
    from the last ones (a preference a model learns in a few steps)."""
    import numpy as np

    from megannm.data.tokenize import Tokenizers
    from megannm.phases.rl.pairs import write_pairs
    from megannm.toy import prompts as toy_prompts
    tok = Tokenizers.load(tokenizers)
    rng = np.random.default_rng(seed)
    top = tok.vocab.text_size
    pairs = [{"prompt": it.prompt.ids, "chosen": rng.integers(0, top // 2, 2).tolist(),
              "rejected": rng.integers(top // 2, top, 2).tolist(), "reward_chosen": 1.0, "reward_rejected": 0.0}
             for it in toy_prompts.toy_caption(tok, n, rng)]
    return write_pairs(folder, pairs, {"vocab_fingerprint": tok.vocab.fingerprint})


def train(recipe: dict, layout, world: int = 1) -> tuple[list[float], object]:
    """Run ``recipe`` on ``layout``; (per-step losses, the Trainer)."""
    from megannm.config import recipe_from_dict
    from megannm.stage import build_trainer
    from megannm.train.logging import read_metrics
    r = recipe_from_dict(recipe, source=recipe["name"], world_size=world)
    trainer = build_trainer(r, layout, source=r.name)
    trainer.run()
    losses = [m["loss"] for m in read_metrics(Path(r.logging.dir)) if m.get("split") == "train"]
    return losses, trainer


@contextlib.contextmanager
def _output_to(log: Path):
    """Everything the item prints (DeepSpeed's banners, the trainer's events, C++ warnings) goes to ``log``, at the
    file-descriptor level, so that the console shows one line per item."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# ---------------------------------------------------------------------------------------------------------------------
# the items


class Check:
    def __init__(self, out: Path, require_gpu: bool):
        from megannm import parallel
        self.out, self.require_gpu = out, require_gpu
        self.gpu = torch.cuda.is_available()
        self.layout = parallel.init_parallel(1, 1)
        self.device = parallel.device()
        self.data: dict = {}
        self.ckpt = None  # the bf16 pretraining checkpoint
        self.failures = 0

    def item(self, name: str, fn: Callable[[], str], gpu_only: bool = False) -> None:
        t0 = time.time()
        try:
            if gpu_only and not self.gpu:
                raise Skip(SKIPPED)
            with _output_to(self.out / "selfcheck.log"):
                detail = fn()
            status = "ok"
        except Skip as s:
            status, detail = str(s), ""
        except Exception as e:  # one line per item, whatever broke
            self.failures += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} " \
                                     f"({Path(where.filename).name}:{where.lineno})"
        line = f"{name:<34} {status}" + (f": {detail}" if detail else "") + f"  ({time.time() - t0:.1f} s)"
        print(line, flush=True)

    # ---------------------------------------------------------------------------------------------------------
    def device_line(self) -> str:
        if self.require_gpu and not self.gpu:
            raise RuntimeError("--gpu: no CUDA device visible (CUDA_VISIBLE_DEVICES, driver, a CUDA build of torch)")
        if not self.gpu:
            return f"cpu, torch {torch.__version__}"
        p = torch.cuda.get_device_properties(self.device)
        return (f"{p.name}, {p.total_memory / 2 ** 30:.1f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")

    def build_data(self) -> str:
        from megannm.toy.demo import build_data
        self.data = build_data(self.out / "toy", n_train=200, n_valid=20, seed=0, workers=1, say=lambda *a: None)
        return str(self.data["shards"])

    def phase(self, kind: str) -> str:
        if kind == "dpo":
            write_toy_pairs(self.data["tokenizers"], self.out / "pairs")
        losses, trainer = train(phase_recipe(kind, self.data, self.out), self.layout)
        if kind == "pretrain":
            self.ckpt = trainer.ckpt_dir
        dtype = next(trainer.engine.module.parameters()).dtype
        if dtype != torch.bfloat16 or not losses or not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"weights {dtype}, losses {losses}")
        extra = ""
        if kind == "grpo":  # its loss is ~0 by construction (advantages centred per group): show the rollout too
            from megannm.train.logging import read_metrics
            last = [m for m in read_metrics(trainer.run_dir) if m.get("split") == "train"][-1]
            extra = f", reward {last['reward']:.2f}, KL {last['kl']:.2e}"
        return (f"{len(losses)} steps, losses {' '.join(f'{x:.3f}' for x in losses)}{extra}, "
                f"{type(trainer.engine.optimizer).__name__}")

    def attention(self) -> str:
        from megannm.model.attention import BACKENDS_USED
        used = dict(BACKENDS_USED)
        if self.gpu and (used.get("sdpa-cpu") or not used.get("flex")):
            raise RuntimeError(f"on a GPU packed rows should run flex_attention and nothing the CPU path: {used}")
        return ", ".join(f"{k} x{v}" for k, v in sorted(used.items()))

    def _model(self):
        from megannm.checkpoint.opened import load_model
        from megannm.data.tokenize import Tokenizers
        tok = Tokenizers.load(self.data["tokenizers"])
        model, _ = load_model(self.ckpt, self.layout, vocab=tok.vocab)
        return model.to(self.device), tok

    def generate(self, kind: str) -> str:
        from megannm.generate import SamplingConfig, caption_prompt, generate, image_prompt
        from megannm.toy import world
        model, tok = self._model()
        v = tok.vocab
        sampling = SamplingConfig.from_options(temperature=1.0, top_k=20, seed=1)
        if kind == "image":
            prompts = [image_prompt(tok, c) for c in ("a small red circle at the top", "a large blue square")]
            rows = generate(model, v, prompts, "image", sampling=sampling, cfg_scale=2.0)
            ok = all(len(r) == v.image_grid and all(v.image_start <= i < v.image_end for i in r) for r in rows)
        else:
            images = [image for _, image, _ in world.make_examples(2, seed=0)]
            rows = generate(model, v, [caption_prompt(tok, im) for im in images], "text", max_new_tokens=8,
                            sampling=sampling)
            ok = all(all(i < v.text_size or i in (v.eos_id, v.special("<|end|>")) for i in r) for r in rows)
        if not ok:
            raise RuntimeError(f"{kind} answers outside the {kind} ids: {rows}")
        return f"{len(rows)} {kind} answers ({', '.join(str(len(r)) for r in rows)} tokens) on {self.device}, " \
               f"{next(model.parameters()).dtype}"

    def hf(self) -> str:
        from transformers import AutoModelForCausalLM

        from megannm.convert.route import convert
        cons, hf = self.out / "consolidated", self.out / "hf"
        convert(self.ckpt, cons, "consolidated", overwrite=True, say=lambda line: None)
        convert(cons, hf, "hf", tokenizers=Path(self.data["tokenizers"]), overwrite=True, say=lambda line: None)
        model, tok = self._model()
        theirs = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True, dtype=torch.bfloat16)
        theirs = theirs.to(self.device).eval()
        v = tok.vocab
        ids = torch.tensor([[v.bos_id, *range(3, 12), v.boi_id, *range(v.image_start, v.image_start + 6)]],
                           device=self.device)
        with torch.no_grad():
            ours = model(ids).float()
            other = theirs(input_ids=ids).logits.float()[..., :ours.shape[-1]]
        diff = float((ours - other).abs().max())
        scale = float(ours.abs().max())
        if not diff <= 3e-2 * scale:  # both bf16: the same weights, different kernels and summation orders
            raise RuntimeError(f"logits differ by {diff:.4f} (max |logit| {scale:.2f})")
        return f"max |logit difference| {diff:.4f} of max |logit| {scale:.2f} (both bf16), {type(theirs).__name__}"

    def throughput(self, mot: bool, compiled: bool = False) -> str:
        """Tokens/s and MFU of bf16 training steps at a GPU-sized shape, and the peak memory against the plan;
        ``compiled``: with ``model.compile`` (each block compiled: Triton kernels for its element-wise work)."""
        from megannm.config import recipe_from_dict
        from megannm.estimate import DEVICES, GiB, estimate_recipe
        from megannm.stage import build_trainer
        from megannm.vocab import Vocab
        d = phase_recipe("pretrain", self.data, self.out, steps=100,
                         name=f"speed_{'mot' if mot else 'dense'}{'_compiled' if compiled else ''}",
                         model__compile=compiled,
                         model__hidden_size=2048, model__num_layers=8, model__num_heads=16, model__num_kv_heads=4,
                         model__ffn_hidden_size=5632, model__max_seq_len=2048, model__mot=mot,
                         data__seq_len=2048, data__micro_batch_size=4, data__global_batch_size=8)
        r = recipe_from_dict(d, source=d["name"])
        trainer = build_trainer(r, self.layout, source=r.name)
        vocab = Vocab.load(Path(self.data["shards"]) / "train" / "vocab.json")
        gen = torch.Generator().manual_seed(0)
        b, s = r.data.micro_batch_size, r.data.seq_len

        def batches():
            while True:  # packed rows of random documents (both modalities), so the document mask matters
                ids = torch.randint(0, vocab.size, (b, s + 1), generator=gen)
                docs = (torch.rand(b, s, generator=gen) < 1 / 300).long().cumsum(1)
                pos = torch.arange(s).expand(b, s) - torch.cummax(torch.where(
                    torch.diff(docs, dim=1, prepend=docs[:, :1] - 1) != 0, torch.arange(s), 0), dim=1).values
                yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": pos.contiguous(),
                       "document_ids": docs, "loss_mask": torch.ones(b, s)}

        it = batches()
        for _ in range(3):  # compile flex_attention (and the element-wise kernels), warm the allocator
            trainer.train_step(it)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        steps, t0 = 5, time.perf_counter()
        for _ in range(steps):
            trainer.train_step(it)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        tps = r.data.global_batch_size * s / dt
        peak = torch.cuda.max_memory_allocated()
        name = torch.cuda.get_device_name().lower()
        kind = next((k for k in ("h200", "h100", "a100", "b200") if k in name), None)
        plan = estimate_recipe(r, 1, kind or "h100", vocab=vocab)
        estimate = plan.peak.total - plan.peak.parts["overhead"]  # the allocator's view: no CUDA context
        flops = trainer.flops_per_token * tps
        mfu = f", MFU {flops / (DEVICES[kind].peak_tflops['bf16'] * 1e12):.1%}" if kind else ""
        del trainer
        torch.cuda.empty_cache()
        return (f"{tps:,.0f} tokens/s, {flops / 1e12:.0f} TFLOP/s{mfu}; peak {peak / GiB:.2f} GiB allocated vs "
                f"plan {estimate / GiB:.2f} GiB ({peak / estimate:.2f}x)")

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> int:
        self.item("device", self.device_line)
        self.item("toy data", self.build_data)
        for kind in ("pretrain", "sft", "grpo", "dpo"):
            self.item(f"bf16 {kind} step", lambda k=kind: self.phase(k))
        self.item("attention backends used", self.attention)
        self.item("generate image -> text (bf16)", lambda: self.generate("text"))
        self.item("generate text -> image (bf16)", lambda: self.generate("image"))
        self.item("bf16 checkpoint -> Hugging Face", self.hf)
        self.item("dense step: tokens/s, MFU, memory", lambda: self.throughput(mot=False), gpu_only=True)
        self.item("MoT step: tokens/s, MFU, memory", lambda: self.throughput(mot=True), gpu_only=True)
        self.item("MoT step, model.compile: tokens/s, MFU, memory",
                  lambda: self.throughput(mot=True, compiled=True), gpu_only=True)
        print(f"selfcheck: {'all ok' if not self.failures else f'{self.failures} FAILED'}", flush=True)
        return 1 if self.failures else 0


def selfcheck(gpu: bool = False, out=None) -> int:
    """What ``megannm selfcheck`` runs: every item, one line each; 1 when one failed. ``gpu``: fail unless a CUDA
    device is visible; ``out``: the working folder (default: a new temporary folder)."""
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="megannm-selfcheck-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"selfcheck: working folder {out} (the runs' own output: {out / 'selfcheck.log'})", flush=True)
    with _output_to(out / "selfcheck.log"):
        from megannm import parallel
        check = Check(out, gpu)
    try:
        return check.run()
    finally:
        with _output_to(out / "selfcheck.log"):
            parallel.shutdown()

