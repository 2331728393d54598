"""The toy world (synthetic shards with ground truth) and the tiny LLaVA trained on it."""
from pathlib import Path

# The committed checkpoint: `--model toy` everywhere resolves here.
TOY_MODEL_DIR = Path(__file__).resolve().parent / "checkpoint"
