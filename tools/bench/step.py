"""Training-step throughput: megannm's dense model vs Hugging Face LlamaForCausalLM, and MoT vs its dense twin.

Every contender trains the same shape (hidden, layers, heads, FFN, vocabulary), batch and sequence, on the same
threads, in ONE process; HF with torch AdamW (its default implementation), megannm through its real step (DeepSpeed
engine, ZeRO 0, fp32, gradient clipping, the vocab-parallel loss, the optimizer ``megannm.train.engine`` builds).
Timings are interleaved round-robin (A B C A B C ...) so that machine noise hits every contender alike; a ratio is
the median over rounds of the two contenders' step times in the same round (paired: a slow stretch of the machine
shifts both), beside each contender's median step time. Goals: megannm dense >= 1.2x HF's tokens/s, MoT step time
<= 1.05x its dense twin. The summary's headline ratios are the default setting's (eager); ``settings`` has both.
Each contender's minor page faults per step are printed too: all share one process and one allocator (glibc's by
default), and a step that frees and re-allocates large temporaries pays the kernel for fresh pages every step.

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
import time

# Named shapes: the small default and the toy demo's model (megannm.toy) at its batch and sequence length.
SHAPES = {
    "default": dict(hidden=256, layers=4, heads=4, ffn=688, batch=8, seq=256),
    "demo": dict(hidden=192, layers=4, heads=6, ffn=512, batch=32, seq=80),
}
DIMS = ("hidden", "layers", "heads", "ffn", "batch", "seq")
GOAL_DENSE_VS_HF, GOAL_MOT_VS_DENSE = 1.2, 1.05


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="default", help=f"comma-separated named shapes ({', '.join(SHAPES)})")
    for dim in DIMS:
        p.add_argument(f"--{dim}", type=int, default=None, help="overrides this dimension of every shape run")
    p.add_argument("--vocab", type=int, default=2048, help="total ids (text + image codes + specials)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per contender (after 2 warm-up steps)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out the contenders with model.compile_elementwise (generated element-wise kernels)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    a = p.parse_args()
    names = [n.strip() for n in a.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        p.error(f"--shapes: unknown shape {unknown[0] if unknown else a.shapes!r} (expected {', '.join(SHAPES)})")
    overrides = {d: getattr(a, d) for d in DIMS if getattr(a, d) is not None}

    import torch
    torch.set_num_threads(a.threads)
    from megannm import parallel

    layout = parallel.init_parallel(1, 1)
    results = {}
    for name in names:
        shape = {**SHAPES[name], **overrides}
        results[name if not overrides else f"{name}+custom"] = measure(argparse.Namespace(**{**vars(a), **shape}),
                                                                       layout)
    worst_dense = min(r["dense_vs_hf_tokens_per_s"] for r in results.values())
    worst_mot = max(r["mot_vs_dense_step_time"] for r in results.values())
    print(json.dumps({"bench": "step", "baseline": "HF LlamaForCausalLM (sdpa, torch AdamW), same shape/batch/threads",
                      "dense_vs_hf_tokens_per_s": worst_dense, "mot_vs_dense_step_time": worst_mot,
                      "shapes": results}))
    parallel.shutdown()


def paired(num: list, den: list) -> float:
    """Median over rounds of num[i] / den[i]: the two step times of one interleaved round."""
    return statistics.median(x / y for x, y in zip(num, den))


def measure(a, layout) -> dict:
    """One shape: the three contenders interleaved; prints the table, returns the shape's ratios and step times."""
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

    def recipe(mot: bool, compiled: bool):
        return recipe_from_dict({
            "model": {"hidden_size": a.hidden, "num_layers": a.layers, "num_heads": a.heads,
                      "ffn_hidden_size": a.ffn, "mot": mot, "qk_norm": False, "max_seq_len": a.seq,
                      "compile_elementwise": compiled},
            "parallel": {"zero_stage": 0},
            "data": {"seq_len": a.seq, "micro_batch_size": a.batch, "global_batch_size": a.batch},
            "optimizer": {"lr": 1e-4, "min_lr": 1e-5, "grad_clip": 1.0},
            "schedule": {"train_steps": 1000, "warmup_steps": 0}}, world_size=1)

    def megannm_step(mot: bool, compiled: bool = False):
        r = recipe(mot, compiled)
        torch.manual_seed(0)
        engine = build_engine(r, layout, NMMModel(ModelArgs.from_config(r.model, vocab, 1), layout))

        def step():
            loss, _ = engine(input_ids=inputs, position_ids=pos, document_ids=docs, labels=labels, loss_mask=mask)
            engine.backward(loss)
            engine.step()
        return step, sum(p.numel() for p in engine.module.parameters())

    def hf_step():
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=vocab.size, hidden_size=a.hidden, intermediate_size=a.ffn,
                          num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                          max_position_embeddings=a.seq, tie_word_embeddings=False, attention_bias=False,
                          mlp_bias=False)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            out = model(input_ids=inputs, labels=inputs, use_cache=False)  # HF shifts the labels itself
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, sum(p.numel() for p in model.parameters())

    contenders = {"hf_llama": hf_step(), "megannm_dense": megannm_step(False), "megannm_mot": megannm_step(True)}
    if a.compile:
        contenders.update({"dense_compiled": megannm_step(False, True), "mot_compiled": megannm_step(True, True)})
    times = {k: [] for k in contenders}
    faults = {k: [] for k in contenders}  # minor page faults per step: fresh pages the allocator had to map
    compile_s = {}
    for name, (step, _) in contenders.items():  # warm-up; the first compiled step includes the compile
        t = time.perf_counter()
        step()
        compile_s[name] = time.perf_counter() - t
        step()
    for _ in range(a.steps):
        for name, (step, _) in contenders.items():
            f, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = a.batch * a.seq
    print(f"shape: hidden {a.hidden}, layers {a.layers}, heads {a.heads}, ffn {a.ffn}, vocab {vocab.size}, "
          f"batch {a.batch} x seq {a.seq}, threads {a.threads}, {a.steps} interleaved steps each")
    print(f"{'model':16s} {'params':>10s} {'ms/step':>9s} {'tokens/s':>10s} {'first step s':>13s} "
          f"{'page faults/step':>17s}")
    for k in contenders:
        print(f"{k:16s} {contenders[k][1]:10,d} {med[k] * 1e3:9.1f} {tokens / med[k]:10.0f} {compile_s[k]:13.1f} "
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
