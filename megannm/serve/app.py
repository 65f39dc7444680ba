"""The FastAPI application of ``megannm serve``: OpenAI's chat, completions and images endpoints, the tokenizer
endpoints that lm-eval's ``tokenizer_backend=remote`` calls, ``/v1/models``, ``/health`` and ``/metrics``.

Every request becomes rows of the one decoder (``engine.Engine``); a request's rows answer together, a streamed
chat answers token by token (server-sent events), and a client that disconnects has its rows cancelled. Bad input
is an OpenAI-style error (``{"error": {"message", "type", "param", "code"}}``) with the status a client can act on:
400 (malformed JSON, a field out of range, a picture that cannot be decoded, a prompt longer than the context),
401 (API key), 404 (unknown model or path), 413 (body or picture too large), 422 (a body of the wrong shape),
429 (queue full); the server keeps serving.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from megannm.decode import Row
from megannm.generate import DEFAULT_CFG_SCALE, chat_prompt, codes_to_images, image_prompt, png_bytes
from megannm.serve import prompts as P
from megannm.serve.engine import Engine, QueueFull
from megannm.serve.metrics import Metrics
from megannm.serve.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, HTTPProblem, ImagesRequest,
                                    TokenizeRequest, new_id, now)
from megannm.web import key_matches

__all__ = ["make_app", "Limits"]


class Limits:
    """What one request may ask for (``megannm serve``'s flags)."""

    def __init__(self, max_n: int = 8, max_tokens: int = 1024, max_body: int = 16 * 2 ** 20):
        self.max_n, self.max_tokens, self.max_body = max_n, max_tokens, max_body


def make_app(engine: Engine, tok, model_name: str, api_key: Optional[str] = None, limits: Limits = Limits(),
             media_root: Optional[Path] = None, cfg_scale: float = DEFAULT_CFG_SCALE):
    """The ASGI application (the FastAPI app inside the API-key, body-size and metrics guard); ``.state`` holds
    the engine and the metrics."""
    app = FastAPI(title="megannm", docs_url=None, redoc_url=None)
    v = tok.vocab
    context = engine.decoder.max_len
    metrics = Metrics(engine)
    end = v.special("<|end|>")
    routes: set = set()

    # errors -----------------------------------------------------------------------------------------------------------
    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, e: HTTPProblem):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return JSONResponse(HTTPProblem(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})"
                                            .replace(" ()", "")).body(), status_code=400)
        msg = f"{where or 'body'}: {first.get('msg', 'invalid')}"
        status = 400 if first.get("type") in ("greater_than_equal", "less_than_equal", "greater_than", "less_than",
                                              "too_short") else 422
        return JSONResponse(HTTPProblem(status, msg, where or None).body(), status_code=status)

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return JSONResponse(HTTPProblem(404, f"no such endpoint: {request.method} {request.url.path}").body(),
                            status_code=404)

    async def guard(scope, receive, send):
        """API key, body size and metrics around every request: a plain ASGI middleware (Starlette's
        BaseHTTPMiddleware would hide a client's disconnect from the handlers)."""
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        headers = {k.decode().lower(): val.decode() for k, val in scope["headers"]}
        path = scope["path"]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        problem = None
        if path != "/health" and not key_matches(headers.get("authorization"), api_key):
            problem = HTTPProblem(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                  kind="authentication_error")
        elif int(headers.get("content-length") or 0) > limits.max_body:
            problem = HTTPProblem(413, f"the body is {headers['content-length']} bytes, more than --max-body "
                                       f"{limits.max_body}")
        try:
            if problem is not None:
                await JSONResponse(problem.body(), status_code=problem.status)(scope, receive, sending)
            else:
                await inner(scope, receive, sending)
        finally:
            metrics.request(path if path in routes else "other", status[0], time.perf_counter() - t0)

    # helpers ----------------------------------------------------------------------------------------------------------
    def check_model(name: Optional[str]) -> None:
        if name is not None and name != model_name:
            raise HTTPProblem(404, f"the model {name!r} does not exist (this server serves {model_name!r})", "model",
                              kind="not_found_error")

    def check_n(n: int) -> None:
        if n > limits.max_n:
            raise HTTPProblem(400, f"n={n} is over this server's limit of {limits.max_n} (--max-n)", "n")

    def answer_budget(prompt_len: int, asked: Optional[int], kind: str, prompt_param: str) -> int:
        if kind == "image":
            need = v.image_grid
            if prompt_len + need > context:
                raise HTTPProblem(400, f"this model's maximum context length is {context} tokens; the prompt is "
                                       f"{prompt_len} tokens and a picture {need}", prompt_param)
            return need
        if asked is not None and asked > limits.max_tokens:
            raise HTTPProblem(400, f"max_tokens={asked} is over this server's limit of {limits.max_tokens} "
                                   f"(--max-tokens)", "max_tokens")
        room = context - prompt_len
        if room < 1 or (asked is not None and asked > room):
            raise HTTPProblem(400, f"this model's maximum context length is {context} tokens; the prompt is "
                                   f"{prompt_len} tokens and max_tokens {asked if asked is not None else 1}",
                              prompt_param if room < 1 else "max_tokens")
        return asked if asked is not None else min(room, limits.max_tokens)

    def rows_for(prompt: list[int], kind: str, n: int, body, budget: int, stop_ids=(), scale=1.0,
                 keep_stop: bool = False) -> list[Row]:
        seeds = [None if body.seed is None else body.seed + i for i in range(n)]
        return [Row(list(prompt), kind, budget, body.temperature, body.top_k, body.top_p, seed=s,
                    cfg_scale=scale if kind == "image" else 1.0, stop_ids=tuple(stop_ids),
                    keep_stop=keep_stop, ignore_eos=getattr(body, "ignore_eos", False)) for s in seeds]

    def submit(rows: list[Row], stream: bool = False) -> asyncio.Queue:
        """Queue ``rows`` on the decoder (429 when the queue is full) before any answer starts; their tokens
        (``stream``) and ends arrive in the returned queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for r in rows:
            r.on_done = lambda row: loop.call_soon_threadsafe(events.put_nowait, ("done", row, None))
            if stream:
                r.on_tokens = lambda row, new: loop.call_soon_threadsafe(events.put_nowait, ("tokens", row, new))
        try:
            engine.submit(rows)
        except QueueFull as e:
            raise HTTPProblem(429, str(e), kind="rate_limit_error") from None
        except ValueError as e:
            raise HTTPProblem(400, str(e)) from None
        return events

    async def run(request: Request, rows: list[Row], events: Optional[asyncio.Queue] = None, on_tokens=None) -> None:
        """Wait for every row of ``rows`` (submitted now unless ``events`` says they were); a client that goes
        away has them cancelled."""
        events = events if events is not None else submit(rows)
        pending = len(rows)
        try:
            while pending:
                try:
                    what, row, new = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # its rows are cancelled below; nobody reads this
                        raise HTTPProblem(499, "the client closed the request")
                    continue
                if what == "done":
                    pending -= 1
                    if row.finish == "error":
                        raise HTTPProblem(500, f"decoding failed: {engine.error}", kind="server_error")
                elif on_tokens is not None:
                    await on_tokens(row, new)
        finally:
            if pending:
                engine.cancel(rows)

    async def on_engine(fn):
        return await asyncio.wrap_future(engine.call(fn))

    def usage(prompt_tokens: int, rows: list[Row]) -> dict:
        c = sum(len(r.tokens) for r in rows)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c}

    def finish_reason(r: Row) -> str:
        return "length" if r.finish == "length" else "stop"

    def cut(text: str, stop) -> tuple[str, bool]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        at = min((text.find(s) for s in stops if s and s in text), default=-1)
        return (text[:at], True) if at >= 0 else (text, False)

    async def draw(rows: list[Row]) -> list[bytes]:
        images = await on_engine(lambda: codes_to_images(tok, [r.tokens for r in rows]))
        return [png_bytes(im) for im in images]

    # models, health, metrics -----------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now(),
                                            "owned_by": "megannm", "max_model_len": context}]}

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    # tokenizer endpoints (lm-eval's tokenizer_backend=remote) --------------------------------------------------------
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"eos_token": "<eos>", "bos_token": "<bos>", "pad_token": "<pad>", "model_max_length": context,
                "tokenizer_class": "megannm", "vocab_size": v.size}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        ids = ([v.bos_id] if body.add_special_tokens else []) + P.encode_text(tok, body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        P.check_ids(tok, body.tokens, "tokens")
        return {"prompt": P.decode_ids(tok, body.tokens)}

    # chat -------------------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        check_n(body.n)
        kind = "image" if body.modalities and "image" in body.modalities and "text" not in body.modalities else "text"
        if kind == "image" and body.stream:
            raise HTTPProblem(400, "image answers are not streamed: send stream=false", "stream")
        messages = P.chat_messages(tok, body.messages, media_root)
        prompt = await on_engine(lambda: chat_prompt(tok, messages, kind))
        asked = body.max_completion_tokens or body.max_tokens
        budget = answer_budget(len(prompt), asked, kind, "messages")
        scale = body.guidance_scale if body.guidance_scale is not None else cfg_scale
        rows = rows_for(prompt, kind, body.n, body, budget, (end,), scale)
        rid, created = new_id("chatcmpl"), now()
        if body.stream:
            events = submit(rows, stream=True)
            return StreamingResponse(stream_chat(request, rows, events, rid, created, body),
                                     media_type="text/event-stream")
        await run(request, rows)
        choices = []
        if kind == "image":
            for i, png in enumerate(await draw(rows)):
                content = [{"type": "image_url", "image_url": {"url": P.png_data_url(png)}}]
                choices.append({"index": i, "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop", "logprobs": None})
        else:
            for i, r in enumerate(rows):
                text, stopped = cut(P.decode_ids(tok, [t for t in r.tokens if t < v.text_size]), body.stop)
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop" if stopped else finish_reason(r), "logprobs": None})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(len(prompt), rows)}

    async def stream_chat(request: Request, rows: list[Row], events: asyncio.Queue, rid: str, created: int,
                          body: ChatRequest):
        def chunk(i: int, delta: dict, finish: Optional[str] = None) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                 "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(c)}\n\n"

        out: asyncio.Queue = asyncio.Queue()
        sent = {id(r): "" for r in rows}
        done_text = {id(r): False for r in rows}

        async def on_tokens(row, new):
            if done_text[id(row)]:
                return
            text = P.decode_ids(tok, [t for t in row.tokens if t < v.text_size])
            text, stopped = cut(text, body.stop)
            if text.endswith("\ufffd") and not stopped:  # half a character: wait for its other bytes
                return
            if len(text) > len(sent[id(row)]):
                await out.put(chunk(rows.index(row), {"content": text[len(sent[id(row)]):]}))
                sent[id(row)] = text
            if stopped:
                done_text[id(row)] = True

        async def produce():
            try:
                await run(request, rows, events, on_tokens)
                for i, r in enumerate(rows):
                    await out.put(chunk(i, {}, "stop" if done_text[id(r)] else finish_reason(r)))
                await out.put("data: [DONE]\n\n")
            except HTTPProblem as e:
                await out.put(f"data: {json.dumps(e.body())}\n\n")
            finally:
                await out.put(None)

        for i in range(len(rows)):
            yield chunk(i, {"role": "assistant", "content": ""})
        task = asyncio.create_task(produce())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            if not task.done():  # the client went away: its rows leave the batch
                task.cancel()
                engine.cancel(rows)

    # images -----------------------------------------------------------------------------------------------------------
    @app.post("/v1/images/generations")
    async def images(body: ImagesRequest, request: Request):
        check_model(body.model)
        check_n(body.n)
        if body.response_format != "b64_json":
            raise HTTPProblem(400, "only response_format=b64_json is served (no image hosting)", "response_format")
        h, w = tok.image_size()
        if body.size is not None and body.size != f"{w}x{h}":
            raise HTTPProblem(400, f"size {body.size!r}: this model draws {w}x{h} pictures", "size")
        if not tok.image.can_decode:
            raise HTTPProblem(400, f"the image tokenizer ({tok.image.kind}) encodes only: this model cannot draw")
        prompt = image_prompt(tok, body.prompt)
        budget = answer_budget(len(prompt), None, "image", "prompt")
        scale = body.guidance_scale if body.guidance_scale is not None else cfg_scale
        rows = rows_for(prompt, "image", body.n, body, budget, (), scale)
        await run(request, rows)
        return {"created": now(), "data": [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None}
                                           for png in await draw(rows)]}

    # completions ------------------------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        check_n(body.n)
        if body.stream:
            raise HTTPProblem(400, "/v1/completions does not stream here: use /v1/chat/completions", "stream")
        p = body.prompt
        if isinstance(p, str):
            batch = [[v.bos_id, *P.encode_text(tok, p)]]
        elif p and all(isinstance(x, str) for x in p):
            batch = [[v.bos_id, *P.encode_text(tok, x)] for x in p]
        elif p and all(isinstance(x, int) for x in p):
            batch = [list(p)]
        else:
            batch = [list(x) for x in p]
        if not batch or any(not ids for ids in batch):
            raise HTTPProblem(400, "the prompt is empty", "prompt")
        for ids in batch:
            P.check_ids(tok, ids, "prompt")
        if body.n * len(batch) > limits.max_n * 4:
            raise HTTPProblem(400, f"{len(batch)} prompts x n={body.n} is over this server's limit", "prompt")
        rows: list[list[Row]] = []
        for ids in batch:
            if body.max_tokens == 0:
                if not body.echo:
                    raise HTTPProblem(400, "max_tokens=0 needs echo=true (nothing to return otherwise)",
                                      "max_tokens")
                if len(ids) > context:
                    raise HTTPProblem(400, f"this model's maximum context length is {context} tokens; the prompt is "
                                           f"{len(ids)} tokens", "prompt")
                rows.append([])
                continue
            budget = answer_budget(len(ids), body.max_tokens, "text", "prompt")
            # the stop token is part of the answer's tokens (and log-probs), as a completion's <eos> is in vLLM's
            rows.append(rows_for(ids, "text", body.n, body, budget, keep_stop=True))
        flat = [r for rs in rows for r in rs]
        if flat:
            await run(request, flat)
        choices = []
        for ids, rs in zip(batch, rows):
            for r in rs or [None] * body.n:
                gen = r.tokens if r is not None else []
                text = P.decode_ids(tok, [t for t in gen if t < v.text_size])
                text, stopped = cut(text, body.stop)
                choice = {"index": len(choices), "text": (P.decode_ids(tok, ids) if body.echo else "") + text,
                          "finish_reason": "stop" if stopped or r is None else finish_reason(r), "logprobs": None}
                if body.logprobs is not None:
                    choice["logprobs"] = await logprobs(ids, gen, body.logprobs, body.echo)
                choices.append(choice)
        prompt_tokens = sum(len(ids) for ids in batch)
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model_name,
                "choices": choices, "usage": usage(prompt_tokens, flat)}

    async def logprobs(prompt: list[int], gen: list[int], k: int, echo: bool) -> dict:
        """OpenAI's legacy logprobs of the echoed prompt (if ``echo``) and the generated tokens: one forward over
        both on the decoding thread (exact, whatever sampled the answer)."""
        seq = prompt + gen
        chosen, top_v, top_i = await asyncio.wrap_future(engine.forward("logprobs", seq, k))
        first = 0 if echo else len(prompt)
        tokens, lps, tops, offsets, at = [], [], [], [], 0
        for j in range(first, len(seq)):
            s = P.token_string(tok, seq[j])
            tokens.append(s)
            offsets.append(at)
            at += len(s)
            if j == 0:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(chosen[j - 1])
            top = {P.token_string(tok, int(i)): float(x) for x, i in zip(top_v[j - 1][:k], top_i[j - 1][:k])}
            tops.append(top if k else {s: chosen[j - 1]})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    routes.update(r.path for r in app.routes)
    app.state.engine, app.state.metrics = engine, metrics
    inner = app
    guard.state = app.state
    return guard
