"""Preference pairs for DPO: ``megannm pairs`` samples two answers per prompt from a checkpoint, ranks them by
verifiable rewards and drops ties; the DPO phase reads them back.

On disk: ``pairs.jsonl`` (one pair a line: prompt, chosen and rejected token ids, both rewards, the truth) and
``manifest.json`` (vocabulary fingerprint, counts, source checkpoint, rewards), written last: complete or absent.
"""
from __future__ import annotations

import json
from pathlib import Path

from megannm.fileio import atomic_write, atomic_write_json
from megannm.phases.rl.prompts import PromptSource
from megannm.phases.rl.rollout import sample_and_score
from megannm.phases.rl.score import OFFLINE_BATCH
from megannm.rewards import Combined, parse_weights

PAIRS, MANIFEST = "pairs.jsonl", "manifest.json"


def read_pairs(folder, vocab=None, key: str = "phase.options.pairs") -> list[dict]:
    folder = Path(folder)
    if not (folder / MANIFEST).exists() or not (folder / PAIRS).exists():
        raise FileNotFoundError(f"recipe: {key}: {folder}: not a pairs folder (expected {PAIRS} and {MANIFEST}, "
                                f"written by `megannm pairs`)")
    manifest = json.loads((folder / MANIFEST).read_text())
    if vocab is not None:
        vocab.check_same(manifest.get("vocab_fingerprint", "?"), "the recipe's vocabulary", str(folder / MANIFEST))
    pairs = []
    for n, line in enumerate((folder / PAIRS).read_text().splitlines(), 1):
        if line.strip():
            r = json.loads(line)
            missing = {"prompt", "chosen", "rejected"} - set(r)
            if missing:
                raise ValueError(f"{folder / PAIRS}:{n}: a pair needs {', '.join(sorted(missing))}")
            pairs.append(r)
    if len(pairs) != manifest.get("pairs", len(pairs)):
        raise ValueError(f"{folder / PAIRS}: {len(pairs)} pairs, the manifest says {manifest['pairs']} (truncated?)")
    if not pairs:
        raise ValueError(f"{folder / PAIRS}: no pairs")
    return pairs


def build_pairs(model, tok, items, combined: Combined, sampling, cfg_scale: float = 1.0,
                max_new_tokens: int = 32) -> tuple[list[dict], int]:
    """Two sampled answers per prompt item, ranked by the verifier; ties dropped. Returns (pairs, ties)."""
    doubled = [it for it in items for _ in range(2)]
    s = sample_and_score(model, tok, doubled, combined, sampling, cfg_scale, max_new_tokens,
                         batch_size=OFFLINE_BATCH)
    pairs, ties = [], 0
    for k, it in enumerate(items):
        a, b = 2 * k, 2 * k + 1
        ra, rb = float(s.rewards[a]), float(s.rewards[b])
        if ra == rb:
            ties += 1
            continue
        c, r = (a, b) if ra > rb else (b, a)
        truth = it.truth.as_dict() if hasattr(it.truth, "as_dict") else it.truth
        pairs.append({"prompt": it.prompt.ids, "chosen": s.answers[c], "rejected": s.answers[r],
                      "reward_chosen": float(s.rewards[c]), "reward_rejected": float(s.rewards[r]),
                      "kind": it.prompt.kind, "prompt_text": it.prompt.text, "truth": truth})
    return pairs, ties


def write_pairs(folder, pairs: list[dict], manifest: dict) -> Path:
    """``pairs.jsonl`` then ``manifest.json``, each through a temporary name (the manifest last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / PAIRS, "".join(json.dumps(p) + "\n" for p in pairs))
    atomic_write_json(folder / MANIFEST, {**manifest, "pairs": len(pairs)})
    return folder


def make_pairs(checkpoint, tokenizers, out, prompts: str, rewards: str, split: str = "seen", n: int = 1000,
               temperature: float = 1.0, cfg_scale: float = 1.0, max_new_tokens: int = 32,
               seed: int = 0) -> tuple[int, int]:
    """What ``megannm pairs`` runs: two sampled answers for each of ``n`` prompts from ``checkpoint``, ranked by
    ``rewards`` (``parse_weights``), ties dropped, written to ``out``. Returns (pairs written, ties dropped)."""
    from megannm.generate import SamplingConfig
    from megannm.checkpoint.opened import open_checkpoint
    combined = Combined(parse_weights(rewards))
    source = PromptSource(prompts, key="--prompts")
    with open_checkpoint(checkpoint, tokenizers) as ck:
        items = source.sample(ck.tok, n, [seed, 17], split)
        sampling = SamplingConfig.from_options(temperature=temperature, seed=seed, greedy=False)
        pairs, ties = build_pairs(ck.model, ck.tok, items, combined, sampling, cfg_scale, max_new_tokens)
        write_pairs(out, pairs, {"vocab_fingerprint": ck.tok.vocab.fingerprint, "checkpoint": str(checkpoint),
                                 "prompts": prompts, "split": split, "rewards": combined.weights,
                                 "temperature": temperature, "cfg_scale": cfg_scale, "seed": seed,
                                 "prompts_sampled": n, "ties_dropped": ties})
    return len(pairs), ties
