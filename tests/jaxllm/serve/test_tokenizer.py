"""The server's tokenizer: loading from a checkpoint directory, special tokens, the chat
template, and incremental detokenization that never splits a character."""

from __future__ import annotations

import json

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxllm.serve.tokenizer import IncrementalDetokenizer, TextCodec

TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
            "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE that knows only single bytes (and a few ASCII merges): every non-ASCII
    character is several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["hello world"] * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bos)])
    return tok


def _checkpoint(tmp_path, tokenizer: Tokenizer, config: dict | None = None,
                jinja: str | None = None):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return TextCodec.from_dir(tmp_path)


def test_no_tokenizer_json_means_no_codec(tmp_path):
    assert TextCodec.from_dir(tmp_path) is None


def test_encode_decode_and_special_tokens(tmp_path, byte_tokenizer):
    codec = _checkpoint(tmp_path, byte_tokenizer)
    bos = byte_tokenizer.token_to_id("<s>")
    with_bos = codec.encode("hello w\u00e9")
    assert with_bos[0] == bos and codec.encode("hello w\u00e9", add_special_tokens=False) \
        == with_bos[1:]
    assert codec.decode(with_bos) == "hello w\u00e9"  # special tokens are skipped
    assert codec.token_text(bos) == "<s>"  # but a single token shows its own text
    assert not codec.has_chat_template


def test_chat_template_from_the_tokenizer_config(tmp_path, byte_tokenizer):
    codec = _checkpoint(tmp_path, byte_tokenizer,
                        {"chat_template": TEMPLATE, "bos_token": {"content": "<s>"},
                         "eos_token": "</s>"})
    assert codec.has_chat_template and codec.special == {"bos_token": "<s>", "eos_token": "</s>"}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert codec.render_chat(messages) == "<s>[system]be brief[user]hi[assistant]"
    assert codec.render_chat(messages, add_generation_prompt=False) == \
        "<s>[system]be brief[user]hi"


def test_chat_template_file_overrides_the_config(tmp_path, byte_tokenizer):
    codec = _checkpoint(tmp_path, byte_tokenizer, {"chat_template": TEMPLATE},
                        jinja="{% for m in messages %}{{ m['content'] }};{% endfor %}")
    assert codec.render_chat([{"role": "user", "content": "x"}]) == "x;"


def test_template_errors_and_missing_template(tmp_path, byte_tokenizer):
    codec = _checkpoint(tmp_path, byte_tokenizer,
                        jinja="{{ raise_exception('only user messages') }}")
    with pytest.raises(jinja2.TemplateError, match="only user messages"):
        codec.render_chat([{"role": "user", "content": "x"}])
    plain = TextCodec(byte_tokenizer, None, {})
    with pytest.raises(ValueError, match="no chat template"):
        plain.render_chat([{"role": "user", "content": "x"}])


def test_template_runs_sandboxed(tmp_path, byte_tokenizer):
    codec = _checkpoint(tmp_path, byte_tokenizer, jinja="{{ ''.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        codec.render_chat([])


def test_incremental_detokenizer_never_emits_half_a_character(tmp_path, byte_tokenizer):
    codec = _checkpoint(tmp_path, byte_tokenizer)
    text = "h\u00e9llo \u20ac1 \U0001f600!"
    token_ids = codec.encode(text, add_special_tokens=False)
    assert len(token_ids) > len(text)  # multi-byte characters really are split
    detok = IncrementalDetokenizer(codec)
    deltas = [detok.add([t]) for t in token_ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens had to wait for the rest of their character


def test_incremental_detokenizer_accepts_several_ids_at_once(tmp_path, byte_tokenizer):
    codec = _checkpoint(tmp_path, byte_tokenizer)
    token_ids = codec.encode("ab \u00e9c", add_special_tokens=False)
    detok = IncrementalDetokenizer(codec)
    assert detok.add(token_ids[:2]) + detok.add(token_ids[2:]) + detok.add([]) == "ab \u00e9c"
