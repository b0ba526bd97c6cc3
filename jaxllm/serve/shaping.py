"""How each endpoint shapes its choices: the whole choice of a response, the chunks of a
stream (opening, per token, finish) and the log-probabilities. One class per endpoint, so the
routes and ``stream_events`` never branch on which endpoint they serve."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxllm.serve.choice import (
    Choice,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    vllm_prompt_logprobs,
)
from jaxllm.serve.tools import CallStream, parse_tool_calls

TokenText = Callable[[int], str]


class Shaping:
    """The endpoint-specific part of serving a request's choices (``req`` is its body)."""

    kind: str  # the response's "object"
    chunk_kind: str  # a stream chunk's "object"
    id_prefix: str

    def __init__(self, token_text: TokenText, req: Any):
        self.token_text, self.req = token_text, req

    def logprobs(self, items: list) -> dict[str, Any] | None:
        raise NotImplementedError

    def final(self, c: Choice) -> dict[str, Any]:
        """The choice of a non-streamed response."""
        raise NotImplementedError

    def opening(self, c: Choice) -> list[dict[str, Any]]:
        """Chunk bodies sent for ``c`` before any token."""
        return []

    def delta(self, c: Choice, text: str, new_logprobs: list) -> dict[str, Any]:
        """The chunk body of new text (one token's worth)."""
        raise NotImplementedError

    def finish(self, c: Choice, reason: str) -> list[dict[str, Any]]:
        """The chunk bodies that end ``c`` (its remaining text and finish reason)."""
        raise NotImplementedError

    def _prompt_logprobs(self, c: Choice) -> dict[str, Any]:
        if self.req.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": vllm_prompt_logprobs(
            self.token_text, self.req.prompt_logprobs, c.request.prompt, c.prompt_scores or [])}


class CompletionShaping(Shaping):
    """``/v1/completions``: text choices; ``echo`` puts the prompt (``decode``) first."""

    kind = chunk_kind = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, token_text: TokenText, req: Any, decode: Callable[[list[int]], str]):
        super().__init__(token_text, req)
        self.decode = decode

    def logprobs(self, items: list) -> dict[str, Any] | None:
        return completion_logprobs(self.token_text, self.req.logprobs, items)

    def final(self, c: Choice) -> dict[str, Any]:
        c.take_delta()
        text, logprobs, prompt = c.text, self.logprobs(c.logprobs), c.request.prompt
        if self.req.echo:
            text = self.decode(prompt) + text
            if self.req.logprobs is not None:
                logprobs = echo_logprobs(self.token_text, self.req.logprobs, prompt,
                                         c.prompt_scores or [], logprobs if c.token_ids else None)
        return {"index": c.index, "text": text, "finish_reason": c.finish_reason,
                "logprobs": logprobs, **self._prompt_logprobs(c)}

    def delta(self, c: Choice, text: str, new_logprobs: list) -> dict[str, Any]:
        return {"index": c.index, "text": text, "finish_reason": None,
                "logprobs": self.logprobs(new_logprobs)}

    def finish(self, c: Choice, reason: str) -> list[dict[str, Any]]:
        return [{"index": c.index, "text": c.take_delta(), "finish_reason": reason,
                 "logprobs": self.logprobs([])}]


class ChatShaping(Shaping):
    """``/v1/chat/completions``: assistant messages; with ``tool_names`` (the functions the
    request lets the model call) the text is read back as tool calls."""

    kind, chunk_kind = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, token_text: TokenText, req: Any, tool_names: list[str]):
        super().__init__(token_text, req)
        self.tool_names = tool_names
        self.named = getattr(req, "tool_mode", None) == "named"
        self._calls: dict[int, CallStream] = {}

    def logprobs(self, items: list) -> dict[str, Any] | None:
        return chat_logprobs(self.token_text, bool(self.req.logprobs),
                             self.req.top_logprobs or 0, items)

    def final(self, c: Choice) -> dict[str, Any]:
        c.take_delta()
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        finish = c.finish_reason
        if self.tool_names and finish == "stop" and (
                calls := parse_tool_calls(c.text, self.tool_names)):
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "stop" if self.named else "tool_calls"
        return {"index": c.index, "message": message, "logprobs": self.logprobs(c.logprobs),
                "finish_reason": finish, **self._prompt_logprobs(c)}

    def opening(self, c: Choice) -> list[dict[str, Any]]:
        if self.tool_names:
            self._calls[c.index] = CallStream(self.tool_names, named=self.named)
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None}]

    def delta(self, c: Choice, text: str, new_logprobs: list) -> dict[str, Any]:
        stream = self._calls.get(c.index)
        delta = stream.delta(text) if stream else {"content": text} if text else {}
        return self._body(c, delta, new_logprobs, None)

    def finish(self, c: Choice, reason: str) -> list[dict[str, Any]]:
        stream = self._calls.get(c.index)
        if stream is None:
            text = c.take_delta()
            return [self._body(c, {"content": text} if text else {}, [], reason)]
        deltas, reason = stream.finish(c.take_delta(), reason)
        return [self._body(c, d, [], None) for d in deltas] + [self._body(c, {}, [], reason)]

    def _body(self, c: Choice, delta: dict[str, Any], new_logprobs: list,
              finish: str | None) -> dict[str, Any]:
        return {"index": c.index, "delta": delta, "logprobs": self.logprobs(new_logprobs),
                "finish_reason": finish}
