"""``megannm reward-server``: serve any registered reward over HTTP, for recipes that name it by URL.

    megannm reward-server --reward my_pkg.verifiers:detector --port 8000 [--host 0.0.0.0]

Every ``POST`` (any path) is a batch in the wire format of ``remote.py``; the reward scores it (its own
``score_batch`` when it has one, sample by sample otherwise) and the answer is ``{"rewards": [...]}``. A malformed
request gets 400, a reward that raises gets 500, each with ``{"error": "one line"}``; ``GET`` answers
``{"reward": NAME, "format": ...}`` (a health check). The standard library's threaded HTTP server: one thread per
connection, no dependency, and one batch at a time through the reward (a GPU model is rarely safe to call from
several threads; the batches of many ranks queue). It binds to 127.0.0.1 unless told otherwise, because it runs
whatever it is sent through the reward and has no authentication.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megannm.rewards import get
from megannm.rewards.remote import FORMAT, MAX_BODY, decode_items


def make_server(name: str, host: str = "127.0.0.1", port: int = 0, log=None) -> ThreadingHTTPServer:
    """A server for the reward ``name`` (registered, installed or ``package.module:function``), bound but not yet
    serving (``serve_forever``); port 0 picks a free one (``server.server_address``)."""
    fn = get(name)
    batch = getattr(fn, "score_batch", None)
    one_at_a_time = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._answer(200, {"reward": name, "format": FORMAT})

        def do_POST(self):  # noqa: N802
            t0 = time.perf_counter()
            size = int(self.headers.get("Content-Length") or 0)
            if not 0 < size <= MAX_BODY:
                return self._answer(400, {"error": f"expected a JSON body of 1 B to {MAX_BODY} B (got {size} B)"})
            try:
                prompts, samples, truths = decode_items(self.rfile.read(size))
            except ValueError as e:
                return self._answer(400, {"error": f"bad request: {e}"})
            try:
                with one_at_a_time:
                    values = (batch(prompts, samples, truths) if batch is not None
                              else [fn(p, s, t) for p, s, t in zip(prompts, samples, truths)])
                rewards = [float(v) for v in values]
            except Exception as e:  # noqa: BLE001 - the reward's own failure, reported to the caller in one line
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                return self._answer(500, {"error": f"reward {name}: {type(e).__name__}: {msg}"})
            if log is not None:  # before the answer: a client that reads the log after it finds the line
                log(f"scored {len(rewards)} samples in {time.perf_counter() - t0:.3f} s")
            self._answer(200, {"rewards": rewards})

        def log_message(self, format, *args):  # noqa: A002 - one line per batch (above), not per request
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True  # a hung client never keeps the process alive
    return server


def serve(name: str, host: str = "127.0.0.1", port: int = 0, quiet: bool = False) -> None:
    """What ``megannm reward-server`` runs: serve the reward ``name`` until Ctrl-C, one line per batch unless
    ``quiet``; a port that cannot be listened on is one ValueError line naming ``--port``."""
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        server = make_server(name, host, port, log=None if quiet else say)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise ValueError(f"--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    bound_host, bound_port = server.server_address[:2]
    say(f"reward {name} served at http://{bound_host}:{bound_port}/ (POST {FORMAT} batches; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("megannm reward-server: stopped", file=sys.stderr)
    finally:
        server.server_close()
