"""``megannm demo``: the embedded default, with no cluster, GPU or download.

Builds the toy world of shapes and captions, trains the image tokenizer and the text BPE on it, writes zstd token
shards, trains the toy recipe chain (``recipes/toy/chain.yaml``: alignment -> joint -> annealing -> SFT on chat data,
each stage starting from the previous stage's checkpoint) on the CPU, then evaluates both directions on seen and
held-out attribute combinations (and chat, before and after SFT) and prints where the report, the picture and the
TensorBoard logs are.

``megannm demo --benchmark toy-geneval`` does the same for the compositional benchmark (``geneval.py``): scenes of
one to four shapes from seen combinations only (both directions, plus their chat form for SFT), a lossless 8 px
patch tokenizer over the 64 px canvas, the chain ``recipes/toy/geneval/chain.yaml`` (pretraining -> SFT -> GRPO with
the benchmark's own checker as reward; DPO on pairs sampled from the SFT checkpoint and ranked by that checker),
then the GenEval-style table of every checkpoint the chain names, before (SFT) and after (GRPO, DPO), on seen and
held-out prompts, with the wall time of every stage.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TOY_CHAIN = REPO / "recipes" / "toy" / "chain.yaml"
GENEVAL_CHAIN = REPO / "recipes" / "toy" / "geneval" / "chain.yaml"
CONTINUOUS_CHAIN = REPO / "recipes" / "toy" / "continuous" / "chain.yaml"
BENCHMARKS = ("toy", "toy-geneval")


def build_data(out: Path, n_train: int, n_valid: int, seed: int, workers: int, say=print,
               n_chat: int | None = None, image_to_text: float = 0.35, benchmark: str = "toy") -> dict:
    """Toy world (+ its chat data for SFT, ``n_chat`` conversations, default ``n_train // 4``) -> tokenizers ->
    shards. Returns paths. Skips work whose outputs already exist (re-runs are cheap).

    ``benchmark="toy-geneval"``: the compositional scenes instead (``geneval.training_records``, seen combinations
    only; the chat records are the same kind of items as conversations) and an 8 px patch tokenizer, so that a 64 px
    scene is a grid of 64 codes, as a 32 px picture of the single-shape world is with 4 px patches."""
    from megannm.data.image_tokenizer import PatchVQ
    from megannm.data.preprocess import preprocess
    from megannm.data.text_tokenizer import train_text_tokenizer
    from megannm.data.tokenize import Tokenizers
    from megannm.toy import chat as toy_chat
    from megannm.toy import geneval, world

    raw, tok_dir, shards = out / "data" / "raw", out / "tokenizers", out / "data" / "shards"
    t = time.time()
    if benchmark not in BENCHMARKS:
        raise ValueError(f"demo: --benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    scenes = benchmark == "toy-geneval"
    make = dict(make=geneval.training_records) if scenes else {}
    if not (raw / "train.jsonl").exists():
        world.write_toy_dataset(raw, n_train=n_train, n_valid=n_valid, seed=seed, image_to_text_fraction=image_to_text,
                                **make)
    chat = out / "data" / "raw_chat"
    n_chat = n_train // 4 if n_chat is None else n_chat
    if not (chat / "train.jsonl").exists():
        if scenes:
            world.write_toy_dataset(chat, n_train=n_chat, n_valid=n_valid, seed=seed + 1,
                                    image_to_text_fraction=image_to_text, make=geneval.chat_records)
        else:
            toy_chat.write_toy_chat(chat, n_train=n_chat, n_valid=n_valid, seed=seed + 1)
    say(f"{'toy scenes' if scenes else 'toy world'}: {n_train} training records in {raw}, {n_chat} conversations in "
        f"{chat} "
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
            vq = PatchVQ.train(images, codebook_size=2048, patch=8 if scenes else 4, seed=seed)
            vq.save(staging / "image_tokenizer.npz")
            Tokenizers.build(text_dir, staging / "image_tokenizer.npz").save(tok_dir)
    tok = Tokenizers.load(tok_dir)
    say(f"tokenizers: text {tok.vocab.text_size} ids, image codebook {tok.vocab.image_codes}, vocabulary "
        f"{tok.vocab.size} (fingerprint {tok.vocab.fingerprint}) ({time.time() - t:.1f} s)")
    t = time.time()
    sources = {name: raw / f"{name}.jsonl" for name in ("train", "valid_seen", "valid_heldout")}
    sources.update(sft_train=chat / "train.jsonl", sft_valid=chat / ("valid_seen.jsonl" if scenes else "valid.jsonl"))
    for name, src in sources.items():
        if not (shards / name / "manifest.json").exists():
            preprocess([src], shards / name, tok_dir, workers=workers, progress=False)
    say(f"shards: {shards} ({time.time() - t:.1f} s)")
    return {"raw": raw, "chat": chat, "tokenizers": tok_dir, "shards": shards}


def continuous_data(data: dict, out: Path, patch: int = 4) -> dict:
    """The toy data set of ``build_data`` with continuous images: the same records and text tokenizer, pixel patches
    as latents (``--image-kind pixels``), shards for the same splits. Skips what exists. Returns paths."""
    from megannm.data.image_tokenizer.pixels import PixelPatches
    from megannm.data.preprocess import preprocess
    from megannm.data.tokenize import Tokenizers
    tok_dir, shards = out / "tokenizers", out / "data" / "shards"
    if not (tok_dir / "vocab.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        side = Tokenizers.load(data["tokenizers"]).image_size()
        PixelPatches(side, patch).save(out / "pixels.npz")
        Tokenizers.build(Path(data["tokenizers"]) / "text", out / "pixels.npz").save(tok_dir)
    for name in ("train", "valid_seen", "valid_heldout"):
        if not (shards / name / "manifest.json").exists():
            preprocess([Path(data["raw"]) / f"{name}.jsonl"], shards / name, tok_dir, progress=False)
    return {"raw": data["raw"], "tokenizers": tok_dir, "shards": shards}


STAGE_KEYS = {"name", "recipe", "overrides", "from", "pairs"}
PAIRS_KEYS = {"from", "prompts", "rewards", "n", "temperature", "cfg_scale", "seed"}


def load_chain(path: Path) -> list[dict]:
    """A chain's stages: name, recipe (relative to the chain file), overrides, ``from`` (the earlier stage whose
    checkpoint this one starts from; default the stage before it) and ``pairs`` (DPO: build preference pairs before
    training, ``{from, prompts, rewards, n, temperature, cfg_scale, seed}``, as ``megannm pairs`` does)."""
    chain = yaml.safe_load(path.read_text())
    stages, names = [], set()
    for k, s in enumerate(chain["stages"]):
        unknown = set(s) - STAGE_KEYS
        if unknown:
            raise ValueError(f"{path}: stages[{k}]: unknown key(s) {', '.join(sorted(unknown))} (expected "
                             f"{', '.join(sorted(STAGE_KEYS))})")
        for key, ref in (("from", s.get("from")), ("pairs.from", (s.get("pairs") or {}).get("from"))):
            if ref is not None and ref not in names:
                raise ValueError(f"{path}: stages[{k}] ({s['name']}): {key}: {ref!r} is not an earlier stage")
        if set(s.get("pairs") or {}) - PAIRS_KEYS:
            raise ValueError(f"{path}: stages[{k}] ({s['name']}): pairs: unknown key(s) "
                             f"{', '.join(sorted(set(s['pairs']) - PAIRS_KEYS))}")
        names.add(s["name"])
        stages.append({"name": s["name"], "recipe": path.parent / s["recipe"],
                       "overrides": list(s.get("overrides", [])), "from": s.get("from"), "pairs": s.get("pairs")})
    return stages


def build_stage_pairs(spec: dict, checkpoints: Path, data: dict, folder: Path, layout, say=print) -> int | None:
    """``megannm pairs`` inside the demo's process: two answers per prompt sampled from ``checkpoints``, ranked by
    the rewards, ties dropped, written to ``folder``. Returns how many; None (nothing done) when its manifest
    exists."""
    from megannm.checkpoint.opened import load_model
    from megannm.data.tokenize import Tokenizers
    from megannm.generate import SamplingConfig
    from megannm.phases.rl.pairs import MANIFEST, build_pairs, write_pairs
    from megannm.phases.rl.prompts import PromptSource
    from megannm.rewards import Combined, parse_weights

    if (folder / MANIFEST).exists():
        say(f"pairs: already built ({folder})")
        return None
    t = time.time()
    tok = Tokenizers.load(data["tokenizers"])
    model, _ = load_model(checkpoints, layout, vocab=tok.vocab)
    n, seed, temperature = int(spec.get("n", 1000)), int(spec.get("seed", 0)), float(spec.get("temperature", 1.0))
    combined = Combined(parse_weights(str(spec["rewards"])))
    items = PromptSource(spec["prompts"], key="pairs.prompts").sample(tok, n, [seed, 17], "seen")
    sampling = SamplingConfig.from_options(temperature=temperature, seed=seed, greedy=False)
    pairs, ties = build_pairs(model, tok, items, combined, sampling, float(spec.get("cfg_scale", 1.0)))
    write_pairs(folder, pairs, {"vocab_fingerprint": tok.vocab.fingerprint, "checkpoint": str(checkpoints),
                                "prompts": spec["prompts"], "split": "seen", "rewards": combined.weights,
                                "temperature": temperature, "seed": seed, "prompts_sampled": n, "ties_dropped": ties})
    say(f"pairs: {len(pairs)} of {n} prompts ({ties} ties dropped) from {checkpoints} -> {folder} "
        f"({time.time() - t:.0f} s)")
    return len(pairs)


def run_chain(chain: Path, data: dict, out: Path, extra: list[str], layout, say=print,
              seconds: dict | None = None) -> Path:
    """Train every stage in this process (a world of one), each from the previous stage's checkpoint (or the one
    its ``from`` names), building a stage's DPO pairs first when it asks for them.

    Every stage reads the pretraining shards unless its overrides name others: ``{shards}`` in a stage's overrides
    is the demo's shard folder (e.g. the SFT stage's ``data.train=[{path: "{shards}/sft_train"}]``),
    ``{tokenizers}`` its tokenizer bundle and ``{out}`` its output folder. ``seconds`` (if given) receives the wall
    seconds of every stage trained (and of every pairs build, as ``<stage>.pairs``) in this call."""
    from megannm import checkpoint
    from megannm.config import load_recipe
    from megannm.stage import build_trainer

    shards = data["shards"]
    fill = lambda o: (o.replace("{shards}", str(shards)).replace("{tokenizers}", str(data["tokenizers"]))  # noqa
                      .replace("{out}", str(out)))
    seconds = {} if seconds is None else seconds
    previous, trained = None, {}
    for stage in load_chain(chain):
        run_dir = out / "runs" / stage["name"]
        start = trained[stage["from"]] if stage["from"] else previous
        overrides = [f"data.train=[{{path: {shards / 'train'}}}]",
                     f"data.valid=[{{path: {shards / 'valid_seen'}}}]",
                     f"logging.dir={run_dir}", *[fill(o) for o in stage["overrides"]], *extra]
        if stage["pairs"]:
            folder = out / "pairs" / stage["name"]
            overrides.append(f"phase.options.pairs={folder}")
            t = time.time()
            src = trained[stage["pairs"]["from"]] if stage["pairs"].get("from") else start
            if build_stage_pairs(stage["pairs"], src, data, folder, layout, say) is not None:
                seconds[f"{stage['name']}.pairs"] = round(time.time() - t, 1)
            if not json.loads((folder / "manifest.json").read_text())["pairs"]:
                # every prompt's two answers scored alike (a model that is always right, or never): nothing to
                # prefer, so the stage has nothing to learn from; the report says so instead of failing the demo
                say(f"stage {stage['name']}: skipped: no preference pairs in {folder} (every pair tied)")
                continue
        if start is not None:
            overrides.append(f"checkpoint.init_from={start}")
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
            seconds[stage["name"]] = round(time.time() - t, 1)
            say(f"stage {stage['name']}: done in {time.time() - t:.0f} s")
        previous = trained[stage["name"]] = run_dir / "checkpoints"
    return previous


def run_demo(out, benchmark: str = "toy", chain=None, n_train: int | None = None, n_valid: int = 200,
             eval_n: int | None = None, eval_temperature: float = 1.0, eval_chat_n: int = 10,
             image_to_text: float = 0.35, seed: int = 0, workers: int = 2, overrides: tuple = (),
             images: str = "discrete") -> int:
    """What ``megannm demo`` runs (the module docstring); returns the exit code. ``None`` sizes: the benchmark's.
    ``images="continuous"``: the same records with pixel patches as latents and the flow objective
    (``continuous_data``, ``recipes/toy/continuous/chain.yaml``)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"--benchmark: {benchmark!r} is not one of {', '.join(BENCHMARKS)}")
    scenes = benchmark == "toy-geneval"
    if images not in ("discrete", "continuous") or (scenes and images == "continuous"):
        raise ValueError(f"--images: {images!r} (expected discrete, or continuous with --benchmark toy)")
    chain = Path(chain or (GENEVAL_CHAIN if scenes else CONTINUOUS_CHAIN if images == "continuous" else TOY_CHAIN))
    n_train = n_train or (20000 if scenes else 14000)
    eval_n = eval_n or (50 if scenes else 100)
    overrides = list(overrides)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out, n_train, n_valid, seed, workers, image_to_text=image_to_text, benchmark=benchmark)
    if images == "continuous":
        data = dict(data, **continuous_data(data, out / "continuous"))
    if scenes:
        return geneval_demo(chain, data, out, t0, overrides, eval_n, eval_temperature, seed)

    from megannm import checkpoint, parallel
    from megannm.config import load_recipe
    from megannm.checkpoint.opened import load_model
    from megannm.data.tokenize import Tokenizers
    from megannm.evaluate import write_report
    from megannm.toy.evaluate import evaluate, evaluate_chat, format_report
    layout = parallel.init_parallel(1, 1)  # one world of one for every stage and the evaluation
    try:
        final = run_chain(chain, data, out, overrides, layout)
        tok = Tokenizers.load(data["tokenizers"])
        stages = load_chain(chain)
        sft = load_recipe(stages[-1]["recipe"]).phase.kind == "sft" and len(stages) > 1
        # Both directions are the pretrained model's job: score the last pretraining stage; the SFT model (a chat
        # model, prompted with the chat template) is scored on chat, against that same pretrained model.
        base = out / "runs" / stages[-2]["name"] / "checkpoints" if sft else final
        model, _ = load_model(base, layout, vocab=tok.vocab)
        # continuous drawings are guided (scale 2: held-out shape kind 0.38 -> 0.45, size 0.66 -> 0.83 on the
        # 670-step chain, 40 prompts a split); the discrete ones greedy, as measured for them (toy/evaluate.py)
        report = evaluate(model, tok, n_per_split=eval_n, out_dir=out, cfg_scale=2.0 if images == "continuous" else 1.0)
        report["checkpoint"] = str(checkpoint.latest(base))
        if sft:
            n = {"n_per_task": eval_chat_n, "n_per_question": 2 * eval_chat_n}
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


