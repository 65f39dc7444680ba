"""The same seeded model at tensor-parallel 2 and 1 in ONE launch (start-up costs ~8 s per launch on 2 cores).

usage: torchrun --nproc_per_node 2 tests/scripts/model_tp.py   -> rank 0 prints one JSON line

For each case (MoT, dense twin, MoT with continuous images): build at TP=2 on both ranks, train a few AdamW steps on
fixed micro-batches (packed documents, a text-only one whose image slices are empty, an image-heavy one), then
greedy-generate with the KV cache (continuous: velocities at the image slots). Then re-initialise the same two ranks
as TP=1 (x data-parallel 2, each rank computing alone) and repeat.
The vocabulary pads to 384 rows at TP 1 and 512 at TP 2, so equal numbers also show that padding never matters.
"""
import dataclasses
import json
import warnings

import torch
import torch.distributed as dist

from megannm import parallel
from megannm.config import ModelConfig
from megannm.model import ModelArgs, NMMModel
from megannm.model.latents import flow_arguments, sample_timesteps
from megannm.vocab import Vocab

warnings.filterwarnings("ignore")
VOCAB = Vocab(text_size=200, image_codes=64)
CASES = {
    "mot": dict(mot=True, qk_norm=True, z_loss=1e-3),  # QK-norm weights are shared by heads split over TP
    "dense": dict(mot=False, qk_norm=True, norm_reorder=True),
    "flow": dict(mot=True, qk_norm=True),  # continuous images: one image id (the latent slot), 6 numbers a slot
}
CHANNELS = 6


def document(gen, n_text, n_image):
    return torch.cat([torch.tensor([VOCAB.bos_id]), torch.randint(0, VOCAB.text_size, (n_text,), generator=gen),
                      torch.tensor([VOCAB.boi_id]),
                      torch.randint(VOCAB.image_start, VOCAB.image_end, (n_image,), generator=gen),
                      torch.tensor([VOCAB.eoi_id, VOCAB.eos_id])])


def micro_batch(rows):
    """rows: list of lists of documents -> packed inputs/labels with document ids and reset positions."""
    ids, pos, doc = [], [], []
    for docs in rows:
        ids.append(torch.cat(docs))
        pos.append(torch.cat([torch.arange(len(d)) for d in docs]))
        doc.append(torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)]))
    ids, pos, doc = torch.stack(ids), torch.stack(pos), torch.stack(doc)
    # a target in another document than its input is not predicted
    mask = (doc[:, 1:] == doc[:, :-1]).long()
    return dict(input_ids=ids[:, :-1], position_ids=pos[:, :-1], document_ids=doc[:, :-1], labels=ids[:, 1:],
                loss_mask=mask)


def with_latents(b: dict, g) -> dict:
    """Continuous images: every image id becomes THE latent slot, with a clean latent, noise and a timestep per
    image; the slots carry the flow loss."""
    slot = (b["input_ids"] >= VOCAB.image_start) & (b["input_ids"] < VOCAB.image_end)
    shape = (*b["input_ids"].shape, CHANNELS)
    b = dict(b, input_ids=torch.where(slot, VOCAB.image_start, b["input_ids"]),
             labels=torch.where((b["labels"] >= VOCAB.image_start) & (b["labels"] < VOCAB.image_end),
                                VOCAB.image_start, b["labels"]))
    b["latents"] = torch.randn(shape, generator=g) * slot[..., None]
    b["noise"] = torch.randn(shape, generator=g)
    b["timesteps"] = sample_timesteps(b["input_ids"].shape, generator=g) * slot
    b["flow_mask"] = slot.float()
    return b


def batches(flow: bool = False):
    g = torch.Generator().manual_seed(0)
    text_only = [torch.randint(0, VOCAB.text_size, (24,), generator=g) for _ in range(2)]
    out = [  # rows of 24 tokens (a document is n_text + n_image + 4 long)
        micro_batch([[document(g, 5, 4), document(g, 3, 4)], [document(g, 9, 11)]]),
        micro_batch([[t] for t in text_only]),  # no image token at all: image modules run on [0, D]
        micro_batch([[document(g, 2, 18)], [document(g, 4, 6), document(g, 1, 5)]]),
    ]
    return [with_latents(b, g) for b in out] if flow else out


def replicated_max_diff(model) -> float:
    """Largest difference of a non-TP-split parameter (norms) between the TP ranks."""
    worst = torch.zeros(())
    for p in model.parameters():
        if getattr(p, "tensor_model_parallel", False):
            continue
        hi = p.detach().clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=model.layout.tp_group)
        worst = torch.maximum(worst, (hi - p.detach()).abs().max())
    return float(worst)


def run(case: str, tp: int) -> dict:
    layout = parallel.init_parallel(tp, 1)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      max_seq_len=64, **CASES[case])
    args = ModelArgs.from_config(cfg, VOCAB, tp)
    if case == "flow":
        args = dataclasses.replace(args, latent_channels=CHANNELS)
    torch.manual_seed(1234)  # every rank alike: megatron-core slices each shard from the same CPU master weight
    model = NMMModel(args, layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, image_losses = [], []
    for _ in range(2):
        for b in batches(flow=case == "flow"):
            ids = {k: b[k] for k in ("input_ids", "position_ids", "document_ids", "labels", "loss_mask")}
            loss, stats = model(**ids, **flow_arguments(b))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            image_losses.append(float(stats["image_loss"]))
    model.eval()
    prompt = document(torch.Generator().manual_seed(5), 4, 3)[None, :8].repeat(2, 1)
    if case == "flow":  # velocities at the image slots of a noised prompt, and its logits
        prompt = torch.where(prompt >= VOCAB.image_start, VOCAB.image_start, prompt)
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            logits, velocity = model(prompt, latents=torch.randn(2, 8, CHANNELS, generator=g),
                                     timesteps=torch.full((2, 8), 0.5))
        return {"tp": layout.tp, "padded_vocab": args.padded_vocab_size, "losses": losses,
                "image_losses": image_losses, "logits": logits[0, -1, :6].tolist(),
                "logits_shape": list(logits.shape), "velocity": velocity[0, 5:8].flatten().tolist(),
                "replicated_max_diff": replicated_max_diff(model)}
    with torch.no_grad():
        logits = model(prompt)
        cache = model.new_cache(2, 16)
        step = model(prompt, cache=cache)
        tokens = []
        for _ in range(6):
            nxt = step[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt[0].item())
            step = model(nxt, cache=cache)
    return {"tp": layout.tp, "padded_vocab": args.padded_vocab_size, "losses": losses, "image_losses": image_losses,
            "logits": logits[0, -1, :6].tolist(), "logits_shape": list(logits.shape), "tokens": tokens,
            "replicated_max_diff": replicated_max_diff(model)}


def main():
    out = {case: {"tp2": run(case, 2)} for case in CASES}
    for case in CASES:
        out[case]["tp1"] = run(case, 1)
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)
    parallel.shutdown()


if __name__ == "__main__":
    main()
