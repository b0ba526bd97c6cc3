"""Train an EAGLE-3 draft head for the bundled tiny Llama 4, written in the published layout.

    python scripts/train_eagle_tiny.py                  # about 10 min on 2 CPUs
    python scripts/train_eagle_tiny.py --target DIR --out DIR2

The head reads the frozen target's residual stream entering layers 1, 2 and 3 (its
auxiliary features, ``Llama4.forward(aux_layers=...)``) and shares the target's embedding.
It is trained on the target's own training conversations (``scripts/train_tiny.py``) with
EAGLE-3's training-time test: pass 1 takes the features, pass s > 1 takes pass s - 1's hidden
state one position back, and a pass-s query attends to pass-1 keys up to its anchor and to
the diagonal of the passes after it, as the head does when it drafts s tokens in the engine
(``jaxllm.engine.spec_decode.eagle.draft``). The head is written as safetensors + config.json in the
NVIDIA / EAGLE layout (``midlayer.*``, ``LlamaForCausalLMEagle3``), then served by the engine
over held-out questions: the report gives the acceptance length (tokens per verifying step)
and checks the outputs against the target's without speculation.

A head is tied to its target's vocabulary: ``--target`` names the model (its config and
tokenizer), so the head can be retrained when the bundled checkpoint changes; the engine
refuses a head whose vocabulary differs from its target's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import batch_layout, batches, fit, make_split, question  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.config import rope_inverse_frequencies  # noqa: E402
from jaxllm.kv_cache import init_kv_cache  # noqa: E402
from jaxllm.model.eagle3 import Eagle3Config, Eagle3Head, apply_rope_halves  # noqa: E402
from jaxllm.model.llama4 import embed_lookup  # noqa: E402

AUX = [1, 2, 3]
SEQ_LEN = 24
PASSES = 3  # the training-time test's depth: drafts 1..3 of a step


def head_config(target: jaxllm.config.Llama4Config, intermediate: int) -> dict:
    """The head's config.json (NVIDIA / EAGLE layout) for ``target``."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": target.hidden_size, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": target.hidden_size // 4, "intermediate_size": intermediate,
        "num_hidden_layers": 1, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256,
        "vocab_size": target.vocab_size, "draft_vocab_size": target.vocab_size,
        "target_hidden_size": target.hidden_size, "tie_word_embeddings": False,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": AUX, "use_aux_hidden_state": True},
    }


def head_passes(head: Eagle3Head, embed: jax.Array, features: jax.Array, tokens: jax.Array
                ) -> list[jax.Array]:
    """Draft logits of each pass ``[B, L, V]`` over sequences ``tokens [B, L]`` with the
    target's ``features [B, L, 3 D]``: pass s at position p is the s-th draft of a step
    anchored at p - s + 1, fed token p + 1; it predicts token p + 2."""
    c = head.config
    B, L = tokens.shape
    positions = jnp.arange(L)
    inv_freq = jnp.asarray(rope_inverse_frequencies(c), jnp.float32)
    following = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    e = head.input_norm(embed_lookup(embed, following.reshape(-1), None).reshape(B, L, -1))
    hidden = head.combine(features.reshape(B * L, -1)).reshape(B, L, -1)
    keys, values, out = [], [], []
    for s in range(PASSES):
        h = head.hidden_norm(hidden)
        residual = h if c.norm_before_residual else hidden
        x = jnp.concatenate([e, h], axis=-1)
        q = jnp.einsum("BLE,EHd->BLHd", x, head.wq[...])
        k = jnp.einsum("BLE,EKd->BLKd", x, head.wk[...])
        v = jnp.einsum("BLE,EKd->BLKd", x, head.wv[...])
        rope = jax.vmap(lambda a: apply_rope_halves(a, positions, inv_freq))
        q, k = rope(q), rope(k)
        keys.append(k)
        values.append(v)
        group = c.num_heads // c.num_kv_heads
        # Pass-1 keys up to the anchor p - s, then pass t's key at p - s + t (t = 1..s).
        scores = [jnp.einsum("BQHd,BKHd->BHQK", q, jnp.repeat(keys[0], group, axis=2))]
        allowed = [positions[None, :] <= positions[:, None] - s]
        for t in range(1, s + 1):
            diag = jnp.roll(jnp.repeat(keys[t], group, axis=2), s - t, axis=1)
            scores.append(jnp.einsum("BQHd,BQHd->BHQ", q, diag)[..., None])
            allowed.append(jnp.ones((L, 1), bool))
        scale = c.head_dim ** -0.5
        logits = jnp.concatenate(scores, axis=-1) * scale
        logits = jnp.where(jnp.concatenate(allowed, axis=-1)[None, None], logits, -1e30)
        weights = jax.nn.softmax(logits, axis=-1)
        attn = jnp.einsum("BHQK,BKHd->BQHd", weights[..., :L],
                          jnp.repeat(values[0], group, axis=2))
        for t in range(1, s + 1):
            diag = jnp.roll(jnp.repeat(values[t], group, axis=2), s - t, axis=1)
            attn += weights[..., L + t - 1].transpose(0, 2, 1)[..., None] * diag
        x = residual + jnp.einsum("BLHd,HdD->BLD", attn, head.wo[...])
        pre = x + head.mlp(head.post_attn_norm(x).reshape(B * L, -1)).reshape(B, L, -1)
        out.append(head.logits(head.norm(pre).reshape(B * L, -1)).reshape(B, L, -1))
        # The next pass at p takes this pass's hidden state at p - 1.
        hidden = jnp.concatenate([pre[:, :1], pre[:, :-1]], axis=1)
    return out


