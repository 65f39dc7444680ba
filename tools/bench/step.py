"""Training-step throughput: megannm's dense model vs Hugging Face LlamaForCausalLM, and MoT vs its dense twin.

Every contender trains the same shape (hidden, layers, heads, FFN, vocabulary), batch and sequence, on the same
threads, each in a process of its own (its own allocator and caches, as a user runs one model per process); HF with
torch AdamW (its default implementation), megannm through its real step (DeepSpeed engine, ZeRO 0, fp32, gradient
clipping, the vocab-parallel loss, the optimizer ``megannm.train.engine`` builds). The parent drives them in lock
step, one step at a time, round-robin (A B C A B C ...: only one runs at a time), so that machine noise hits every
contender alike; a ratio is the median over rounds of the two contenders' step times in the same round (paired: a
slow stretch of the machine shifts both), beside each contender's median step time. On a CPU these ratios are
guards, not targets (no complexity enters the model for a CPU figure): megannm dense >= 1.0x HF's tokens/s, MoT step
time <= 1.15x its dense twin. The summary's headline ratios are the default setting's (eager); ``settings`` has
both (eager, and each block compiled: ``model.compile``). Each contender's minor page faults per step are printed
too: a step that frees and
re-allocates large temporaries pays the kernel for fresh pages every step (glibc's allocator returns them).
(When all contenders shared one process, HF's step mapped 15-30k fresh pages a step there, and the heap it left made
megannm's dense step at the demo's shape pay 5-13k faults a step that it does not pay alone.)

    python tools/bench/step.py                        # the default shape
    python tools/bench/step.py --shapes default,demo  # both named shapes, one after the other
    python tools/bench/step.py --hidden 192 --layers 4 --heads 6 --ffn 512 --batch 32 --seq 80  # any shape
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Named shapes: the small default and the toy demo's model (megannm.toy) at its batch and sequence length.
SHAPES = {
    "default": dict(hidden=256, layers=4, heads=4, ffn=688, batch=8, seq=256),
    "demo": dict(hidden=192, layers=4, heads=6, ffn=512, batch=32, seq=80),
}
DIMS = ("hidden", "layers", "heads", "ffn", "batch", "seq")
GOAL_DENSE_VS_HF, GOAL_MOT_VS_DENSE = 1.0, 1.15


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="default", help=f"comma-separated named shapes ({', '.join(SHAPES)})")
    for dim in DIMS:
        p.add_argument(f"--{dim}", type=int, default=None, help="overrides this dimension of every shape run")
    p.add_argument("--vocab", type=int, default=2048, help="total ids (text + image codes + specials)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per contender (after 2 warm-up steps)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out the contenders with model.compile (each block compiled by torch.compile)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)  # a contender's process (see above)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    names = [n.strip() for n in a.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        p.error(f"--shapes: unknown shape {unknown[0] if unknown else a.shapes!r} (expected {', '.join(SHAPES)})")
    overrides = {d: getattr(a, d) for d in DIMS if getattr(a, d) is not None}
    results = {}
    for name in names:
        shape = {**SHAPES[name], **overrides}
        results[name if not overrides else f"{name}+custom"] = measure(argparse.Namespace(**{**vars(a), **shape}))
    worst_dense = min(r["dense_vs_hf_tokens_per_s"] for r in results.values())
    worst_mot = max(r["mot_vs_dense_step_time"] for r in results.values())
    print(json.dumps({"bench": "step", "baseline": "HF LlamaForCausalLM (sdpa, torch AdamW), same shape/batch/threads",
                      "dense_vs_hf_tokens_per_s": worst_dense, "mot_vs_dense_step_time": worst_mot,
                      "shapes": results}))


def paired(num: list, den: list) -> float:
    """Median over rounds of num[i] / den[i]: the two step times of one interleaved round."""
    return statistics.median(x / y for x, y in zip(num, den))


# name -> (megannm's MoT, model.compile); None: Hugging Face Llama
CONTENDERS = {"hf_llama": None, "megannm_dense": (False, False), "megannm_mot": (True, False),
              "dense_compiled": (False, True), "mot_compiled": (True, True)}
_REPLY = "@step-bench "  # the prefix of a worker's protocol lines on its stdout (libraries print there too)


def build(name: str, a, layout):
    """Contender ``name`` at the shape in ``a``, in this process -> (one training step, parameter count)."""
    import torch
    from megannm.config import recipe_from_dict
    from megannm.model.transformer import ModelArgs, NMMModel
    from megannm.train.engine import build_engine
    from megannm.vocab import DEFAULT_SPECIALS, Vocab

    n_text = a.vocab // 2
    vocab = Vocab(text_size=n_text, image_codes=a.vocab - n_text - len(DEFAULT_SPECIALS), image_grid=64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab.size, (a.batch, a.seq + 1), generator=g)  # both modalities in every row
    inputs, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(a.seq).expand(a.batch, a.seq)
    docs = torch.zeros_like(pos)
    mask = torch.ones(a.batch, a.seq)
    torch.manual_seed(0)
    if CONTENDERS[name] is None:
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=vocab.size, hidden_size=a.hidden, intermediate_size=a.ffn,
                          num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                          max_position_embeddings=a.seq, tie_word_embeddings=False, attention_bias=False,
                          mlp_bias=False)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def hf_step():
            out = model(input_ids=inputs, labels=inputs, use_cache=False)  # HF shifts the labels itself
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return hf_step, sum(p.numel() for p in model.parameters())
    mot, compiled = CONTENDERS[name]
    r = recipe_from_dict({
        "model": {"hidden_size": a.hidden, "num_layers": a.layers, "num_heads": a.heads,
                  "ffn_hidden_size": a.ffn, "mot": mot, "qk_norm": False, "max_seq_len": a.seq,
                  "compile": compiled},
        "parallel": {"zero_stage": 0},
        "data": {"seq_len": a.seq, "micro_batch_size": a.batch, "global_batch_size": a.batch},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5, "grad_clip": 1.0},
        "schedule": {"train_steps": 1000, "warmup_steps": 0}}, world_size=1)
    engine = build_engine(r, layout, NMMModel(ModelArgs.from_config(r.model, vocab, 1), layout))

    def step():
        loss, _ = engine(input_ids=inputs, position_ids=pos, document_ids=docs, labels=labels, loss_mask=mask)
        engine.backward(loss)
        engine.step()
    return step, sum(p.numel() for p in engine.module.parameters())


def worker(a) -> None:
    """A contender's process: builds it, runs two warm-up steps (the first one's time is reported: it includes a
    compile), then one timed step per ``step`` line on stdin, answering each with its time and page faults."""
    import torch
    torch.set_num_threads(a.threads)
    from megannm import parallel
    layout = parallel.init_parallel(1, 1)
    step, params = build(a.worker, a, layout)
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    step()
    print(_REPLY + json.dumps({"params": params, "first_s": first}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        f, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        seconds = time.perf_counter() - t
        print(_REPLY + json.dumps({"s": seconds, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f}),
              flush=True)
    parallel.shutdown()


class Contender:
    """One worker process (``worker``), started and built before the next one starts (no two pick one port)."""

    def __init__(self, name: str, a):
        self.name = name
        args = [sys.executable, __file__, "--worker", name, "--vocab", str(a.vocab), "--threads", str(a.threads)]
        for dim in DIMS:
            args += [f"--{dim}", str(getattr(a, dim))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                            os.environ.get("PYTHONPATH", "")]))
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a world of its own
            env.pop(key, None)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        ready = self.reply()
        self.params, self.first_s = ready["params"], ready["first_s"]

    def reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        self.log.seek(0)
        raise SystemExit(f"step bench: the {self.name} worker exited {self.proc.wait()}:\n{self.log.read()[-3000:]}")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def measure(a) -> dict:
    """One shape: the contenders interleaved; prints the table, returns the shape's ratios and step times."""
    names = [n for n, spec in CONTENDERS.items() if a.compile or spec is None or not spec[1]]
    contenders = {}
    try:
        for name in names:
            contenders[name] = Contender(name, a)
        times = {k: [] for k in contenders}
        faults = {k: [] for k in contenders}  # minor page faults per step: fresh pages the allocator had to map
        for _ in range(a.steps):
            for name, c in contenders.items():
                got = c.step()
                times[name].append(got["s"])
                faults[name].append(got["faults"])
    finally:
        for c in contenders.values():
            c.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = a.batch * a.seq
    print(f"shape: hidden {a.hidden}, layers {a.layers}, heads {a.heads}, ffn {a.ffn}, vocab {a.vocab}, "
          f"batch {a.batch} x seq {a.seq}, threads {a.threads}, {a.steps} interleaved steps each")
    print(f"{'model':16s} {'params':>10s} {'ms/step':>9s} {'tokens/s':>10s} {'first step s':>13s} "
          f"{'page faults/step':>17s}")
    for k in contenders:
        c = contenders[k]
        print(f"{k:16s} {c.params:10,d} {med[k] * 1e3:9.1f} {tokens / med[k]:10.0f} {c.first_s:13.1f} "
              f"{statistics.median(faults[k]):17,.0f}")
    out = {}
    for tag, dense, mot in (("eager", "megannm_dense", "megannm_mot"), ("compiled", "dense_compiled", "mot_compiled")):
        if dense not in med:
            continue
        dense_vs_hf, mot_vs_dense = paired(times["hf_llama"], times[dense]), paired(times[mot], times[dense])
        print(f"{tag:8s} megannm dense tokens/s vs HF Llama: {dense_vs_hf:.2f}x (goal >= {GOAL_DENSE_VS_HF}x); "
              f"MoT step time vs dense twin: {mot_vs_dense:.2f}x (goal <= {GOAL_MOT_VS_DENSE}x)")
        out[tag] = {"dense_vs_hf_tokens_per_s": round(dense_vs_hf, 3), "mot_vs_dense_step_time": round(mot_vs_dense, 3)}
    print()
    return {**out["eager"], "settings": out, "ms_per_step": {k: round(v * 1e3, 1) for k, v in med.items()}}


if __name__ == "__main__":
    main()
