"""What ``megannm serve`` runs: open the checkpoint, start the decoding thread, serve the app with uvicorn until
Ctrl-C or SIGTERM (in-flight requests finish, queued rows drain, then the process exits).

Under a launcher with several ranks (``torchrun --nproc-per-node N megannm serve ...``) the model is split over N
tensor-parallel ranks: rank 0 serves HTTP and leads the decoding, the other ranks follow it step by step
(``engine.follow``)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from megannm.generate import DEFAULT_CFG_SCALE
from megannm.web import check_bind, listen


@contextmanager
def opened(checkpoint, tokenizers):
    """(model, tokenizers, layout): a world of one (``open_checkpoint``), or every rank of the launch as one
    tensor-parallel group, each with its slice of the weights; the world is shut down on the way out."""
    from megannm import parallel
    from megannm.checkpoint.opened import load_model, open_checkpoint
    from megannm.data.tokenize import Tokenizers
    world = parallel.discover_launch().world_size
    if world == 1:
        with open_checkpoint(checkpoint, tokenizers) as ck:
            yield ck.model, ck.tok, ck.layout
        return
    layout = parallel.init_parallel(world, 1)
    try:
        tok = Tokenizers.load(tokenizers)
        model = load_model(checkpoint, layout, vocab=tok.vocab)[0].to(parallel.device())
        yield model, tok, layout
    finally:
        parallel.shutdown()


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGINT / SIGTERM only ask it to stop: uvicorn re-raises the signal once
        it has stopped, which would end the process before the queued rows drain and the followers are told."""

        @contextmanager
        def capture_signals(self):
            import signal

            def stop(sig, frame):
                self.force_exit = self.should_exit  # a second signal: stop now
                self.should_exit = True
            old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
    return Server


def serve(checkpoint, tokenizers, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          model_name: Optional[str] = None, max_rows: int = 16, max_queue: int = 64, max_n: int = 8,
          max_tokens: int = 1024, max_body: int = 16 * 2 ** 20, media_root=None,
          cfg_scale: float = DEFAULT_CFG_SCALE, seed: int = 0, say=print) -> None:
    import uvicorn

    from megannm.serve.app import Limits, make_app
    from megannm.serve.engine import Engine, follow
    check_bind(host, api_key)
    if media_root is not None and not Path(media_root).is_dir():
        raise FileNotFoundError(f"--allowed-local-media-path {media_root}: not a folder")
    for flag, value in (("--max-rows", max_rows), ("--max-queue", max_queue), ("--max-n", max_n),
                        ("--max-tokens", max_tokens)):
        if value <= 0:
            raise ValueError(f"{flag} must be positive (got {value})")
    name = model_name or Path(checkpoint).resolve().name
    with opened(checkpoint, tokenizers) as (model, tok, layout):
        if layout.tp_rank != 0:
            import signal
            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when to stop (it drains first)
                signal.signal(sig, signal.SIG_IGN)
            follow(model, tok.vocab, layout.tp_group, max_rows, seed)
            return
        sock = listen(host, port)
        tok.image.to(next(model.parameters()).device)
        engine = Engine(model, tok.vocab, max_rows=max_rows, max_queue=max_queue, seed=seed, group=layout.tp_group)
        app = make_app(engine, tok, name, api_key, Limits(max_n, max_tokens, max_body),
                       Path(media_root).resolve() if media_root else None, cfg_scale)
        server = _server_class()(uvicorn.Config(app, log_level="warning", access_log=False,
                                                timeout_graceful_shutdown=30))
        bound = sock.getsockname()
        say(f"megannm serve: {name} at http://{bound[0]}:{bound[1]}/v1 ({engine.decoder.cache.rows} rows, context "
            f"{engine.decoder.max_len}, tensor parallel {layout.tp}; Ctrl-C stops)", flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            engine.shutdown()
