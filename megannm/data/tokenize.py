"""Records -> token documents, and back.

A ``Tokenizers`` bundle is the text tokenizer, the image tokenizer and the unified ``Vocab`` built from both; it is
saved as one folder (``text/``, ``image_tokenizer/`` or ``image_tokenizer.npz``, ``vocab.json``; ``megannm tokenizers
build`` makes one from your records) so that preprocessing, training and
generation provably use the same ids (the vocab fingerprint covers the text tokenizer's digest and both range sizes).

Two record shapes become documents:

* interleaved ``{"parts": [{"text": ...}, {"image": "images/1.png"}, ...]}`` (pretraining):
  ``<bos> [text ids | <boi> image ids <eoi>]... <eos>``, every token trained (loss mask ``None``);
* chat ``{"messages": [{"role": "user", "content": ...}, ...]}`` (SFT):
  ``<bos> (<|role|> content <|end|>)... <eos>``, loss mask 1 exactly on assistant content and the assistant's
  ``<|end|>`` (so the model learns to answer and to stop, never to imitate the user).

Every error is one line ``file:line: what`` (the ``where`` the caller passes), raised as ``RecordError``.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megannm.fileio import atomic_output
from megannm.vocab import Vocab, VocabMismatchError

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A record that cannot be tokenised; the message is one line naming file:line and what is wrong."""


# ---------------------------------------------------------------------------------------------------------------------
# the bundle


