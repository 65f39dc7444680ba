"""The toy benchmarks: both directions on seen and held-out attribute combinations, and chat after SFT.

- caption accuracy: the model captions an image; the caption is parsed and compared with the truth per attribute;
- image accuracy: the model draws an image for a caption; the toy checker reads the pixels back per attribute;
- text and image loss on the same examples in both document orders.

Both accuracies are the toy rewards' own scoring (``megannm.toy.rewards``), averaged over examples. The held-out
split holds attribute combinations training never saw: it measures compositional generalisation, the honest number.
The same scoring applied to ground-truth captions and images scores >= 0.99 (tested), so a low number is the
model's, not the checker's.

Installed as the ``toy`` and ``toy-chat`` benchmarks of ``megannm evaluate`` (``megannm.benchmarks`` entry points).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from megannm.evaluate import Benchmark, modality_losses, sample_grid, write_report
from megannm.generate import (SamplingConfig, caption_latents, caption_prompt, chat_prompt, codes_to_images, generate,
                              image_prompt, text_of)
from megannm.toy import chat, world
from megannm.toy.rewards import caption_hits, image_hits

SPLITS = ("seen", "heldout")


def _fractions(hits: list[dict]) -> dict:
    """Per attribute, the fraction of examples whose hits say right."""
    n = max(len(hits), 1)
    return {a: sum(h[a] for h in hits) / n for a in world.ATTRIBUTES}


def score_captions(captions: list[str], truths: list) -> dict:
    """Fraction of captions naming each attribute correctly."""
    return _fractions([caption_hits(text, t) for text, t in zip(captions, truths)])


def score_images(images: np.ndarray, truths: list) -> dict:
    """Fraction of images whose pixels show each attribute, as read by the toy checker."""
    return _fractions([image_hits(img, t) for img, t in zip(images, truths)])


def chance() -> dict:
    return {a: 1 / len(world.VALUES[a]) for a in world.ATTRIBUTES}


def split_losses(model, tok, examples) -> dict:
    """Mean text and image loss over both document orders of ``examples``."""
    v = tok.vocab
    docs, latents = [], []
    for _, img, cap in examples:
        if v.continuous:  # the picture's latents at its slots, clean: the text loss reads it (no flow loss here)
            codes, lat = [v.slot_id] * tok.image.num_tokens, caption_latents(tok, img)
        else:
            codes, lat = v.image_ids(tok.image.encode(img[None])[0]).tolist(), None
        text = tok.text.encode(cap, add_special_tokens=False)
        image_span = [v.boi_id, *codes, v.eoi_id]
        docs.append([v.bos_id, *image_span, *text, v.eos_id])
        docs.append([v.bos_id, *text, *image_span, v.eos_id])
        latents += [lat, lat]
    return modality_losses(model, v, docs, latents=latents if v.continuous else None)


# Greedy decoding without guidance by default: on the demo's pretrained checkpoints guidance measured worse or equal
# (held-out generated shape kind, greedy, 100 prompts: 0.91 / 0.77 / 0.77 at scale 1 / 1.5 / 2 after 600 steps;
# 1.00 at scales 1 to 2 after 1,200 steps). The unconditional model learns only from the few captions dropped in
# training and is the weakest part of a short run. `--cfg-scale` turns guidance on.
def evaluate(model, tok, n_per_split: int = 100, seed: int = 7, cfg_scale: float = 1.0, temperature: float = 0.0,
             out_dir: str | Path | None = None, picture: bool = True) -> dict:
    t0 = time.time()
    sampling = SamplingConfig.from_options(temperature=temperature, seed=seed)
    report = {"caption_accuracy": {}, "image_accuracy": {}, "loss": {}, "chance": chance(),
              "n_per_split": n_per_split, "cfg_scale": cfg_scale, "temperature": temperature}
    shown = {}
    for split in SPLITS:
        examples = world.make_examples(n_per_split, seed=seed + (0 if split == "seen" else 1), split=split)
        truths = [a for a, _, _ in examples]
        latents = [caption_latents(tok, img) for _, img, _ in examples] if tok.vocab.continuous else None
        rows = generate(model, tok.vocab, [caption_prompt(tok, img) for _, img, _ in examples], "text",
                        max_new_tokens=24, sampling=sampling, latents=latents)
        captions = [text_of(tok, r) for r in rows]
        prompts = [world.caption(a) for a in truths]
        drawn = codes_to_images(tok, generate(model, tok.vocab, [image_prompt(tok, c) for c in prompts], "image",
                                              sampling=sampling, cfg_scale=cfg_scale))
        report["caption_accuracy"][split] = score_captions(captions, truths)
        report["image_accuracy"][split] = score_images(drawn, truths)
        report["loss"][split] = split_losses(model, tok, examples[: min(len(examples), 64)])
        shown[split] = (examples, captions, prompts, drawn)
    report["wall_seconds"] = round(time.time() - t0, 1)
    if out_dir is not None:
        write_report(report, out_dir)
        if picture:
            samples_png(shown, Path(out_dir) / "samples.png")
    return report


def evaluate_chat(model, tok, n_per_task: int = 25, n_per_question: int = 50, seed: int = 11,
                  cfg_scale: float = 1.0, temperature: float = 0.0) -> dict:
    """Chat (SFT) evaluation on seen and held-out targets (``megannm.toy.chat.eval_items``).

    - ``answer_accuracy``: split -> question type -> fraction of answers (text up to ``<|end|>``) naming the asked
      attribute's true value (an answer naming two values is wrong); ``answer_exact``: the fraction that are exactly
      the reference answer ("it is blue"), i.e. that also follow the answer format;
    - ``draw_accuracy``: split -> attribute -> fraction of pictures drawn for "draw a ..." that show it (the checker);
    - ``edit_accuracy``: the same for the picture answering "now make it ..." after a ground-truth first picture,
      plus ``edited``: the fraction showing the edited attribute's new value.
    """
    t0 = time.time()
    v = tok.vocab
    sampling = SamplingConfig.from_options(temperature=temperature, seed=seed)
    report = {"answer_accuracy": {}, "answer_exact": {}, "draw_accuracy": {}, "edit_accuracy": {}, "examples": {},
              "n_per_task": n_per_task, "n_per_question": n_per_question}
    for split in SPLITS:
        items = chat.eval_items(n_per_task, seed, split, n_per_question)
        qa = [i for i in items if i.task == "qa"]
        rows = generate(model, v, [chat_prompt(tok, i.messages) for i in qa], "text", max_new_tokens=12,
                        sampling=sampling, stop_ids=(v.special("<|end|>"),))
        answers = [text_of(tok, r) for r in rows]
        hits, exact = {a: [] for a in world.ATTRIBUTES}, {a: [] for a in world.ATTRIBUTES}
        for it, ans in zip(qa, answers):
            hits[it.attr].append(caption_hits(ans, it.truth)[it.attr])
            exact[it.attr].append(ans == chat.answer(it.attr, it.truth))
        report["answer_accuracy"][split] = {a: sum(h) / max(len(h), 1) for a, h in hits.items()}
        report["answer_exact"][split] = {a: sum(h) / max(len(h), 1) for a, h in exact.items()}
        report["examples"][split] = [{"question": it.messages[-1]["content"][-1]["text"], "answer": ans,
                                      "truth": getattr(it.truth, it.attr)}
                                     for it, ans in list(zip(qa, answers))[::n_per_question]]  # one per type
        for task in ("draw", "edit"):
            chosen = [i for i in items if i.task == task]
            drawn = codes_to_images(tok, generate(model, v, [chat_prompt(tok, i.messages, "image") for i in chosen],
                                                  "image", sampling=sampling, cfg_scale=cfg_scale))
            acc = score_images(drawn, [i.truth for i in chosen])
            if task == "edit":
                changed = [image_hits(img, i.truth)[i.attr] for img, i in zip(drawn, chosen)]
                acc["edited"] = sum(changed) / max(len(chosen), 1)
            report[f"{task}_accuracy"][split] = acc
    report["wall_seconds"] = round(time.time() - t0, 1)
    return report


def samples_png(shown: dict, path: Path, per_row: int = 8) -> None:
    """Generated images with their prompts (both splits), then held-out images with the generated captions."""
    rows = []
    for split in SPLITS:
        ex, _, prompts, drawn = shown[split]
        rows.append([(drawn[i], f"draw ({split}):", prompts[i]) for i in range(min(per_row, len(ex)))])
    ex, caps, _, _ = shown["heldout"]
    rows.append([(ex[i][1], "caption (heldout):", caps[i]) for i in range(min(per_row, len(ex)))])
    sample_grid(rows, path, per_row)


def format_chat(report: dict, title: str = "chat") -> str:
    lines = []
    for what, label in (("answer_accuracy", "answers"), ("answer_exact", "exact"), ("draw_accuracy", "draw"),
                        ("edit_accuracy", "edit")):
        for split in SPLITS:
            accs = report[what][split]
            lines.append(f"{title + ' ' + label:17s} {split:8s} " + "  ".join(f"{a} {x:.2f}" for a, x in accs.items()))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    lines = [f"{'checkpoint':17s} {report['checkpoint']}"] if "checkpoint" in report else []
    for what in ("caption_accuracy", "image_accuracy"):
        for split in SPLITS:
            accs = report[what][split]
            lines.append(f"{what:17s} {split:8s} " + "  ".join(f"{a} {v:.2f}" for a, v in accs.items()))
    for split in SPLITS:
        lo = report["loss"][split]
        lines.append(f"{'loss':17s} {split:8s} text {lo['text_loss']:.3f}  image {lo['image_loss']:.3f}")
    lines.append("chance            " + "  ".join(f"{a} {v:.2f}" for a, v in report["chance"].items()))
    for key, title in (("chat_before_sft", "before sft"), ("chat", "chat")):
        if key in report:
            if "checkpoint" in report[key]:
                lines.append(f"{'chat checkpoint':17s} {report[key]['checkpoint']}")
            lines.append(format_chat(report[key], title))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# the benchmarks of `megannm evaluate` (--n, --seed: None = these defaults)


def _toy_arguments(p) -> None:
    p.add_argument("--chat", action="store_true", help="also evaluate chat (SFT): answer accuracy per question type, "
                                                       "instructed drawing and edits per attribute")


def _run_toy(model, tok, a, out: Path) -> dict:
    report = evaluate(model, tok, n_per_split=100 if a.n is None else a.n, seed=7 if a.seed is None else a.seed,
                      cfg_scale=a.cfg_scale, temperature=a.temperature, out_dir=out)
    if a.chat:
        report["chat"] = evaluate_chat(model, tok, cfg_scale=a.cfg_scale, temperature=a.temperature)
    return report


def _run_chat(model, tok, a, out: Path) -> dict:
    n = 25 if a.n is None else a.n
    return evaluate_chat(model, tok, n_per_task=n, n_per_question=2 * n, seed=11 if a.seed is None else a.seed,
                         cfg_scale=a.cfg_scale, temperature=a.temperature)


TOY = Benchmark(_run_toy, format_report, _toy_arguments,
                "toy: caption and image accuracy on seen and held-out toy combinations (--n per split, default 100; "
                "--seed 7); --chat adds the chat evaluation")
TOY_CHAT = Benchmark(_run_chat, format_chat, None,
                     "toy-chat: answer, drawing and edit accuracy of a chat (SFT) model (--n drawings and edits per "
                     "split, twice as many questions per question type, default 25; --seed 11)")
