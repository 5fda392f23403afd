"""OpenAI chat-completions wire format: the request schema (validated strictly: unknown fields and wrong types
are errors, as OpenAI's own API does), the response and stream-chunk bodies, and the error shape.

Pure data: no Ray, no model. The server (cluster/server.py) turns ApiError into its HTTP status.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))} if self.retry_after_s is not None else {}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # "tool" is refused with a clear 400
    content: Union[str, list[Part], None] = None  # None only in an assistant turn (OpenAI sends it with tool calls)
    name: str | None = None
    tool_calls: list[Any] | None = None  # accepted in the schema only to be refused by name
    tool_call_id: str | None = None
    refusal: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]  # only "text" is supported (else 400)
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class DynllavaOptions(_Strict):
    """The extension field: per-request sparsity, within the operator's bounds, and ignore_eos."""

    vision_keep: float | None = None
    text_keep: float | None = None
    vision_scorer: str | None = None
    text_scorer: str | None = None
    ignore_eos: bool = False  # generate all max_tokens even past end-of-sequence (load tests; vLLM's ignore_eos)

    def sparsity_fields(self) -> dict[str, Any]:
        """The SparsityConfig fields the request set."""
        return {k: v for k, v in self.model_dump(exclude={"ignore_eos"}).items() if v is not None}


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what a torch.Generator accepts
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> -100..100
    logprobs: bool = False  # each answer token's log-probability (the model's raw distribution)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None  # refused when non-empty
    tool_choice: Any = None  # refused unless "none"
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None  # the legacy form of tools: refused when non-empty
    function_call: Any = None
    ignore_eos: bool = False  # vLLM's extension: generate all max_tokens even past end-of-sequence
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: no end-of-sequence before this many tokens
    dynllava: DynllavaOptions | None = None


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Validate a raw JSON body; ApiError(400) for malformed JSON or the first bad field."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"malformed JSON: {first['msg']}") from None
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where or 'body'}: {first['msg']}", param=where or None) from None
    if request.n != 1:
        raise ApiError(400, "n: only n=1 is supported", param="n")
    unsupported = {"tools": bool(request.tools), "functions": bool(request.functions),
                   "tool_choice": request.tool_choice not in (None, "none"),
                   "function_call": request.function_call not in (None, "none"),
                   "response_format": request.response_format is not None and request.response_format.type != "text"}
    for name, used in unsupported.items():
        if used:
            raise ApiError(400, f"{name}: not supported by this server (see the README's list of supported "
                                f"fields)", param=name)
    for i, message in enumerate(request.messages):
        if message.role == "tool" or message.tool_calls or message.tool_call_id:
            raise ApiError(400, f"messages.{i}: tool messages and tool calls are not supported by this server",
                           param=f"messages.{i}")
        if message.content is None and message.role != "assistant":
            raise ApiError(400, f"messages.{i}.content: required in a {message.role} message",
                           param=f"messages.{i}.content")
    if request.top_logprobs and not request.logprobs:
        raise ApiError(400, "top_logprobs: requires logprobs: true", param="top_logprobs")
    for key in request.logit_bias or {}:
        if not key.isdigit():
            raise ApiError(400, f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias")
    stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stops) > 4:
        raise ApiError(400, "stop: at most 4 sequences", param="stop")
    return request


def stop_list(request: ChatCompletionRequest) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_body(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict:
    """OpenAI's `logprobs` of a choice from (token text, logprob, [(alternative text, logprob)]) per token."""
    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top]} for t, lp, top in entries],
            "refusal": None}


def completion_body(cid: str, model: str, text: str, finish_reason: str, usage_: dict, extension: dict,
                    logprobs: dict | None = None) -> dict:
    """A non-streamed chat.completion."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish_reason}],
            "usage": usage_, "dynllava": extension}


def chunk_body(cid: str, model: str, delta: dict, finish_reason: str | None = None,
               usage_: dict | None = None, extension: dict | None = None, no_choices: bool = False,
               include_usage: bool = False, logprobs: dict | None = None) -> dict:
    """One chat.completion.chunk (the usage chunk has no choices). include_usage: the client asked for usage,
    so every chunk has a `usage` key, null until the last (as OpenAI sends it)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if no_choices else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                               "finish_reason": finish_reason}]}
    if usage_ is not None or include_usage:
        body["usage"] = usage_
    if extension is not None:
        body["dynllava"] = extension
    return body
