"""The one bucket policy: every shape a compiled program sees, and every length check.

``BucketPolicy`` is also the engine's configuration: built once from the model (and the CLI)
and passed down whole. It owns ``max_model_len`` and the step limits; the page size and page
count belong to its ``cache`` (``jaxllm.kv_cache.CacheConfig``).

Request lengths vary; compiled shapes do not. Prompt lengths round up to a length bucket
(powers of two, then ``max_model_len`` itself), batches to a batch bucket, and every sequence
owns a block table exactly ``ceil(max_model_len / page_size)`` pages wide. Masks, not shapes,
carry the raggedness, so a request near ``max_model_len`` runs a program that was compiled and
tested before it arrived.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING, Any

import jax

from jaxllm.kv_cache import CacheConfig
from jaxllm.layout import pages_for

if TYPE_CHECKING:
    from jaxllm.config import Llama4Config

GPU_MAX_NUM_BATCHED_TOKENS = 8192  # vLLM's default for an H100 server
CPU_MAX_NUM_BATCHED_TOKENS = 512  # keeps CPU steps (and the bundled model's warm-up) short
GPU_MAX_NUM_SEQS = 256  # vLLM's default: sequences running at once
CPU_MAX_NUM_SEQS = 8  # a CPU runs few sequences well, and warms up fewer batch buckets


def default_max_num_seqs(on_gpu: bool | None = None) -> int:
    """Sequences that run at once unless told otherwise (``on_gpu``: the backend's)."""
    gpu = jax.default_backend() == "gpu" if on_gpu is None else on_gpu
    return GPU_MAX_NUM_SEQS if gpu else CPU_MAX_NUM_SEQS


def default_max_num_batched_tokens(on_gpu: bool | None = None) -> int:
    """Rows of one engine step unless told otherwise: independent of ``max_model_len`` (chunked
    prefill splits longer prompts), so step memory and the program count stay bounded.
    ``on_gpu``: for a GPU or not (default: this backend)."""
    gpu = jax.default_backend() == "gpu" if on_gpu is None else on_gpu
    return GPU_MAX_NUM_BATCHED_TOKENS if gpu else CPU_MAX_NUM_BATCHED_TOKENS


class ContextLengthError(ValueError):
    """A request does not fit in the model's context (the serving engine's wording)."""


def _powers_of_two_then(limit: int, start: int) -> tuple[int, ...]:
    sizes, n = [], start
    while n < limit:
        sizes.append(n)
        n *= 2
    sizes.append(limit)
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class BucketPolicy:
    max_model_len: int
    cache: CacheConfig = CacheConfig()
    chunk_size: int | None = None
    max_num_seqs: int = 8
    min_length_bucket: int = 16
    max_num_batched_tokens: int | None = None  # rows of one engine step (default below)

    @classmethod
    def for_model(cls, config: Llama4Config, *, dtype: Any, max_model_len: int | None = None,
                  page_size: int = 16, hybrid: bool = True, max_num_seqs: int | None = None,
                  max_num_batched_tokens: int | None = None,
                  on_gpu: bool | None = None) -> BucketPolicy:
        """The policy of ``config``'s model (``load_model`` and the dry run), its KV cache of
        ``dtype``: ``max_model_len`` defaults to the config's, the step limits to those of a
        GPU or not (``on_gpu``, default: this backend's)."""
        max_model_len = max_model_len or config.max_position_embeddings
        if max_model_len <= 0:
            raise ValueError(f"max_model_len={max_model_len} must be positive")
        max_num_seqs = max_num_seqs or default_max_num_seqs(on_gpu)
        if max_num_batched_tokens is None:  # no wider than max_num_seqs whole sequences
            max_num_batched_tokens = max(max_num_seqs, min(
                default_max_num_batched_tokens(on_gpu), max_num_seqs * max_model_len))
        return cls(max_model_len=max_model_len,
                   cache=CacheConfig(page_size=page_size, dtype=dtype, hybrid=hybrid),
                   chunk_size=config.attention_chunk_size, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens)

    def __post_init__(self):
        if self.max_num_batched_tokens is None:
            default = default_max_num_batched_tokens()
            object.__setattr__(self, "max_num_batched_tokens", max(self.max_num_seqs, min(
                default, self.max_num_seqs * self.max_model_len)))
        for name in ("max_model_len", "max_num_seqs", "min_length_bucket",
                     "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= 1")

    @property
    def page_size(self) -> int:
        return self.cache.page_size

    @property
    def pages_per_seq(self) -> int:
        """Block-table width: enough pages for ``max_model_len`` tokens, and no more."""
        return pages_for(self.max_model_len, self.page_size)

    def for_engine(self, num_pages: int | None = None,
                   max_num_batched_tokens: int | None = None) -> BucketPolicy:
        """This configuration with a sized cache (default: ``max_num_seqs`` sequences of
        ``max_model_len``) and, if given, another step width."""
        if num_pages is None:
            num_pages = self.max_num_seqs * self.pages_per_seq
        if max_num_batched_tokens is None:
            max_num_batched_tokens = self.max_num_batched_tokens
        if num_pages < self.pages_per_seq:
            raise ValueError(f"num_pages={num_pages} cannot hold one sequence of max_model_len="
                             f"{self.max_model_len} ({self.pages_per_seq} pages of "
                             f"{self.page_size} tokens)")
        return dataclasses.replace(
            self, cache=self.cache.with_pages(num_pages),
            max_num_batched_tokens=max_num_batched_tokens)

    @property
    def length_buckets(self) -> tuple[int, ...]:
        return _powers_of_two_then(self.max_model_len, min(self.min_length_bucket,
                                                            self.max_model_len))

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        return _powers_of_two_then(self.max_num_seqs, 1)

    @property
    def token_buckets(self) -> tuple[int, ...]:
        """Flat row counts of one engine step (prefill chunks and decode rows together)."""
        return _powers_of_two_then(self.max_num_batched_tokens,
                                   min(self.min_length_bucket, self.max_num_batched_tokens))

    def step_shapes(self) -> list[tuple[int, int]]:
        """Every (token bucket, batch bucket) an engine step can have: the programs to warm up.

        A step of b sequences has at least b rows, and its rows (one each for b - 1 sequences,
        the rest for the last) fit in ``max_model_len``."""
        return [(t, b) for t in self.token_buckets for b in self.batch_buckets
                if b <= t and t - b + 1 <= self.max_model_len]

    def token_bucket(self, rows: int) -> int:
        return self._bucket(rows, self.token_buckets, "step token count",
                            "max_num_batched_tokens")

    def length_bucket(self, length: int) -> int:
        return self._bucket(length, self.length_buckets, "prompt length", "max_model_len")

    def batch_bucket(self, batch: int) -> int:
        return self._bucket(batch, self.batch_buckets, "batch size", "max_num_seqs")

    @staticmethod
    def _bucket(n: int, buckets: tuple[int, ...], what: str, limit: str) -> int:
        if n < 1:
            raise ValueError(f"{what} {n} must be >= 1")
        i = bisect.bisect_left(buckets, n)
        if i == len(buckets):
            raise ValueError(f"{what} {n} exceeds {limit}={buckets[-1]}")
        return buckets[i]

    def check_length(self, length: int) -> None:
        """Raises ContextLengthError unless ``length`` tokens fit in ``max_model_len``."""
        if length > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {length} tokens. Please reduce the length of the input.")

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raises ContextLengthError unless prompt + completion fits in ``max_model_len``."""
        if prompt_len < 1:
            raise ValueError(f"prompt must have at least one token, got {prompt_len}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        total = prompt_len + max_new_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {total} tokens ({prompt_len} in the messages, {max_new_tokens} "
                f"in the completion). Please reduce the length of the messages or completion.")
