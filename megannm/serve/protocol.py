"""The request bodies of the OpenAI-compatible API (pydantic, as FastAPI reads them) and its error answers.

Fields a client may send that megannm does not use (``frequency_penalty``, ``user``, ...) are accepted and
ignored, as the OpenAI clients and evaluation harnesses send them; fields it does use are checked and a wrong one is
a 400/422 naming it. megannm's own extensions ride along in the body (the ``openai`` client's ``extra_body``):
``guidance_scale`` (classifier-free guidance of image answers), ``top_k``, and ``modalities: ["image"]`` to ask a
chat for a picture.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None


class Sampling(_Body):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    ignore_eos: bool = False


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    modalities: Optional[list[Literal["text", "image"]]] = None
    guidance_scale: Optional[float] = Field(None, ge=0.0)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)


class ImagesRequest(_Body):
    prompt: str = Field(min_length=1)
    model: Optional[str] = None
    n: int = Field(1, ge=1)
    response_format: Literal["b64_json", "url"] = "b64_json"
    size: Optional[str] = None
    seed: Optional[int] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    guidance_scale: Optional[float] = Field(None, ge=0.0)


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


class HTTPProblem(Exception):
    """An answer other than 200: ``status``, one line, and the request field at fault (``param``)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
