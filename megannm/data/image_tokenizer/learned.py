"""``learned``: a VQ tokenizer trained on your own pictures (``megannm tokenizers train-image``).

The network is transformers' ``JanusVQVAE`` (LlamaGen's VQ design: conv encoder, codebook, conv decoder) at a
configuration sized for the data, so the folder it leaves is an ordinary ``save_pretrained`` folder that
transformers loads by itself, and megannm encodes and decodes through the model's own ``encode``/``decode``.

Training, as in LlamaGen: encoder outputs and codewords are compared on the unit sphere (cosine), the codeword
nearest each latent replaces it, and gradients pass straight through to the encoder. Losses: reconstruction (mean
squared error on [-1, 1] pixels) + commitment (``commitment`` x distance of the latent to its codeword) + either
a codebook loss (``codebook="st"``: the codewords learn by gradient) or none with ``codebook="ema"`` (each codeword
moves to an exponential moving average of its latents: steadier on small data). A codeword unused for
``restart_after`` steps is restarted on a random latent of the batch (dead codes otherwise stay dead, and a codebook
that uses few of its codes is a smaller codebook). Codewords are kept at unit length, so transformers' own
``encode`` (nearest by Euclidean distance) and ``decode`` (which normalises codewords) agree with the training.

Resumable: the folder holds ``train_state.pt`` (optimizer, codebook averages, usage) next to the weights, every
random choice is a function of (seed, step), so stopping and resuming gives the same weights as one run.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from megannm import trust
from megannm.data.image_tokenizer.base import META_FILE, register
from megannm.data.image_tokenizer.images import check_policy
from megannm.data.image_tokenizer.hf import quiet_transformers
from megannm.data.image_tokenizer.janus import JanusVQ
from megannm.fileio import atomic_output, atomic_write_json

STATE_FILE = "train_state.pt"
# what the weights' shapes depend on: a resumed run must agree on all of these
STRUCTURAL = ("image_size", "codebook_size", "downsample", "base_channels", "latent_channels", "embed_dim",
              "res_blocks")


@register
class LearnedVQ(JanusVQ):
    """A ``JanusVQVAE`` trained by megannm; ``training`` holds what image_tokenizer.json says about its training."""

    kind = "learned"

    def __init__(self, model, training: dict | None = None, **kw):
        super().__init__(model, **kw)
        self.training = dict(training or {})

    @classmethod
    def load(cls, folder: Path, meta: dict) -> "LearnedVQ":
        tok = super().load(folder, meta)
        tok.training = dict(meta.get("training", {}))
        return tok

    def extra_meta(self) -> dict:
        return {"training": self.training}


@dataclass
class TrainConfig:
    """Options of ``megannm tokenizers train-image`` (the defaults: minutes on 2 CPU cores at 32 px)."""
    image_size: int = 32  # native side in pixels
    codebook_size: int = 512  # codes (the image rows of the unified vocabulary)
    downsample: int = 4  # pixels per token side: 32 px / 4 = an 8 x 8 grid of 64 tokens
    base_channels: int = 32  # width of the first level (a multiple of 32: GroupNorm's groups)
    latent_channels: int = 32
    embed_dim: int = 8  # codeword dimension
    res_blocks: int = 1  # residual blocks per level
    steps: int = 2000
    batch_size: int = 8  # on a CPU, more and smaller steps learned faster per second than batches of 32
    lr: float = 3e-3
    warmup: int = 50
    codebook: str = "ema"  # "ema" or "st" (straight-through, codewords learn by gradient)
    ema_decay: float = 0.95
    commitment: float = 0.25
    restart_after: int = 25  # steps unused before a codeword is restarted
    holdout: float = 0.05  # share of the images kept out of training to measure reconstruction
    save_every: int = 250
    flip: bool = True  # random horizontal flips
    seed: int = 0
    resize: str = "crop"
    device: str = "cpu"  # where it trains ("cuda" on a GPU: the same command trains a real-sized one there)

    def check(self) -> "TrainConfig":
        levels = math.log2(self.downsample)
        if self.downsample < 1 or levels != int(levels):
            raise ValueError(f"train-image: downsample must be a power of two (got {self.downsample})")
        if self.image_size % self.downsample:
            raise ValueError(f"train-image: image size {self.image_size} is not a multiple of downsample "
                             f"{self.downsample}")
        if self.base_channels % 32 or self.latent_channels <= 0:
            raise ValueError(f"train-image: base_channels must be a multiple of 32 (got {self.base_channels})")
        if self.codebook not in ("ema", "st"):
            raise ValueError(f"train-image: codebook must be 'ema' or 'st' (got {self.codebook!r})")
        if self.codebook_size < 2 or self.steps < 1 or self.batch_size < 1 or not 0 <= self.holdout < 1:
            raise ValueError(f"train-image: codebook_size >= 2, steps >= 1, batch_size >= 1 and 0 <= holdout < 1 "
                             f"(got {self.codebook_size}, {self.steps}, {self.batch_size}, {self.holdout})")
        check_policy(self.resize, "train-image: resize")
        return self

    def janus_config(self):
        from transformers import JanusVQVAEConfig
        levels = int(math.log2(self.downsample)) + 1
        # Janus-Pro's widths (1, 1, 2, 2, 4) cut to the number of levels: cheap full-resolution levels, wider deep ones
        mult = ([1, 1, 2, 2, 4] + [4] * levels)[:levels]
        return JanusVQVAEConfig(embed_dim=self.embed_dim, num_embeddings=self.codebook_size,
                                base_channels=self.base_channels, channel_multiplier=mult,
                                num_res_blocks=self.res_blocks, latent_channels=self.latent_channels,
                                num_patches=self.image_size // self.downsample, projection_dim=self.embed_dim,
                                image_token_embed_dim=self.embed_dim)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


class _Trainer:
    """The state of one training run: model, optimizer, codebook averages, usage; one ``step`` at a time."""

    def __init__(self, cfg: TrainConfig, train: np.ndarray, model=None, state: dict | None = None):
        import torch
        self.cfg, self.train = cfg, train
        if model is None:
            torch.manual_seed(cfg.seed)
            from transformers import JanusVQVAE
            model = JanusVQVAE(cfg.janus_config())
            # transformers initialises every convolution N(0, 0.02), a transformer's default, which starves a deep
            # conv net of signal (a plain autoencoder measured 13.7 vs 19.3 dB after the same 50 s): PyTorch's own
            # fan-in initialisation instead
            for module in model.modules():
                if isinstance(module, torch.nn.Conv2d):
                    module.reset_parameters()
        self.device = torch.device(cfg.device)
        self.model = model.to(self.device).train()
        self.codebook = model.quantize.embedding.weight  # [K, D]; kept at unit length
        self.codebook.requires_grad_(cfg.codebook == "st")
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.99))
        k, d = self.codebook.shape
        self.ema_sum = torch.zeros(k, d, device=self.device)
        self.ema_count = torch.zeros(k, device=self.device)
        # every code starts "dead", so the first step places the whole codebook on real latents
        self.last_used = torch.full((k,), -cfg.restart_after, dtype=torch.long, device=self.device)
        self.step, self.history, self.restarts = 0, [], 0
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.ema_sum, self.ema_count = state["ema_sum"], state["ema_count"]
            self.last_used, self.step = state["last_used"], int(state["step"])
            self.history, self.restarts = list(state["history"]), int(state["restarts"])

    def batch(self, step: int):
        """Images of ``step``: positions step*B .. step*B+B-1 of a per-epoch permutation (a function of the seed)."""
        import torch
        n, b = len(self.train), self.cfg.batch_size
        pos = np.arange(step * b, (step + 1) * b)
        epochs, offsets = pos // n, pos % n
        idx = np.empty(b, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            idx[sel] = _rng(self.cfg.seed, 1, int(e)).permutation(n)[offsets[sel]]
        x = self.train[idx]
        if self.cfg.flip:
            flip = _rng(self.cfg.seed, 2, step).random(b) < 0.5
            x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        x = torch.from_numpy(np.ascontiguousarray(x)).to(self.device).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0  # [-1, 1], the normalisation LearnedVQ records (rescale 1/255, mean 0.5, std 0.5)

    def lr(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        t = (step - c.warmup) / max(1, c.steps - c.warmup)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))  # cosine down to 10%

    def run_step(self) -> dict:
        import torch
        import torch.nn.functional as F
        c, m, step = self.cfg, self.model, self.step
        x = self.batch(step)
        z = m.quant_conv(m.encoder(x))  # [B, D, h, w]
        b, d, h, w = z.shape
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)
        e = F.normalize(self.codebook, dim=1) if c.codebook == "st" else self.codebook.detach()
        idx = (zf.detach() @ e.detach().T).argmax(1)
        q = e[idx]
        commit = F.mse_loss(zf, q.detach())
        loss_cb = F.mse_loss(q, zf.detach()) if c.codebook == "st" else torch.zeros((), device=self.device)
        q_st = (zf + (q - zf).detach()).view(b, h, w, d).permute(0, 3, 1, 2)
        recon = F.mse_loss(m.decoder(m.post_quant_conv(q_st)), x)
        loss = recon + c.commitment * commit + loss_cb
        for g in self.opt.param_groups:
            g["lr"] = self.lr(step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self._update_codebook(zf.detach(), idx, step)
        self.step += 1
        return {"recon": float(recon.detach()), "commit": float(commit.detach()),
                "used": int(torch.unique(idx).numel())}

    def _update_codebook(self, zf, idx, step: int) -> None:
        import torch
        import torch.nn.functional as F
        c, k = self.cfg, self.codebook.shape[0]
        if c.codebook == "ema":
            counts = torch.bincount(idx, minlength=k).float()
            sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, zf)
            self.ema_count.mul_(c.ema_decay).add_(counts, alpha=1 - c.ema_decay)
            self.ema_sum.mul_(c.ema_decay).add_(sums, alpha=1 - c.ema_decay)
        self.last_used[torch.unique(idx)] = step
        dead = torch.nonzero(step - self.last_used >= c.restart_after).flatten()
        if len(dead):
            pick = _rng(c.seed, 3, step).choice(len(zf), size=len(dead), replace=len(dead) > len(zf))
            pick = torch.from_numpy(pick).to(self.device)
            self.ema_sum[dead], self.ema_count[dead] = zf[pick], 1.0
            self.codebook.data[dead] = zf[pick]
            self.last_used[dead] = step
            self.restarts += len(dead)
        if c.codebook == "ema":
            live = self.ema_count > 0
            self.codebook.data[live] = F.normalize(self.ema_sum[live], dim=1)
        else:
            self.codebook.data.copy_(F.normalize(self.codebook.data, dim=1))

    def state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "ema_sum": self.ema_sum, "ema_count": self.ema_count,
                "last_used": self.last_used, "step": self.step, "history": self.history, "restarts": self.restarts,
                "config": asdict(self.cfg)}


def reconstruction_error(tok, images: np.ndarray) -> dict:
    """Mean squared error (0-255 scale) and PSNR of ``decode(encode(images))``, plus the share of codes used."""
    if len(images) == 0:
        return {"images": 0}
    codes = tok.encode(images)
    rec = tok.decode(codes)
    mse = float(np.mean((rec.astype(np.float64) - images.astype(np.float64)) ** 2))
    return {"images": int(len(images)), "mse": round(mse, 3),
            "psnr": round(10 * math.log10(255.0 ** 2 / max(mse, 1e-10)), 3),
            "codes_used": int(len(np.unique(codes))), "codebook_size": int(tok.codebook_size)}


def split_holdout(images: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): a seeded share of the images, never trained on."""
    n_hold = int(round(holdout * len(images))) if len(images) > 1 else 0
    order = _rng(seed, 0).permutation(len(images))
    return images[np.sort(order[n_hold:])], images[np.sort(order[:n_hold])]


