"""The batched decoder: continuous batching over one KV cache with a slot per row.

One ``Decoder`` holds ``max_rows`` slots of a KV cache as long as the model's context. A ``Row`` (a prompt, what it
answers with: text or an image's codes, its sampling options) joins at any step: its prompt prefills into free
slots, and from then on it decodes one token a step beside every other row, whatever their lengths, until its stop
token or its limit; then its slots are free for the next row. It serves ``megannm serve`` (rows join and leave as
requests come and go), ``megannm.generate.generate`` (every prompt of ``megannm generate``, ``megannm evaluate``
and the RL rollouts of GRPO and DPO) alike.

- Per-row lengths: every slot writes its next key and value at its own position (``SlotCache``), and its position
  ids continue its own sequence. The attention mask is the cache's per-slot validity row (one [rows, 1, 1, T] bool
  per step, T the longest row): keys past a row's own length, left over from the slot's previous row, are never
  read.
- Classifier-free guidance: an image row with ``cfg_scale != 1`` takes two slots, its conditional prompt and the
  unconditional one (``<bos> <boi>``), decoding side by side in the same batch; its logits are
  ``uncond + scale * (cond - uncond)`` and both slots are fed the token sampled from them.
- Text and image rows together: each row has its allowed ids (text ids and stops, or image codes) and its own end
  (an image row exactly ``vocab.image_grid`` codes, a text row its stop token or ``max_new`` tokens).
- No host synchronisation per token: sampling (temperature, top-k, top-p, per row) happens on the device, the
  tokens land in a device buffer, and the host reads the buffer (and the rows' stop flags) once every
  ``sync_every`` steps; a row whose limit the host can count needs no read to end. Random draws come from
  generators on the logits' device: one for the batch, and its own for a row with a seed (its samples then do not
  depend on the rows beside it).
- Tensor parallel: every rank of a tensor-parallel group drives the same rows; the sampled ids are broadcast from
  the group's first rank, so ranks never diverge (stop flags are computed from the broadcast ids).

Hand-written because no library decodes this model: vLLM and SGLang serve their own model classes (text out), and
Hugging Face ``generate`` has neither per-row join/leave nor guidance rows beside their conditional rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megannm import parallel
from megannm.vocab import Vocab

# Prompt tokens per prefill forward: the forward returns logits at every prompt position (gathered over the
# vocabulary), so many joining prompts prefill in slices of rows to bound that tensor.
PREFILL_TOKENS = 8192
# Prompts prefilled together are padded (on the right) to at most this factor of the shortest one's length.
_PREFILL_PAD = 1.25


@dataclass
class Row:
    """One sequence to continue. ``kind``: "text" (stops at ``<eos>``, any of ``stop_ids`` or ``max_new`` tokens)
    or "image" (exactly ``vocab.image_grid`` codes). ``temperature`` <= 0 is greedy. ``seed``: its own generator
    (else the decoder's). ``on_tokens(row, new_ids)`` is called from the decoding thread as tokens reach the host;
    ``on_done(row)`` once at the end (``finish`` says why: "stop", "length" or "cancelled")."""

    prompt: list[int]
    kind: str = "text"
    max_new: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    cfg_scale: float = 1.0
    stop_ids: tuple = ()
    keep_stop: bool = False
    ignore_eos: bool = False  # a text row runs to ``max_new`` tokens unless one of ``stop_ids`` ends it
    logprobs: bool = False
    on_tokens: Optional[Callable] = None
    on_done: Optional[Callable] = None
    tag: object = None  # the caller's
    latents: object = None  # continuous images: the prompt's slot latents [slots, C] (clean pictures to read)
    # filled in by the decoder
    tokens: list = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    finish: Optional[str] = None
    cancelled: bool = False
    _slots: tuple = ()
    _limit: int = 0
    _count: int = 0  # tokens generated, as the host counts them (exact until the row stops early)
    _delivered: int = 0
    _generator: Optional[torch.Generator] = None

    @property
    def done(self) -> bool:
        return self.finish is not None


# ---------------------------------------------------------------------------------------------------------------------
# the cache: a slot per row, each with its own length


class _SlotLayer:
    def __init__(self, cache: "SlotCache", k: torch.Tensor, v: torch.Tensor):
        self.cache, self.k, self.v = cache, k, v

    def store(self, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write one new key/value per row at that row's own position; return every slot's keys up to the longest."""
        c = self.cache
        n = k.shape[0]
        self.k[c.row_index[:n], :, c.pos[:n]] = k[:, :, 0]
        self.v[c.row_index[:n], :, c.pos[:n]] = v[:, :, 0]
        return self.k[:n, :, :c.end], self.v[:n, :, :c.end]


class SlotCache:
    """Keys and values of ``rows`` slots x ``max_len`` positions for every layer; ``pos`` [rows] (device) is each
    slot's length, ``valid`` [rows, max_len] which cached positions a slot's query may read. It speaks the model's
    cache protocol (``megannm.model.attention.Attender``: ``length``, ``extend``, ``layers[i].store``, ``advance``)
    for one-token decoding steps over the slots [0, n) (``use(n, end)``)."""

    def __init__(self, model, rows: int, max_len: int):
        a, p = model.args, next(model.parameters())
        shape = (rows, a.kv_heads // model.layout.tp, max_len, a.head_dim)
        self.layers = [_SlotLayer(self, torch.zeros(shape, dtype=p.dtype, device=p.device),
                                  torch.zeros(shape, dtype=p.dtype, device=p.device)) for _ in range(a.layers)]
        self.valid = torch.zeros(rows, max_len, dtype=torch.long, device=p.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=p.device)
        self.row_index = torch.arange(rows, device=p.device)
        self.rows, self.max_len, self.end = rows, max_len, 0

    @property
    def length(self) -> int:  # the Attender's start: every query of a step sits at index end - 1 or before
        return self.end - 1

    def use(self, end: int) -> None:
        self.end = end

    def extend(self, document_ids: torch.Tensor) -> torch.Tensor:
        n = document_ids.shape[0]
        self.valid[self.row_index[:n], self.pos[:n]] = 1
        return self.valid[:n, :self.end]

    def advance(self, n: int) -> None:  # positions move in ``Decoder.step`` (per row, not by a shared count)
        pass

    def fill(self, slots: torch.Tensor, tmp, lengths: torch.Tensor, width: int) -> None:
        """The keys and values of a prefilled batch (``tmp``: a ``KVCache`` of ``len(slots)`` rows, each row's
        prompt at [0, length)) into ``slots``."""
        for mine, theirs in zip(self.layers, tmp.layers):
            mine.k[slots, :, :width] = theirs.k[:, :, :width]
            mine.v[slots, :, :width] = theirs.v[:, :, :width]
        idx = torch.arange(self.max_len, device=lengths.device)
        self.valid[slots] = (idx[None] < lengths[:, None]).long()
        self.pos[slots] = lengths


# ---------------------------------------------------------------------------------------------------------------------
# sampling on the device


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           noise: Callable[[tuple], torch.Tensor], all_greedy: bool, filtered: bool) -> torch.Tensor:
    """logits [n, V] (disallowed ids -inf), per-row temperature (<= 0: greedy), top_k (0: all), top_p -> ids [n].
    Sampling is the exponential race (``argmax p / E``, E ~ Exp(1) from ``noise(shape)``): a draw of the
    categorical with no host round trip, whose randomness can come from a generator per row. ``all_greedy`` and
    ``filtered`` (some row has a top-k or top-p) are known on the host, so that no step reads them back."""
    greedy = logits.argmax(-1)
    if all_greedy:
        return greedy
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    order = None
    if filtered:
        scaled, order = torch.sort(scaled, descending=True, dim=-1)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)
        keep = rank[None] < torch.where(top_k > 0, top_k, scaled.shape[-1])[:, None]
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), -1)
        keep &= (probs.cumsum(-1) - probs) <= top_p[:, None]  # the smallest prefix reaching top_p (first stays)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    choice = (torch.softmax(scaled, -1) / noise(scaled.shape)).argmax(-1)
    if order is not None:
        choice = order.gather(1, choice[:, None]).squeeze(1)
    return torch.where(temperature <= 0, greedy, choice)


