"""The decoding thread of ``megannm serve``: one ``megannm.decode.Decoder`` stepping while any row runs, fed by
the HTTP handlers through a thread-safe inbox.

Handlers never touch the model: they ``submit`` rows (refused with ``QueueFull`` when more than ``max_queue`` rows
wait, which the app answers 429), ``cancel`` them (a client that went away), or ``call`` a function on the thread
between two decoding steps (scoring a prompt's log-probs, encoding a picture with a model-backed image tokenizer):
the model and its KV cache are only ever used from this one thread. ``shutdown`` drains: queued and running rows
finish, then the thread ends.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections import deque
from typing import Callable

import torch

from megannm.decode import Decoder, Row


class QueueFull(Exception):
    pass


class Engine:
    def __init__(self, model, vocab, max_rows: int = 16, max_queue: int = 64, seed: int = 0):
        self.decoder = Decoder(model, vocab, max_rows=max_rows, seed=seed, sync_every=1)
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
        for r in rows:
            if not r.done:
                self.decoder.cancel(r)
        self._inbox.put(("wake", None))

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run ``fn()`` on the decoding thread between two steps; its result (or exception) in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, fut)))
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
        """Apply what the inbox holds (waiting for one item when ``block``); False once told to stop."""
        go = True
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while item is not None:
            what, payload = item
            if what == "add":
                for r in payload:
                    self.decoder.add(r)
            elif what == "call":
                fn, fut = payload
                if fut.set_running_or_notify_cancel():
                    try:
                        with torch.no_grad():
                            fut.set_result(fn())
                    except Exception as e:  # noqa: BLE001 - handed to the caller, which answers it
                        fut.set_exception(e)
            elif what == "stop":
                go = False
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None
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
