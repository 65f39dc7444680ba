"""Serving throughput: `megannm serve` under 1, 4 and 16 concurrent `openai` clients vs the same requests one at a
time; and the batched decoder's tokens/s vs Hugging Face `generate` on the exported model at the same batch.

A toy-shaped dense model (recipes/toy/common.yaml's sizes: hidden 192, 4 layers, 6 heads, FFN 512; the toy world's
tokenizers, built on the spot), random weights, written as a consolidated checkpoint and served by a real
`megannm serve` process. Requests alternate directions: a chat asking for a picture (64 image codes) and a chat
with a picture asking for text (``--max-new`` tokens, ``ignore_eos`` so every answer has the same length). Each
setting sends ``--requests`` requests; throughput = answer tokens / wall seconds; latency per request (p50, p99).

The decoder part (in this process): ``--batch`` rows of ``--max-new`` greedy text tokens after a prompt of 72 ids,
through ``megannm.decode.Decoder`` and through ``LlamaForCausalLM.generate`` of the same weights exported by
``megannm.convert.hf`` (``min_new_tokens`` = ``max_new_tokens``: equal work), timed alternately, median of
``--reps``. Prints a table, then one JSON line.

    python tools/bench/serve.py [--requests 32 --max-new 32 --batch 16 --reps 3 --threads 2]
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def toy_model(vocab, mot: bool = False):
    import torch

    from megannm import parallel
    from megannm.config import ModelConfig
    from megannm.model.transformer import ModelArgs, NMMModel
    layout = parallel.init_parallel(1, 1)
    cfg = ModelConfig(hidden_size=192, num_layers=4, num_heads=6, ffn_hidden_size=512, mot=mot, qk_norm=False,
                      max_seq_len=256)  # qk_norm off: the dense model exports to LlamaForCausalLM unchanged
    torch.manual_seed(0)
    return NMMModel(ModelArgs.from_config(cfg, vocab), layout).eval()


def write_checkpoint(model, vocab, out: Path) -> Path:
    from megannm.checkpoint import consolidated
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in ("embedding.embed_tokens.weight", "head.output.weight"):  # canonical: the unpadded vocabulary
        state[k] = state[k][:vocab.size].clone()
    c = consolidated.Consolidated(state, consolidated.normalise_args(model.args, vocab), vocab, {"kind": "bench"})
    consolidated.write(c, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_server(ckpt: Path, tokenizers: Path, picture: bytes, a) -> dict:
    from openai import OpenAI
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.Popen([sys.executable, "-m", "megannm", "serve", str(ckpt), "--tokenizers", str(tokenizers),
                             "--port", str(port), "--max-rows", str(2 * a.concurrency[-1]), "--max-queue", "256",
                             "--served-model-name", "bench"], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "the server exited"
                time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
        url = "data:image/png;base64," + base64.b64encode(picture).decode()

        def request(i: int) -> tuple[float, int]:
            t0 = time.perf_counter()
            if i % 2 == 0:
                r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content":
                                                   "a small red circle at the top"}], temperature=1.0, seed=i,
                                                   extra_body={"modalities": ["image"]})
            else:
                r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": [
                    {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}],
                    max_tokens=a.max_new, temperature=1.0, seed=i, extra_body={"ignore_eos": True})
            return time.perf_counter() - t0, r.usage.completion_tokens

        for i in range(4):  # warm-up
            request(i)
        out = {}
        for c in [1, *a.concurrency]:
            t0 = time.perf_counter()
            if c == 1:
                results = [request(i) for i in range(a.requests)]
            else:
                with concurrent.futures.ThreadPoolExecutor(c) as pool:
                    results = list(pool.map(request, range(a.requests)))
            wall = time.perf_counter() - t0
            lat = [r[0] for r in results]
            out[c] = {"tokens_per_s": sum(r[1] for r in results) / wall, "p50_s": percentile(lat, 0.5),
                      "p99_s": percentile(lat, 0.99), "requests_per_s": len(results) / wall}
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def bench_decoder(model, vocab, hf_dir: Path, a) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    from megannm.decode import Decoder, Row
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), local_files_only=True).eval()
    rng = np.random.default_rng(0)
    prompt = [vocab.bos_id, vocab.boi_id, *rng.integers(vocab.image_start, vocab.image_end, 64).tolist(), vocab.eoi_id]
    prompt += rng.integers(0, vocab.text_size, 72 - len(prompt)).tolist()
    ids = torch.tensor([prompt] * a.batch)

    def ours():
        rows = [Row(list(prompt), "text", a.max_new, ignore_eos=True) for _ in range(a.batch)]
        Decoder(model, vocab, max_rows=a.batch, max_len=len(prompt) + a.max_new, sync_every=8).run(rows)
        return sum(len(r.tokens) for r in rows)

    def theirs():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new,
                          min_new_tokens=a.max_new, do_sample=False, pad_token_id=vocab.pad_id)
        return (out.shape[1] - ids.shape[1]) * a.batch

    rates = {"megannm": [], "hf_generate": []}
    with torch.no_grad():
        ours(), theirs()  # warm-up
        for _ in range(a.reps):
            for name, fn in (("megannm", ours), ("hf_generate", theirs)):
                t0 = time.perf_counter()
                n = fn()
                rates[name].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32, help="requests per setting")
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 16], help="concurrent clients (besides 1)")
    p.add_argument("--max-new", type=int, default=32, help="tokens per text answer")
    p.add_argument("--batch", type=int, default=16, help="rows of the decoder comparison")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    a = p.parse_args()

    import torch
    torch.set_num_threads(a.threads)
    from megannm.convert.hf import export_hf
    from megannm.checkpoint import consolidated
    from megannm.data.tokenize import Tokenizers
    from megannm.generate import png_bytes
    from megannm.toy import world
    from megannm.toy.demo import build_data

    with tempfile.TemporaryDirectory(prefix="megannm-bench-serve-") as tmp:
        tmp = Path(tmp)
        tok_dir = build_data(tmp / "toy", n_train=200, n_valid=8, seed=0, workers=1, say=lambda *x: None)["tokenizers"]
        vocab = Tokenizers.load(tok_dir).vocab
        model = toy_model(vocab)
        ckpt = write_checkpoint(model, vocab, tmp / "ckpt")
        export_hf(consolidated.read(ckpt), tmp / "hf")
        served = bench_server(ckpt, tok_dir, png_bytes(world.make_examples(1, seed=0)[0][1]), a)
        decoded = bench_decoder(model, vocab, tmp / "hf", a)

    base = served[1]["tokens_per_s"]
    print(f"serve: toy-shaped dense model, {a.requests} requests a setting (half pictures of {vocab.image_grid} codes, "
          f"half {a.max_new}-token answers), {a.threads} threads")
    print(f"{'clients':>8s} {'tokens/s':>10s} {'vs one':>8s} {'p50 s':>8s} {'p99 s':>8s}")
    for c, r in served.items():
        print(f"{c:8d} {r['tokens_per_s']:10.0f} {r['tokens_per_s'] / base:7.2f}x {r['p50_s']:8.3f} {r['p99_s']:8.3f}")
    print(f"decoder at batch {a.batch}: megannm {decoded['megannm']:.0f} tokens/s, HF generate "
          f"{decoded['hf_generate']:.0f} tokens/s ({decoded['megannm'] / decoded['hf_generate']:.2f}x)")
    top = a.concurrency[-1]
    print(json.dumps({"bench": "serve", "baseline": "one_at_a_time", "threads": a.threads,
                      "speedup": round(served[top]["tokens_per_s"] / base, 3),
                      "clients": {str(c): {k: round(v, 4) for k, v in r.items()} for c, r in served.items()},
                      "decode_vs_hf_generate": round(decoded["megannm"] / decoded["hf_generate"], 3),
                      "decode_tokens_per_s": {k: round(v, 1) for k, v in decoded.items()}}))


if __name__ == "__main__":
    main()