def _prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Indices (sorted by length) cut into groups within ``_PREFILL_PAD`` of their shortest and at most
    ``PREFILL_TOKENS`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, cur = [], []
    for i in order:
        if cur and (lengths[i] > _PREFILL_PAD * lengths[cur[0]] or (len(cur) + 1) * lengths[i] > PREFILL_TOKENS):
            groups.append(cur)
            cur = []
        cur.append(i)
    return groups + [cur] if cur else groups


# ---------------------------------------------------------------------------------------------------------------------
# the decoder


def _logits(out):
    """The logits of a forward (a model with continuous images returns them with the velocities)."""
    return out[0] if isinstance(out, tuple) else out


class Decoder:
    """Continuous batching for ``model`` (an ``NMMModel``): ``add`` rows at any time, ``step`` until
    ``idle``. ``max_rows``: slots (the KV cache's memory; a guided image row takes two); ``max_len``: positions
    per slot (default the model's context). ``seed``: the generator of rows without their own."""

    def __init__(self, model, vocab: Vocab, max_rows: int = 64, max_len: Optional[int] = None, seed: int = 0,
                 sync_every: int = 1):
        self.model, self.vocab = model, vocab
        self.max_len = min(max_len or model.args.max_seq_len, model.args.max_seq_len)
        self.cache = SlotCache(model, max_rows, self.max_len)
        dev = self.device = self.cache.pos.device
        v, vs = vocab, model.args.vocab_size
        self.vocab_size = vs
        allowed = torch.zeros(2, vs, dtype=torch.bool, device=dev)
        allowed[0, :v.text_size] = True  # text: text ids and <eos>; never image codes nor <boi>
        allowed[0, v.eos_id] = True
        allowed[1, v.image_start:v.image_end] = True
        self.allowed = allowed
        r = max_rows
        self.logits = torch.zeros(r, vs, dtype=torch.float32, device=dev)
        self.kind = torch.zeros(r, dtype=torch.long, device=dev)  # 0 text, 1 image
        self.stops = torch.zeros(r, vs, dtype=torch.bool, device=dev)
        self.temperature = torch.zeros(r, device=dev)
        self.top_k = torch.zeros(r, dtype=torch.long, device=dev)
        self.top_p = torch.ones(r, device=dev)
        self.scale = torch.ones(r, device=dev)
        self.partner = torch.arange(r, device=dev)  # a guided row's unconditional slot (else itself)
        self.leader = torch.arange(r, device=dev)  # whose sample a slot is fed (an uncond slot: its row's)
        self.limit = torch.zeros(r, dtype=torch.long, device=dev)
        self.count = torch.zeros(r, dtype=torch.long, device=dev)
        self.stopped = torch.zeros(r, dtype=torch.bool, device=dev)
        self.busy = torch.zeros(r, dtype=torch.long, device=dev)  # 1 where a row holds the slot
        self.out = torch.zeros(r, self.max_len, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(r, self.max_len, dtype=torch.float32, device=dev)
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        self.sync_every = max(1, sync_every)
        self.rows: list[Optional[Row]] = [None] * r  # the row of each slot (its cond slot, and its uncond slot)
        self.waiting: list[Row] = []
        self.steps = 0
        self.tokens_generated = 0
        self.cancelled_rows = 0
        self._tp = model.layout.tp_group

    # rows in and out ------------------------------------------------------------------------------------------------
    def check(self, row: Row) -> None:
        """A ValueError naming what is wrong with ``row`` (before it queues)."""
        if row.kind not in ("text", "image"):
            raise ValueError(f"kind must be text or image (got {row.kind!r})")
        if row.kind == "image" and not self.vocab.image_grid:
            raise ValueError("the vocabulary does not record the image grid size (vocab.image_grid)")
        if row.kind == "image" and self.vocab.continuous:
            raise ValueError("continuous images are drawn by the flow sampler (megannm.model.draw), not decoded "
                             "token by token")
        if row.kind == "text" and row.max_new <= 0:
            raise ValueError(f"max_new_tokens must be positive for text (got {row.max_new})")
        if not row.prompt:
            raise ValueError("the prompt is empty")
        need = len(row.prompt) + self._limit_of(row)
        if need > self.max_len:
            raise ValueError(f"the prompt ({len(row.prompt)} tokens) and its answer ({self._limit_of(row)}) exceed "
                             f"the context of {self.max_len} tokens")
        if self._slots_of(row) > self.cache.rows:
            raise ValueError(f"a guided image row takes 2 slots and the decoder has {self.cache.rows}")

    def _limit_of(self, row: Row) -> int:
        return self.vocab.image_grid if row.kind == "image" else row.max_new

    def _slots_of(self, row: Row) -> int:
        return 2 if row.kind == "image" and row.cfg_scale != 1.0 else 1

    def add(self, row: Row) -> Row:
        """Queue ``row``; it joins at the next ``step`` that has free slots for it (in queue order)."""
        self.check(row)
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Stop ``row`` at the next step (a disconnected client): its slots are freed, ``on_done`` is called."""
        row.cancelled = True

    @property
    def running(self) -> int:
        """Rows decoding now (a guided row counts once)."""
        return len({id(r) for r in self.rows if r is not None})

    @property
    def idle(self) -> bool:
        return not self.waiting and all(r is None for r in self.rows)

    def _free(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def _admit(self) -> None:
        free = self._free()
        joining: list[tuple[Row, list[int]]] = []
        while self.waiting:
            row = self.waiting[0]
            if row.cancelled:
                self.waiting.pop(0)
                self._finish(row, "cancelled")
                continue
            k = self._slots_of(row)
            if len(free) < k:
                break
            self.waiting.pop(0)
            slots, free = free[:k], free[k:]
            joining.append((row, slots))
        if not joining:
            return
        v = self.vocab
        prompts, slots, latents = [], [], []
        for row, s in joining:
            row._slots, row._limit, row._count, row._delivered = tuple(s), self._limit_of(row), 0, 0
            for i in s:
                self.rows[i] = row
            prompts.append(row.prompt)
            slots.append(s[0])
            latents.append(row.latents)
            if len(s) == 2:
                prompts.append([v.bos_id, v.boi_id])
                slots.append(s[1])
                latents.append(None)
        self._prefill(prompts, slots, latents)
        dev = self.device
        for row, s in joining:
            c = s[0]
            u = s[1] if len(s) == 2 else c
            idx = torch.tensor(list(s), device=dev)
            self.kind[idx] = int(row.kind == "image")
            stop = self.stops[c].zero_()
            if row.kind == "text":
                stop[v.eos_id] = not row.ignore_eos
                for t in row.stop_ids:
                    stop[t] = True
            self.stops[u] = stop
            self.temperature[idx] = float(row.temperature)
            self.top_k[idx] = int(row.top_k)
            self.top_p[idx] = float(row.top_p)
            self.scale[idx] = float(row.cfg_scale) if u != c else 1.0
            self.partner[c], self.partner[u] = u, u
            self.leader[c], self.leader[u] = c, c
            self.limit[idx] = row._limit
            self.count[idx] = 0
            self.stopped[idx] = False
            self.busy[idx] = 1
            row._generator = (torch.Generator(device=dev).manual_seed(int(row.seed))
                              if row.seed is not None and row.temperature > 0 else None)

    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]], slots: list[int], latents: list) -> None:
        dev, model = self.device, self.model
        for group in _prefill_groups([len(p) for p in prompts]):
            lengths = torch.tensor([len(prompts[i]) for i in group], dtype=torch.long, device=dev)
            width = max(len(prompts[i]) for i in group)
            ids = torch.full((len(group), width), self.vocab.pad_id, dtype=torch.long, device=dev)
            for r, i in enumerate(group):
                ids[r, :len(prompts[i])] = torch.tensor(prompts[i], dtype=torch.long, device=dev)
            idx = torch.arange(width, device=dev).expand(len(group), width)
            real = idx < lengths[:, None]
            # right-padded: the padding is a document of its own (0), so no prompt token attends to it
            tmp = model.new_cache(len(group), width)
            extra = {}
            if model.args.continuous:  # the prompts' pictures enter at their slots, clean (t = 0)
                lat = torch.zeros(len(group), width, model.args.latent_channels, device=dev)
                for r, i in enumerate(group):
                    if latents[i] is not None:
                        lat[r, ids[r] == self.vocab.slot_id] = torch.as_tensor(latents[i], device=dev).float()
                extra = {"latents": lat.to(next(model.parameters()).dtype), "timesteps": real.float() * 0}
            logits = _logits(model(ids, position_ids=idx * real, document_ids=real.long(), cache=tmp, **extra))
            at = torch.tensor([slots[i] for i in group], device=dev)
            self.logits[at] = logits[torch.arange(len(group), device=dev), lengths - 1].float()
            self.cache.fill(at, tmp, lengths, width)

    def _finish(self, row: Row, why: str) -> None:
        for i in row._slots:
            if self.rows[i] is row:
                self.rows[i] = None
        if row._slots:  # a free slot decodes on (until the slots above it empty) reading its own key only
            idx = torch.tensor(row._slots, device=self.device)
            self.cache.pos[idx] = 0
            self.cache.valid[idx] = 0
            self.busy[idx] = 0
        row._slots = ()
        row.finish = why
        self.cancelled_rows += why == "cancelled"
        if row.on_done is not None:
            row.on_done(row)

    # one step -------------------------------------------------------------------------------------------------------
    def _noise(self, live: list[Row], n: int):
        def draw(shape):
            e = torch.empty(shape, device=self.device).exponential_(generator=self.generator)
            for row in live:
                g = getattr(row, "_generator", None)
                if g is not None:
                    e[row._slots[0]] = torch.empty(shape[1], device=self.device).exponential_(generator=g)
            return e
        return draw

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting rows, then one token for every running row (and, every ``sync_every`` steps or when a
        row reaches its limit, hand the new tokens to the host and free the finished rows)."""
        for row in {id(r): r for r in self.rows if r is not None and r.cancelled}.values():
            self._finish(row, "cancelled")
        self._admit()
        occupied = [i for i, r in enumerate(self.rows) if r is not None]
        if not occupied:
            return
        n = occupied[-1] + 1
        live = list({id(r): r for r in self.rows[:n] if r is not None}.values())
        logits = self.logits[:n]
        if any(len(r._slots) == 2 for r in live):
            u = logits[self.partner[:n]]
            logits = u + self.scale[:n, None] * (logits - u)
        logits = logits.masked_fill(~(self.allowed[self.kind[:n]] | self.stops[:n]), float("-inf"))
        ids = sample(logits, self.temperature[:n], self.top_k[:n], self.top_p[:n], self._noise(live, n),
                     all_greedy=all(r.temperature <= 0 for r in live),
                     filtered=any(r.temperature > 0 and (r.top_k > 0 or r.top_p < 1) for r in live))
        ids = parallel.broadcast(ids[self.leader[:n]].contiguous(), self._tp)
        write = ~self.stopped[:n] & (self.count[:n] < self.limit[:n])
        col = self.count[:n].clamp(max=self.max_len - 1)
        rows = self.cache.row_index[:n]
        self.out[rows, col] = torch.where(write, ids, self.out[rows, col])
        if any(r.logprobs for r in live):
            lp = torch.log_softmax(logits, -1).gather(1, ids[:, None]).squeeze(1)
            self.out_lp[rows, col] = torch.where(write, lp, self.out_lp[rows, col])
        self.stopped[:n] |= write & (self.kind[:n] == 0) & self.stops[:n].gather(1, ids[:, None]).squeeze(1)
        self.count[:n] += write.long()
        for row in live:
            row._count = min(row._count + 1, row._limit)
        self.steps += 1
        # feed every slot its token (finished and free slots too: cheaper than gathering the live ones; a free
        # slot stays at position 0 and reads only its own key)
        at_limit = any(r._count >= r._limit for r in live)
        self.cache.use(int(max(len(r.prompt) + r._count for r in live)) + 1)
        pos = self.cache.pos
        self.logits[:n] = _logits(self.model(ids[:, None], position_ids=pos[:n, None],
                                             document_ids=torch.ones(n, 1, dtype=torch.long, device=self.device),
                                             cache=self.cache))[:, -1].float()
        pos[:n] += self.busy[:n]
        if at_limit or self.steps % self.sync_every == 0 or any(r.cancelled for r in live):
            self._sync(live, n)

    def _sync(self, live: list[Row], n: int) -> None:
        """One read of the device: the stop flags, counts and new tokens of the running rows."""
        c0 = min(r._delivered for r in live)
        c1 = max(r._count for r in live)
        parts = [self.stopped[:n, None].long(), self.count[:n, None], self.out[:n, c0:c1]]
        snap = torch.cat(parts, 1).cpu()
        lps = self.out_lp[:n, c0:c1].cpu() if any(r.logprobs for r in live) else None
        for row in live:
            s = row._slots[0]
            stopped, count = bool(snap[s, 0]), int(snap[s, 1])
            new = snap[s, 2 + row._delivered - c0: 2 + count - c0].tolist()
            if lps is not None and row.logprobs:
                row.token_logprobs += lps[s, row._delivered - c0: count - c0].tolist()
            row._delivered = count
            row._count = count
            if stopped and new and not row.keep_stop:
                new = new[:-1]
                if row.logprobs:
                    row.token_logprobs.pop()
            row.tokens += new
            self.tokens_generated += len(new)
            if new and row.on_tokens is not None:
                row.on_tokens(row, new)
            if stopped or count >= row._limit:
                self._finish(row, "stop" if stopped or row.kind == "image" else "length")

    def run(self, rows: list[Row]) -> list[Row]:
        """Decode ``rows`` to their ends (a batch job: ``megannm.generate.generate``)."""
        for r in rows:
            self.add(r)
        while not self.idle:
            self.step()
        return rows
