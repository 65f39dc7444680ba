"""The consolidated form <-> Hugging Face folders.

Export (``export_hf``):

- dense, ``qk_norm: false``: ``LlamaForCausalLM`` (stock transformers, no remote code);
- dense, ``qk_norm: true``: ``Qwen3ForCausalLM``, which is Llama plus an RMSNorm over head_dim on queries and keys
  before RoPE, exactly megannm's QK-norm;
- MoT (and the dense twin with ``norm_reorder``, which no stock class has): ``MegannmMoTForCausalLM`` from
  ``hf_modeling/`` (copied into the folder, ``auto_map`` in config.json; ``trust_remote_code=True``, no megannm
  import).

Beside the weights: config.json, generation_config.json (bos/eos/pad of the unified vocabulary) and, given the
tokenizer bundle, a tokenizer whose ids are the unified vocabulary's: the text tokenizer plus one added token per
image code (``<img_0>`` ...) and megannm's specials, in that order.

Import (``import_hf``): a Llama-architecture LLM (``llama``, ``qwen3``, ``mistral`` without sliding window) becomes
a native multimodal model: the LLM's tokenizer is the text range of a new unified vocabulary (plus an image tokenizer's
codes and the specials); existing embedding/output rows are kept and the new rows start at the mean of the existing
ones plus small noise (Hewitt 2021: new tokens start near the average, so the LLM's outputs barely move); under MoT
every modality's weights start as copies of the LLM's (as in the MoT paper and BAGEL). Text-only logits then equal
the LLM's before any training.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from megannm.checkpoint import canonical
from megannm.checkpoint.consolidated import Consolidated, normalise_args, write
from megannm.checkpoint.tensors import (DEFAULT_SHARD_SIZE, INDEX, SINGLE, LazyState, SafetensorsFolder, cast_to,
                                        load_torch, save_safetensors, specs_of)
from megannm.convert import ConvertError
from megannm.convert.hf_modeling import SOURCES as REMOTE_FILES
from megannm.fileio import atomic_output, atomic_write_json

IMAGE_TOKEN = "<img_{}>"
EXPORT_META = "megannm_export.json"
LLAMA_LIKE = ("llama", "qwen3", "mistral")

# canonical (with the weight-set index m) -> Hugging Face (Llama's names; the MoT class appends the index)
_LAYER = re.compile(r"^layers\.(\d+)\.(attn|ffn)\.(\w+)\.(\d+)\.weight$")


def hf_name(name: str, per_set: bool) -> str:
    """A canonical name -> its Hugging Face name (``per_set``: the MoT class, which keeps the weight-set index)."""
    if name == "embedding.embed_tokens.weight":
        return "model.embed_tokens.weight"
    if name == "head.output.weight":
        return "lm_head.weight"
    if name.startswith("embedding.latents."):  # continuous images (the MoT class only)
        return "model." + name[len("embedding."):]
    if name.startswith("head.velocity."):
        return name[len("head."):]
    m = re.fullmatch(r"head\.norm\.(\d+)\.weight", name)
    if m:
        return f"model.norm.{m.group(1)}.weight" if per_set else "model.norm.weight"
    m = _LAYER.match(name)
    if not m:
        raise ConvertError(f"no Hugging Face name for parameter {name}")
    if per_set:  # the MoT class runs megannm's own block: its names under ``model.``
        return f"model.{name}"
    i, block, part, s = m.groups()
    suffix = f".{s}.weight" if per_set else ".weight"
    if part == "norm":
        return f"model.layers.{i}.{'input_layernorm' if block == 'attn' else 'post_attention_layernorm'}{suffix}"
    return f"model.layers.{i}.{'self_attn' if block == 'attn' else 'mlp'}.{part}{suffix}"


def architecture(args) -> str:
    if args.mot or args.norm_reorder or getattr(args, "latent_channels", 0):
        return "megannm_mot"
    return "qwen3" if args.qk_norm else "llama"


# ---------------------------------------------------------------------------------------------------------------------
# export


def _special_ids(vocab) -> dict:
    return {"bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id, "pad_token_id": vocab.pad_id}


def hf_config(args, vocab) -> dict:
    """config.json for the architecture ``architecture(args)`` picks (the MoT one without importing transformers,
    which takes longer than exporting a few hundred MB)."""
    from importlib.metadata import version
    common = dict(vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=args.ffn,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  head_dim=args.head_dim, rms_norm_eps=args.eps, max_position_embeddings=args.max_seq_len,
                  tie_word_embeddings=False, **_special_ids(vocab))
    arch = architecture(args)
    if arch == "megannm_mot":
        cfg = dict(common, model_type="megannm_mot", architectures=["MegannmMoTForCausalLM"],
                   auto_map={"AutoConfig": "configuration_megannm_mot.MegannmMoTConfig",
                             "AutoModelForCausalLM": "modeling_megannm_mot.MegannmMoTForCausalLM"},
                   num_weight_sets=args.n_sets, image_token_start=args.image_start, image_token_end=args.image_end,
                   qk_norm=args.qk_norm, norm_reorder=args.norm_reorder, rope_theta=args.rope_theta,
                   initializer_range=args.init_std, use_cache=True, dtype="float32",
                   latent_channels=getattr(args, "latent_channels", 0),
                   transformers_version=version("transformers"))
        return cfg
    import transformers
    cls = transformers.Qwen3Config if arch == "qwen3" else transformers.LlamaConfig
    extra = {"use_sliding_window": False, "sliding_window": None} if arch == "qwen3" else {}
    cfg = cls(**common, rope_theta=args.rope_theta, attention_bias=False, hidden_act="silu",
              initializer_range=args.init_std, **extra)
    d = cfg.to_dict()
    d["architectures"] = ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"]
    d["rope_theta"] = args.rope_theta  # where transformers 4 reads it (5 reads rope_parameters)
    d["dtype"] = d["torch_dtype"] = "float32"
    return d


def export_tokenizer(bundle: Path, vocab, out: Path) -> None:
    """The text tokenizer + image-code tokens + specials, saved so that every id is the unified vocabulary's."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    from megannm.data.text_tokenizer import _portable_class_name
    from megannm.vocab import Vocab
    bundle = Path(bundle)
    vocab_file = bundle / "vocab.json"
    if not vocab_file.exists() or not (bundle / "text").is_dir():
        raise ConvertError(f"{bundle}: not a tokenizers bundle (needs text/ and vocab.json)")
    theirs = Vocab.load(vocab_file)
    vocab.check_same(theirs.fingerprint, "the checkpoint", str(vocab_file))
    tok = PreTrainedTokenizerFast.from_pretrained(str(bundle / "text"), local_files_only=True)
    if len(tok) != vocab.text_size:
        raise ConvertError(f"{bundle / 'text'}: {len(tok)} text tokens, the vocabulary says {vocab.text_size}")
    tok.add_tokens([AddedToken(IMAGE_TOKEN.format(i), special=False, normalized=False)
                    for i in range(vocab.image_codes)])
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in vocab.specials], special_tokens=True)
    tok.bos_token, tok.eos_token, tok.pad_token = "<bos>", "<eos>", "<pad>"
    expected = {IMAGE_TOKEN.format(i): vocab.image_start + i for i in range(vocab.image_codes)}
    expected.update({s: vocab.special(s) for s in vocab.specials})
    for token, want in expected.items():
        got = tok.convert_tokens_to_ids(token)
        if got != want:
            raise ConvertError(f"{bundle / 'text'}: token {token!r} gets id {got} in the exported tokenizer, the "
                               f"unified vocabulary has {want} (does the text tokenizer already contain it?)")
    tok.save_pretrained(str(out))
    config = out / "tokenizer_config.json"
    if config.exists():
        _portable_class_name(config)
        cfg = json.loads(config.read_text())
        for key in ("is_local", "local_files_only"):  # from_pretrained's own arguments, not the tokenizer's
            cfg.pop(key, None)
        atomic_write_json(config, cfg)


