"""A chat request's images: counted against ``--limit-mm-per-prompt``, fetched or decoded
within the media limits, and processed into tiles, each off the event loop. Every problem is
a ``MediaError`` that names the image and what is wrong with it (the route's 400)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from jaxllm.multimodal.media import MediaError, MediaLimits, decode_image, image_bytes
from jaxllm.multimodal.processor import ProcessedImage, ProcessorConfig, process_image
from jaxllm.multimodal.prompt import ImageTokens, expand_prompt
from jaxllm.serve.protocol import ChatMessage


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """What the server accepts as images; ``processor`` is None for a model without a vision
    tower (a text-only checkpoint), which refuses every image."""

    processor: ProcessorConfig | None = None
    limits: MediaLimits = MediaLimits()
    max_images: int = 1  # per prompt (vLLM's default)
    # The tokenizer's image special tokens (None: it has none, and images are refused) and
    # the <|patch|> tokens per tile (the vision tower's).
    tokens: ImageTokens | None = None
    tokens_per_tile: int = 0

    @property
    def placeholder(self) -> int:
        """The ``<|image|>`` id an image part becomes in a rendered prompt."""
        return self._tokens().image

    def _tokens(self) -> ImageTokens:
        if self.tokens is None:
            raise MediaError("this model's tokenizer has no image tokens (<|image|>, "
                             "<|patch|>, ...): it cannot take images")
        return self.tokens

    async def load(self, messages: list[ChatMessage]) -> list[ProcessedImage]:
        """The processed images of ``messages`` in prompt order ([] without image parts)."""
        where = [(f"messages.{i}.content", url) for i, m in enumerate(messages)
                 for url in m.image_urls()]
        return await self.load_urls(where)

    async def load_urls(self, where: list[tuple[str, str]]) -> list[ProcessedImage]:
        """The processed images of (field, URL) pairs, in order."""
        if not where:
            return []
        if self.processor is None:
            raise MediaError("this model takes no images: its checkpoint has no vision tower "
                             "(a text-only model, or converted with --text-only)")
        if len(where) > self.max_images:
            raise MediaError(f"At most {self.max_images} image(s) may be provided in one "
                             f"prompt; this one has {len(where)} (--limit-mm-per-prompt)")
        return list(await asyncio.gather(*(self._one(field, url) for field, url in where)))

    def expand(self, ids: list[int], images: list[ProcessedImage]) -> list[int]:
        """``ids`` with each ``<|image|>`` placeholder expanded into its image's tile layout
        (``jaxllm.multimodal.prompt``); a count of placeholders other than of images is a
        ``MediaError``."""
        tokens = self._tokens()
        try:
            return expand_prompt(ids, [im.grid for im in images], self.tokens_per_tile,
                                 tokens)
        except ValueError as e:
            raise MediaError(str(e)) from None

    async def _one(self, field: str, url: str) -> ProcessedImage:
        def run() -> ProcessedImage:
            image = decode_image(image_bytes(url, self.limits), self.limits)
            return process_image(image, self.processor)

        try:
            return await asyncio.to_thread(run)
        except MediaError as e:
            raise MediaError(f"{field}: {e}") from None


def parse_mm_limit(text: str) -> int:
    """``--limit-mm-per-prompt``: ``image=N`` or ``{"image": N}`` -> N (only images exist)."""
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else dict(
            item.split("=", 1) for item in text.split(","))
        limits = {str(k).strip(): int(v) for k, v in raw.items()}
    except (ValueError, TypeError) as e:
        raise ValueError(f"--limit-mm-per-prompt {text!r}: expected image=N or "
                         f"'{{\"image\": N}}' ({e})") from None
    unknown = sorted(set(limits) - {"image"})
    if unknown:
        raise ValueError(f"--limit-mm-per-prompt: modality {unknown} is not supported "
                         f"(only image)")
    count = limits.get("image", 1)
    if count < 0:
        raise ValueError(f"--limit-mm-per-prompt image={count} must be >= 0")
    return count
