"""What ``megannm serve`` runs: open the checkpoint, start the decoding thread, serve the app with uvicorn until
Ctrl-C or SIGTERM (in-flight requests finish, queued rows drain, then the process exits)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megannm.generate import DEFAULT_CFG_SCALE
from megannm.web import check_bind, listen


def serve(checkpoint, tokenizers, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          model_name: Optional[str] = None, max_rows: int = 16, max_queue: int = 64, max_n: int = 8,
          max_tokens: int = 1024, max_body: int = 16 * 2 ** 20, media_root=None,
          cfg_scale: float = DEFAULT_CFG_SCALE, seed: int = 0, say=print) -> None:
    import uvicorn

    from megannm.checkpoint.opened import open_checkpoint
    from megannm.serve.app import Limits, make_app
    from megannm.serve.engine import Engine
    check_bind(host, api_key)
    if media_root is not None and not Path(media_root).is_dir():
        raise FileNotFoundError(f"--allowed-local-media-path {media_root}: not a folder")
    for flag, value in (("--max-rows", max_rows), ("--max-queue", max_queue), ("--max-n", max_n),
                        ("--max-tokens", max_tokens)):
        if value <= 0:
            raise ValueError(f"{flag} must be positive (got {value})")
    sock = listen(host, port)
    name = model_name or Path(checkpoint).resolve().name
    with open_checkpoint(checkpoint, tokenizers) as ck:
        ck.tok.image.to(next(ck.model.parameters()).device)
        engine = Engine(ck.model, ck.tok.vocab, max_rows=max_rows, max_queue=max_queue, seed=seed)
        app = make_app(engine, ck.tok, name, api_key, Limits(max_n, max_tokens, max_body),
                       Path(media_root).resolve() if media_root else None, cfg_scale)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               timeout_graceful_shutdown=30))
        bound = sock.getsockname()
        say(f"megannm serve: {name} at http://{bound[0]}:{bound[1]}/v1 ({engine.decoder.cache.rows} rows, context "
            f"{engine.decoder.max_len}; Ctrl-C stops)", flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            engine.shutdown()
