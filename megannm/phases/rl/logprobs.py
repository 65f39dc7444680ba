"""Per-token log-probs of answers under a model, through the head's vocab-parallel logits (the full vocabulary
never gathers at TP > 1), and the (prompt, answer) batches they are computed on."""
from __future__ import annotations

import torch

from megannm.model import vocab_parallel


def token_logprobs(model, batch: dict, temperature: float = 1.0, with_entropy: bool = True):
    """log p(label) [B, S] (differentiable) and the entropy [B, S] (detached, or None) of ``batch["labels"]`` under
    ``model`` (a DeepSpeed engine or a plain ``NMMModel``), divided by the sampling temperature, over the whole
    vocabulary: the policy being optimised is the model's own distribution. Meaningful where ``batch["mask"]``."""
    module = getattr(model, "module", model)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   document_ids=batch["document_ids"], parallel_logits=True)
    return vocab_parallel.token_logprobs(logits, batch["labels"], module.args.vocab_size, module.layout,
                                         temperature=temperature, with_entropy=with_entropy)


def collate(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device=None) -> dict:
    """(prompt, answer) token lists -> a right-padded batch: ``input_ids``/``labels`` [B, S] (labels shifted by one),
    ``mask`` 1 on the labels that are answer tokens, position ids from 0, one document per row."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    s = max(len(x) for x in seqs) - 1
    b = len(seqs)
    ids = torch.full((b, s + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(b, s)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, len(p) - 1:len(p) - 1 + len(a)] = 1  # label j is token j + 1: the answer's tokens
    pos = torch.arange(s).expand(b, s).contiguous()
    out = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "mask": mask,
           "position_ids": pos, "document_ids": torch.zeros_like(pos)}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out