@dataclass
class Tokenizers:
    text: object  # transformers.PreTrainedTokenizerFast
    image: object  # megannm.data.image_tokenizer.ImageTokenizer
    vocab: Vocab
    text_dir: Path | None = None  # the text tokenizer's files (save copies them verbatim: the digest is of bytes)
    image_path: Path | None = None  # the saved image tokenizer (copied verbatim by save)
    characters: frozenset | None = None  # what the text tokenizer was trained on, when recorded (text_tokenizer.py)

    @staticmethod
    def vocab_for(text, image, text_digest: str) -> Vocab:
        return Vocab(text_size=len(text), image_codes=int(image.codebook_size), text_digest=text_digest,
                     image_grid=int(image.num_tokens), latent_channels=int(getattr(image, "latent_channels", 0)))

    @classmethod
    def build(cls, text_dir, image_tokenizer_path) -> "Tokenizers":
        """The bundle for a trained text tokenizer folder and a saved image tokenizer (its Vocab is derived)."""
        from megannm.data.image_tokenizer import load_image_tokenizer
        from megannm.data.text_tokenizer import load_text_tokenizer, seen_characters, text_digest

        text_dir, image_path = Path(text_dir), Path(image_tokenizer_path)
        text = load_text_tokenizer(text_dir)
        image = load_image_tokenizer(image_path)
        return cls(text, image, cls.vocab_for(text, image, text_digest(text_dir)), text_dir, image_path,
                   seen_characters(text_dir))

    def save(self, folder) -> Path:
        """Write ``folder/{text/, image_tokenizer.<ext>, vocab.json}`` via a temporary folder and a rename."""
        folder = Path(folder)
        with atomic_output(folder, overwrite=True) as tmp:
            self._save_into(tmp, folder)
        return folder

    def _save_into(self, tmp: Path, folder: Path) -> None:
        if self.text_dir is not None:
            shutil.copytree(self.text_dir, tmp / "text")
        else:  # a tokenizer built in memory: what we write must be what the vocabulary's digest describes
            from megannm.data.text_tokenizer import text_digest
            self.text.save_pretrained(tmp / "text")
            if text_digest(tmp / "text") != self.vocab.text_digest:
                raise VocabMismatchError(f"{folder}: the text tokenizer does not match the vocabulary's text_digest; "
                                         f"build the bundle with Tokenizers.build from a saved tokenizer folder")
        if self.image_path is not None:
            if self.image_path.is_dir():  # a folder kind; a learned one's training state stays where it trained
                shutil.copytree(self.image_path, tmp / "image_tokenizer",
                                ignore=shutil.ignore_patterns("train_state.pt", ".*"))
            else:
                shutil.copyfile(self.image_path, tmp / "image_tokenizer.npz")
        else:
            self.image.save(tmp / self.image.default_name)
        self.vocab.save(tmp / "vocab.json")

    @classmethod
    def load(cls, folder, device=None) -> "Tokenizers":
        """Load a saved bundle and check that ``vocab.json`` still describes the tokenizers beside it.
        ``device``: where a model-backed image tokenizer runs (default: the CPU)."""
        from megannm.data.image_tokenizer import load_image_tokenizer
        from megannm.data.text_tokenizer import load_text_tokenizer, seen_characters, text_digest

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: tokenizers folder not found (make one with `megannm tokenizers "
                                    f"build`)")
        if not (folder / "vocab.json").exists():
            raise FileNotFoundError(f"{folder}: not a tokenizers folder (no vocab.json){_what_it_is(folder)}")
        vocab = Vocab.load(folder / "vocab.json")
        image_path = image_tokenizer_path(folder)
        if image_path is None or not (folder / "text").is_dir():
            raise FileNotFoundError(f"{folder}: a tokenizers folder needs text/ and image_tokenizer (a folder or "
                                    f"image_tokenizer.npz) beside vocab.json")
        text = load_text_tokenizer(folder / "text")
        image = load_image_tokenizer(image_path, device=device)
        actual = cls.vocab_for(text, image, text_digest(folder / "text"))
        if actual.fingerprint != vocab.fingerprint:
            raise VocabMismatchError(
                f"{folder / 'vocab.json'}: fingerprint {vocab.fingerprint} does not match the tokenizers beside it "
                f"({actual.fingerprint}: text_size {actual.text_size}, image_codes {actual.image_codes}, "
                f"image_grid {actual.image_grid}); rebuild the bundle")
        return cls(text, image, vocab, folder / "text", image_path, seen_characters(folder / "text"))

    # encoding helpers ---------------------------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        # No <bos>/<eos> from the text tokenizer: the document layout owns every special.
        return self.text.encode(text, add_special_tokens=False)

    def unseen_characters(self, text: str) -> list[str]:
        """The characters of ``text`` the text tokenizer never saw in training (a model trained on its ids has
        never read them): by the record of a BPE megannm trained, else those a tokenizer with an unknown token maps
        to it. In order of first appearance, each once."""
        if self.characters is not None:
            return list(dict.fromkeys(c for c in text if c not in self.characters))
        unk = getattr(self.text, "unk_token_id", None)
        if unk is None:
            return []
        return list(dict.fromkeys(c for c in dict.fromkeys(text) if unk in self.text_ids(c)))

    def image_size(self) -> tuple[int, int]:
        s = self.image.image_size
        return (int(s), int(s)) if np.isscalar(s) else (int(s[0]), int(s[1]))


def image_tokenizer_path(folder: Path) -> Path | None:
    """The bundle's image tokenizer: ``image_tokenizer/`` (a folder kind) or ``image_tokenizer.npz`` (a file kind);
    two of them is an error (which one would the vocabulary describe?)."""
    found = [p for p in (folder / "image_tokenizer", folder / "image_tokenizer.npz") if p.exists()]
    if len(found) > 1:
        raise ValueError(f"{folder}: both image_tokenizer/ and image_tokenizer.npz; keep the one vocab.json was built "
                         f"from")
    return found[0] if found else None


def _what_it_is(folder: Path) -> str:
    """A hint for a folder given where a tokenizers bundle was expected."""
    if (folder / "image_tokenizer.json").exists() or (folder / "config.json").exists():
        return (f"; it looks like an image tokenizer: make a bundle with `megannm tokenizers build --image-tokenizer "
                f"{folder} ...`")
    if (folder / "manifest.json").exists():
        return "; it looks like a shard folder: pass the tokenizers folder it was made with"
    if (folder / "tokenizer.json").exists():
        return (f"; it looks like a text tokenizer: make a bundle with `megannm tokenizers build --text-tokenizer "
                f"{folder} ...`")
    return "; make one with `megannm tokenizers build`"


