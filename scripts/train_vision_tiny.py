"""Give the bundled tiny Llama 4 eyes: a small vision tower trained to say how many shapes a
picture has and what colour they are.

    python scripts/train_tiny.py --out /tmp/tiny-text          # the text model (addition)
    python scripts/train_vision_tiny.py --base /tmp/tiny-text --out checkpoints/tiny-llama4

Pictures are drawn here with Pillow: 1-4 circles, squares or triangles of one colour (red,
green, blue, yellow, purple) on a plain light background, of varied sizes and positions, on
canvases of 32-96 pixels a side. Each goes through jaxllm's image processor (one 32 x 32
tile, ``max_patches`` 1: a bigger picture is scaled down onto it) and the tokenizer's chat
template (an image part becomes ``<|image|>``, expanded to 4 ``<|patch|>`` tokens). A
Llama 4 vision tower (2 layers, width 64, 8 x 8 patches of 4 pixels; a pixel shuffle of
ratio 0.25 folds each 4 x 4 block of them into one token), its adapter and the projector
are trained from scratch, jointly with the text model started from ``--base``; half of
every batch is the base's addition task (its training split), so held-out sums keep their
score. The checkpoint written is a multimodal one (``Llama4ForConditionalGeneration``
config, the image special tokens appended after the characters, ``preprocessor_config.json``)
that ``jaxllm.load_model`` and ``python -m jaxllm.serve`` read like a converted checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny  # noqa: E402  (the text model's tokenizer, data and training loop)

import jaxllm  # noqa: E402
from jaxllm.config import Llama4Config  # noqa: E402
from jaxllm.kv_cache import init_kv_cache  # noqa: E402
from jaxllm.model.llama4 import Llama4  # noqa: E402
from jaxllm.model.vision import ImageEmbeds  # noqa: E402
from jaxllm.multimodal.processor import ProcessorConfig, process_image  # noqa: E402
from jaxllm.multimodal.prompt import SPECIAL_NAMES, ImageTokens, expand_prompt  # noqa: E402

# The ids after the 102 text tokens, in Llama 4's order of these six.
IMAGE_SPECIALS = tuple(SPECIAL_NAMES[k] for k in ("start", "end", "image", "patch", "tile_x",
                                                  "tile_y"))
TEXT_VOCAB = len(train_tiny.SPECIALS) + len(train_tiny.CHARS)
SEQ_LEN = 32  # the longest picture conversation ("What colour?", "purple", EOS) is 29 tokens
TILE = 32
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 50), "blue": (40, 70, 220),
           "yellow": (225, 200, 20), "purple": (140, 50, 170)}
MAX_SHAPES = 4
COUNT_QUESTION, COLOUR_QUESTION = "How many shapes?", "What colour?"

VISION_CONFIG = {
    "model_type": "llama4_vision_model", "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 1024, "image_size": TILE, "patch_size": 4,
    "num_channels": 3, "pixel_shuffle_ratio": 0.25, "projector_input_dim": 128,
    "projector_output_dim": 128, "vision_output_dim": 128, "rope_theta": 10000,
    "hidden_act": "gelu", "norm_eps": 1e-5, "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default", "multi_modal_projector_bias": False,
    "initializer_range": 0.02,
}
TOKEN_IDS = {name: TEXT_VOCAB + i for i, name in enumerate(IMAGE_SPECIALS)}
CONFIG = {
    "model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
    "text_config": {**train_tiny.CONFIG, "vocab_size": TEXT_VOCAB + len(IMAGE_SPECIALS)},
    "vision_config": VISION_CONFIG,
    "boi_token_index": TOKEN_IDS["<|image_start|>"],
    "eoi_token_index": TOKEN_IDS["<|image_end|>"],
    "image_token_index": TOKEN_IDS["<|patch|>"],
    "tie_word_embeddings": False,
}
PREPROCESSOR = {
    "image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
    "size": {"height": TILE, "width": TILE}, "max_patches": 1, "resize_to_max_canvas": False,
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
}


def draw_picture(rng: np.random.Generator) -> tuple[Image.Image, int, str]:
    """A picture of 1-4 non-overlapping shapes of one colour; returns it, the count, the
    colour's name."""
    width, height = (int(n) for n in rng.integers(32, 97, 2))
    height = int(np.clip(height, width / 1.5, width * 1.5))  # at most 3:2 either way
    side = min(width, height)
    grey = int(rng.integers(215, 256))
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    name = str(rng.choice(list(COLOURS)))
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[name])
    count = int(rng.integers(1, MAX_SHAPES + 1))
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:
        r = side * rng.uniform(0.08, 0.14)
        x, y = rng.uniform(r, width - r), rng.uniform(r, height - r)
        if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + side * 0.05) ** 2
               for px, py, pr in placed):
            placed.append((x, y, r))
            kind = rng.integers(3)
            if kind == 0:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            elif kind == 1:
                draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
            else:
                draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=fill)
    return image, count, name