def geneval_demo(chain: Path, data: dict, out: Path, t0: float, overrides: list, eval_n: int,
                 eval_temperature: float, seed: int) -> int:
    """Train the compositional chain, then score every checkpoint its ``evaluate`` names (``before``: one stage,
    ``after``: a list) on the toy-geneval benchmark and write ``report.json``: per checkpoint, the benchmark's
    report; ``headline``: text -> image per split and category, before and after; the wall seconds of every
    stage, pairs build and evaluation."""
    from megannm import checkpoint, parallel
    from megannm.checkpoint.opened import load_model
    from megannm.data.tokenize import Tokenizers
    from megannm.evaluate import write_report
    from megannm.toy.geneval import CATEGORIES, SPLITS, evaluate_geneval

    spec = yaml.safe_load(chain.read_text()).get("evaluate") or {}
    names = [spec.get("before"), *spec.get("after", [])]
    stages = {s["name"] for s in load_chain(chain)}
    if names[0] is None or not set(names) <= stages:
        raise ValueError(f"{chain}: evaluate: expected before: <stage> and after: [<stage>, ...] naming stages of "
                         f"the chain (got {spec!r})")
    seconds: dict = {"data": round(time.time() - t0, 1)}
    layout = parallel.init_parallel(1, 1)
    try:
        run_chain(chain, data, out, overrides, layout, seconds=seconds)
        tok = Tokenizers.load(data["tokenizers"])
        report = {"benchmark": "toy-geneval", "chain": str(chain), "checkpoints": {}, "evaluations": {}}
        names = [n for n in names if checkpoint.latest(out / "runs" / n / "checkpoints") is not None]
        for name in names:
            t = time.time()
            ckpt = out / "runs" / name / "checkpoints"
            model, _ = load_model(ckpt, layout, vocab=tok.vocab)
            (out / "eval" / name).mkdir(parents=True, exist_ok=True)
            report["evaluations"][name] = evaluate_geneval(model, tok, n=eval_n, seed=seed,
                                                           temperature=eval_temperature, out_dir=out / "eval" / name)
            report["checkpoints"][name] = str(checkpoint.latest(ckpt))
            seconds[f"evaluate {name}"] = round(time.time() - t, 1)
            del model
    finally:
        parallel.shutdown()
    report["headline"] = {split: {g: {name: report["evaluations"][name]["generation"][split][g] for name in names}
                                  for g in (*CATEGORIES, "overall")} for split in SPLITS}
    report["before"], report["after"] = names[0], names[1:]
    report["skipped"] = [n for n in [spec["before"], *spec.get("after", [])] if n not in names]
    report["eval"] = {"n_per_category": eval_n, "temperature": eval_temperature, "seed": seed}
    report["wall_seconds"] = seconds
    report["demo_wall_seconds"] = round(time.time() - t0, 1)
    write_report(report, out)
    print(format_geneval_demo(report))
    print(f"\nreport:      {out / 'report.json'}\npictures:    {out / 'eval'}/*/samples.png\n"
          f"tensorboard: tensorboard --logdir {out / 'runs'}\nwall time:   {time.time() - t0:.0f} s")
    return 0


def format_geneval_demo(report: dict) -> str:
    """The headline table: text -> image, fraction of prompts right per category, before and after each stage."""
    names = [report["before"], *report["after"]]
    f = lambda x: "   -  " if x is None else f"{x:6.3f}"  # noqa: E731
    e = report["eval"]
    lines = [f"toy-geneval, text -> image ({e['n_per_category']} prompts per category and split, temperature "
             f"{e['temperature']}; before = {names[0]})"]
    for split, title in (("heldout", "held-out prompts"), ("seen", "seen prompts")):
        lines.append(f"  {title:18s}" + "".join(f"{n:>8s}" for n in names))
        for g, row in report["headline"][split].items():
            lines.append(f"    {g:16s}" + "".join(f"  {f(row[n])}" for n in names))
    u = {n: report["evaluations"][n]["understanding"]["heldout"]["overall"] for n in names}
    lines.append("  image -> text, held-out questions, overall" + "".join(f"  {n} {f(v)}" for n, v in u.items()))
    lines.append("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["wall_seconds"].items()))
    return "\n".join(lines)
