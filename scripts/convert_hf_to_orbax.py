"""Convert a Hugging Face Llama 4 checkpoint (safetensors) into a jaxllm Orbax checkpoint.

    python scripts/convert_hf_to_orbax.py --hf-dir /models/Llama-4-Scout-17B-16E-Instruct \
        --out checkpoints/scout [--dtype bfloat16] [--quantization fp8|int8|int4]

A compressed-tensors checkpoint (FP8-dynamic, w4a16, ...) keeps its quantized weights;
``--quantization`` quantizes an unquantized one (routed and shared experts by default,
``--quantization-scope ffn`` adds the dense FFN layers; see jaxllm/model/quant.py).
"""

from __future__ import annotations

import argparse
import sys

from jaxllm.model.quant import SCHEMES, SCOPES
from jaxllm.weights.convert import DTYPES, convert
from jaxllm.weights.safetensors import ConversionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True,
                        help="directory with config.json and *.safetensors")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--quantization", choices=SCHEMES, default=None,
                        help="quantize the feed-forward weights while converting")
    parser.add_argument("--quantization-scope", choices=sorted(SCOPES), default="experts",
                        help="experts: routed + shared (default); ffn: also dense FFN layers")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--text-only", action="store_true",
                        help="drop a multimodal checkpoint's vision tower and projector")
    args = parser.parse_args(argv)
    try:
        out = convert(args.hf_dir, args.out, dtype=args.dtype, quantization=args.quantization,
                      quantization_scope=args.quantization_scope, overwrite=args.overwrite,
                      progress=not args.no_progress, text_only=args.text_only)
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
