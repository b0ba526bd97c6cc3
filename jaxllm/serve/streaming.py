"""Server-sent events for streamed completions: one chunk per token, ``data: [DONE]`` last."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from jaxllm.serve.choice import Choice
from jaxllm.serve.protocol import error_body
from jaxllm.serve.tools import CallStream


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def stream_events(
    choices: list[Choice],
    run_choice: Callable[[Choice], AsyncIterator[None]],
    *,
    head: dict[str, Any],
    chat: bool,
    logprobs_of: Callable[[list], dict[str, Any] | None],
    include_usage: bool,
    usage_of: Callable[[], dict[str, int]],
    continuous_usage: bool = False,
    call_stream: Callable[[], CallStream] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of a streamed request: every choice's deltas as they come, each choice's
    finish chunk, the usage chunk when asked for, then ``[DONE]``. ``continuous_usage``
    puts the usage so far in every chunk. With tools (``call_stream``), a chat choice's
    calls come as ``tool_calls`` deltas. An error after the status line went out is
    reported in-stream."""
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    calls = {c.index: call_stream() for c in choices} if chat and call_stream else {}

    def chunk(c: Choice, text: str, new_logprobs: list, finish: str | None,
              delta: dict[str, Any] | None = None,
              usage_now: dict[str, int] | None = None) -> dict[str, Any]:
        if chat:
            if delta is None:
                stream = calls.get(c.index)
                delta = stream.delta(text) if stream else {"content": text} if text else {}
            body = {"index": c.index, "delta": delta,
                    "logprobs": logprobs_of(new_logprobs), "finish_reason": finish}
        else:
            body = {"index": c.index, "text": text, "finish_reason": finish,
                    "logprobs": logprobs_of(new_logprobs)}
        # The usage when the chunk's tokens arrived, not when it is written out.
        usage = {"usage": usage_now or usage_of()} if continuous_usage else {}
        return {**head, "object": chunk_kind, "choices": [body], **usage}

    out_queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        seen = 0
        try:
            async for _ in run_choice(c):
                new, seen = c.logprobs[seen:], len(c.logprobs)
                await out_queue.put((c, c.take_delta(), new,
                                     usage_of() if continuous_usage else None))
        except Exception as e:  # reported in-stream: the status line has been sent
            await out_queue.put((c, e, None, None))
        await out_queue.put((c, None, None, None))

    if chat:
        for c in choices:
            yield sse({**head, "object": chunk_kind, "choices": [{
                "index": c.index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}]})
    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            c, delta, new_logprobs, usage_now = await out_queue.get()
            if isinstance(delta, Exception):
                yield sse({"error": error_body(str(delta), getattr(delta, "status", 500),
                                               getattr(delta, "kind", "InternalServerError"))})
            elif delta is None:
                remaining -= 1
                reason = c.finish_reason or "abort"
                if (stream := calls.get(c.index)) is not None:
                    deltas, reason = stream.finish(c.take_delta(), reason)
                    for d in deltas:
                        yield sse(chunk(c, "", [], None, d))
                    yield sse(chunk(c, "", [], reason, {}))
                else:
                    yield sse(chunk(c, c.take_delta(), [], reason))
            elif delta or new_logprobs:  # one chunk per token, so clients can time them
                yield sse(chunk(c, delta, new_logprobs, None, usage_now=usage_now))
        if include_usage:
            yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage_of()})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
