"""The decoding thread of ``megannm serve``: one ``megannm.decode.Decoder`` stepping while any row runs, fed by
the HTTP handlers through a thread-safe inbox.

Handlers never touch the model: they ``submit`` rows (refused with ``QueueFull`` when more than ``max_queue`` rows
wait, which the app answers 429), ``cancel`` them (a client that went away), or ``call`` a function on the thread
between two decoding steps (scoring a prompt's log-probs, encoding a picture with a model-backed image tokenizer):
the model and its KV cache are only ever used from this one thread. ``shutdown`` drains: queued and running rows
finish, then the thread ends.

Under tensor parallelism (``megannm serve`` under torchrun) rank 0's engine leads: every turn of its loop it sends
the group what it applied (rows joining, cancellations, forwards to run, stop) as one pickled message
(``parallel.broadcast_tensors``), and every other rank runs ``follow``: the same operations in the same order, then
the same decoding step, so that every rank's forward joins the same collectives. Idle, the leader still sends an
empty message twice a second, so followers never wait out a collective's timeout.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import pickle
import queue
import threading
import time
from collections import deque
from typing import Callable

import torch

from megannm import parallel
from megannm.decode import Decoder, Row

_ROW_FIELDS = ("prompt", "kind", "max_new", "temperature", "top_k", "top_p", "seed", "cfg_scale", "stop_ids",
               "keep_stop", "ignore_eos", "logprobs")


def prompt_logprobs(model, seq: list[int], k: int):
    """One forward over ``seq``: the log-prob of every token after the first (list) and the ``k`` most likely
    ids and log-probs at each of those positions (lists): what completions' ``logprobs`` answer with."""
    dev = next(model.parameters()).device
    ids = torch.tensor([seq], device=dev)
    pos = torch.arange(len(seq), device=dev)[None]
    logp = torch.log_softmax(model(ids, position_ids=pos, document_ids=torch.zeros_like(pos))[0].float(), -1)
    chosen = logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
    top_v, top_i = logp[:-1].topk(max(k, 1), -1)
    return chosen.tolist(), top_v.tolist(), top_i.tolist()


# operations the followers of a tensor-parallel group run too (they use the model): name -> function(model, *args)
REPLICATED = {"logprobs": prompt_logprobs}


def _send(group, ops: list) -> None:
    data = torch.frombuffer(bytearray(pickle.dumps(ops)), dtype=torch.uint8)
    n = parallel.broadcast_tensors({"n": torch.tensor([data.numel()])}, {"n": ((1,), torch.int64)}, group)["n"]
    parallel.broadcast_tensors({"data": data}, {"data": ((int(n),), torch.uint8)}, group)


def _receive(group) -> list:
    n = int(parallel.broadcast_tensors(None, {"n": ((1,), torch.int64)}, group)["n"])
    data = parallel.broadcast_tensors(None, {"data": ((n,), torch.uint8)}, group)["data"]
    return pickle.loads(data.cpu().numpy().tobytes())


def follow(model, vocab, group, max_rows: int, seed: int = 0) -> None:
    """A follower rank of a tensor-parallel ``megannm serve``: replay the leader's operations and decoding steps
    until it stops."""
    decoder = Decoder(model, vocab, max_rows=max_rows, seed=seed, sync_every=1)
    rows: dict[int, Row] = {}
    go = True
    with torch.no_grad():
        while go or not decoder.idle:
            for op, payload in _receive(group):
                if op == "add":
                    for rid, spec in payload:
                        rows[rid] = decoder.add(Row(**spec, tag=rid))
                elif op == "cancel":
                    for rid in payload:
                        if rid in rows:
                            decoder.cancel(rows[rid])
                elif op == "call":
                    name, args = payload
                    REPLICATED[name](model, *args)
                elif op == "stop":
                    go = False
            if not decoder.idle:
                decoder.step()
            rows = {k: r for k, r in rows.items() if not r.done}


class QueueFull(Exception):
    pass