# ---------------------------------------------------------------------------------------------------------------------
# records -> documents


def load_image(path, size: tuple[int, int], where: str, policy: str = "crop") -> np.ndarray:
    """An RGB uint8 [H, W, 3] at the tokenizer's size, by its resize policy (``image_tokenizer/images.py``: centre
    crop or pad; greyscale and RGBA converted); ``path`` may also be encoded bytes or a uint8 array. A missing,
    unreadable or tiny picture is one RecordError line."""
    from megannm.data.image_tokenizer import ImageError, read_image

    try:
        return read_image(path, size, policy, where)
    except ImageError as e:
        raise RecordError(str(e)) from None


class _Doc:
    """A document under construction: token chunks with their loss flag, images filled in after batch encoding."""

    def __init__(self):
        self.chunks: list = []  # list of int lists, or ("image", k) placeholders
        self.train: list[bool] = []
        self.has_text = False

    def add(self, ids, train: bool):
        self.chunks.append(ids)
        self.train.append(train)


def _image_part(doc: _Doc, image, base_dir: Path, images: list, where: str, train: bool, tok: Tokenizers):
    """An image part: a file path relative to ``base_dir``, or the picture itself (encoded bytes, a uint8 array),
    as the WebDataset / Parquet sources give it."""
    if isinstance(image, str) and image:
        image = Path(base_dir) / image
    elif not isinstance(image, (bytes, bytearray, np.ndarray)):
        raise RecordError(f"{where}: an image part needs a file path (got {image!r})")
    images.append(load_image(image, tok.image_size(), where, tok.image.resize))
    doc.add([tok.vocab.boi_id], train)
    doc.add(("image", len(images) - 1), train)
    doc.add([tok.vocab.eoi_id], train)


def _text_part(doc: _Doc, text, tok: Tokenizers, where: str, train: bool) -> int:
    if not isinstance(text, str):
        raise RecordError(f"{where}: a text part must be a string (got {type(text).__name__})")
    ids = tok.text_ids(text)
    if ids:
        doc.has_text = True
        doc.add(ids, train)
    return len(ids)


def _plan_parts(record: dict, tok: Tokenizers, base_dir: Path, where: str, images: list) -> _Doc:
    doc = _Doc()
    parts = record["parts"]
    if not isinstance(parts, list):
        raise RecordError(f"{where}: 'parts' must be a list (got {type(parts).__name__})")
    for k, part in enumerate(parts):
        if isinstance(part, dict) and "text" in part:
            _text_part(doc, part["text"], tok, where, True)
        elif isinstance(part, dict) and "image" in part:
            _image_part(doc, part["image"], base_dir, images, where, True, tok)
        else:
            what = sorted(part) if isinstance(part, dict) else type(part).__name__
            raise RecordError(f"{where}: parts[{k}]: unknown part type {what} (expected a 'text' or 'image' key)")
    return doc


def _has_substance(content) -> bool:
    """Some non-whitespace text or an image: an answer worth training on (a turn of spaces would teach the model
    to answer with nothing)."""
    if isinstance(content, str):
        return bool(content.strip())
    return any(p.get("type") == "image" or (isinstance(p.get("text"), str) and p["text"].strip())
               for p in content if isinstance(p, dict))


