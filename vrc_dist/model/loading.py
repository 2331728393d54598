"""Loading a LLaVA checkpoint by its config's `model_type`: the one loader every stage uses.

`load_llava` gives the probe's adapter (vrc_dist.model.adapter); `load_checkpoint` gives the plain transformers
model and processor, as a user's `from_pretrained` would, for evaluation and pruning.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from vrc_dist.config import DEFAULT_PROMPT, DEFAULT_TOKEN_BUDGET
from vrc_dist.model.adapter import LlavaAdapter, ModelError

MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "llava_next_video": LlavaNextVideoForConditionalGeneration,  # images as NeXT; videos pruned per frame
}
# float64: for checking that two computation paths agree beyond float32 rounding
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_checkpoint(path_or_toy: str) -> Path:
    """Local directory of a LLaVA checkpoint: "toy", a path, or a hub id already in the local cache."""
    if path_or_toy == "toy":
        from vrc_dist.toy import TOY_MODEL_DIR

        path = Path(TOY_MODEL_DIR)
    else:
        path = Path(path_or_toy).expanduser()
        if not path.exists() and path_or_toy.count("/") == 1:
            path = _hub_cache_dir(path_or_toy) or path
    if not path.is_dir():
        raise ModelError(f"model {path_or_toy!r}: {path} is not a directory (nor a hub id in the local cache)")
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"model {path_or_toy!r}: no config.json in {path}")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ModelError(
            f"model {path_or_toy!r}: config.json model_type {model_type!r}, expected one of {', '.join(MODEL_CLASSES)}"
        )
    return path


def _hub_cache_dir(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def checkpoint_revision(path: Path) -> str:
    """The hub snapshot hash when loaded from the hub cache, else a digest of config and weight files.

    Small checkpoints are hashed whole; for large ones the safetensors headers (tensor names, shapes,
    offsets) and file sizes stand in, so identifying a 14 GB model costs no full read.
    """
    if path.parent.name == "snapshots":
        return path.name
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix not in (".json", ".safetensors", ".bin") or not f.is_file():
            continue
        digest.update(f.name.encode())
        size = f.stat().st_size
        digest.update(str(size).encode())
        with f.open("rb") as fh:
            digest.update(fh.read() if size < 64 << 20 else fh.read(1 << 20))
    return "sha256:" + digest.hexdigest()[:16]


def processor_chat_template(path: Path) -> str | None:
    """The chat template saved with the processor (hub LLaVA repos keep it there, not with the tokenizer)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        if (path / name).is_file():
            template = json.loads((path / name).read_text()).get("chat_template")
            if template:
                return template
    return None


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}; expected auto or one of {', '.join(DTYPES)}")
    return dev, DTYPES[dtype]


def load_llava(
    path_or_toy: str,
    device: str = "auto",
    dtype: str = "auto",
    prompt: str = DEFAULT_PROMPT,
    pad_token_id: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    conversation: str = "template",
) -> LlavaAdapter:
    path = resolve_checkpoint(path_or_toy)
    dev, dt = resolve_device_dtype(device, dtype)
    model = MODEL_CLASSES[model_type_of(path)].from_pretrained(path, dtype=dt).to(dev).eval()
    # The image processor and tokenizer, not the full processor: the probe never lets the processor
    # expand the image placeholder, and OneVision's processor object needs torchvision for video.
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = tokenizer.chat_template or processor_chat_template(path)
    return LlavaAdapter(
        model,
        AutoImageProcessor.from_pretrained(path),
        tokenizer,
        model_id=str(path_or_toy),
        revision=checkpoint_revision(path),
        prompt=prompt,
        pad_token_id=pad_token_id,
        token_budget=token_budget,
        conversation=conversation,
    )


def load_checkpoint(path_or_toy, dtype: str = "float32", device: str = "cpu"):
    """(model, processor) of "toy" or a checkpoint directory, through the same `from_pretrained` calls a user
    makes, with the model class its config's `model_type` names (LLaVA-1.5, LLaVA-NeXT, OneVision, NeXT-Video)."""
    path = resolve_checkpoint(str(path_or_toy))
    dev, dt = resolve_device_dtype(device, dtype)
    processor = AutoProcessor.from_pretrained(path)
    model = MODEL_CLASSES[model_type_of(path)].from_pretrained(path, dtype=dt).to(dev).eval()
    return model, processor


def model_type_of(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["model_type"]
