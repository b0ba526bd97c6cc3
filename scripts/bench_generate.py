"""Generation throughput: jaxllm.generate against HF transformers' generate, same weights.

    python scripts/bench_generate.py                         # tiny model, CPU
    python scripts/bench_generate.py --preset scout-4layers  # Scout-shaped, 4 layers (GPU)

Builds a random Llama 4 with HF transformers, converts it with scripts/convert_hf_to_orbax.py,
runs greedy generation of the same prompts with both (EOS disabled, so both produce exactly
batch x new-tokens tokens) and prints tokens/s and the ratio. jaxllm is warmed up first;
HF runs once untimed first as well.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: test helpers

import jaxllm  # noqa: E402
from tests.support import hf_models  # noqa: E402

PRESETS = {
    "tiny": dict(hf_models.SCOUT_LIKE),
    "scout-4layers": dict(
        hf_models.SCOUT_LIKE, vocab_size=202048, hidden_size=5120, intermediate_size=8192,
        intermediate_size_mlp=16384, num_hidden_layers=4, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, num_local_experts=16, attention_chunk_size=8192,
        floor_scale=8192, attn_scale=0.1, max_position_embeddings=8192),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num-layers", type=int, default=None,
                        help="override the preset's layer count (fewer layers build faster)")
    args = parser.parse_args()
    spec = dict(PRESETS[args.preset])
    if args.num_layers is not None:
        spec["num_hidden_layers"] = args.num_layers
    max_len = args.prompt_len + args.new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        hf = hf_models.make_text_model(spec)
        hf_models.save(hf, tmp / "hf", shard_size="2GB")
        subprocess.run([sys.executable, str(Path(__file__).with_name("convert_hf_to_orbax.py")),
                        "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "jx"), "--dtype",
                        args.dtype, "--no-progress"], check=True, capture_output=True)
        model = jaxllm.load_model(tmp / "jx", max_model_len=max_len,
                                  max_num_seqs=max(args.batch, 1))
        model.eos_token_ids = ()
        rng = np.random.default_rng(0)
        prompts = rng.integers(3, spec["vocab_size"], (args.batch, args.prompt_len)).tolist()

        jaxllm.generate(model, prompts, max_new_tokens=args.new_tokens)  # compile
        ours = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = jaxllm.generate(model, prompts, max_new_tokens=args.new_tokens)
            ours.append(time.perf_counter() - start)
        assert all(len(o) == args.new_tokens for o in out)

        hf = hf.to(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf = hf.to(device)
        hf.generation_config.eos_token_id = None
        ids = torch.tensor(prompts, device=device)

        def hf_run():
            with torch.no_grad():
                return hf.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)

        hf_run()
        theirs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            hf_out = hf_run()
            theirs.append(time.perf_counter() - start)
        agree = np.mean(np.asarray(out) == hf_out[:, args.prompt_len:].cpu().numpy())

    tokens = args.batch * args.new_tokens
    ours_tps, hf_tps = tokens / min(ours), tokens / min(theirs)
    print(f"preset={args.preset} layers={spec['num_hidden_layers']} batch={args.batch} "
          f"prompt={args.prompt_len} new={args.new_tokens} dtype={args.dtype} "
          f"jax={jax.__version__} device={jax.devices()[0].device_kind} hf_device={device}")
    print(f"{'engine':<16}{'best s':>10}{'tokens/s':>12}")
    print(f"{'jaxllm':<16}{min(ours):>10.3f}{ours_tps:>12.1f}")
    print(f"{'HF transformers':<16}{min(theirs):>10.3f}{hf_tps:>12.1f}")
    print(f"ratio jaxllm / HF: {ours_tps / hf_tps:.2f}x   (greedy token agreement "
          f"{agree:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