def _plan_messages(record: dict, tok: Tokenizers, base_dir: Path, where: str, images: list) -> _Doc:
    doc = _Doc()
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: 'messages' must be a non-empty list")
    end = tok.vocab.special("<|end|>")
    for m, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ROLES:
            raise RecordError(f"{where}: messages[{m}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        train = role == "assistant"
        doc.add([tok.vocab.special(f"<|{role}|>")], False)  # role markers are given by the template, never trained
        before = len(doc.chunks)
        content = msg.get("content")
        if isinstance(content, str):
            _text_part(doc, content, tok, where, train)
        elif isinstance(content, list):
            for k, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    _text_part(doc, part.get("text"), tok, where, train)
                elif kind == "image":
                    _image_part(doc, part.get("image"), base_dir, images, where, train, tok)
                else:
                    raise RecordError(f"{where}: messages[{m}].content[{k}]: unknown part type {kind!r} "
                                      f"(expected 'text' or 'image')")
        elif content is not None:
            raise RecordError(f"{where}: messages[{m}]: content must be a string or a list of parts "
                              f"(got {type(content).__name__})")
        if train and (len(doc.chunks) == before or not _has_substance(content)):
            raise RecordError(f"{where}: messages[{m}]: empty assistant turn (nothing to train on"
                              f"{': only whitespace' if len(doc.chunks) > before else ''})")
        doc.add([end], train)  # the assistant's <|end|> is trained: that is how the model learns to stop
    return doc


def encode_records(records: list[dict], tok: Tokenizers, base_dir: Path, wheres: list[str]) -> list[tuple]:
    """``encode_record`` over many records, with all their images encoded in one batch (much faster for a VQ)."""
    base_dir = Path(base_dir)
    plans, images = [], []
    for record, where in zip(records, wheres):
        if not isinstance(record, dict):
            raise RecordError(f"{where}: a record must be a JSON object (got {type(record).__name__})")
        if "parts" in record:
            doc = _plan_parts(record, tok, base_dir, where, images)
        elif "messages" in record:
            doc = _plan_messages(record, tok, base_dir, where, images)
        else:
            raise RecordError(f"{where}: record has neither 'parts' nor 'messages' (keys: {', '.join(sorted(record))})")
        if not doc.has_text:
            raise RecordError(f"{where}: record has no text (every document needs at least one non-empty text part)")
        plans.append((doc, "messages" in record))
    v, out = tok.vocab, []
    encoded = tok.image.encode(np.stack(images)) if images else None
    if encoded is None:
        codes = latents = None
    elif v.continuous:  # an image is a run of latent slots; its numbers travel beside the ids (16-bit)
        latents = np.asarray(encoded, dtype=np.float16)
        codes = np.full(latents.shape[:2], v.slot_id, np.int64)
    else:
        codes, latents = v.image_ids(np.asarray(encoded, dtype=np.int64)), None

    for doc, chat in plans:
        chunks = [np.asarray(codes[c[1]] if isinstance(c, tuple) else c, dtype=np.int64) for c in doc.chunks]
        tokens = np.concatenate([[v.bos_id], *chunks, [v.eos_id]]).astype(np.int64)
        mask = None
        if chat:
            mask = np.concatenate([[0], *[np.full(len(c), t, np.uint8) for c, t in zip(chunks, doc.train)], [0]])
            mask = mask.astype(np.uint8)
        if not v.continuous:
            out.append((tokens, mask))
            continue
        mine = [latents[c[1]] for c in doc.chunks if isinstance(c, tuple)]
        out.append((tokens, mask, np.concatenate(mine) if mine else np.zeros((0, v.latent_channels), np.float16)))
    return out


def encode_record(record: dict, tok: Tokenizers, base_dir: Path, where: str) -> tuple:
    """One record -> (token ids int64 [T], loss mask uint8 [T] or None meaning "train every token"); with
    continuous images also the latents float16 [slots, latent_channels] of its slots, in order."""
    return encode_records([record], tok, base_dir, [where])[0]


# ---------------------------------------------------------------------------------------------------------------------
# documents -> parts


def decode_tokens(ids, tok: Tokenizers, latents=None) -> list[dict]:
    """Token ids -> parts: ``{"text": str}``, ``{"image": uint8 [H,W,3]}`` for a complete image span, ``{"image":
    None, "codes": int64 [n]}`` for an incomplete one, ``{"special": "<|user|>"}`` for role markers and ``<|end|>``.
    ``<bos>``, ``<eos>`` and ``<pad>`` are dropped. Used by generation and evaluation. Continuous images: ``latents``
    [slots, C] are the numbers of the ids' slots, in order (without them an image part has ``codes`` only)."""
    v = tok.vocab
    slot_latents = None if latents is None else np.asarray(latents, dtype=np.float32)
    used = 0
    ids = np.asarray(ids, dtype=np.int64).ravel()
    silent = {v.bos_id, v.eos_id, v.pad_id}
    is_img = v.is_image(ids)
    is_text = ids < v.text_size
    parts, i, n = [], 0, len(ids)
    while i < n:
        t = int(ids[i])
        if is_text[i]:
            j = i
            while j < n and is_text[j]:
                j += 1
            parts.append({"text": tok.text.decode(ids[i:j].tolist())})
            i = j
        elif t == v.boi_id or is_img[i]:
            j = i + 1 if t == v.boi_id else i
            k = j
            while k < n and is_img[k]:
                k += 1
            if v.continuous:
                got = None if slot_latents is None else slot_latents[used:used + k - j]
                parts.append({"image": None, "codes": ids[j:k]} if got is None else _image_from_latents(got, tok))
                used += k - j
            else:
                parts.append(_image_from_codes(v.image_codes_of(ids[j:k]), tok))
            i = k + 1 if k < n and ids[k] == v.eoi_id else k
        else:
            if t not in silent:
                name = v.specials[t - v.special_start] if v.special_start <= t < v.size else f"<id {t}>"
                parts.append({"special": name})
            i += 1
    return parts


def _image_from_latents(latents: np.ndarray, tok: Tokenizers) -> dict:
    if len(latents) != tok.image.num_tokens or not tok.image.can_decode:
        return {"image": None, "codes": np.full(len(latents), tok.vocab.slot_id)}
    return {"image": np.asarray(tok.image.decode(latents[None]))[0]}


def _image_from_codes(codes: np.ndarray, tok: Tokenizers) -> dict:
    if len(codes) != tok.image.num_tokens or not tok.image.can_decode:  # incomplete, or an encode-only tokenizer
        return {"image": None, "codes": codes}
    return {"image": np.asarray(tok.image.decode(codes[None]))[0]}


# ---------------------------------------------------------------------------------------------------------------------
# prompts for sampling (what megannm generate checks before it loads anything onto the output folder)


def check_captions(tok: Tokenizers, captions: list[str], prompts: list[list[int]], context: int,
                   warn=None) -> None:
    """Every caption's prompt with its image's codes must fit the model's context (``max_seq_len``), else one line
    naming the ``--caption``, its size and the room there is; a caption with characters the text tokenizer never
    saw is sampled, with a warning naming them (``warn``: default, a line on stderr)."""
    grid = int(tok.vocab.image_grid)
    for k, (caption, prompt) in enumerate(zip(captions, prompts)):
        if len(prompt) + grid > context:
            room = context - grid - (len(prompt) - len(tok.text_ids(caption)))
            raise ValueError(f"--caption {k + 1} ({len(caption)} characters): {len(prompt)} prompt tokens and the "
                             f"image's {grid} codes exceed the model's context of {context} tokens (max_seq_len): "
                             f"a caption here is at most {max(room, 0)} text tokens")
    warn = warn or (lambda line: print(f"megannm generate: warning: {line}", file=sys.stderr))
    for k, caption in enumerate(captions):
        unseen = tok.unseen_characters(caption)
        if unseen:
            names = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unseen[:10]) + (", ..." if len(unseen) > 10 else "")
            warn(f"--caption {k + 1} {caption[:40]!r}: characters the text tokenizer never saw in training: {names}; "
                 f"the model has not learned them")


def check_answer_room(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """A caption of ``max_new_tokens`` after a picture's prompt must fit the model's context, else one line."""
    if prompt_tokens + max_new_tokens > context:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: after the picture's {prompt_tokens} prompt tokens that "
                         f"exceeds the model's context of {context} tokens (max_seq_len): at most "
                         f"{max(context - prompt_tokens, 0)}")
