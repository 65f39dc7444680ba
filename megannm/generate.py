"""Sampling with a KV cache, in both directions.

- image -> text: the prompt ends after ``<eoi>``; decoding is restricted to text ids and ``<eos>``.
- text -> image: the prompt ends with ``<boi>``; decoding is restricted to image codes for exactly the tokenizer's
  grid size, then ``<eoi>`` is appended (modality-constrained decoding), with classifier-free guidance:
  ``logits = uncond + scale * (cond - uncond)``, the unconditional prompt being ``<bos> <boi>`` (the training recipe
  drops captions with ``data.caption_dropout``, so the model knows that prompt).

Prompts of different lengths are decoded in buckets of equal length (exact, no left-padding masks), or with
``pad=True`` together, left-padded; one batch may mix image and text answers (an RL rollout decodes all of a rank's
prompts in one loop over one KV cache: per-row allowed ids, lengths and stops; finished rows leave the batch). At
TP > 1 every tensor-parallel rank computes the same gathered logits; the sampled token is broadcast from the group's
first rank so that ranks never diverge.
"""
from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megannm import parallel
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


def _same_on_tp_ranks(ids: torch.Tensor, tp_group) -> torch.Tensor:
    """The group's first rank's sample on every tensor-parallel rank (a no-op at TP 1)."""
    return parallel.broadcast(ids, tp_group)


# A left-padded batch prefills in groups of similar prompt lengths, each group padded to at most this factor of its
# shortest prompt: a rollout's short captions do not compute an image prompt's length of padding.
_PREFILL_PAD = 1.25


