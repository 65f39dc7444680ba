"""What megannm's HTTP servers (``megannm serve``, ``megannm reward-server``) share: where they may listen, and the
API key they check.

Both run what they are sent through a model or a reward, so they listen on this machine only (127.0.0.1) unless an
API key is given; with a key every request must carry ``Authorization: Bearer KEY`` (the OpenAI clients' header) or
is answered 401.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from typing import Optional

API_KEY_ENV = "MEGANNM_API_KEY"


def is_local(host: str) -> bool:
    """True for a loopback address or name (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_of(given: Optional[str]) -> Optional[str]:
    """The key from ``--api-key``, else from the environment (``MEGANNM_API_KEY``: keeps it out of ``ps``)."""
    return given or os.environ.get(API_KEY_ENV) or None


def check_bind(host: str, api_key: Optional[str]) -> None:
    """One ValueError line when ``host`` is not this machine's loopback and no API key protects the server."""
    if not is_local(host) and not api_key:
        raise ValueError(f"--host {host}: listening beyond this machine needs --api-key KEY (or {API_KEY_ENV}); "
                         f"without one, bind 127.0.0.1 and reach it through an SSH tunnel")


def key_matches(header: Optional[str], api_key: Optional[str]) -> bool:
    """Whether an ``Authorization`` header carries ``api_key`` (always, when the server has none)."""
    if not api_key:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), api_key.encode())


def listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: any free one); a port that cannot be listened on is one ValueError naming --port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock
