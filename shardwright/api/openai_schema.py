"""The OpenAI wire format of completions: request models, response and chunk bodies, error bodies.

Requests are checked strictly: a parameter this server does not implement (`logprobs`,
`logit_bias`, ...) or does not know is refused with a 400 naming it, never ignored. Parameters left
at OpenAI's no-op values (`logit_bias: null`, `logprobs: null`, ...) are accepted.

Several choices: `n` choices per prompt, and for completions a list of prompts; choice
`i * n + j` is prompt i's j-th sample (OpenAI's order). Choice j > 0 of a seeded request samples
with `derive_seed(seed, j)`, so choice 0 equals the same request with `n: 1`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shardwright.serving.sampling import MAX_LOGPROBS, SamplingParams, derive_seed

DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 64  # prompts x n in one request: each is a request of its own in the engine
# OpenAI parameters this server does not implement, with the value that means "off".
NOT_IMPLEMENTED: dict[str, Any] = {
    "best_of": 1, "echo": False, "suffix": None,
    "logit_bias": None,
    "tools": None, "tool_choice": None, "functions": None, "function_call": None, "response_format": None,
    "parallel_tool_calls": None,
}
IGNORED = {"user", "metadata", "store", "service_tier"}  # bookkeeping fields that change no output


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable",
             504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices.")


class _Common(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names, our extensions last)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="The deployment's name (as listed by GET /v1/models).")
    max_tokens: int | None = Field(None, description="Most new tokens (default 16).")
    temperature: float = Field(1.0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling mass, (0, 1].")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings; text is cut before the first.")
    stream: bool = Field(False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (include_usage).")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt.")
    presence_penalty: float = Field(0.0, description="Subtract from each generated token's logit, -2..2.")
    frequency_penalty: float = Field(0.0, description="Times each token's count among generated ones, -2..2.")
    top_k: int = Field(0, description="Extension: keep the k most likely tokens; 0 is off.")
    repetition_penalty: float = Field(1.0, description="Extension: CTRL penalty over prompt and output, > 0.")
    ignore_eos: bool = Field(False, description="Extension: generate past end-of-sequence tokens.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extension: token ids that end generation.")

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED:
                continue
            if name not in NOT_IMPLEMENTED:
                raise OpenAIError(400, f"unknown parameter {name!r}: remove it", param=name,
                                  code="unknown_parameter")
            if value != NOT_IMPLEMENTED[name]:
                raise OpenAIError(400, f"parameter {name!r}={value!r} is not supported by this server; "
                                  f"omit it or send {json.dumps(NOT_IMPLEMENTED[name])}", param=name, code="unsupported_parameter")
        return self

    def _logprobs(self) -> int | None:
        """SamplingParams.logprobs of this request (None: off)."""
        return None

    def choice_params(self, max_tokens: int | None = None) -> list[SamplingParams]:
        """The sampling parameters of the n choices of one prompt (see the module's docstring)."""
        first = self.sampling_params(max_tokens)
        if first.seed is None:
            return [first] * self.n
        return [first] + [first.model_copy(update={"seed": derive_seed(first.seed, j)}) for j in range(1, self.n)]

    def sampling_params(self, max_tokens: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        fields = {"max_tokens": max_tokens or self.max_tokens or DEFAULT_MAX_TOKENS, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed, "stop": stop,
                  "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos,
                  "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                  "repetition_penalty": self.repetition_penalty, "logprobs": self._logprobs()}
        try:
            return SamplingParams(**fields)
        except ValidationError as err:
            first = err.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else None
            raise OpenAIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from err


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="Text or token ids, or a list of prompts (each answered with n choices).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Each token's logprob and this many most likely alternatives.")

    def _logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, at most MAX_CHOICES choices in all."""
        prompt = self.prompt
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = list(prompt) if many else [prompt]
        if len(prompts) * self.n > MAX_CHOICES:
            raise OpenAIError(400, f"prompt: {len(prompts)} prompts x n={self.n} is {len(prompts) * self.n} "
                              f"choices, over the limit of {MAX_CHOICES}: split the request", param="prompt",
                              code="invalid_value")
        return prompts


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(description="Who speaks.")
    content: str = Field(description="The message text.")


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, description="Most new tokens (newer name of max_tokens).")
    logprobs: bool = Field(False, description="Return each output token's logprob.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="With logprobs: this many most likely alternatives per token.")

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return self

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def parse(model: type[_Common], body: Any) -> _Common:
    """Validate a request body; every failure is an OpenAIError 400 naming the parameter."""
    try:
        return model.model_validate(body)
    except OpenAIError:
        raise
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        raise OpenAIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from err


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish(reason: str | None) -> str | None:
    """OpenAI's finish reasons are 'stop' and 'length'; a cancelled request counts as stopped."""
    return None if reason is None else "length" if reason == "length" else "stop"


LogprobEntry = tuple[str, float, list[tuple[str, float]]]  # token text, its logprob, top (text, logprob)


def logprobs_body(chat: bool, entries: list[LogprobEntry] | None, offset: int = 0) -> dict | None:
    """OpenAI's `logprobs` of a choice (or chunk): for chat `{"content": [...]}`, for completions
    the legacy `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` (offsets from `offset`)."""
    if entries is None:
        return None
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())} for a, b in top]}
                            for t, lp, top in entries]}
    offsets, at = [], offset
    for t, _, _ in entries:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}


def choice(chat: bool, text: str, finish_reason: str | None, delta: bool, first: bool = False,
           index: int = 0, logprobs: dict | None = None) -> dict:
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if delta:
        body = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
        return {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def envelope(cid: str, chat: bool, model: str, chunk: bool, choices: list[dict], **extra) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": cid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
