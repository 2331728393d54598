"""The toy world: synthetic images of a few objects on varied backgrounds, with exact ground truth.

Every sample knows which patch of the model's grid each object covers, so "redundant" has a ground
truth here: background patches. Rendering is deterministic for (split, seed, shard, index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vrc_dist.config import DEFAULT_PROMPT

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
COUNT_WORDS = ("zero", "one", "two", "three")
BACKGROUNDS = ("solid", "gradient", "noise", "stripes")
SPLITS = ("train", "eval")

IMAGE_SIZE = 96
GRID = 8

QUESTION_TEMPLATES = {
    "single": DEFAULT_PROMPT,
    "shape": "What shape is the {colour} object?",
    "colour": "What colour is the {shape}?",
    "count": "How many objects are there?",
    "position": "Is the {colour} {shape} on the left or the right?",
}
QUESTION_TYPES = tuple(QUESTION_TEMPLATES)
POSITIONS = ("left", "right")


def vocabulary() -> list[str]:
    """Every word the toy world can ask or answer, lower-cased (the tokenizer lower-cases too)."""
    words = set()
    for text in QUESTION_TEMPLATES.values():
        words.update(text.replace("{", " ").replace("}", " ").lower().replace("?", " ? ").replace(".", " . ").split())
    words.update(SHAPES, COLOURS, COUNT_WORDS, POSITIONS, ("user", "assistant", ":", ",", "object", "objects"))
    return sorted(words)


@dataclass
class WorldSpec:
    image_size: int = IMAGE_SIZE
    grid: int = GRID
    min_size: int = 28
    max_size: int = 48
    max_objects: int = 3


def _rng(split: str, seed: int, shard: int, index: int) -> np.random.Generator:
    # The split is part of the stream's identity, so train and eval never render the same image.
    return np.random.default_rng([SPLITS.index(split) + 1, seed, shard, index])


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour, so backgrounds never look like an object colour."""
    grey = rng.uniform(70, 200)
    return 0.7 * grey + 0.3 * rng.uniform(0, 255, size=3)


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    base = _muted(rng)
    if kind == "solid":
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == "gradient":
        other = _muted(rng)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / max(np.ptp(t), 1e-9)
        img = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == "noise":
        img = base + rng.normal(0, rng.uniform(6, 18), size=(size, size, 1))
    else:  # stripes
        period = rng.integers(6, 16)
        yy, xx = np.mgrid[0:size, 0:size]
        phase = (xx if rng.random() < 0.5 else yy) // (period // 2) % 2
        img = base + (phase[..., None] * 2 - 1) * rng.uniform(8, 20)
    return np.clip(img, 0, 255)


def _shape_mask(shape: str, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    r = s / 2
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square":
        q = r * 0.85
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=1)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=1)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=1)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=1)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=1)
    return np.asarray(mask, dtype=bool)


def _place_objects(rng: np.random.Generator, spec: WorldSpec):
    """Draw objects until the scene is unambiguous: one clearly largest, every object mostly visible."""
    size = spec.image_size
    while True:
        n = int(rng.integers(1, spec.max_objects + 1))
        objects, owner = [], np.zeros((size, size), dtype=np.int8)
        for j in range(n):
            s = float(rng.uniform(spec.min_size, spec.max_size))
            cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            mask = _shape_mask(shape, cx, cy, s, size)
            owner[mask] = j + 1  # later objects occlude earlier ones
            objects.append({"shape": shape, "colour": colour, "size": round(s, 2), "full_area": int(mask.sum())})
        areas = [int((owner == j + 1).sum()) for j in range(n)]
        if any(a < 0.4 * o["full_area"] for a, o in zip(areas, objects)):
            continue
        ranked = sorted(areas, reverse=True)
        # The single-word answer is the largest object's shape; the model sees 12-pixel patches, so
        # areas closer than 1.5x are a coin toss at its resolution (crosses and stars fill few pixels).
        if n > 1 and ranked[0] < 1.5 * ranked[1]:
            continue
        for j, o in enumerate(objects):
            ys, xs = np.nonzero(owner == j + 1)
            o.update(area=areas[j], cx=round(float(xs.mean()), 2), cy=round(float(ys.mean()), 2))
            del o["full_area"]
        return objects, owner


def _patch_masks(owner: np.ndarray, grid: int):
    """Per patch: the object covering most of it (0 = none) and the fraction covered by any object."""
    p = owner.shape[0] // grid
    blocks = owner.reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid, grid, p * p)
    coverage = (blocks > 0).mean(-1)
    counts = np.stack([(blocks == j).sum(-1) for j in range(1, int(owner.max()) + 1)], -1)
    mask = np.where(coverage > 0, counts.argmax(-1) + 1, 0)
    return mask.astype(int).tolist(), np.round(coverage, 3).tolist()


def _questions(objects: list[dict], image_size: int) -> list[dict]:
    largest = max(objects, key=lambda o: o["area"])
    qa = [{"type": "single", "question": QUESTION_TEMPLATES["single"], "answer": largest["shape"]}]
    colours = [o["colour"] for o in objects]
    shapes = [o["shape"] for o in objects]
    for o in objects:
        if colours.count(o["colour"]) == 1:
            qa.append({"type": "shape", "question": QUESTION_TEMPLATES["shape"].format(**o), "answer": o["shape"]})
        if shapes.count(o["shape"]) == 1:
            qa.append({"type": "colour", "question": QUESTION_TEMPLATES["colour"].format(**o), "answer": o["colour"]})
        unique = sum(1 for p in objects if (p["colour"], p["shape"]) == (o["colour"], o["shape"])) == 1
        if unique and abs(o["cx"] - image_size / 2) >= image_size / 12:
            side = "left" if o["cx"] < image_size / 2 else "right"
            qa.append({"type": "position", "question": QUESTION_TEMPLATES["position"].format(**o), "answer": side})
    qa.append({"type": "count", "question": QUESTION_TEMPLATES["count"], "answer": COUNT_WORDS[len(objects)]})
    return qa


def render(split: str, seed: int, shard: int, index: int, spec: WorldSpec = WorldSpec()):
    """Return (PIL RGB image, metadata dict) for one sample of the world."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _rng(split, seed, shard, index)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    img = _background(rng, background, spec.image_size)
    objects, owner = _place_objects(rng, spec)
    for j, o in enumerate(objects):
        jitter = rng.integers(-20, 21, size=3)
        img[owner == j + 1] = np.clip(np.array(COLOURS[o["colour"]]) + jitter, 0, 255)
    mask, coverage = _patch_masks(owner, spec.grid)
    qa = _questions(objects, spec.image_size)
    key = f"{split}-s{seed}-{shard:05d}-{index:05d}"
    meta = {
        "key": key,
        "split": split,
        "seed": seed,
        "size": [spec.image_size, spec.image_size],
        "grid": [spec.grid, spec.grid],
        "background": background,
        "objects": objects,
        "mask": mask,
        "coverage": coverage,
        "answer": qa[0]["answer"],
        "qa": qa,
    }
    return Image.fromarray(img.astype(np.uint8), "RGB"), meta