def export_hf(c: Consolidated, dst: str | Path, tokenizers: Optional[Path] = None, overwrite: bool = False,
              max_shard_size: int = DEFAULT_SHARD_SIZE, dtype: Optional[torch.dtype] = None) -> Path:
    """A Hugging Face folder (config, weights, generation config, tokenizer) from the canonical form, the weights
    written one shard at a time (renamed, cast to ``dtype`` when given; config.json records the dtype written)."""
    args, vocab = c.args, c.vocab
    arch = architecture(args)
    per_set = arch == "megannm_mot"
    specs = specs_of(c.state)
    canonical.check_shape_map({k: s for k, (s, _) in specs.items()}, canonical.canonical_shapes(args),
                            "consolidated state")
    names = {hf_name(k, per_set): k for k in canonical.canonical_shapes(args)}
    out_specs = {h: (specs[k][0], cast_to(specs[k][1], dtype)) for h, k in names.items()}
    state = LazyState(out_specs, lambda h: c.state[names[h]])
    written = {dt for _, dt in out_specs.values() if dt.is_floating_point}
    torch_dtype = str(written.pop() if len(written) == 1 else torch.float32).replace("torch.", "")
    tokenizers = tokenizers or c.tokenizers
    dst = Path(dst)
    with atomic_output(dst, overwrite) as tmp:
        cfg = hf_config(args, vocab)
        cfg["dtype"] = cfg["torch_dtype"] = torch_dtype  # what from_pretrained loads as by default
        atomic_write_json(tmp / "config.json", cfg)
        if per_set:
            for f, source in REMOTE_FILES.items():
                shutil.copyfile(source, tmp / f)
        save_safetensors(tmp, state, max_shard_size, dtype=dtype)
        atomic_write_json(tmp / "generation_config.json", {**_special_ids(vocab), "_from_model_config": True})
        if tokenizers is not None:
            export_tokenizer(Path(tokenizers), vocab, tmp)
        atomic_write_json(tmp / EXPORT_META, {"architecture": arch, "vocab": vocab.to_dict(),
                                              "model_args": args.to_dict(), "source": c.source,
                                              "image_token": IMAGE_TOKEN.format("{code}"),
                                              "tokenizer": tokenizers is not None})
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# import: a pretrained LLM -> a native multimodal model


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.exists():
        raise ConvertError(f"{src}: not a Hugging Face model folder (no config.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    kind = cfg.get("model_type")
    if kind not in LLAMA_LIKE:
        raise ConvertError(f"{path}: model_type {kind!r} is not a Llama-architecture LLM (expected one of "
                           f"{', '.join(LLAMA_LIKE)})")
    checks = [("hidden_act", cfg.get("hidden_act", "silu"), "silu"),
              ("attention_bias", bool(cfg.get("attention_bias", False)), False),
              ("mlp_bias", bool(cfg.get("mlp_bias", False)), False)]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    checks.append(("rope_parameters.rope_type", rope.get("rope_type", rope.get("type", "default")), "default"))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", kind == "mistral") else None
    if window is not None and window < cfg.get("max_position_embeddings", window + 1):
        checks.append(("sliding_window", window, None))
    for key, got, want in checks:
        if got != want:
            raise ConvertError(f"{path}: {key} is {got!r}; megannm's model has {want!r}")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise ConvertError(f"{path}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size "
                           f"{cfg['hidden_size']} (megannm derives head_dim = hidden / heads)")
    return cfg


def _hf_weights(src: Path):
    """name -> tensor getter over safetensors (single or sharded) or a single pytorch_model.bin."""
    if (src / SINGLE).exists() or (src / INDEX).exists():
        reader = SafetensorsFolder(src)
        return set(reader.keys()), reader.get, src
    if (src / "pytorch_model.bin").exists():
        state = load_torch(src / "pytorch_model.bin")  # as data (megannm.trust), one line if it is not
        return set(state), state.__getitem__, src / "pytorch_model.bin"
    raise ConvertError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _new_rows(existing: torch.Tensor, n: int, gen: torch.Generator, noise: float) -> torch.Tensor:
    mean = existing.mean(0, keepdim=True)
    std = existing.std(0, keepdim=True) if existing.shape[0] > 1 else torch.ones_like(mean)
    return mean + noise * std * torch.randn(n, existing.shape[1], generator=gen, dtype=existing.dtype)


def import_hf(src: str | Path, dst: str | Path, image_tokenizer: str | Path, mot: bool = True, seed: int = 0,
              noise: float = 0.1, overwrite: bool = False, max_shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """A Llama-architecture LLM folder -> a consolidated native multimodal model (with its tokenizer bundle)."""
    from megannm.data.tokenize import Tokenizers
    from megannm.model.args import ModelArgs
    src = Path(src)
    cfg = _read_config(src)
    if not (src / "tokenizer.json").exists():
        raise ConvertError(f"{src}: no tokenizer.json (the LLM's tokenizer becomes the text range of the vocabulary)")
    image_tokenizer = Path(image_tokenizer)
    if not image_tokenizer.exists():
        raise ConvertError(f"{image_tokenizer}: image tokenizer not found (--image-tokenizer)")
    names, get, where = _hf_weights(src)
    qk_norm = cfg["model_type"] == "qwen3"
    with tempfile.TemporaryDirectory(prefix="megannm-import-") as tmp:
        text_dir = Path(tmp) / "text"
        text_dir.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / f).exists():
                shutil.copyfile(src / f, text_dir / f)
        bundle = Tokenizers.build(text_dir, image_tokenizer)
        vocab = bundle.vocab
        bundle.save(Path(tmp) / "tokenizers")
        rows = cfg["vocab_size"]
        if rows < vocab.text_size:
            raise ConvertError(f"{src / 'config.json'}: vocab_size {rows} is smaller than its tokenizer's "
                               f"{vocab.text_size} tokens")
        heads = cfg["num_attention_heads"]
        args = ModelArgs(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
                         kv_heads=cfg.get("num_key_value_heads") or heads, ffn=cfg["intermediate_size"],
                         vocab_size=vocab.size, padded_vocab_size=vocab.padded_size(1),
                         image_start=vocab.image_start, image_end=vocab.image_end, mot=mot, qk_norm=qk_norm,
                         rope_theta=float((cfg.get("rope_parameters") or {}).get("rope_theta",
                                                                                 cfg.get("rope_theta", 10000.0))),
                         eps=float(cfg.get("rms_norm_eps", 1e-6)),
                         max_seq_len=int(cfg.get("max_position_embeddings", 2048)))
        tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in names
        expected = {hf_name(k, per_set=False) for k in canonical.canonical_shapes(dataclasses.replace(args, mot=False))}
        if tied:
            expected.discard("lm_head.weight")
        canonical.check_names(names - {k for k in names if k.endswith("rotary_emb.inv_freq")}, expected, str(where))
        gen = torch.Generator().manual_seed(seed)
        n_new = vocab.size - vocab.text_size
        shapes = canonical.canonical_shapes(args)

        def build(name: str) -> torch.Tensor:  # one at a time, in canonical order (the noise's order; an
            # error leaves no output: the folder is renamed into place only at the end)
            hf = "model.embed_tokens.weight" if name == "head.output.weight" and tied else hf_name(name, False)
            t = get(hf).float()
            if name in canonical.VOCAB_PARAMS:
                t = t[:vocab.text_size]
                t = torch.cat([t, _new_rows(t, n_new, gen, noise)])
            if tuple(t.shape) != tuple(shapes[name]):
                raise ConvertError(f"{where}: parameter {hf} has shape {list(t.shape)}, expected "
                                   f"{list(shapes[name])}")
            return t

        state = LazyState({k: (v, torch.float32) for k, v in shapes.items()}, build)
        c = Consolidated(state, normalise_args(args, vocab), vocab,
                         {"kind": "huggingface", "path": str(src.resolve()), "model_type": cfg["model_type"],
                          "llm_vocab_rows": rows, "new_rows": f"mean of the LLM's rows + {noise} x row std x N(0,1), "
                          f"seed {seed}", "modality_init": "every weight set copies the LLM's" if mot else "dense"},
                         tokenizers=Path(tmp) / "tokenizers")
        return write(c, dst, overwrite=overwrite, max_shard_size=max_shard_size)
