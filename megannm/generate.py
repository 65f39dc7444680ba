"""Sampling with a KV cache, in both directions.

- image -> text: the prompt ends after ``<eoi>``; decoding is restricted to text ids and ``<eos>``.
- text -> image: the prompt ends with ``<boi>``; decoding is restricted to image codes for exactly the tokenizer's
  grid size, then ``<eoi>`` is appended (modality-constrained decoding), with classifier-free guidance:
  ``logits = uncond + scale * (cond - uncond)``, the unconditional prompt being ``<bos> <boi>`` (the training recipe
  drops captions with ``data.caption_dropout``, so the model knows that prompt).

Prompts of different lengths are decoded in buckets of equal length (exact, no left-padding masks). At TP > 1 every
tensor-parallel rank computes the same gathered logits; the sampled token is broadcast from the group's first rank so
that ranks never diverge.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megannm import parallel
from megannm.vocab import Vocab


@dataclass
class SamplingConfig:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def _allowed_mask(vocab: Vocab, vocab_size: int, kind: str, device) -> torch.Tensor:
    """Boolean [V]: which ids may be sampled in a text or image span."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    if kind == "image":
        allowed[vocab.image_start:vocab.image_end] = True
    else:  # text: text ids and <eos>; never image codes, never <boi> (a caption does not open an image)
        allowed[:vocab.text_size] = True
        allowed[vocab.eos_id] = True
    return allowed


