"""``admit``: the one place a request is checked against the model and the bucket policy and
resolved (token ids, ``max_tokens``, the seed, the stop set), for the engine and ``generate()``
alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from jaxllm.buckets import BucketPolicy
from jaxllm.layout import check_token_ids
from jaxllm.sample.sampling import MAX_STOP_IDS, SamplingParams


@dataclasses.dataclass(frozen=True)
class Admission:
    """A checked request: int32-range prompt ids, and sampling with ``max_tokens`` and
    ``seed`` resolved (never None), and the full stop set (EOS included unless ignored)."""

    prompt: list[int]
    sampling: SamplingParams
    stop_ids: frozenset[int]


def admit(prompt: Sequence[int], sampling: SamplingParams, policy: BucketPolicy, *,
          vocab_size: int, eos_token_ids: Collection[int], seed: int,
          ignore_eos: bool = False) -> Admission:
    """Checks ``prompt`` and ``sampling`` against the model and ``policy`` (ValueError naming
    the value and the limit) and resolves them: ``max_tokens`` defaults to what is left of
    ``max_model_len``, ``seed`` (used when the request brings none) becomes the request's."""
    ids = check_token_ids(list(prompt), vocab_size)
    if ids.ndim != 1:
        raise ValueError(f"a prompt must be a flat list of token ids, got shape {ids.shape}")
    if sampling.max_tokens is None:
        policy.check_request(len(ids), max(1, policy.max_model_len - len(ids)))
        max_tokens = policy.max_model_len - len(ids)
    else:
        max_tokens = sampling.max_tokens
    if max_tokens == 0:  # only scores the prompt
        policy.check_length(len(ids))
    else:
        policy.check_request(len(ids), max_tokens)
    stops = set(sampling.stop_token_ids) | (set() if ignore_eos else set(eos_token_ids))
    check_token_ids(sorted(stops), vocab_size)
    if len(stops) > MAX_STOP_IDS:
        raise ValueError(f"{len(stops)} stop token ids (EOS included), at most "
                         f"{MAX_STOP_IDS}")
    check_token_ids([t for t, _ in sampling.logit_bias], vocab_size)
    resolved = dataclasses.replace(
        sampling, max_tokens=max_tokens,
        seed=sampling.seed if sampling.seed is not None else seed)
    return Admission(ids.tolist(), resolved, frozenset(stops))
