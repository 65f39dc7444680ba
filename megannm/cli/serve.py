"""``megannm serve``: an OpenAI-compatible HTTP server for a checkpoint."""
from __future__ import annotations

import argparse

from megannm.generate import DEFAULT_CFG_SCALE


def serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm serve", description="Serve a checkpoint over an OpenAI-compatible HTTP "
                                "API (chat with pictures in and out, completions with log-probs, images), with "
                                "continuous batching.")
    p.add_argument("checkpoint", help="checkpoint folder (or its parent holding `latest`)")
    p.add_argument("--tokenizers", required=True, help="tokenizer bundle folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs "
                                                       "--api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one; the line printed says which)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or set MEGANNM_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                                                             "checkpoint folder's name)")
    p.add_argument("--max-rows", type=int, default=16, help="rows decoding together (KV cache slots; a guided "
                                                            "picture takes two)")
    p.add_argument("--max-queue", type=int, default=64, help="rows that may wait for a slot; more answer 429")
    p.add_argument("--max-n", type=int, default=8, help="the largest n a request may ask for")
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-body", type=int, default=16 * 2 ** 20, help="the largest request body in bytes (413 past)")
    p.add_argument("--allowed-local-media-path", default=None, help="image_url parts may name files under this "
                                                                    "folder (default: data URLs only)")
    p.add_argument("--cfg-scale", type=float, default=DEFAULT_CFG_SCALE,
                   help="default guidance scale of image answers (a request's guidance_scale overrides it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling of requests without their own")
    a = p.parse_args(argv)
    from megannm.serve.server import serve as run
    from megannm.web import api_key_of
    run(a.checkpoint, a.tokenizers, a.host, a.port, api_key_of(a.api_key), a.served_model_name, a.max_rows,
        a.max_queue, a.max_n, a.max_tokens, a.max_body, a.allowed_local_media_path, a.cfg_scale, a.seed)
    return 0