def train(target: jaxllm.runtime.handle.Model, tokenizer, pairs: np.ndarray, args) -> Eagle3Head:
    config = Eagle3Config.from_hf(head_config(target.config, args.intermediate))
    head = Eagle3Head(config, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(head)
    module = target.module()
    embed = module.embed[...]
    cache, meta = batch_layout(args.batch, SEQ_LEN)

    @jax.jit
    def features_of(tokens):
        _, _, features = module.forward(tokens.reshape(-1),
                                        init_kv_cache(target.config, cache), meta,
                                        attention_impl="reference", aux_layers=tuple(AUX))
        return features.reshape(*tokens.shape, -1)

    def loss_fn(params, tokens, mask, features):
        head = nnx.merge(graphdef, params)
        total = 0.0
        # Pass s at p predicts token p + 2: learned where that token is part of the answer.
        want = jnp.concatenate([tokens[:, 2:], tokens[:, :2]], axis=1)
        learn = jnp.concatenate([mask[:, 2:], jnp.zeros_like(mask[:, :2])], axis=1)
        for s, logits in enumerate(head_passes(head, embed, features, tokens)):
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), want[..., None], -1)[..., 0]
            # A pass-s draft also needs its anchor inside the sequence.
            valid = learn * (jnp.arange(tokens.shape[1]) >= s)[None]
            total += jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        return total / PASSES

    def data():
        for tokens, mask in batches(tokenizer, pairs, args.batch,
                                    np.random.default_rng(args.seed)):
            yield tokens, mask, features_of(jnp.asarray(tokens))

    return nnx.merge(graphdef, fit(loss_fn, params, data(), args.steps, args.lr))


def write_head(out: Path, head: Eagle3Head, config: dict) -> None:
    """safetensors (float16, HF Linear layouts) and config.json."""
    from safetensors.numpy import save_file

    c = head.config
    D, H, K, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim

    def a(x):
        return np.asarray(x[...], np.float32)

    attn = "midlayer.self_attn."
    tensors = {
        "fc.weight": a(head.fc).T,
        "midlayer.input_layernorm.weight": a(head.input_norm.weight),
        "midlayer.hidden_norm.weight": a(head.hidden_norm.weight),
        attn + "q_proj.weight": a(head.wq).reshape(2 * D, H * d).T,
        attn + "k_proj.weight": a(head.wk).reshape(2 * D, K * d).T,
        attn + "v_proj.weight": a(head.wv).reshape(2 * D, K * d).T,
        attn + "o_proj.weight": a(head.wo).reshape(H * d, D).T,
        "midlayer.post_attention_layernorm.weight": a(head.post_attn_norm.weight),
        "midlayer.mlp.gate_proj.weight": a(head.mlp.gate).T,
        "midlayer.mlp.up_proj.weight": a(head.mlp.up).T,
        "midlayer.mlp.down_proj.weight": a(head.mlp.down).T,
        "norm.weight": a(head.norm.weight),
        "lm_head.weight": a(head.lm_head)[:, : c.draft_vocab_size].T,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float16) for k, v in tensors.items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1))


def acceptance(target_dir: Path, head_dir: Path, pairs: np.ndarray, k: int) -> dict:
    """The head in the engine over chat questions about ``pairs``: acceptance length, and
    whether every answer equals the target's greedy answer without speculation."""
    from jaxllm.engine import Engine
    from jaxllm.engine.spec_decode.config import SpeculativeConfig
    from jaxllm.serve.tokenizer import TextCodec

    model = jaxllm.load_model(target_dir, max_model_len=64)
    codec = TextCodec.from_dir(target_dir)
    prompts = [codec.encode(codec.render_chat([{"role": "user", "content": question(a, b)}]),
                            add_special_tokens=False) for a, b in pairs]
    sampling = jaxllm.SamplingParams(temperature=0.0, max_tokens=8)
    plain = Engine(model).generate(prompts, sampling)
    engine = Engine(model, speculative=SpeculativeConfig(method="eagle3", model=str(head_dir),
                                                         num_speculative_tokens=k))
    outs = engine.generate(prompts, sampling)
    s = engine.speculator.stats
    right = sum(codec.decode(o) == str(a + b) for o, (a, b) in zip(outs, pairs, strict=True))
    return {"acceptance_length": s.acceptance_length, "drafts": s.num_drafts,
            "accepted": s.num_accepted_tokens, "per_position": s.accepted_per_position,
            "same_as_plain": outs == plain, "accuracy": right / len(pairs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="checkpoints/tiny-llama4")
    p.add_argument("--out", default="checkpoints/tiny-llama4-eagle3")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--held-out", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3, help="drafts per step in the report")
    args = p.parse_args()
    target_dir = Path(args.target)
    target = jaxllm.load_model(target_dir, dtype="float32", max_model_len=64)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(target_dir / "tokenizer.json"))
    train_pairs, test_pairs = make_split(args.seed, args.held_out)
    start = time.perf_counter()
    head = train(target, tokenizer, train_pairs, args)
    minutes = (time.perf_counter() - start) / 60
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "head"
        write_head(staged, head, head_config(target.config, args.intermediate))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in staged.iterdir():
            shutil.copyfile(f, out / f.name)  # the umask's modes, not the temporary files'
    report = acceptance(target_dir, Path(args.out), test_pairs[:64], args.k)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    print(f"trained {args.steps} steps in {minutes:.1f} min; {size / 1024:.0f} KiB; held-out "
          f"questions, k={args.k}: acceptance length {report['acceptance_length']:.2f} "
          f"({report['accepted']} of {report['drafts'] * args.k} drafts accepted, per position "
          f"{report['per_position']}), answers equal the target's without speculation: "
          f"{report['same_as_plain']}, accuracy {report['accuracy']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
