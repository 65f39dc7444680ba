"""``megannm demo``: the embedded default, with no cluster, GPU or download.

Builds the toy world of shapes and captions, trains the image tokenizer and the text BPE on it, writes zstd token
shards, trains the toy recipe chain (``recipes/toy/chain.yaml``: alignment -> joint -> annealing -> SFT on chat data,
each stage starting from the previous stage's checkpoint) on the CPU, then evaluates both directions on seen and
held-out attribute combinations (and chat, before and after SFT) and prints where the report, the picture and the
TensorBoard logs are.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TOY_CHAIN = REPO / "recipes" / "toy" / "chain.yaml"


def build_data(out: Path, n_train: int, n_valid: int, seed: int, workers: int, say=print,
               n_chat: int | None = None, image_to_text: float = 0.35) -> dict:
    """Toy world (+ its chat data for SFT, ``n_chat`` conversations, default ``n_train // 4``) -> tokenizers ->
    shards. Returns paths. Skips work whose outputs already exist (re-runs are cheap)."""
    from megannm.data.image_tokenizer import PatchVQ
    from megannm.data.preprocess import preprocess
    from megannm.data.text_tokenizer import train_text_tokenizer
    from megannm.data.tokenize import Tokenizers
    from megannm.toy import chat as toy_chat
    from megannm.toy import world

    raw, tok_dir, shards = out / "data" / "raw", out / "tokenizers", out / "data" / "shards"
    t = time.time()
    if not (raw / "train.jsonl").exists():
        world.write_toy_dataset(raw, n_train=n_train, n_valid=n_valid, seed=seed, image_to_text_fraction=image_to_text)
    chat = out / "data" / "raw_chat"
    n_chat = n_train // 4 if n_chat is None else n_chat
    if not (chat / "train.jsonl").exists():
        toy_chat.write_toy_chat(chat, n_train=n_chat, n_valid=n_valid, seed=seed + 1)
    say(f"toy world: {n_train} training records in {raw}, {n_chat} conversations in {chat} "
        f"({time.time() - t:.1f} s)")
    t = time.time()
    if not (tok_dir / "vocab.json").exists():
        import numpy as np
        from PIL import Image
        records = [json.loads(line) for line in (raw / "train.jsonl").read_text().splitlines()]
        texts = [p["text"] for r in records for p in r["parts"] if "text" in p]
        # the chat texts too, so that questions, instructions and one-word answers get merges of their own
        texts += [p["text"] for line in (chat / "train.jsonl").read_text().splitlines()
                  for m in json.loads(line)["messages"] for p in m["content"] if p["type"] == "text"]
        paths = [raw / p["image"] for r in records for p in r["parts"] if "image" in p]
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(paths), size=min(len(paths), 4000), replace=False)
        images = np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in sorted(pick)])
        import tempfile
        with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizers.build-") as staging:  # never left behind
            staging = Path(staging)
            text_dir = train_text_tokenizer(texts, staging / "text", vocab_size=512)
            vq = PatchVQ.train(images, codebook_size=2048, seed=seed)
            vq.save(staging / "image_tokenizer.npz")
            Tokenizers.build(text_dir, staging / "image_tokenizer.npz").save(tok_dir)
    tok = Tokenizers.load(tok_dir)
    say(f"tokenizers: text {tok.vocab.text_size} ids, image codebook {tok.vocab.image_codes}, vocabulary "
        f"{tok.vocab.size} (fingerprint {tok.vocab.fingerprint}) ({time.time() - t:.1f} s)")
    t = time.time()
    sources = {name: raw / f"{name}.jsonl" for name in ("train", "valid_seen", "valid_heldout")}
    sources.update(sft_train=chat / "train.jsonl", sft_valid=chat / "valid.jsonl")
    for name, src in sources.items():
        if not (shards / name / "manifest.json").exists():
            preprocess([src], shards / name, tok_dir, workers=workers, progress=False)
    say(f"shards: {shards} ({time.time() - t:.1f} s)")
    return {"raw": raw, "chat": chat, "tokenizers": tok_dir, "shards": shards}


def load_chain(path: Path) -> list[dict]:
    chain = yaml.safe_load(path.read_text())
    return [{"name": s["name"], "recipe": path.parent / s["recipe"], "overrides": list(s.get("overrides", []))}
            for s in chain["stages"]]


def run_chain(chain: Path, data: dict, out: Path, extra: list[str], layout, say=print) -> Path:
    """Train every stage in this process (a world of one), each from the previous stage's checkpoint.

    Every stage reads the pretraining shards unless its overrides name others: ``{shards}`` in a stage's overrides
    is the demo's shard folder (e.g. the SFT stage's ``data.train=[{path: "{shards}/sft_train"}]``)."""
    from megannm import checkpoint
    from megannm.config import load_recipe
    from megannm.runner import build_trainer

    shards = data["shards"]
    previous = None
    for stage in load_chain(chain):
        run_dir = out / "runs" / stage["name"]
        overrides = [f"data.train=[{{path: {shards / 'train'}}}]",
                     f"data.valid=[{{path: {shards / 'valid_seen'}}}]",
                     f"logging.dir={run_dir}", *[o.replace("{shards}", str(shards)) for o in stage["overrides"]],
                     *extra]
        if previous is not None:
            overrides.append(f"checkpoint.init_from={previous}")
        recipe = load_recipe(stage["recipe"], overrides, world_size=1)
        done = checkpoint.latest(run_dir / "checkpoints")
        if done is not None and checkpoint.read_meta(done)["step"] >= recipe.schedule.train_steps:
            say(f"stage {stage['name']}: already trained ({done})")
        else:
            say(f"stage {stage['name']}: {recipe.schedule.train_steps} steps -> {run_dir}")
            t = time.time()
            result = build_trainer(recipe, layout, source=str(stage["recipe"])).run(resume=True)
            if result.get("exit_code", 0) != 0:  # preempted (a signal): saved; `megannm demo` again resumes it
                raise SystemExit(result["exit_code"])
            say(f"stage {stage['name']}: done in {time.time() - t:.0f} s")
        previous = run_dir / "checkpoints"
    return previous


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--chain", default=str(TOY_CHAIN), help="recipe chain to train")
    p.add_argument("--n-train", type=int, default=14000)
    p.add_argument("--n-valid", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=100, help="examples per split in the evaluation")
    p.add_argument("--eval-chat-n", type=int, default=10,
                   help="chat evaluation (when the chain ends with an SFT stage): drawing and edit prompts per split "
                        "(twice as many questions per question type)")
    p.add_argument("--image-to-text", type=float, default=0.35,
                   help="fraction of pretraining records that put the image first (the rest: caption -> image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="key.path=value applied to every stage (e.g. a shorter schedule)")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out, a.n_train, a.n_valid, a.seed, a.workers, image_to_text=a.image_to_text)

    from megannm import checkpoint, parallel
    from megannm.config import load_recipe
    from megannm.convert.deepspeed import load_model
    from megannm.data.tokenize import Tokenizers
    from megannm.evaluate import write_report
    from megannm.toy.evaluate import evaluate, evaluate_chat, format_report
    layout = parallel.init_parallel(1, 1)  # one world of one for every stage and the evaluation
    try:
        final = run_chain(Path(a.chain), data, out, a.overrides, layout)
        tok = Tokenizers.load(data["tokenizers"])
        stages = load_chain(Path(a.chain))
        sft = load_recipe(stages[-1]["recipe"]).phase.kind == "sft" and len(stages) > 1
        # Both directions are the pretrained model's job: score the last pretraining stage; the SFT model (a chat
        # model, prompted with the chat template) is scored on chat, against that same pretrained model.
        base = out / "runs" / stages[-2]["name"] / "checkpoints" if sft else final
        model, _ = load_model(base, layout, vocab=tok.vocab)
        report = evaluate(model, tok, n_per_split=a.eval_n, out_dir=out)
        report["checkpoint"] = str(checkpoint.latest(base))
        if sft:
            n = {"n_per_task": a.eval_chat_n, "n_per_question": 2 * a.eval_chat_n}
            report["chat_before_sft"] = evaluate_chat(model, tok, **n)
            model, _ = load_model(final, layout, vocab=tok.vocab)
            report["chat"] = evaluate_chat(model, tok, **n)
            report["chat"]["checkpoint"] = str(checkpoint.latest(final))
        report["demo_wall_seconds"] = round(time.time() - t0, 1)
        write_report(report, out)
    finally:
        parallel.shutdown()
    print(format_report(report))
    print(f"\nreport:      {out / 'report.json'}\npicture:     {out / 'samples.png'}\n"
          f"tensorboard: tensorboard --logdir {out / 'runs'}\nwall time:   {time.time() - t0:.0f} s")
    return 0

