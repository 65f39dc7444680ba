"""Rewards served over HTTP: a reward named by URL in a recipe is scored by a reward server, a batch per request.

Heavy verifiers (detectors, OCR, VQA or preference models) are large GPU models that belong on machines of their
own; ``megannm reward-server`` (``server.py``) serves any registered reward, and a recipe names it by URL::

    phase: {kind: grpo, options: {rewards: {"http://verifier-1:8000/score#timeout=120&retries=2": 1.0, format: 0.1}}}

The wire format (version ``megannm-reward/1``), JSON both ways:

- request: ``POST URL`` ``{"format": "megannm-reward/1", "items": [{"prompt": {...}, "sample": {...},
  "truth": ...}, ...]}``; a prompt is ``{ids, kind, text}``, a sample ``{ids, kind, text, image, well_formed,
  extra}`` with ``image`` a base64 PNG (or null), a truth whatever the prompt source gave, as JSON (objects with an
  ``as_dict`` method and dataclasses become dicts);
- response: ``{"rewards": [float, ...]}`` in the items' order, or ``{"error": "one line"}`` with a 4xx/5xx status.

The client is bounded: every request has a timeout, a failed one is retried a few times with a growing pause
(connection refused or reset, a timeout, a 5xx: a server restarting or busy), a 4xx is not (the request is
wrong), and the last failure is one ``RemoteRewardError`` line naming the URL. Options ride in the URL's fragment,
which HTTP never sends to the server: ``#timeout=SECONDS&retries=N&batch=ITEMS`` (defaults 60, 2 and 64: a
rollout of many pictures goes as several requests of at most ``batch`` items).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
import urllib.error
import urllib.request
from typing import Optional
from urllib.parse import parse_qsl, urldefrag

import numpy as np

from megannm.web import api_key_of

FORMAT = "megannm-reward/1"
DEFAULTS = {"timeout": 60.0, "retries": 2, "batch": 64}
BACKOFF_S = 0.5  # first pause between tries; doubled after each
MAX_BODY = 1 << 30  # the server refuses requests above 1 GiB (a mistake, not a batch)


class RemoteRewardError(RuntimeError):
    """A reward server failed to score a batch; the message is one line naming the server's URL. Not a user
    mistake in the recipe but a fault outside it: the command exits 1 with that line (as a failed save does)."""
    exit_code = 1


# ---------------------------------------------------------------------------------------------------------------------
# JSON both ways (shared with the server)


def image_to_b64(image: Optional[np.ndarray]) -> Optional[str]:
    if image is None:
        return None
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(text: Optional[str]) -> Optional[np.ndarray]:
    if text is None:
        return None
    from PIL import Image
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return np.asarray(im.convert("RGB"))


def _jsonable(x):
    """``json.dumps`` default: truths and extras as plain JSON (``as_dict``, dataclasses, numpy values)."""
    if hasattr(x, "as_dict"):
        return x.as_dict()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def encode_items(prompts: list, samples: list, truths: list) -> bytes:
    items = [{"prompt": {"ids": [int(i) for i in p.ids], "kind": p.kind, "text": p.text},
              "sample": {"ids": [int(i) for i in s.ids], "kind": s.kind, "text": s.text,
                         "image": image_to_b64(s.image), "well_formed": bool(s.well_formed), "extra": s.extra},
              "truth": t} for p, s, t in zip(prompts, samples, truths)]
    return json.dumps({"format": FORMAT, "items": items}, default=_jsonable).encode()


def decode_items(body: bytes) -> tuple[list, list, list]:
    """A request's body -> (prompts, samples, truths); a ValueError line for a malformed one."""
    from megannm.rewards import Prompt, Sample
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(req, dict) or req.get("format") != FORMAT or not isinstance(req.get("items"), list):
        raise ValueError(f"expected {{\"format\": \"{FORMAT}\", \"items\": [...]}}")
    prompts, samples, truths = [], [], []
    for k, it in enumerate(req["items"]):
        try:
            p, s = it["prompt"], it["sample"]
            prompts.append(Prompt(list(p["ids"]), p["kind"], p.get("text") or ""))
            samples.append(Sample(list(s["ids"]), s["kind"], s.get("text"), image_from_b64(s.get("image")),
                                  bool(s.get("well_formed", True)), dict(s.get("extra") or {})))
            truths.append(it.get("truth"))
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ValueError(f"item {k}: {type(e).__name__}: {e}") from None
    return prompts, samples, truths


