"""The toy world (synthetic shards with ground truth) and the tiny LLaVA trained on it."""
from pathlib import Path

# The committed checkpoint: `--model toy` everywhere resolves here.
TOY_MODEL_DIR = Path(__file__).resolve().parent / "checkpoint"
# Its codebook, built by the pipeline from the toy world: `--codebook toy` resolves here. Both ship as
# package data, so they work from a non-editable install too.
TOY_CODEBOOK_DIR = Path(__file__).resolve().parent / "codebook"