def image_prompt(codec, question: str) -> list[int]:
    """Token ids of a user turn with one image then ``question``, its placeholder expanded as
    HF's ``Llama4Processor`` does (one tile: ``max_patches`` is 1), ending at the assistant's
    turn."""
    vision = Llama4Config.from_hf(CONFIG).vision
    messages = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    ids = codec.encode(codec.render_chat(messages), add_special_tokens=False)
    return expand_prompt(ids, [(1, 1)], vision.tokens_per_tile,
                         ImageTokens.from_vocab(codec.tokenizer.token_to_id))


def picture_examples(rng: np.random.Generator, n: int, processor: ProcessorConfig
                     ) -> tuple[np.ndarray, list[str], list[str]]:
    """``n`` pictures as pixel values ``[n, 3, TILE, TILE]``, the question about each (three
    of four ask the count, the fourth the colour), its answer, and both labels ``[n, 2]``
    (count - 1, colour index)."""
    pixels, questions, answers, labels = [], [], [], []
    for i in range(n):
        image, count, colour = draw_picture(rng)
        pixels.append(process_image(image, processor).pixel_values)
        counts = i % 4 != 3  # colour is learned much sooner than counting
        questions.append(COUNT_QUESTION if counts else COLOUR_QUESTION)
        answers.append(str(count) if counts else colour)
        labels.append((count - 1, list(COLOURS).index(colour)))
    return np.concatenate(pixels), questions, answers, np.asarray(labels, np.int32)


def batches(codec, processor: ProcessorConfig, pairs: np.ndarray, batch: int,
            rng: np.random.Generator):
    """Batches of ``batch`` picture conversations (tokens, learned mask, pixel values, the
    feature row of every token or -1, the probe's labels) and ``batch`` sums (tokens,
    mask)."""
    patch = codec.tokenizer.token_to_id("<|patch|>")
    prompts = {q: image_prompt(codec, q) for q in (COUNT_QUESTION, COLOUR_QUESTION)}
    eos = codec.tokenizer.token_to_id("</s>")
    while True:
        pixels, questions, answers, labels = picture_examples(rng, batch, processor)
        tokens = np.zeros((batch, SEQ_LEN), np.int32)
        mask = np.zeros((batch, SEQ_LEN), np.float32)
        for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
            ids = prompts[q] + codec.encode(a, add_special_tokens=False) + [eos]
            tokens[i, : len(ids)] = ids
            mask[i, len(prompts[q]) : len(ids)] = 1.0
        rows = np.full(tokens.size, -1, np.int32)
        flat = tokens.reshape(-1) == patch  # each picture row has its 4 in order
        rows[flat] = np.arange(int(flat.sum()), dtype=np.int32)
        sums = pairs[rng.integers(0, len(pairs), batch)]
        yield (tokens, mask, pixels, rows, labels,
               *train_tiny.sum_batch(codec.tokenizer, sums, train_tiny.SEQ_LEN))


