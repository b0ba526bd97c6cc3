"""Text <-> token ids for the server: the checkpoint's tokenizer.json and chat template."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer


class TextCodec:
    """Wraps an HF ``tokenizers`` tokenizer plus the chat template from the checkpoint."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None,
                 special: dict[str, str]):
        self.tokenizer = tokenizer
        self.special = special
        self._template = None
        # A template that reads ``tools`` prints them itself (Llama 4's does); for one that
        # does not, the server describes them in the system message (``serve.tools``).
        self.template_has_tools = bool(chat_template) and "tools" in chat_template
        if chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                               lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> TextCodec | None:
        """The checkpoint's tokenizer, or None when it has no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        return cls(Tokenizer.from_file(str(path / "tokenizer.json")), template,
                   {k: v for k, v in special.items() if v})

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not): a long prompt
        # tokenized on a worker thread then leaves the event loop free.
        [encoding] = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        return encoding.ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=tools or None, **self.special)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return value.get("content")
    return value


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class IncrementalDetokenizer:
    """Text of a growing list of ids, emitted as deltas that never split a character."""

    def __init__(self, codec: TextCodec, skip_special_tokens: bool = True):
        self.codec, self.ids, self.text = codec, [], ""
        self.skip_special_tokens = skip_special_tokens

    def add(self, token_ids: Sequence[int]) -> str:
        self.ids += token_ids
        full = self.codec.decode(self.ids, self.skip_special_tokens)
        if full.endswith("\ufffd"):  # an unfinished multi-byte character: wait for more
            return ""
        delta = full[len(self.text):] if full.startswith(self.text) else full
        self.text = full
        return delta