def _prompt_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive row ranges [r0, r1) whose prompt lengths stay within ``_PREFILL_PAD`` of each other."""
    groups, r0 = [], 0
    lo = hi = lengths[0] if lengths else 0
    for r, n in enumerate(lengths):
        lo, hi = min(lo, n), max(hi, n)
        if hi > _PREFILL_PAD * lo and r > r0:
            groups.append((r0, r))
            r0, lo, hi = r, n, n
    return groups + [(r0, len(lengths))] if lengths else groups


# Prompt tokens per prefill forward: the forward returns logits at every prompt position (gathered over the
# vocabulary), so a rollout of all of a rank's prompts prefills in slices of rows to bound that tensor.
PREFILL_TOKENS = 8192


def _prefill_slices(lengths: list[int]) -> list[tuple[int, int]]:
    """``_prompt_groups`` cut into row ranges of at most ``PREFILL_TOKENS`` padded prompt tokens each."""
    out = []
    for r0, r1 in _prompt_groups(lengths):
        rows = max(1, PREFILL_TOKENS // max(lengths[r0:r1]))
        out += [(a, min(a + rows, r1)) for a in range(r0, r1, rows)]
    return out


class _Stream:
    """One batch of prompts decoding with its own KV cache: equal lengths, or left-padded to equal length with
    ``lengths`` given (the padding is a document of its own, so no prompt or answer token ever attends to it, and
    every row's positions start at 0 at its first real token; the prompts prefill in groups of similar lengths,
    ``_prompt_groups``). ``keep`` drops finished rows from the batch."""

    def __init__(self, model, prompts: torch.Tensor, max_new: int, lengths: Optional[torch.Tensor] = None):
        self.model = model
        b, n = prompts.shape
        self.cache = model.new_cache(b, n + max_new)
        if lengths is None:
            idx = torch.arange(n, device=prompts.device).expand(b, n)
            self.docs = None
            self.pos = torch.full((b,), n, dtype=torch.long, device=prompts.device)
            self.logits = model(prompts, position_ids=idx, document_ids=None, cache=self.cache)[:, -1].float()
            return
        self.docs = torch.ones(b, 1, dtype=torch.long, device=prompts.device)
        self.pos = lengths.clone()
        last = []
        for r0, r1 in _prefill_slices(lengths.tolist()):
            width = int(lengths[r0:r1].max())
            idx = torch.arange(width, device=prompts.device).expand(r1 - r0, width)
            start = (width - lengths[r0:r1])[:, None]
            pos, docs = (idx - start).clamp(min=0), (idx >= start).long()
            view = self.cache.rows_view(r0, r1, n - width)  # positions before it: document 0, never attended
            last.append(model(prompts[r0:r1, n - width:], position_ids=pos, document_ids=docs, cache=view)[:, -1])
        self.cache.advance(n)
        self.logits = torch.cat(last).float()

    def feed(self, ids: torch.Tensor) -> None:
        self.logits = self.model(ids[:, None], position_ids=self.pos[:, None], document_ids=self.docs,
                                 cache=self.cache)[:, -1].float()
        self.pos = self.pos + 1

    def keep(self, rows: torch.Tensor) -> None:
        """Only ``rows`` (indices into the batch) decode on: every later step's attention reads their cache only.
        (One copy of the kept rows' keys and values; the cache's batch is implicit in its tensors.)"""
        self.cache.keep_rows(rows)
        self.pos, self.logits = self.pos[rows], self.logits[rows]
        if self.docs is not None:
            self.docs = self.docs[rows]


# Drop finished rows once a quarter of the batch is done: each drop copies the kept rows' cache once, and the rows
# left (a rollout's image answers, long after its short captions ended) stop paying for the finished ones.
_COMPACT_WHEN_DONE = 0.25


@torch.no_grad()
def _decode_bucket(model, vocab: Vocab, prompts: torch.Tensor, kind, max_new: int, cfg: SamplingConfig,
                   cfg_scale: float, generator, stop_ids: tuple = (), keep_stop: bool = False,
                   lengths: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Decode one batch in one loop over one KV cache. ``kind``: "text", "image", or one of them per row (a mixed
    batch: each row has its own allowed ids, its own length (an image row exactly ``vocab.image_grid`` codes, a
    text row up to ``max_new`` tokens or its stop token) and its own end). The loop ends when every row is done."""
    dev = prompts.device
    b = prompts.shape[0]
    kinds = [kind] * b if isinstance(kind, str) else list(kind)
    is_image = torch.tensor([k == "image" for k in kinds], dtype=torch.bool, device=dev)
    limit = torch.where(is_image, vocab.image_grid or 0, max_new).to(torch.long)
    steps = int(limit.max())
    cond = _Stream(model, prompts, steps, lengths)
    # the unconditional stream (classifier-free guidance) decodes the image rows only
    guided = cfg_scale != 1.0 and bool(is_image.any())
    uncond = None
    if guided:
        n_img = int(is_image.sum())
        uncond = _Stream(model, torch.tensor([[vocab.bos_id, vocab.boi_id]], device=dev).expand(n_img, 2), steps)
    vsize = cond.logits.shape[-1]
    stops = torch.tensor([vocab.eos_id, *stop_ids], device=dev)
    text_allowed = _allowed_mask(vocab, vsize, "text", dev)
    text_allowed[stops] = True  # e.g. <|end|>: a chat answer ends its turn
    allowed_by_kind = torch.stack([text_allowed, _allowed_mask(vocab, vsize, "image", dev)])  # [2, V]
    out = torch.full((b, steps), vocab.eos_id, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)  # the original row of every row still in the batch
    done = torch.zeros(b, dtype=torch.bool, device=dev)  # of the rows in the batch
    tp_group = model.layout.tp_group
    for t in range(steps):
        img = is_image[rows]
        logits = cond.logits
        if uncond is not None:
            at = img.nonzero().squeeze(-1)  # the uncond stream holds the batch's image rows, in batch order
            u = uncond.logits
            logits = logits.index_copy(0, at, u + cfg_scale * (logits[at] - u))
        logits = logits.masked_fill(~allowed_by_kind[img.long()], float("-inf"))
        ids = _same_on_tp_ranks(pick(logits, cfg, generator), tp_group)
        ids = torch.where(done, torch.full_like(ids, vocab.eos_id), ids)  # a finished row's filler, never read
        out[rows, t] = ids
        done |= (~img & torch.isin(ids, stops)) | (t + 1 >= limit[rows])
        n_done = int(done.sum())  # the same on every tensor-parallel rank: computed from the broadcast ids
        if n_done == len(rows):
            break
        cond.feed(ids)
        if uncond is not None:
            uncond.feed(ids[img])
        if n_done >= _COMPACT_WHEN_DONE * len(rows):
            live = (~done).nonzero().squeeze(-1)
            cond.keep(live)
            if uncond is not None:
                uncond.keep((~done[img]).nonzero().squeeze(-1))
            rows, done = rows[live], done[live]
    result = []
    stop = set(stops.tolist())
    for r, k, n in zip(out.tolist(), kinds, limit.tolist()):
        r = r[:n]
        if k == "text":
            r = r[:next((j + int(keep_stop) for j, x in enumerate(r) if x in stop), len(r))]
        result.append(r)
    return result