def start_params(config: Llama4Config, base: Path, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """The multimodal model: text weights from ``base`` (embedding and head rows of the new
    image tokens fresh), the vision tower fresh."""
    graphdef, params = nnx.split(Llama4(config, dtype=jnp.float32, rngs=nnx.Rngs(seed)))
    fresh = nnx.to_pure_dict(params)
    text = jaxllm.load_model(base, dtype="float32")
    if text.config.vision is not None or text.config.vocab_size != TEXT_VOCAB:
        raise ValueError(f"--base {base} is not train_tiny.py's text-only model (vocab "
                         f"{TEXT_VOCAB}, no vision tower)")
    loaded = nnx.to_pure_dict(text.params)
    for key, value in loaded.items():
        fresh[key] = value
    fresh["embed"] = jnp.concatenate([loaded["embed"], params.embed[...][TEXT_VOCAB:]], 0)
    fresh["lm_head"] = jnp.concatenate([loaded["lm_head"],
                                        params.lm_head[...][:, TEXT_VOCAB:]], 1)
    fresh["vision"] = fan_in_init(fresh["vision"], jax.random.key(seed))
    nnx.replace_by_pure_dict(params, fresh)
    return graphdef, params


def fan_in_init(tree: dict, key: jax.Array) -> dict:
    """The vision tower's matrices drawn with std 1/sqrt(fan-in). The model's own init (std
    0.02, as HF's) shrinks the features through five stacked maps to ~1e-2 of the text
    embeddings, and the tower got ~1e-2 of the text model's gradient: trained that way it
    never learned to see (the answers were the priors, 20% right)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    keys = iter(jax.random.split(key, len(flat)))
    out = {}
    for path, leaf in flat:
        name = path[-1].key
        fan_in = leaf.shape[0] if name in ("wq", "wk", "wv") else int(np.prod(leaf.shape[:-1]))
        value = leaf
        if leaf.ndim >= 2 and name != "positional_embedding":
            value = jax.random.normal(next(keys), leaf.shape, leaf.dtype) / np.sqrt(fan_in)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part.key, {})
        node[name] = value
    return out


def train(config: Llama4Config, codec, processor: ProcessorConfig, pairs: np.ndarray, args
          ) -> nnx.State:
    graphdef, params = start_params(config, Path(args.base), args.seed)
    if args.resume:  # continue from an earlier run's checkpoint (the probe starts afresh)
        nnx.replace_by_pure_dict(params, nnx.to_pure_dict(
            jaxllm.load_model(args.resume, dtype="float32").params))
    layouts = {n: train_tiny.batch_layout(args.batch, n) for n in (SEQ_LEN, train_tiny.SEQ_LEN)}

    def nll(module, tokens, mask, images=None):
        cache, meta = layouts[tokens.shape[1]]
        hidden, _ = module(tokens.reshape(-1), init_kv_cache(config, cache), meta,
                           attention_impl="reference", images=images)  # as train_tiny.py's
        logits = module.logits(hidden).reshape(*tokens.shape, -1)
        return train_tiny.answer_nll(logits, tokens, mask)

    def loss_fn(trained, tokens, mask, pixels, rows, labels, sum_tokens, sum_mask):
        params, probe = trained
        module = nnx.merge(graphdef, params)
        features = module.vision(pixels)
        images = ImageEmbeds(features.reshape(-1, features.shape[-1]), rows)
        answers = nll(module, tokens, mask, images)
        return (answers + nll(module, sum_tokens, sum_mask)) / 2 + probe_loss(
            probe, features, labels), answers

    data = batches(codec, processor, pairs, args.batch, np.random.default_rng(args.seed))
    trained = train_tiny.fit(loss_fn, (params, init_probe(config, args.seed)), data,
                             args.steps, args.lr, log_every=50)
    return trained[0]


def init_probe(config: Llama4Config, seed: int) -> dict[str, jax.Array]:
    """Linear read-outs of a picture's count and colour from its mean projected feature: an
    auxiliary loss during training only (the checkpoint does not keep them). Through the
    text model alone the tower got too little signal to learn in a few hundred steps."""
    width = config.hidden_size
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    return {"count": jax.random.normal(k1, (width, MAX_SHAPES)) / np.sqrt(width),
            "colour": jax.random.normal(k2, (width, len(COLOURS))) / np.sqrt(width)}


def probe_loss(probe: dict[str, jax.Array], features: jax.Array, labels: jax.Array
               ) -> jax.Array:
    """Cross-entropy of the probe's count and colour (``labels [B, 2]``: count - 1, colour
    index) from the mean of each picture's ``features [B, tokens, D]``."""
    pooled = features.mean(axis=1)
    losses = [optax.softmax_cross_entropy_with_integer_labels(pooled @ probe[name],
                                                              labels[:, i]).mean()
              for i, name in enumerate(("count", "colour"))]
    return sum(losses) / len(losses)