# ---------------------------------------------------------------------------------------------------------------------
# the client


class RemoteReward:
    """A reward behind a URL; ``score_batch`` is one request per ``batch`` items, ``__call__`` scores one."""

    def __init__(self, name: str):
        url, frag = urldefrag(name)
        self.name, self.url = name, url
        opts = dict(DEFAULTS)
        for key, value in parse_qsl(frag, keep_blank_values=True):
            if key not in DEFAULTS:
                raise ValueError(f"rewards: {name}: unknown option {key!r} after '#' (expected "
                                 f"{', '.join(DEFAULTS)})")
            try:
                opts[key] = type(DEFAULTS[key])(value)
            except ValueError:
                raise ValueError(f"rewards: {name}: {key}={value!r} is not a number") from None
        if opts["timeout"] <= 0 or opts["retries"] < 0 or opts["batch"] < 1:
            raise ValueError(f"rewards: {name}: expected timeout > 0, retries >= 0, batch >= 1 (got {opts})")
        self.timeout, self.retries, self.batch = float(opts["timeout"]), int(opts["retries"]), int(opts["batch"])
        self.__name__ = url  # what logs and error messages call it

    def __call__(self, prompt, sample, truth) -> float:
        return self.score_batch([prompt], [sample], [truth])[0]

    def score_batch(self, prompts: list, samples: list, truths: list) -> list[float]:
        out: list[float] = []
        for s in range(0, len(prompts), self.batch):
            part = slice(s, s + self.batch)
            try:
                body = encode_items(prompts[part], samples[part], truths[part])
            except TypeError as e:
                raise RemoteRewardError(f"reward server {self.url}: cannot send the truths as JSON ({e})") from None
            got = self._post(body)
            if len(got) != len(prompts[part]):
                raise RemoteRewardError(f"reward server {self.url}: answered {len(got)} rewards for "
                                        f"{len(prompts[part])} samples")
            out += got
        return out

    def _post(self, body: bytes) -> list[float]:
        """One batch, with up to ``retries`` more tries after a failure that may pass; the last one raises."""
        pause, why = BACKOFF_S, "no answer"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(pause)
                pause *= 2
            key = api_key_of(None)  # a server beyond localhost wants the key it was started with
            req = urllib.request.Request(self.url, data=body, method="POST", headers={
                "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return _rewards_of(resp.read())
            except urllib.error.HTTPError as e:  # the server answered, with an error status
                why = f"HTTP {e.code}: {_error_of(e)}"
                if e.code < 500:
                    break  # a bad request stays bad
            except (TimeoutError, OSError) as e:  # refused, reset, unreachable, timed out (URLError is an OSError)
                reason = getattr(e, "reason", e)
                timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
                why = f"no answer within {self.timeout:g} s" if timed_out else f"{type(reason).__name__}: {reason}"
            except ValueError as e:  # an answer that is not {"rewards": [...]}
                why = str(e)
                break
        tries = attempt + 1
        raise RemoteRewardError(f"reward server {self.url}: {why} ({tries} {'try' if tries == 1 else 'tries'})")


def _rewards_of(body: bytes) -> list[float]:
    try:
        r = json.loads(body)
        return [float(x) for x in r["rewards"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"not a reward answer (expected {{\"rewards\": [...]}}, got {body[:80]!r})") from None


def _error_of(e) -> str:
    try:
        return str(json.loads(e.read()).get("error") or e.reason).splitlines()[0]
    except Exception:  # noqa: BLE001 - whatever the body, the status line still says what happened
        return str(e.reason)