def train_image_tokenizer(images: np.ndarray, out, cfg: TrainConfig = TrainConfig(), resume: bool = False,
                          overwrite: bool = False, progress: bool = False, say=print, stop_at: int | None = None
                          ) -> dict:
    """Train (or, with ``resume``, continue) a learned tokenizer on uint8 ``images [N, S, S, 3]`` (already fitted
    to ``cfg.image_size``) and save it in ``out`` (every ``save_every`` steps and at the end, atomically).

    ``stop_at``: stop after that many steps as if interrupted (the state is saved; a later ``resume`` goes on).
    Returns ``{"steps", "held_out": reconstruction_error(...), "history", "seconds", "stopped"}``."""
    from transformers import JanusVQVAE

    quiet_transformers()
    cfg.check()
    out = Path(out)
    images = np.asarray(images)
    s = cfg.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(f"train-image: expected uint8 images [N, {s}, {s}, 3], got {images.dtype} "
                         f"{list(images.shape)}")
    train, held = split_holdout(images, cfg.holdout, cfg.seed)
    if len(train) < 2:
        raise ValueError(f"train-image: {len(images)} image(s) is too few to train a tokenizer")
    model = state = None
    if resume and (out / STATE_FILE).is_file():
        state = trust.torch_load(out / STATE_FILE, map_location=cfg.device, mmap=False)  # as data
        before = state["config"]
        changed = [f"{k} {before.get(k)} -> {getattr(cfg, k)}" for k in STRUCTURAL if before.get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(f"{out / STATE_FILE}: cannot resume with a different shape ({', '.join(changed)})")
        model = JanusVQVAE.from_pretrained(str(out), local_files_only=True)
        say(f"train-image: resuming {out} at step {state['step']} of {cfg.steps}")
    elif out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --resume to continue its training, or --overwrite)")
    trainer = _Trainer(cfg, train, model, state)

    from tqdm import tqdm
    t0, window = time.time(), []
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc="train-image", unit="step", disable=not progress,
               dynamic_ncols=True)
    stopped = False
    try:
        while trainer.step < cfg.steps:
            if stop_at is not None and trainer.step >= stop_at:
                stopped = True
                break
            window.append(trainer.run_step())
            bar.update(1)
            bar.set_postfix(recon=f"{window[-1]['recon']:.4f}", used=window[-1]["used"])
            if trainer.step % cfg.save_every == 0 or trainer.step == cfg.steps:
                trainer.history.append({"step": trainer.step,
                                        "recon": round(float(np.mean([w["recon"] for w in window])), 5),
                                        "codes_used": int(np.mean([w["used"] for w in window]))})
                window = []
                _save(trainer, out, held)
    except KeyboardInterrupt:
        stopped = True
    finally:
        bar.close()
    tok = _save(trainer, out, held)
    if stopped:
        say(f"train-image: stopped at step {trainer.step} of {cfg.steps}; saved, continue with --resume")
    return {"steps": trainer.step, "held_out": tok.training.get("held_out", {}), "history": trainer.history,
            "seconds": round(time.time() - t0, 1), "stopped": stopped, "restarts": trainer.restarts}


def _save(trainer: _Trainer, out: Path, held: np.ndarray) -> LearnedVQ:
    """Weights (``save_pretrained``), training state and image_tokenizer.json, all renamed into place together."""
    import torch
    c = trainer.cfg
    trainer.model.eval()
    tok = LearnedVQ(trainer.model, image_size=(c.image_size, c.image_size), resize=c.resize, where=str(out))
    tok.to(trainer.device)
    tok.training = {"steps": trainer.step, "config": asdict(c), "history": trainer.history,
                    "codebook_restarts": trainer.restarts, "held_out": reconstruction_error(tok, held)}
    with atomic_output(out, overwrite=True) as tmp:
        trainer.model.save_pretrained(tmp)
        torch.save(trainer.state(), tmp / STATE_FILE)
        atomic_write_json(tmp / META_FILE, tok.meta(pixels=tok.pixels, training=tok.training))
    trainer.model.train()
    return tok


def config_from(options: dict) -> TrainConfig:
    """A TrainConfig from a dict of options (unknown names are one error line)."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"train-image: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return TrainConfig(**options).check()