class Engine:
    def __init__(self, model, vocab, max_rows: int = 16, max_queue: int = 64, seed: int = 0, group=None):
        self.decoder = Decoder(model, vocab, max_rows=max_rows, seed=seed, sync_every=1)
        self.group = group if group is not None and parallel.group_size(group) > 1 else None
        self._ids = itertools.count()
        self.model, self.vocab = model, vocab
        self.max_queue = max_queue
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0  # rows submitted and not yet decoding (inbox + the decoder's waiting list)
        self._stopping = False
        self._rate = deque(maxlen=64)  # (time, tokens generated so far) every step: tokens/s over the last ones
        self.running = 0
        self.error = None  # the exception that stopped the thread, if one did
        self._thread = threading.Thread(target=self._loop, name="megannm-decoder", daemon=True)
        self._thread.start()

    # from the handlers ------------------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        with self._lock:
            return self._queued

    def submit(self, rows: list[Row]) -> None:
        """Queue ``rows`` (checked first: ValueError naming the problem); QueueFull past ``max_queue`` waiting."""
        for r in rows:
            self.decoder.check(r)
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._queued + len(rows) > self.max_queue:
                raise QueueFull(f"{self._queued} rows already wait (--max-queue {self.max_queue}); retry later")
            self._queued += len(rows)
        self._inbox.put(("add", rows))

    def cancel(self, rows: list[Row]) -> None:
        self._inbox.put(("cancel", [r for r in rows if not r.done]))

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run ``fn()`` on the decoding thread between two steps (on this rank only: no model forward inside); its
        result (or exception) in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, None, fut)))
        return fut

    def forward(self, name: str, *args) -> concurrent.futures.Future:
        """Run ``REPLICATED[name](model, *args)`` on the decoding thread (and on every follower rank)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (lambda: REPLICATED[name](self.model, *args), (name, args), fut)))
        return fut

    def tokens_per_second(self) -> float:
        r = list(self._rate)
        if len(r) < 2 or r[-1][0] - r[0][0] <= 0 or time.monotonic() - r[-1][0] > 5:
            return 0.0
        return (r[-1][1] - r[0][1]) / (r[-1][0] - r[0][0])

    def shutdown(self, timeout: float = 60.0) -> None:
        """Refuse new rows, let queued and running rows finish, stop the thread."""
        with self._lock:
            self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    # the thread ------------------------------------------------------------------------------------------------------
    def _take(self, block: bool) -> bool:
        """Apply what the inbox holds (waiting for one item when ``block``); False once told to stop. A leader
        sends its followers what it applied, in order, before applying it."""
        go = True
        try:
            items = [self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()]
        except queue.Empty:
            items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        if self.group is not None:
            ops = []
            for what, payload in items:
                if what == "add":
                    for r in payload:
                        r.tag = next(self._ids)
                    ops.append(("add", [(r.tag, {f: getattr(r, f) for f in _ROW_FIELDS}) for r in payload]))
                elif what == "cancel":
                    ops.append(("cancel", [r.tag for r in payload]))
                elif what == "call" and payload[1] is not None:
                    ops.append(("call", payload[1]))
                elif what == "stop":
                    ops.append(("stop", None))
            _send(self.group, ops)
        for what, payload in items:
            if what == "add":
                for r in payload:
                    self.decoder.add(r)
            elif what == "cancel":
                for r in payload:
                    self.decoder.cancel(r)
            elif what == "call":
                fn, _, fut = payload
                if fut.set_running_or_notify_cancel():
                    try:
                        with torch.no_grad():
                            fut.set_result(fn())
                    except Exception as e:  # noqa: BLE001 - handed to the caller, which answers it
                        fut.set_exception(e)
            elif what == "stop":
                go = False
        return go

    def _loop(self) -> None:
        go = True
        try:
            while go or not self.decoder.idle:
                go = self._take(block=self.decoder.idle and go) and go
                if not self.decoder.idle:
                    self.decoder.step()
                    self._rate.append((time.monotonic(), self.decoder.tokens_generated))
                with self._lock:
                    self._queued = len(self.decoder.waiting) + sum(
                        len(p) for w, p in list(self._inbox.queue) if w == "add")
                self.running = self.decoder.running
        except BaseException as e:  # noqa: BLE001 - every waiting request is told, and /health reports it
            self.error = e
            for r in {id(r): r for r in [*self.decoder.rows, *self.decoder.waiting] if r is not None}.values():
                r.finish = "error"
                if r.on_done is not None:
                    r.on_done(r)
            raise
