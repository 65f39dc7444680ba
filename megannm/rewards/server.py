"""``megannm reward-server``: serve any registered reward over HTTP, for recipes that name it by URL.

    megannm reward-server --reward my_pkg.verifiers:detector --port 8000 [--host 10.0.0.5 --api-key KEY]

Every ``POST`` (any path) is a batch in the wire format of ``remote.py``; the reward scores it (its own
``score_batch`` when it has one, sample by sample otherwise) and the answer is ``{"rewards": [...]}``. A malformed
request gets 400, a reward that raises gets 500, each with ``{"error": "one line"}``; ``GET`` answers
``{"reward": NAME, "format": ...}`` (a health check). FastAPI + uvicorn, as ``megannm serve``: batches are read
concurrently and go through the reward one at a time (a GPU model is rarely safe to call from several threads; the
batches of many ranks queue). It runs whatever it is sent through the reward, so it binds to 127.0.0.1 unless an
API key is given (``megannm.web``: the clients send ``MEGANNM_API_KEY`` as a bearer token).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from megannm.rewards import get
from megannm.rewards.remote import FORMAT, MAX_BODY, decode_items
from megannm.web import check_bind, key_matches, listen


def make_app(name: str, api_key: Optional[str] = None, log=None):
    """The ASGI app serving the reward ``name`` (registered, installed or ``package.module:function``)."""
    fn = get(name)
    batch = getattr(fn, "score_batch", None)
    one_at_a_time = threading.Lock()
    app = FastAPI(title=f"megannm reward {name}", docs_url=None, redoc_url=None, openapi_url=None)

    def score(prompts, samples, truths) -> list[float]:
        with one_at_a_time:
            values = (batch(prompts, samples, truths) if batch is not None
                      else [fn(p, s, t) for p, s, t in zip(prompts, samples, truths)])
            return [float(v) for v in values]

    @app.middleware("http")
    async def _key(request: Request, call_next):
        # the health check (GET) answers anyone; a batch needs the key
        if request.method != "GET" and not key_matches(request.headers.get("authorization"), api_key):
            return JSONResponse({"error": "missing or wrong API key (set MEGANNM_API_KEY where the recipe "
                                          "runs: its clients send it as Authorization: Bearer KEY)"}, 401)
        return await call_next(request)

    @app.get("/{path:path}")
    async def health(path: str):
        return {"reward": name, "format": FORMAT}

    @app.post("/{path:path}")
    async def score_request(path: str, request: Request):
        t0 = time.perf_counter()
        size = int(request.headers.get("content-length") or 0)
        if not 0 < size <= MAX_BODY:
            return JSONResponse({"error": f"expected a JSON body of 1 B to {MAX_BODY} B (got {size} B)"}, 400)
        try:
            prompts, samples, truths = decode_items(await request.body())
        except ValueError as e:
            return JSONResponse({"error": f"bad request: {e}"}, 400)
        try:
            rewards = await run_in_threadpool(score, prompts, samples, truths)
        except Exception as e:  # noqa: BLE001 - the reward's own failure, reported to the caller in one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return JSONResponse({"error": f"reward {name}: {type(e).__name__}: {msg}"}, 500)
        if log is not None:  # before the answer: a client that reads the log after it finds the line
            log(f"scored {len(rewards)} samples in {time.perf_counter() - t0:.3f} s")
        return {"rewards": rewards}

    return app


def serve(name: str, host: str = "127.0.0.1", port: int = 0, quiet: bool = False,
          api_key: Optional[str] = None) -> None:
    """What ``megannm reward-server`` runs: serve the reward ``name`` until Ctrl-C, one line per batch unless
    ``quiet``; a non-local ``host`` without ``api_key``, or a port that cannot be listened on, is one ValueError
    line naming the flag."""
    import uvicorn

    say = lambda m: print(m, flush=True)  # noqa: E731
    check_bind(host, api_key)
    app = make_app(name, api_key, log=None if quiet else say)
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    say(f"reward {name} served at http://{bound_host}:{bound_port}/ (POST {FORMAT} batches; Ctrl-C stops)")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    print("megannm reward-server: stopped", file=sys.stderr)
