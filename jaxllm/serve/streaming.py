"""Server-sent events for streamed completions: one chunk per token, ``data: [DONE]`` last."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from jaxllm.serve.choice import Choice
from jaxllm.serve.protocol import error_body
from jaxllm.serve.shaping import Shaping


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def stream_events(
    choices: list[Choice],
    run_choice: Callable[[Choice], AsyncIterator[None]],
    shaping: Shaping,
    *,
    head: dict[str, Any],
    include_usage: bool,
    usage_of: Callable[[], dict[str, int]],
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """The SSE body of a streamed request: every choice's opening chunks, its deltas as
    they come and its finish chunks (shaped by the endpoint's ``shaping``), the usage chunk
    when asked for, then ``[DONE]``. ``continuous_usage`` puts the usage so far in every
    chunk. An error after the status line went out is reported in-stream."""

    def chunk(body: dict[str, Any], usage_now: dict[str, int] | None = None) -> str:
        # The usage when the chunk's tokens arrived, not when it is written out.
        usage = {"usage": usage_now or usage_of()} if continuous_usage else {}
        return sse({**head, "object": shaping.chunk_kind, "choices": [body], **usage})

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

    for c in choices:
        for body in shaping.opening(c):
            yield sse({**head, "object": shaping.chunk_kind, "choices": [body]})
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
                for body in shaping.finish(c, c.finish_reason or "abort"):
                    yield chunk(body)
            elif delta or new_logprobs:  # one chunk per token, so clients can time them
                yield chunk(shaping.delta(c, delta, new_logprobs), usage_now)
        if include_usage:
            yield sse({**head, "object": shaping.chunk_kind, "choices": [], "usage": usage_of()})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