@torch.no_grad()
def generate(model, vocab: Vocab, prompts: list[list[int]], kind, max_new_tokens: int = 0,
             sampling: SamplingConfig = SamplingConfig(), cfg_scale: float = 1.0, batch_size: int = 64,
             device=None, stop_ids: tuple = (), keep_stop: bool = False, pad: bool = False) -> list[list[int]]:
    """Continue every prompt with a span of ``kind`` ("text" or "image", or a list of one of them per prompt: image
    and text answers decoding together). Image spans are exactly ``vocab.image_grid`` codes (unified ids); text
    spans stop at ``<eos>`` or any of ``stop_ids`` (e.g. ``<|end|>`` for a chat answer; not returned unless
    ``keep_stop``: RL trains the decision to stop) or ``max_new_tokens``. ``pad``: decode prompts of different
    lengths together, left-padded (a document mask keeps the padding out of attention), instead of one bucket per
    length: far fewer decoding steps for RL rollouts. ``batch_size``: the most rows decoding together (the KV
    cache's memory). ``model``: an ``NMMModel``, whose ``layout`` names the tensor-parallel group that samples
    together."""
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
    device = device or next(model.parameters()).device
    # on the logits' device: torch.multinomial refuses a CPU generator for GPU probabilities
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if not sampling.greedy else None
    was_training = model.training
    model.eval()
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        buckets[0 if pad else len(p)].append(i)
    results: list[Optional[list[int]]] = [None] * len(prompts)
    for key in sorted(buckets):
        idx = sorted(buckets[key], key=lambda i: len(prompts[i]))  # (stable) similar lengths share a chunk
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            lengths = torch.tensor([len(prompts[i]) for i in chunk], dtype=torch.long, device=device)
            n = int(lengths.max())
            t = torch.full((len(chunk), n), vocab.pad_id, dtype=torch.long, device=device)
            for r, i in enumerate(chunk):
                t[r, n - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long, device=device)
            rows = _decode_bucket(model, vocab, t, [kinds[i] for i in chunk], max_new_tokens, sampling, cfg_scale,
                                  generator, tuple(stop_ids), keep_stop, lengths if pad else None)
            for i, row in zip(chunk, rows):
                results[i] = row
    model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# prompts in the document layouts of megannm.data.tokenize


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


def codes_to_images(tok, rows: list[list[int]]) -> np.ndarray:
    """Generated image spans (unified ids) -> uint8 [N, H, W, 3] through whichever image tokenizer the bundle
    holds (an encode-only kind refuses with one line)."""
    v = tok.vocab
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


def generate_files(checkpoint, tokenizers, out, captions: Optional[list[str]] = None,
                   images: Optional[list[str]] = None, sampling: Optional[SamplingConfig] = None,
                   cfg_scale: float = DEFAULT_CFG_SCALE, max_new_tokens: int = 32, say=print) -> list[dict]:
    """What ``megannm generate`` runs: a picture for each caption (``OUT/image_NNN.png``) or a caption for each
    picture, from the checkpoint; ``OUT/results.json`` lists them (also returned), ``say`` gets one line each."""
    if bool(captions) == bool(images):
        raise ValueError("give either captions (--caption) or pictures (--image) to generate from")
    sampling = sampling or SamplingConfig()
    for f in images or []:  # a missing file fails before the model loads
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
        imgs = [read_image(f, tok.image) for f in images or []]
        if imgs:
            check_answer_room(tok.vocab.image_grid + 3, max_new_tokens, model.args.max_seq_len)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        results = []
        if captions:
            rows = generate(model, tok.vocab, prompts, "image", sampling=sampling, cfg_scale=cfg_scale)
            for i, (c, img) in enumerate(zip(captions, codes_to_images(tok, rows))):
                path = atomic_write(out / f"image_{i:03d}.png", png_bytes(img))
                results.append({"caption": c, "image": str(path)})
                say(f"{c!r} -> {path}")
        else:
            rows = generate(model, tok.vocab, [caption_prompt(tok, im) for im in imgs], "text",
                            max_new_tokens=max_new_tokens, sampling=sampling)
            for f, r in zip(images, rows):
                results.append({"image": f, "caption": text_of(tok, r)})
                say(f"{f} -> {text_of(tok, r)!r}")
        atomic_write_json(out / "results.json", results)
    return results
