"""Server-sent events for streamed completions: one chunk per token, ``data: [DONE]`` last."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from jaxllm.serve.choice import Choice
from jaxllm.serve.protocol import error_body


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
) -> AsyncIterator[str]:
    """The SSE body of a streamed request: every choice's deltas as they come, each choice's
    finish chunk, the usage chunk when asked for, then ``[DONE]``. ``continuous_usage``
    puts the usage so far in every chunk. An error after the status line went out is
    reported in-stream."""
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(c: Choice, text: str, new_logprobs: list, finish: str | None) -> dict[str, Any]:
        if chat:
            body = {"index": c.index, "delta": {"content": text} if text else {},
                    "logprobs": logprobs_of(new_logprobs), "finish_reason": finish}
        else:
            body = {"index": c.index, "text": text, "finish_reason": finish,
                    "logprobs": logprobs_of(new_logprobs)}
        usage = {"usage": usage_of()} if continuous_usage else {}
        return {**head, "object": chunk_kind, "choices": [body], **usage}

    out_queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        seen = 0
        try:
            async for _ in run_choice(c):
                new, seen = c.logprobs[seen:], len(c.logprobs)
                await out_queue.put((c, c.take_delta(), new))
        except Exception as e:  # reported in-stream: the status line has been sent
            await out_queue.put((c, e, None))
        await out_queue.put((c, None, None))

    if chat:
        for c in choices:
            yield sse({**head, "object": chunk_kind, "choices": [{
                "index": c.index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}]})
    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            c, delta, new_logprobs = await out_queue.get()
            if isinstance(delta, Exception):
                yield sse({"error": error_body(str(delta), getattr(delta, "status", 500),
                                               getattr(delta, "kind", "InternalServerError"))})
            elif delta is None:
                remaining -= 1
                yield sse(chunk(c, c.take_delta(), [], c.finish_reason or "abort"))
            elif delta or new_logprobs:  # one chunk per token, so clients can time them
                yield sse(chunk(c, delta, new_logprobs, None))
        if include_usage:
            yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage_of()})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
