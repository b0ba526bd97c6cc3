"""``--speculative-config``: vLLM's JSON shape, checked where it enters.

Methods: ``ngram`` (prompt lookup: the tokens after the earliest earlier occurrence of the
longest suffix of ``prompt_lookup_min``..``prompt_lookup_max`` tokens) and ``eagle3`` (a draft
head read from ``model``). As in vLLM, n-gram sizes default to 5 when neither is given and one
to the other when only one is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Literal

METHODS = ("ngram", "eagle3")
MAX_SPECULATIVE_TOKENS = 16  # k + 1 rows per sequence must fit one step's token bucket
MAX_PROMPT_LOOKUP = 64
DEFAULT_PROMPT_LOOKUP = 5
KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How many tokens to draft per step, and from what."""

    method: Literal["ngram", "eagle3"]
    num_speculative_tokens: int
    model: str | None = None  # the EAGLE-3 head's directory (eagle3 only)
    prompt_lookup_min: int | None = None  # ngram only
    prompt_lookup_max: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative-config method={self.method!r} must be one of "
                             f"{', '.join(METHODS)}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1,
                   MAX_SPECULATIVE_TOKENS)
        if self.method == "eagle3":
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("speculative-config method='eagle3' needs model (the draft "
                                 f"head's path), got model={self.model!r}")
            for key in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, key) is not None:
                    raise ValueError(f"speculative-config {key}={getattr(self, key)} only "
                                     "applies to method='ngram'")
            return
        if self.model not in (None, "ngram"):
            raise ValueError(f"speculative-config model={self.model!r}: method='ngram' drafts "
                             "from the sequence itself and takes no model")
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        for key, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            if value is not None:
                _check_int(key, value, 1, MAX_PROMPT_LOOKUP)
        if low is None and high is None:
            low = high = DEFAULT_PROMPT_LOOKUP
        low = high if low is None else low
        high = low if high is None else high
        if low > high:
            raise ValueError(f"speculative-config prompt_lookup_min={low} must be <= "
                             f"prompt_lookup_max={high}")
        object.__setattr__(self, "model", None)
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> SpeculativeConfig:
        """Parses the flag's JSON object (or an already-decoded mapping); unknown keys are
        refused rather than ignored, so a misspelt setting never silently does nothing."""
        if isinstance(text, str):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative-config is not valid JSON: {e}") from None
        else:
            raw = dict(text)
        if not isinstance(raw, dict):
            raise ValueError(f"speculative-config must be a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise ValueError(f"speculative-config has unknown keys {unknown}; known keys: "
                             f"{', '.join(KEYS)}")
        if "num_speculative_tokens" not in raw:
            raise ValueError("speculative-config needs num_speculative_tokens")
        method = raw.get("method")
        if method is None and raw.get("model") == "ngram":  # vLLM's older spelling
            method = "ngram"
        if method is None:
            raise ValueError(f"speculative-config needs method (one of {', '.join(METHODS)})")
        return cls(method=method, num_speculative_tokens=raw["num_speculative_tokens"],
                   model=raw.get("model"), prompt_lookup_min=raw.get("prompt_lookup_min"),
                   prompt_lookup_max=raw.get("prompt_lookup_max"))

    @property
    def rows_per_sequence(self) -> int:
        """Rows a speculating sequence takes in a decode step: the last token and k drafts."""
        return self.num_speculative_tokens + 1


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"speculative-config {name}={value!r} must be an integer")
    if not low <= value <= high:
        raise ValueError(f"speculative-config {name}={value} must be in [{low}, {high}]")
