"""OpenAI-compatible request models and the error body, in one place (the response models,
which only the OpenAPI schema uses, are ``jaxllm.serve.openapi``).

Nothing a client sends that would change the output is ignored: a known OpenAI / vLLM
parameter the server does not implement is refused (a 400 naming it) unless its value leaves
the output unchanged. A parameter nobody defines is logged as ignored, as vLLM does.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from jaxllm.sample.grammar import ANY_JSON_OBJECT, StructuredOutput
from jaxllm.sample.sampling import SamplingParams
from jaxllm.serve.tools import call_schema

log = logging.getLogger("jaxllm.serve")

INT32_MAX = 2**31 - 1  # the engine's device arrays are int32

# Known OpenAI / vLLM parameters the server does not implement, each with the values that
# change nothing (accepted, so clients sending defaults keep working).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),  # the deprecated forms of tools / tool_choice
    "function_call": (None, "none"),
    "guided_whitespace_pattern": (None,),
    "guided_decoding_backend": (None, "auto", "guidance", "llguidance"),
}
_UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
}
# Accepted and meaningless here: only bookkeeping.
_HARMLESS = frozenset({"user"})


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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output always matches the schema, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput.json_schema(ANY_JSON_OBJECT)
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise ValueError("response_format of type 'json_schema' needs json_schema.schema")
        return StructuredOutput.json_schema(self.json_schema.schema_,
                                            closed=bool(self.json_schema.strict))


class StructuredOutputsParams(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of json, regex, choice, grammar,
    json_object."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # JSON is always written without free whitespace here (True is what happens anyway);
    # with one backend there is nothing to fall back to.
    disable_any_whitespace: Literal[True] | None = None
    disable_fallback: bool | None = None
    disable_additional_properties: bool = False

    def constraints(self) -> list[tuple[str, StructuredOutput]]:
        found = []
        if self.json_ is not None:
            found.append(("structured_outputs.json", StructuredOutput.json_schema(
                self.json_, closed=self.disable_additional_properties)))
        if self.regex is not None:
            found.append(("structured_outputs.regex", StructuredOutput("regex", self.regex)))
        if self.choice is not None:
            found.append(("structured_outputs.choice", StructuredOutput.choice(self.choice)))
        if self.grammar is not None:
            found.append(("structured_outputs.grammar", StructuredOutput("grammar",
                                                                         self.grammar)))
        if self.json_object:
            found.append(("structured_outputs.json_object",
                          StructuredOutput.json_schema(ANY_JSON_OBJECT)))
        return found


class SamplingRequest(BaseModel):
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
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None  # vLLM's
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names for the same
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Penalties with vLLM's semantics (``jaxllm.sample.sampling.SamplingParams``); null = off.
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=1.0, gt=0.0, allow_inf_nan=False)  # vLLM's

    _unsupported = _UNSUPPORTED

    def constraints(self) -> list[tuple[str, StructuredOutput]]:
        """Every structured-output constraint the request asks for, with its field name."""
        found = []
        if self.response_format is not None and (
                fmt := self.response_format.structured()) is not None:
            found.append((f"response_format ({self.response_format.type})", fmt))
        if self.structured_outputs is not None:
            found += self.structured_outputs.constraints()
        if self.guided_json is not None:
            found.append(("guided_json", StructuredOutput.json_schema(self.guided_json)))
        if self.guided_regex is not None:
            found.append(("guided_regex", StructuredOutput("regex", self.guided_regex)))
        if self.guided_choice is not None:
            found.append(("guided_choice", StructuredOutput.choice(self.guided_choice)))
        if self.guided_grammar is not None:
            found.append(("guided_grammar", StructuredOutput("grammar", self.guided_grammar)))
        return found

    def structured(self) -> StructuredOutput | None:
        """The one constraint on the output, or None (two or more are refused)."""
        found = self.constraints()
        if len(found) > 1:
            raise ValueError("give at most one structured-output constraint; got "
                             + ", ".join(name for name, _ in found))
        return found[0][1] if found else None

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
        self.structured()  # at most one constraint
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
                              structured=self.structured(),
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


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)

    echo: bool = False  # the prompt comes back before the completion (and its logprobs)
    # Images of the prompt, whose ``<|image|>`` placeholders take them in order (vLLM's
    # offline ``multi_modal_data`` form): {"image": URL or [URL, ...]}, data: or http(s).
    multi_modal_data: dict[str, str | list[str]] | None = None

    @model_validator(mode="after")
    def _check_multi_modal_data(self):
        unknown = sorted(set(self.multi_modal_data or {}) - {"image"})
        if unknown:
            raise ValueError(f"multi_modal_data: modality {unknown} is not supported (only "
                             f"'image')")
        return self

    def image_urls(self) -> list[tuple[str, str]]:
        """(field, URL) of each image in ``multi_modal_data``, in order."""
        urls = (self.multi_modal_data or {}).get("image") or []
        if isinstance(urls, str):
            return [("multi_modal_data.image", urls)]
        return [(f"multi_modal_data.image.{i}", u) for i, u in enumerate(urls)]

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


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str  # a data: URL (base64) or an http(s) URL of an allowed host
    detail: Literal["auto", "low", "high"] | None = None

    @model_validator(mode="after")
    def _detail(self):
        if self.detail not in (None, "auto"):
            raise ValueError(f"image_url.detail {self.detail!r} is not supported: Llama 4 tiles "
                             f"every image the same way (use 'auto' or leave it out)")
        return self


class ContentPart(BaseModel):
    """One part of a chat message's content: text, or an image (``image_url``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _known_type(self):
        if self.type == "image_url":
            if self.image_url is None:
                raise ValueError("an image_url content part needs 'image_url': {'url': ...}")
            return self
        if self.type in ("input_image", "image"):
            raise ValueError(f"content part type {self.type!r} is not supported: send images "
                             f"as {{'type': 'image_url', 'image_url': {{'url': ...}}}}")
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported (only 'text' "
                             f"and 'image_url')")
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

    def image_urls(self) -> list[str]:
        """The URLs of the message's image parts, in order."""
        if not isinstance(self.content, list):
            return []
        return [p.image_url.url for p in self.content if p.image_url is not None]

    def text(self, image_placeholder: str = "") -> str | None:
        """The content as one string: text parts joined, each image part as
        ``image_placeholder`` (the tokenizer's ``<|image|>``, expanded after tokenizing)."""
        if isinstance(self.content, list):
            return "".join(image_placeholder if p.image_url is not None else p.text or ""
                           for p in self.content)
        return self.content


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-.]{0,63}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema (an object's); None: none
    strict: bool | None = None  # arguments are constrained when the choice forces a call


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ChosenFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_tools(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise ValueError(f"tool_choice={self.chosen_tool or choice!r} needs 'tools'")
        if self.chosen_tool is not None and self.chosen_tool not in names:
            raise ValueError(f"tool_choice names function {self.chosen_tool!r}, which is not "
                             f"in tools ({', '.join(names)})")
        return self

    @property
    def tool_mode(self) -> str:
        """"none", "auto", "required" or "named" (a function chosen by name)."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def chosen_tool(self) -> str | None:
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return None

    def tool_dicts(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def constraints(self) -> list[tuple[str, StructuredOutput]]:
        self._check_tools()  # the base class's checks run first, and ask for these
        found = super().constraints()
        if self.tool_mode in ("required", "named"):
            schema = call_schema(self.tool_dicts(), self.chosen_tool, self.parallel_tool_calls)
            found.append((f"tool_choice ({self.tool_mode})",
                          StructuredOutput.json_schema(schema, closed=True)))
        return found


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
