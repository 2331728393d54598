"""Toy samples from shards, encoded once for training and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from vrc_dist.data.images import load_image
from vrc_dist.data.shards import expand_shards, iter_samples
from vrc_dist.model import chat_prompt


def load_toy_samples(shards) -> list[dict]:
    """Every sample of toy shards given in any --shards form (vrc_dist.shards.expand_shards), in shard order:
    {'key', 'image' (HWC uint8), 'meta'}. A sample without pixels or sidecar is an error naming it."""
    samples = []
    for spec in expand_shards(shards):
        for s in iter_samples(spec.url):
            if s.error or s.meta is None:
                raise ValueError(f"{spec.url}: sample {s.key!r} is not a toy sample: {s.error or 'no .json sidecar'}")
            image = np.asarray(load_image(s.image, f"{spec.url}:{s.image_member}"))
            samples.append({"key": s.key, "image": image, "meta": s.meta})
    return samples


@dataclass
class EncodedQA:
    """One row per (image, question): token ids around the image placeholder and the answer id."""

    prefix: list[int] = field(default_factory=list)  # shared: everything before the image
    image: np.ndarray = None  # index into the pixel tensor
    suffix: list[tuple[int, ...]] = field(default_factory=list)
    answer: list[int] = field(default_factory=list)
    qtype: list[str] = field(default_factory=list)
    owner: list[np.ndarray] = field(default_factory=list)  # per-patch object index (1-based, 0 = none)
    target: list[int] = field(default_factory=list)  # the object the answer is about; 0 = all of them


def target_object(qa: dict) -> int:
    """1-based index of the object a question is about (0: about all objects, or about none present)."""
    return int(qa["object"])


@lru_cache(maxsize=1024)  # a few dozen distinct questions across tens of thousands of samples
def prompt_ids(processor, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the single image placeholder, from the model's own chat template."""
    ids = processor.tokenizer(chat_prompt(processor, question))["input_ids"]
    pos = ids.index(processor.image_token_id)
    return ids[:pos], ids[pos + 1:]


def encode_samples(samples: list[dict], processor) -> tuple[torch.Tensor, EncodedQA]:
    pixels = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).contiguous()
    enc, image_index = EncodedQA(), []
    for i, s in enumerate(samples):
        for qa in s["meta"]["qa"]:
            prefix, suffix = prompt_ids(processor, qa["question"])
            enc.prefix = prefix
            image_index.append(i)
            enc.suffix.append(tuple(suffix))
            enc.answer.append(processor.tokenizer.convert_tokens_to_ids(qa["answer"]))
            enc.qtype.append(qa["type"])
            enc.owner.append(np.asarray(s["meta"]["mask"]).reshape(-1))
            enc.target.append(target_object(qa))
    enc.image = np.asarray(image_index)
    return pixels, enc
