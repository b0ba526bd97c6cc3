"""What the tests share: tiny HF Llama 4 models (``hf_models``), real servers (``servers``),
compilation counts (``compiles``) and the deviceless compile cases (``compile_cases``)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository's root
BUNDLED = REPO / "checkpoints" / "tiny-llama4"  # the bundled model
