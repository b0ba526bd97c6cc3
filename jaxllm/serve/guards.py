"""ASGI guards around the app: the API key, a request body size limit, and a last-resort error
handler that answers 500 without re-raising (a re-raised error makes the server drop the keep-alive
connection, so the client's next request on it would be reset)."""

from __future__ import annotations

import json
import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxllm.serve.protocol import error_body

log = logging.getLogger("jaxllm.serve")


class Guards:
    """Refuses /v1 requests without ``api_key`` (when set) with a 401, and bodies over
    ``max_body_bytes`` with a 413 before reading them (by their Content-Length) or as soon as
    they pass it (chunked: an HTTPException raised in the reading handler); turns any error
    escaping the app before its response started into a JSON 500."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None = None):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.authorization = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if (self.authorization and scope["path"].startswith("/v1")
                and headers.get(b"authorization") != self.authorization):
            await _send_error(send, "invalid API key", 401, "AuthenticationError")
            return
        limit = self.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, _too_large(int(length), limit), 413, "RequestTooLargeError")
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, _too_large(received, limit, at_least=True))
            return message

        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except Exception as e:
            if started:  # the status line is out: nothing to answer with
                raise
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            await _send_error(send, f"internal error: {type(e).__name__}: {e}", 500,
                              "InternalServerError")


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return (f"the request body is {'over ' if at_least else ''}{size} bytes, more than the "
            f"limit of {limit} bytes (--max-request-bytes)")


async def _send_error(send: Send, message: str, status: int, kind: str) -> None:
    body = json.dumps(error_body(message, status, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