def answer_pictures(model, codec, pictures: list[Image.Image], question: str) -> list[str]:
    """Greedy answers to ``question`` about each picture, through ``jaxllm.generate``."""
    processor = ProcessorConfig.from_dir(model.path, tile_size=model.config.vision.image_size)
    prompt = image_prompt(codec, question)
    pixels = [process_image(p, processor).pixel_values for p in pictures]
    outs = jaxllm.generate(model, [prompt] * len(pictures), max_new_tokens=8, images=pixels)
    return [codec.decode(o) for o in outs]


def evaluate(path: Path, seed: int, n: int) -> tuple[float, float]:
    """Accuracy on ``n`` fresh pictures (a generator seed never trained on): count, colour."""
    from jaxllm.serve.tokenizer import TextCodec

    model = jaxllm.load_model(path, max_model_len=64)
    codec = TextCodec.from_dir(path)
    rng = np.random.default_rng(seed)
    drawn = [draw_picture(rng) for _ in range(n)]
    pictures = [p for p, _, _ in drawn]
    counts = answer_pictures(model, codec, pictures, COUNT_QUESTION)
    colours = answer_pictures(model, codec, pictures, COLOUR_QUESTION)
    return (np.mean([a == str(c) for a, (_, c, _) in zip(counts, drawn, strict=True)]),
            np.mean([a == c for a, (_, _, c) in zip(colours, drawn, strict=True)]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="train_tiny.py's text-only checkpoint")
    p.add_argument("--out", default="checkpoints/tiny-llama4")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=16, help="pictures per step (and as many sums)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, help="start from this script's checkpoint")
    p.add_argument("--eval-pictures", type=int, default=100)
    args = p.parse_args()
    config = Llama4Config.from_hf(CONFIG)
    train_pairs, test_pairs = train_tiny.make_split(seed=0, held_out=500)  # the base's split
    processor_json = json.dumps(PREPROCESSOR, indent=1)
    with tempfile.TemporaryDirectory() as tmp:
        from jaxllm.serve.tokenizer import TextCodec

        train_tiny.save_tokenizer(Path(tmp), IMAGE_SPECIALS)
        (Path(tmp) / "preprocessor_config.json").write_text(processor_json)
        codec = TextCodec.from_dir(tmp)
        processor = ProcessorConfig.from_dir(tmp)
        start = time.perf_counter()
        params = train(config, codec, processor, train_pairs, args)
        minutes = (time.perf_counter() - start) / 60
        train_tiny.write_checkpoint(Path(args.out), params, Path(tmp), CONFIG,
                                    {"preprocessor_config.json": processor_json})
    count, colour = evaluate(Path(args.out), args.seed + 1, args.eval_pictures)
    sums = train_tiny.evaluate(Path(args.out), test_pairs)
    summary = (f"trained {args.steps} steps in {minutes:.1f} min on "
               f"{jax.devices()[0].device_kind}; {args.eval_pictures} new pictures: count "
               f"{count:.1%}, colour {colour:.1%}; held-out sums {sums:.1%}")
    (Path(args.out) / "README.md").write_text(MODEL_CARD.format(
        command=" ".join(["python scripts/train_vision_tiny.py", *sys.argv[1:]]),
        summary=summary))
    print(summary)
    return 0


MODEL_CARD = """# tiny-llama4

A Llama 4 (`Llama4ForConditionalGeneration` layout) small enough to bundle, trained on a CPU
by this repository's scripts, so that `python -m jaxllm.serve` answers out of the box.

- Text: 4 layers, width 128, 4 experts + a shared one, a character-level tokenizer.
  `scripts/train_tiny.py` trained it to answer "What is A + B?" (two-digit A, B) with the
  sum; 500 sums were held out of its training.
- Vision: a Llama 4 vision tower (2 layers, width 64, 32 x 32 pixel tiles of 4 x 4-pixel
  patches, pixel shuffle 0.25: 4 `<|patch|>` tokens per picture), adapter and projector,
  trained with the text model by `scripts/train_vision_tiny.py` on pictures it draws: 1-4
  circles, squares or triangles of one colour (red, green, blue, yellow, purple) on a light
  grey background. It answers "How many shapes?" with a digit and "What colour?" with the
  colour's name. `preprocessor_config.json` has `max_patches` 1: any picture is scaled down
  onto one tile.
- It knows nothing else.

Trained with `{command}`: {summary}.
"""


if __name__ == "__main__":
    sys.exit(main())
