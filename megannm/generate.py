"""Sampling with a KV cache, in both directions.

- image -> text: the prompt ends after ``<eoi>``; decoding is restricted to text ids and ``<eos>``.
- text -> image: the prompt ends with ``<boi>``; decoding is restricted to image codes for exactly the tokenizer's
  grid size, then ``<eoi>`` is appended (modality-constrained decoding), with classifier-free guidance:
  ``logits = uncond + scale * (cond - uncond)``, the unconditional prompt being ``<bos> <boi>`` (the training recipe
  drops captions with ``data.caption_dropout``, so the model knows that prompt).

Every prompt decodes through the batched decoder of ``megannm.decode`` (continuous batching over one KV cache with
per-row lengths: prompts of any length, image and text answers and guidance rows in one batch; a finished row's slot
goes to the next prompt). At TP > 1 every tensor-parallel rank computes the same gathered logits; the sampled token is
broadcast from the group's first rank so that ranks never diverge.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megannm.decode import PREFILL_TOKENS, Decoder, Row, sample  # noqa: F401 - PREFILL_TOKENS: estimate's
from megannm.fileio import atomic_write, atomic_write_json
from megannm.vocab import Vocab


# Classifier-free guidance for text -> image, shared by `megannm generate` and `megannm evaluate`: off. Measured on
# the demo's pretrained checkpoints with greedy decoding, guidance was worse or equal (held-out generated shape kind
# 0.91 / 0.77 / 0.77 at scale 1 / 1.5 / 2 after 600 steps; 1.00 at 1 to 2 after 1,200): the unconditional model
# learns only from the few captions dropped in training. With sampling (--temperature 0.7) scale 2 helped there.
DEFAULT_CFG_SCALE = 1.0


@dataclass
class SamplingConfig:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_options(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                     greedy: Optional[bool] = None) -> "SamplingConfig":
        """The one constructor from user options (command lines, phase options): a temperature <= 0 means greedy
        unless ``greedy`` says otherwise."""
        greedy = temperature <= 0 if greedy is None else greedy
        return cls(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


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
    """logits [B, V] (disallowed already -inf) -> ids [B], every row sampled by ``cfg`` (the decoder's sampler)."""
    n = logits.shape[0]
    full = lambda x, dtype=None: torch.full((n,), x, dtype=dtype, device=logits.device)  # noqa: E731
    temperature = 0.0 if cfg.greedy else cfg.temperature
    return sample(logits, full(float(temperature)), full(int(cfg.top_k), torch.long), full(float(cfg.top_p)),
                  lambda shape: torch.empty(shape, device=logits.device).exponential_(generator=generator),
                  all_greedy=temperature <= 0, filtered=cfg.top_k > 0 or cfg.top_p < 1)


@torch.no_grad()
def generate(model, vocab: Vocab, prompts: list[list[int]], kind, max_new_tokens: int = 0,
             sampling: SamplingConfig = SamplingConfig(), cfg_scale: float = 1.0, batch_size: int = 64,
             device=None, stop_ids: tuple = (), keep_stop: bool = False, pad: bool = True,
             latents: Optional[list] = None, flow_steps: int = 25) -> list:
    """Continue every prompt with a span of ``kind`` ("text" or "image", or a list of one of them per prompt: image
    and text answers decoding together). Image spans are exactly ``vocab.image_grid`` codes (unified ids); text
    spans stop at ``<eos>`` or any of ``stop_ids`` (e.g. ``<|end|>`` for a chat answer; not returned unless
    ``keep_stop``: RL trains the decision to stop) or ``max_new_tokens``. Every prompt goes through one
    ``megannm.decode.Decoder``: ``batch_size`` rows decode together (the KV cache's slots; a guided image row takes
    two), and a row that ends hands its slot to the next prompt at once. ``pad`` is accepted for callers of the
    bucketed decoder this replaced (prompts of every length now share the batch). ``model``: an ``NMMModel``, whose
    ``layout`` names the tensor-parallel group that samples together.

    Continuous images: ``latents`` gives each prompt's slot latents (None for a prompt without pictures), and an
    image answer is drawn by the flow sampler (``flow_steps`` Euler steps, guided by ``cfg_scale``; prompts of one
    length at a time) and returned as its latents, float32 [slots, C] (``codes_to_images`` decodes them)."""
    kinds = [kind] * len(prompts) if isinstance(kind, str) else list(kind)
    if len(kinds) != len(prompts):
        raise ValueError(f"generate: {len(kinds)} kinds for {len(prompts)} prompts")
    bad = next((k for k in kinds if k not in ("text", "image")), None)
    if bad is not None or (isinstance(kind, str) and kind not in ("text", "image")):
        raise ValueError(f"generate: kind must be text or image (got {bad if bad is not None else kind!r})")
    if "image" in kinds and not vocab.image_grid:
        raise ValueError("generate: the vocabulary does not record the image grid size (vocab.image_grid)")
    if "text" in kinds and max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be positive for text (got {max_new_tokens})")
    if batch_size <= 0:
        raise ValueError(f"generate: batch_size must be positive (got {batch_size})")
    if not prompts:
        return []
    out: list = [None] * len(prompts)
    if vocab.continuous and "image" in kinds:
        drawn = [i for i, k in enumerate(kinds) if k == "image"]
        for i, lat in zip(drawn, _draw(model, vocab, [prompts[i] for i in drawn], sampling, cfg_scale, flow_steps)):
            out[i] = lat
        rest = [i for i, k in enumerate(kinds) if k != "image"]
        if rest:
            texts = generate(model, vocab, [prompts[i] for i in rest], "text", max_new_tokens, sampling, cfg_scale,
                             batch_size, device, stop_ids, keep_stop,
                             latents=None if latents is None else [latents[i] for i in rest])
            for i, r in zip(rest, texts):
                out[i] = r
        return out
    limit = max((vocab.image_grid if k == "image" else max_new_tokens) for k in kinds)
    rows = max(min(batch_size, len(prompts) * (2 if cfg_scale != 1.0 else 1)), 2 if cfg_scale != 1.0 else 1)
    decoder = Decoder(model, vocab, max_rows=rows, max_len=max(len(p) for p in prompts) + limit,
                      seed=sampling.seed, sync_every=8)
    temperature = 0.0 if sampling.greedy else sampling.temperature
    lats = latents if latents is not None else [None] * len(prompts)
    todo = [Row(list(p), k, max_new_tokens, temperature, sampling.top_k, sampling.top_p,
                cfg_scale=cfg_scale if k == "image" else 1.0, stop_ids=tuple(stop_ids), keep_stop=keep_stop,
                latents=lat)
            for p, k, lat in zip(prompts, kinds, lats)]
    was_training = model.training
    model.eval()
    try:
        decoder.run(todo)
    except ValueError as e:
        raise ValueError(f"generate: {e}") from None
    finally:
        model.train(was_training)
    return [r.tokens for r in todo]


def _draw(model, vocab: Vocab, prompts: list[list[int]], sampling: SamplingConfig, cfg_scale: float,
          steps: int) -> list[np.ndarray]:
    """Continuous images for ``prompts`` (each ending in ``<boi>``), drawn by ``megannm.model.draw`` in groups of one
    prompt length; the starting noise from ``sampling.seed`` on the model's device."""
    from megannm.model.draw import draw_latents
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(int(sampling.seed))
    out: list = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    was_training = model.training
    model.eval()
    try:
        for idx in by_length.values():
            ids = torch.tensor([prompts[i] for i in idx], device=dev)
            uncond = torch.tensor([[vocab.bos_id, vocab.boi_id]] * len(idx), device=dev)
            lat = draw_latents(model, ids, vocab.image_grid, steps, cfg_scale, uncond, gen).float().cpu().numpy()
            for i, x in zip(idx, lat):
                out[i] = x
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# prompts in the document layouts of megannm.data.tokenize


def caption_prompt(tok, image: np.ndarray) -> list[int]:
    """``<bos> <boi> codes <eoi>``: the model continues with a caption (continuous images: the latent slots, whose
    numbers ``caption_latents`` gives)."""
    v = tok.vocab
    if v.continuous:
        return [v.bos_id, v.boi_id, *[v.slot_id] * tok.image.num_tokens, v.eoi_id]
    codes = tok.image.encode(image[None])[0]
    return [v.bos_id, v.boi_id, *v.image_ids(codes).tolist(), v.eoi_id]


def caption_latents(tok, image: np.ndarray) -> np.ndarray:
    """Continuous images: the latents [slots, C] of a picture, for the slots of ``caption_prompt``."""
    return np.asarray(tok.image.encode(image[None])[0], dtype=np.float32)


def image_prompt(tok, text: str) -> list[int]:
    """``<bos> caption <boi>``: the model continues with image codes."""
    v = tok.vocab
    ids = tok.text.encode(text, add_special_tokens=False)
    return [v.bos_id, *ids, v.boi_id]


def chat_prompt(tok, messages: list[dict], answer: str = "text") -> list[int]:
    """A conversation in the chat layout of ``megannm.data.tokenize`` (``<bos> (<|role|> content <|end|>)...``) with
    image parts holding uint8 [H, W, 3] arrays, then ``<|assistant|>`` (and ``<boi>`` when ``answer`` is "image"):
    the model continues with the assistant's answer."""
    v = tok.vocab
    images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    codes = iter(v.image_ids(tok.image.encode(np.stack(images))).tolist() if images else [])
    ids = [v.bos_id]
    for m in messages:
        ids.append(v.special(f"<|{m['role']}|>"))
        for p in m["content"]:
            ids += tok.text_ids(p["text"]) if p["type"] == "text" else [v.boi_id, *next(codes), v.eoi_id]
        ids.append(v.special("<|end|>"))
    ids.append(v.special("<|assistant|>"))
    return ids + [v.boi_id] if answer == "image" else ids


def codes_to_images(tok, rows: list) -> np.ndarray:
    """Generated image spans (unified ids) -> uint8 [N, H, W, 3] through whichever image tokenizer the bundle
    holds (an encode-only kind refuses with one line); continuous images: their drawn latents [slots, C]."""
    v = tok.vocab
    if v.continuous:
        return tok.image.decode(np.stack([np.asarray(r, dtype=np.float32) for r in rows]))
    codes = np.asarray([[i - v.image_start for i in r] for r in rows], dtype=np.int64)
    return tok.image.decode(codes)


def read_image(path, image_tokenizer=None) -> np.ndarray:
    """A picture file as uint8 [H, W, 3]; with ``image_tokenizer``, fitted to its native size by its resize policy,
    exactly as ``megannm preprocess`` fits the pictures of the records (greyscale and RGBA converted too)."""
    from megannm.data.image_tokenizer import read_image as fit_file
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: image not found")
    if image_tokenizer is None:
        from PIL import Image
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    return fit_file(path, image_tokenizer.image_size, image_tokenizer.resize)


def check_decodes(tok) -> None:
    """One line before any sampling if the bundle's image tokenizer cannot turn codes into pictures."""
    if not tok.image.can_decode:
        raise ValueError(f"image tokenizer kind {tok.image.kind!r} encodes only: this bundle can caption images but "
                         f"not generate them (use a kind with a decoder: learned, janus, emu3, patch_vq)")


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] as PNG bytes (for ``megannm.fileio.atomic_write``)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def text_of(tok, ids: list[int]) -> str:
    v = tok.vocab
    return tok.text.decode([i for i in ids if i < v.text_size], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------------------------
# from a checkpoint to files


def read_prompts(path) -> tuple[list[str], list[str]]:
    """A JSONL of prompts for ``megannm generate --prompts``: each line ``{"caption": TEXT}`` (draw it) or
    ``{"image": PATH}`` (caption it; relative to the file's folder). Returns (captions, image paths)."""
    import json
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: file not found")
    captions, images = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or len({"caption", "image"} & set(rec)) != 1:
            raise ValueError(f"--prompts {path}:{n}: expected {{\"caption\": TEXT}} or {{\"image\": PATH}}")
        if "caption" in rec:
            captions.append(str(rec["caption"]))
        else:
            images.append(str(path.parent / rec["image"]))
    return captions, images


def generate_files(checkpoint, tokenizers, out, captions: Optional[list[str]] = None,
                   images: Optional[list[str]] = None, sampling: Optional[SamplingConfig] = None,
                   cfg_scale: float = DEFAULT_CFG_SCALE, max_new_tokens: int = 32, say=print,
                   batch_size: int = 64) -> list[dict]:
    """What ``megannm generate`` runs: a picture for each caption (``OUT/image_NNN.png``) and a caption for each
    picture, all decoding together through one batched decoder (``batch_size`` rows at a time);
    ``OUT/results.json`` lists them in order (captions first; also returned), ``say`` gets one line each."""
    captions, images = list(captions or []), list(images or [])
    if not captions and not images:
        raise ValueError("give captions (--caption), pictures (--image) or a prompts file (--prompts) to generate from")
    sampling = sampling or SamplingConfig()
    for f in images:  # a missing file fails before the model loads
        if not Path(f).is_file():
            raise FileNotFoundError(f"--image {f}: image not found")
    from megannm.checkpoint.opened import open_checkpoint
    from megannm.data.tokenize import check_answer_room, check_captions
    with open_checkpoint(checkpoint, tokenizers) as ck:
        model, tok = ck.model, ck.tok
        tok.image.to(next(model.parameters()).device)  # a model-backed tokenizer encodes/decodes beside the model
        if captions:
            check_decodes(tok)
            prompts = [image_prompt(tok, c) for c in captions]  # checked before the output folder is made
            check_captions(tok, captions, prompts, model.args.max_seq_len)
        # fitted by the tokenizer's own resize policy, as preprocess fitted the training pictures
        imgs = [read_image(f, tok.image) for f in images]
        if imgs:
            check_answer_room(tok.vocab.image_grid + 3, max_new_tokens, model.args.max_seq_len)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        prompts = [image_prompt(tok, c) for c in captions] + [caption_prompt(tok, im) for im in imgs]
        kinds = ["image"] * len(captions) + ["text"] * len(imgs)
        latents = ([None] * len(captions) + [caption_latents(tok, im) for im in imgs]) if tok.vocab.continuous \
            else None
        rows = generate(model, tok.vocab, prompts, kinds, max_new_tokens=max_new_tokens, sampling=sampling,
                        cfg_scale=cfg_scale, batch_size=batch_size, latents=latents)
        results = []
        drawn = codes_to_images(tok, rows[:len(captions)]) if captions else []
        for i, (c, img) in enumerate(zip(captions, drawn)):
            path = atomic_write(out / f"image_{i:03d}.png", png_bytes(img))
            results.append({"caption": c, "image": str(path)})
            say(f"{c!r} -> {path}")
        for f, r in zip(images, rows[len(captions):]):
            results.append({"image": f, "caption": text_of(tok, r)})
            say(f"{f} -> {text_of(tok, r)!r}")
        atomic_write_json(out / "results.json", results)
    return results
