"""Structured outputs: a grammar per request (JSON schema, regex, choice, Lark), compiled by
llguidance against the model's tokenizer.

The grammar state lives on the host, one ``llguidance.LLMatcher`` per request. Before each
step that picks a constrained request's next token, the engine asks its matcher for the
allowed tokens as a bitmask (``[ceil(V / 32)]`` int32 words, bit ``t % 32`` of word ``t // 32``
set when token t is allowed); the compiled sampler sets every other token's logit to -inf
(``jaxllm.sample.sampling.apply_token_mask``); the picked token then advances the matcher. The
masks of one step are computed in parallel on llguidance's thread pool, off the GIL.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Literal

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark
from tokenizers import Tokenizer

Kind = Literal["json", "regex", "choice", "grammar"]
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
# JSON as ``json.dumps`` writes it: one space after ',' and ':', no other whitespace (a model
# allowed free whitespace can pad forever).
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match: ``kind`` and its ``spec`` (JSON schema text, a
    regular expression, the choices as a JSON list, or a Lark grammar)."""

    kind: Kind
    spec: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str, *, closed: bool = False
                    ) -> StructuredOutput:
        """``closed``: objects take no property their schema does not list (OpenAI's strict
        mode, vLLM's ``disable_additional_properties``), unless the schema says otherwise."""
        if closed:
            schema = closed_objects(json.loads(schema) if isinstance(schema, str) else schema)
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json", text)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredOutput:
        if not options:
            raise ValueError("a choice needs at least one option")
        return cls("choice", json.dumps(list(options)))

    def grammar_text(self) -> str:
        """The llguidance grammar (raises ValueError when the spec cannot be one)."""
        try:
            if self.kind == "json":
                return llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_STYLE)
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.spec)
            if self.kind == "choice":
                options = json.loads(self.spec)
                lark = "start: " + " | ".join(json.dumps(o) for o in options)
                return llguidance.LLMatcher.grammar_from_lark(lark)
            # Lark, or GBNF (llama.cpp's EBNF, which vLLM also accepts) converted to Lark.
            return llguidance.LLMatcher.grammar_from_lark(any_to_lark(self.spec))
        except (ValueError, RuntimeError, GbnfToLarkError) as e:
            raise ValueError(f"invalid {self.kind} constraint: {e}") from e


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``"additionalProperties": false`` on every object schema that does not
    set it (in nested properties, items, combinators and definitions alike)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("const", "enum", "default", "examples") else v
           for k, v in schema.items()}
    if "properties" in out and isinstance(out["properties"], dict):
        out["properties"] = {k: closed_objects(v) for k, v in schema["properties"].items()}
    if (out.get("type") == "object" or "properties" in out) and (
            "additionalProperties" not in out):
        out["additionalProperties"] = False
    return out


class GrammarCompiler:
    """The model's tokenizer as llguidance sees it, and the matchers made from it.

    ``vocab_size`` is the model's (the logits' real width); tokens the tokenizer does not
    have are never allowed in a constrained row.
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, vocab_size: int):
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than "
                             f"the model's vocabulary ({vocab_size})")
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._executor = llguidance.LLExecutor()

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, eos_token_ids: Sequence[int],
                      vocab_size: int) -> GrammarCompiler:
        """From an HF ``tokenizers`` tokenizer (the checkpoint's tokenizer.json)."""
        return cls(_ll_tokenizer(tokenizer, list(eos_token_ids)), vocab_size)

    def matcher(self, structured: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher at the start of ``structured``'s grammar; a grammar that does not
        compile raises ValueError with llguidance's reason."""
        grammar = structured.grammar_text()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"invalid {structured.kind} constraint: {'; '.join(messages)}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"invalid {structured.kind} constraint: {matcher.get_error()}")
        return matcher

    def masks(self, matchers: Sequence[llguidance.LLMatcher], words: int) -> np.ndarray:
        """Each matcher's allowed tokens as ``[len(matchers), words]`` int32 bitmask rows
        (``words`` covers the padded vocabulary; bits past the tokenizer's tokens are 0)."""
        own = llg_numpy.get_bitmask_shape(len(matchers), self.tokenizer.vocab_size)[1]
        masks = np.zeros((len(matchers), max(words, own)), np.int32)
        if matchers:
            llg_numpy.fill_next_token_bitmask_par(
                self._executor, [(m, i) for i, m in enumerate(matchers)], masks)
        return np.ascontiguousarray(masks[:, :words])

    def draft_masks(self, drafting: Sequence[tuple[llguidance.LLMatcher, Sequence[int]]],
                    words: int) -> list[np.ndarray]:
        """For each (matcher, drafts the grammar accepts) the allowed tokens after each
        prefix ``x_0..x_j`` of the drafts (``[len(drafts), words]``: the masks of a verifying
        step's positions past the first); each matcher is rolled back to where it was.
        After a draft that ends the grammar every token is allowed: the request stops there
        and what follows is never taken."""
        out = [np.full((len(d), words), -1, np.int32) for _, d in drafting]
        consumed = [0] * len(drafting)
        try:
            for j in range(max((len(d) for _, d in drafting), default=0)):
                live = []
                for n, (matcher, drafts) in enumerate(drafting):
                    if j < len(drafts) and not matcher.is_stopped():
                        if not matcher.consume_token(int(drafts[j])):
                            raise ValueError(f"draft {drafts[j]} refused by the grammar: "
                                             f"{matcher.get_error()}")
                        consumed[n] += 1
                        if not matcher.is_stopped():
                            live.append(n)
                masks = self.masks([drafting[n][0] for n in live], words)
                for row, n in zip(masks, live, strict=True):
                    out[n][j] = row
        finally:
            for (matcher, _), n in zip(drafting, consumed, strict=True):
                if n:
                    matcher.rollback(n)
        return out


class _TokenTable:
    """The generic tokenizer shape llguidance accepts (``llguidance.TokenizerWrapper``): each
    token's bytes and an encode function. Used for tokenizers whose decoder llguidance does
    not recognise (e.g. a character-level WordLevel tokenizer)."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int):
        self._tokenizer = tokenizer
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.eos_token_id, self.bos_token_id = eos_token_id, None
        self.special_token_ids = sorted(special)
        self.tokens = [(tokenizer.id_to_token(i) or "").encode()
                       for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids


def _ll_tokenizer(tokenizer: Tokenizer, eos: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of an HF ``tokenizers`` tokenizer: read from its JSON (byte-level
    BPE, SentencePiece-style) when llguidance knows its decoder, else from its token table."""
    try:
        return llguidance.LLTokenizer(tokenizer.to_str(), eos_token=eos)
    except ValueError:
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTable(tokenizer, eos[0])),
                                      eos_token=eos)
