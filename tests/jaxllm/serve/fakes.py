"""Small stand-ins for the serve tests: a byte tokenizer and engine outputs built by hand."""

from __future__ import annotations

from collections.abc import Sequence

from jaxllm.engine.engine import RequestOutput, TokenLogprob
from jaxllm.engine.request import Request
from jaxllm.sample.sampling import SamplingParams


class ByteCodec:
    """Token id i < 256 is the byte i; ids from 256 up are special and decode to nothing."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = b"" if skip_special_tokens else b"<s>"
        return b"".join(bytes([i]) if i < 256 else special for i in ids).decode(
            "utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return bytes([token_id]).decode("utf-8", errors="replace") if token_id < 256 else "<s>"


def ids(text: str) -> list[int]:
    return list(text.encode())


def request(rid: str = "r", stop_ids: Sequence[int] = ()) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=100, seed=0),
                   stop_ids=frozenset(stop_ids))


def output(rid: str, new: Sequence[int], finish: str | None = None, *,
           logprob: float = -1.0, stop_token: int | None = None) -> RequestOutput:
    """One engine output; each token's log-probability is ``logprob`` with itself as top-1
    and token 0 second at ``logprob - 1``; ``stop_token``: the last token is the stop id that
    ended it (as the engine says)."""
    lps = [TokenLogprob(t, logprob, [(t, logprob), (0, logprob - 1)]) for t in new]
    return RequestOutput(rid, list(new), lps, finish is not None, finish, 3, 0, len(new),
                         stop_token=stop_token)