def pick(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, V] (disallowed already -inf) -> ids [B]."""
    if cfg.greedy or cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs > cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits.float(), -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _same_on_tp_ranks(ids: torch.Tensor) -> torch.Tensor:
    return parallel.broadcast_in_tensor_group(ids)


class _Stream:
    """One batch of equal-length prompts decoding with its own KV cache."""

    def __init__(self, model, prompts: torch.Tensor, max_new: int):
        self.model = model
        b, n = prompts.shape
        self.cache = model.new_cache(b, n + max_new)
        self.pos = n
        pos = torch.arange(n, device=prompts.device).expand(b, n)
        self.logits = model(prompts, position_ids=pos, cache=self.cache)[:, -1].float()

    def feed(self, ids: torch.Tensor) -> None:
        b = ids.shape[0]
        pos = torch.full((b, 1), self.pos, dtype=torch.long, device=ids.device)
        self.logits = self.model(ids[:, None], position_ids=pos, cache=self.cache)[:, -1].float()
        self.pos += 1


@torch.no_grad()
def _decode_bucket(model, vocab: Vocab, prompts: torch.Tensor, kind: str, max_new: int, cfg: SamplingConfig,
                   cfg_scale: float, generator) -> list[list[int]]:
    dev = prompts.device
    b = prompts.shape[0]
    cond = _Stream(model, prompts, max_new)
    uncond = None
    if kind == "image" and cfg_scale != 1.0:
        uncond = _Stream(model, torch.tensor([[vocab.bos_id, vocab.boi_id]], device=dev).expand(b, 2), max_new)
    vsize = cond.logits.shape[-1]
    allowed = _allowed_mask(vocab, vsize, kind, dev)
    out = torch.empty(b, 0, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    for _ in range(max_new):
        logits = cond.logits
        if uncond is not None:
            logits = uncond.logits + cfg_scale * (cond.logits - uncond.logits)
        logits = logits.masked_fill(~allowed, float("-inf"))
        ids = _same_on_tp_ranks(pick(logits, cfg, generator))
        if kind == "text":
            ids = torch.where(done, torch.full_like(ids, vocab.eos_id), ids)
            done |= ids == vocab.eos_id
        out = torch.cat([out, ids[:, None]], 1)
        if kind == "text" and bool(done.all()):
            break
        cond.feed(ids)
        if uncond is not None:
            uncond.feed(ids)
    rows = out.tolist()
    if kind == "text":
        rows = [r[:r.index(vocab.eos_id)] if vocab.eos_id in r else r for r in rows]
    return rows


@torch.no_grad()
def generate(model, vocab: Vocab, prompts: list[list[int]], kind: str, max_new_tokens: int = 0,
             sampling: SamplingConfig = SamplingConfig(), cfg_scale: float = 1.0, batch_size: int = 64,
             device=None) -> list[list[int]]:
    """Continue every prompt with a span of ``kind`` ("text" or "image"). Image spans are exactly
    ``vocab.image_grid`` codes (unified ids); text spans stop at ``<eos>`` (not returned) or ``max_new_tokens``."""
    if kind not in ("text", "image"):
        raise ValueError(f"generate: kind must be text or image (got {kind!r})")
    if kind == "image":
        if not vocab.image_grid:
            raise ValueError("generate: the vocabulary does not record the image grid size (vocab.image_grid)")
        max_new_tokens = vocab.image_grid
    elif max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be positive for text (got {max_new_tokens})")
    device = device or next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed) if not sampling.greedy else None
    was_training = model.training
    model.eval()
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        buckets[len(p)].append(i)
    results: list[Optional[list[int]]] = [None] * len(prompts)
    for length in sorted(buckets):
        idx = buckets[length]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            t = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            for i, row in zip(chunk, _decode_bucket(model, vocab, t, kind, max_new_tokens, sampling, cfg_scale,
                                                    generator)):
                results[i] = row
    model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# prompts in the toy layout (see megannm.data.tokenize for the document layout)


def caption_prompt(tok, image: np.ndarray) -> list[int]:
    """``<bos> <boi> codes <eoi>``: the model continues with a caption."""
    v = tok.vocab
    codes = tok.image.encode(image[None])[0]
    return [v.bos_id, v.boi_id, *v.image_ids(codes).tolist(), v.eoi_id]


def image_prompt(tok, text: str) -> list[int]:
    """``<bos> caption <boi>``: the model continues with image codes."""
    v = tok.vocab
    ids = tok.text.encode(text, add_special_tokens=False)
    return [v.bos_id, *ids, v.boi_id]


def codes_to_images(tok, rows: list[list[int]]) -> np.ndarray:
    v = tok.vocab
    codes = np.asarray([[i - v.image_start for i in r] for r in rows], dtype=np.int64)
    return tok.image.decode(codes)


def text_of(tok, ids: list[int]) -> str:
    v = tok.vocab
    return tok.text.decode([i for i in ids if i < v.text_size], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------------------------
# the command


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm generate", description="Sample captions or images from a checkpoint.")
    p.add_argument("checkpoint", help="checkpoint folder (or its parent holding `latest`)")
    p.add_argument("--tokenizers", required=True, help="tokenizer bundle folder (text/, image tokenizer, vocab.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--caption", action="append", help="text -> image: generate an image for this caption")
    g.add_argument("--image", action="append", help="image -> text: caption this PNG")
    p.add_argument("--out", default="generated", help="folder for PNGs and results.json")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args(argv)

    from PIL import Image

    from megannm.data.tokenize import Tokenizers
    from megannm.convert.deepspeed import load_model
    layout = parallel.init_parallel(1, 1)
    try:
        tok = Tokenizers.load(a.tokenizers)
        model, meta = load_model(a.checkpoint, layout, vocab=tok.vocab)
        sampling = SamplingConfig(greedy=a.temperature <= 0, temperature=max(a.temperature, 1e-6), top_k=a.top_k,
                                  top_p=a.top_p, seed=a.seed)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        results = []
        if a.caption:
            rows = generate(model, tok.vocab, [image_prompt(tok, c) for c in a.caption], "image", sampling=sampling,
                            cfg_scale=a.cfg_scale)
            for i, (c, img) in enumerate(zip(a.caption, codes_to_images(tok, rows))):
                path = out / f"image_{i:03d}.png"
                Image.fromarray(img).save(path)
                results.append({"caption": c, "image": str(path)})
                print(f"{c!r} -> {path}")
        else:
            imgs = []
            for f in a.image:
                if not Path(f).exists():
                    raise FileNotFoundError(f"{f}: image not found")
                imgs.append(np.asarray(Image.open(f).convert("RGB")))
            rows = generate(model, tok.vocab, [caption_prompt(tok, im) for im in imgs], "text",
                            max_new_tokens=a.max_new_tokens, sampling=sampling)
            for f, r in zip(a.image, rows):
                results.append({"image": f, "caption": text_of(tok, r)})
                print(f"{f} -> {text_of(tok, r)!r}")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    finally:
        parallel.shutdown()
    return 0
