"""OpenAI-compatible request models and the error body, in one place.

Nothing a client sends that would change the output is ignored: a known OpenAI / vLLM
parameter the server does not implement is refused (a 400 naming it) unless its value leaves
the output unchanged. A parameter nobody defines is logged as ignored, as vLLM does.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from jaxllm.sampling import SamplingParams

log = logging.getLogger("jaxllm.serve")

INT32_MAX = 2**31 - 1  # the engine's device arrays are int32

# Known OpenAI / vLLM parameters the server does not implement, each with the values that
# change nothing (accepted, so clients sending defaults keep working).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
}
_UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
}
# Accepted and meaningless here: only bookkeeping, or only meaningful with refused tools.
_HARMLESS = frozenset({"user", "parallel_tool_calls"})


def _refuse_extras(extras: dict[str, Any], unsupported: dict[str, tuple[Any, ...]]) -> None:
    """Raises ValueError naming every unknown field, and every unsupported one whose value
    would change the output."""
    problems = []
    for name, value in extras.items():
        if name in unsupported:
            if not any(value == ok and type(value) is type(ok) for ok in unsupported[name]):
                problems.append(f"'{name}' is not supported by this server (got {value!r:.80})")
        elif name not in _HARMLESS:
            log.warning("ignoring unknown request parameter %r", name)
    if problems:
        raise ValueError("; ".join(problems))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage in every chunk


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")  # checked whole by _check_extras

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, le=INT32_MAX)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    best_of: int | None = Field(default=None, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)  # vLLM's
    # Penalties with vLLM's semantics (``jaxllm.sampling.SamplingParams``); null = off.
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=1.0, gt=0.0, allow_inf_nan=False)  # vLLM's

    _unsupported = _UNSUPPORTED

    @property
    def scores_prompt(self) -> int | None:
        """Top alternatives to return per prompt token, or None when the prompt is not
        scored (``prompt_logprobs``; ``echo`` with ``logprobs`` on completions)."""
        return self.prompt_logprobs

    @model_validator(mode="after")
    def _check_extras(self):
        _refuse_extras(self.model_extra or {}, self._unsupported)
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"'best_of' other than n is not supported (got best_of="
                             f"{self.best_of}, n={self.n})")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError(f"max_tokens={self.max_tokens} and max_completion_tokens="
                             f"{self.max_completion_tokens} disagree: give one")
        if self.token_limit == 0 and self.scores_prompt is None:
            field = ("max_completion_tokens" if self.max_completion_tokens is not None
                     else "max_tokens")
            raise ValueError(f"{field}=0 generates nothing: it is only allowed to score the "
                             f"prompt (echo with logprobs, or prompt_logprobs)")
        if self.scores_prompt is not None and self.stream:
            raise ValueError("prompt log-probabilities (echo with logprobs, prompt_logprobs) "
                             "are not supported with stream=true")
        return self

    @property
    def token_limit(self) -> int | None:
        """The completion's length limit (``max_completion_tokens`` or ``max_tokens``)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def sampling(self, max_tokens: int | None, seed_offset: int) -> SamplingParams:
        seed = None if self.seed is None else (self.seed + seed_offset) % 2**63
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p, seed=seed, max_tokens=max_tokens,
                              stop_token_ids=tuple(self.stop_token_ids or ()),
                              prompt_logprobs=self.scores_prompt,
                              logit_bias=self.bias_pairs(), min_tokens=self.min_tokens,
                              presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0,
                              repetition_penalty=(1.0 if self.repetition_penalty is None
                                                  else self.repetition_penalty))

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs; a key that is not an integer is refused."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            try:
                pairs.append((int(key), bias))
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        return tuple(pairs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)

    echo: bool = False  # the prompt comes back before the completion (and its logprobs)

    @model_validator(mode="after")
    def _check_echo(self):
        if self.echo and self.stream:
            raise ValueError("'echo' is not supported with stream=true")
        return self

    _unsupported = {**_UNSUPPORTED, **_UNSUPPORTED_COMPLETION}

    @property
    def scores_prompt(self) -> int | None:
        echoed = self.logprobs if self.echo else None
        wanted = [n for n in (self.prompt_logprobs, echoed) if n is not None]
        return max(wanted) if wanted else None


_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


class ContentPart(BaseModel):
    """One part of a chat message's content: only text parts are supported."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type in _IMAGE_PARTS:
            raise ValueError("image input is not supported yet")
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported (only 'text')")
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        return self


# A string, or a list of parts; tagged so a bad part's error names only the part's field.
Content = Annotated[Annotated[str, Tag("text")] | Annotated[list[ContentPart], Tag("parts")],
                    Discriminator(lambda v: "text" if isinstance(v, str) else "parts")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. 'name', handed to the chat template

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Content | None = None

    def text(self) -> str | None:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


def error_body(message: str, status: int, kind: str = "BadRequestError") -> dict[str, Any]:
    return {"object": "error", "message": message, "type": kind, "code": status}
