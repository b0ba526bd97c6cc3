"""One generated choice as the client sees it: text cut at stop strings, incremental
detokenization, finish reason, and the OpenAI shapes of its log-probabilities."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from jaxllm.engine import Request as EngineRequest
from jaxllm.engine import RequestOutput
from jaxllm.engine.engine import TokenLogprob
from jaxllm.serve.tokenizer import IncrementalDetokenizer, TextCodec

TokenText = Callable[[int], str]  # a token id as text (its piece, or "token_id:N")


@dataclasses.dataclass
class Choice:
    """One generated sequence: its tokens, text (cut at a stop string) and finish reason.

    ``include_stop`` keeps the stop string or stop token's text in the text;
    ``skip_special`` leaves special tokens' text out of it.
    """

    index: int
    request: EngineRequest
    stops: list[str]
    codec: TextCodec | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[Any] = dataclasses.field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    inter_token: list[float] = dataclasses.field(default_factory=list)  # seconds between tokens
    num_cached_tokens: int = 0  # of the prompt, from the prefix cache
    queued_seconds: float | None = None  # waiting before the engine first ran it
    prompt_scores: list[Any] | None = None  # prompt tokens 1.. scored, when asked for
    include_stop: bool = False
    skip_special: bool = True

    def __post_init__(self):
        self._detok = (IncrementalDetokenizer(self.codec, self.skip_special) if self.codec
                       else None)

    def feed(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if self.last_token_at is not None:
            self.inter_token.append(now - self.last_token_at)
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.num_cached_tokens = out.num_cached_tokens
        if self.queued_seconds is None:
            self.queued_seconds = out.queued_seconds
        if out.prompt_logprobs is not None:
            self.prompt_scores = out.prompt_logprobs
        ids = out.new_token_ids
        self.token_ids += ids
        self.logprobs += out.logprobs
        # The engine says when the last token is the stop id that ended the request.
        hide_stop = out.stop_token is not None and not self.include_stop
        visible = ids[:-1] if hide_stop else ids
        if self._detok is not None:
            self.text += self._detok.add(visible)
        if out.finished:
            self.finish_reason = out.finish_reason
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                end = at + len(stop) if self.include_stop else at
                self.text, self.finish_reason = self.text[:end], "stop"

    def take_delta(self) -> str:
        """New text that can no longer turn out to be part of a stop string."""
        hold = 0 if self.finish_reason else max((len(s) for s in self.stops), default=1) - 1
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta


def token_text_fn(codec: TextCodec | None) -> TokenText:
    return codec.token_text if codec else (lambda token_id: f"token_id:{token_id}")


def completion_logprobs(token_text: TokenText, top_n: int | None,
                        items: Sequence[TokenLogprob]) -> dict[str, Any] | None:
    """The /v1/completions ``logprobs`` object (None when not asked for)."""
    if top_n is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for item in items:
        text = token_text(item.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(item.logprob)
        out["top_logprobs"].append({token_text(t): lp for t, lp in item.top[:top_n]})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(token_text: TokenText, wanted: bool, top_n: int, items: Sequence[TokenLogprob]
                  ) -> dict[str, Any] | None:
    """The /v1/chat/completions ``logprobs`` object (None when not asked for)."""
    if not wanted:
        return None

    def entry(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(i.token_id, i.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in i.top[:top_n]]}
                        for i in items]}


def echo_logprobs(token_text: TokenText, top_n: int, prompt: Sequence[int],
                  prompt_scores: Sequence[TokenLogprob], completion: dict[str, Any] | None
                  ) -> dict[str, Any]:
    """The completions ``logprobs`` object with the prompt first (``echo``): the first prompt
    token has no log-probability (None), as in OpenAI's API; offsets run over both."""
    first = {"tokens": [token_text(prompt[0])], "token_logprobs": [None],
             "top_logprobs": [None], "text_offset": [0]}
    scored = completion_logprobs(token_text, top_n, prompt_scores)
    out = {k: first[k] + scored[k] for k in first}
    offset = len(first["tokens"][0])
    out["text_offset"] = [0] + [offset + o for o in scored["text_offset"]]
    offset = out["text_offset"][-1] + len(out["tokens"][-1])
    if completion is not None:
        for k in ("tokens", "token_logprobs", "top_logprobs"):
            out[k] += completion[k]
        out["text_offset"] += [offset + o for o in completion["text_offset"]]
    return out


def vllm_prompt_logprobs(token_text: TokenText, top_n: int, prompt: Sequence[int],
                         prompt_scores: Sequence[TokenLogprob]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: None for the first token, then per token a map from token
    id to its log-probability, rank (1-based, among the top 20 we keep; None beyond) and
    text, for the actual token and the ``top_n`` most likely ones."""
    out: list[dict[str, Any] | None] = [None]
    for item in prompt_scores:
        ranks = {t: r for r, (t, _) in enumerate(item.top, start=1)}
        entries = {item.token_id: item.logprob, **dict(item.top[:top_n])}
        out.append({str(t): {"logprob": lp, "rank": ranks.get(t),
                             "decoded_token": token_text(t)} for t, lp in entries.items()})
    return out

