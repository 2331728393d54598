"""The toy world (v2): synthetic scenes in which the token budget is scarce, with exact ground truth.

A 144 px image is a 12 x 12 grid of 12 px patches (LLaVA-1.5's 24 x 24 in miniature: 11.1% kept is
16 tokens). A scene holds one to six objects, sizes down to a single patch, on two to four background
regions of different textures, plus recurring high-contrast distractor badges that no question is
about. The questions need every object (count, existence, the attribute of a named object, the
method's single-word prompt), so which tokens are kept decides the answer: docs/METHOD.md, "The toy
world". Every sample knows, per patch, which object covers it and whether it holds a distractor, so
object / background / distractor is ground truth. Rendering is deterministic for
(split, seed, shard, index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vrc_dist.config import DEFAULT_PROMPT

WORLD_VERSION = 2
SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
YES_NO = ("yes", "no")
TEXTURES = ("solid", "gradient", "noise", "stripes")
SPLITS = ("train", "eval")

IMAGE_SIZE = 144
GRID = 12

QUESTION_TEMPLATES = {
    "single": DEFAULT_PROMPT,
    "shape": "What shape is the {colour} object?",
    "colour": "What colour is the {shape}?",
    "count": "How many objects are there?",
    "exist": "Is there a {colour} {shape}?",
}
QUESTION_TYPES = tuple(QUESTION_TEMPLATES)


def vocabulary() -> list[str]:
    """Every word the toy world can ask or answer, lower-cased (the tokenizer lower-cases too)."""
    words = set()
    for text in QUESTION_TEMPLATES.values():
        words.update(text.replace("{", " ").replace("}", " ").lower().replace("?", " ? ").replace(".", " . ").split())
    words.update(SHAPES, COLOURS, COUNT_WORDS, YES_NO, ("user", "assistant", ":", ",", "object", "objects"))
    return sorted(words)


@dataclass
class WorldSpec:
    image_size: int = IMAGE_SIZE
    grid: int = GRID
    max_objects: int = 6
    main_size: tuple[float, float] = (30.0, 44.0)  # the largest object: the single-word prompt's answer
    small_size: tuple[float, float] = (12.0, 24.0)  # the others, down to one patch
    max_distractors: int = 4
    distractor_prob: float = 0.8  # scenes with at least one distractor badge
    questions_per_attribute: int = 2  # shape and colour questions asked per scene, at most


def _rng(split: str, seed: int, shard: int, index: int) -> np.random.Generator:
    # The split and the world version are part of the stream's identity: train and eval never render
    # the same image, and a v2 seed is not a v1 scene with more objects.
    return np.random.default_rng([SPLITS.index(split) + 1, seed, shard, index, WORLD_VERSION])


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour, so backgrounds never look like an object colour."""
    grey = rng.uniform(70, 200)
    return 0.7 * grey + 0.3 * rng.uniform(0, 255, size=3)


def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    base = _muted(rng)
    if kind == "solid":
        return np.broadcast_to(base, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = ((t - t.min()) / max(np.ptp(t), 1e-9))[..., None]
        return base * (1 - t) + _muted(rng) * t
    if kind == "noise":
        return base + rng.normal(0, rng.uniform(6, 18), size=(size, size, 1))
    period = int(rng.integers(6, 16))
    phase = (xx if rng.random() < 0.5 else yy) // (period // 2) % 2
    return base + (phase[..., None] * 2 - 1) * rng.uniform(8, 20)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[str]]:
    """Two to four regions cut by one or two random lines, each with its own texture."""
    yy, xx = np.mgrid[0:size, 0:size] - size / 2
    region = np.zeros((size, size), dtype=int)
    for bit in range(int(rng.integers(1, 3))):
        angle, offset = rng.uniform(0, math.pi), rng.uniform(-size / 4, size / 4)
        region += (np.cos(angle) * xx + np.sin(angle) * yy > offset).astype(int) << bit
    kinds = [TEXTURES[rng.integers(len(TEXTURES))] for _ in range(region.max() + 1)]
    img = np.zeros((size, size, 3))
    for r, kind in enumerate(kinds):
        img[region == r] = _texture(rng, kind, size)[region == r]
    return np.clip(img, 0, 255), [kinds[r] for r in np.unique(region)]


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


def _kinds(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """`n` distinct (colour, shape) pairs: every object can be named, and counting is counting kinds."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]


def _place_objects(rng: np.random.Generator, spec: WorldSpec):
    """One large object and up to `max_objects - 1` small ones, none touching another."""
    size = spec.image_size
    while True:
        n = int(rng.integers(1, spec.max_objects + 1))
        sizes = [rng.uniform(*spec.main_size)] + [rng.uniform(*spec.small_size) for _ in range(n - 1)]
        owner, objects, boxes = np.zeros((size, size), dtype=np.int8), [], []
        for j, ((colour, shape), s) in enumerate(zip(_kinds(rng, n), sizes)):
            for _ in range(50):  # free spots are plenty: six objects cover under a fifth of the image
                cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
                box = (cx - s / 2 - 3, cy - s / 2 - 3, cx + s / 2 + 3, cy + s / 2 + 3)
                if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                    break
            else:
                break
            boxes.append(box)
            mask = _shape_mask(shape, cx, cy, float(s), size)
            owner[mask] = j + 1
            ys, xs = np.nonzero(mask)
            objects.append({"shape": shape, "colour": colour, "size": round(float(s), 2), "area": int(mask.sum()),
                            "cx": round(float(xs.mean()), 2), "cy": round(float(ys.mean()), 2)})
        else:
            areas = sorted((o["area"] for o in objects), reverse=True)
            # The single-word answer is the largest object's shape: it must be clearly the largest.
            if n == 1 or areas[0] >= 1.5 * areas[1]:
                return objects, owner


def _patch_masks(owner: np.ndarray, grid: int):
    """Per patch: the object covering most of it (0 = none) and the fraction covered by any object."""
    p = owner.shape[0] // grid
    blocks = owner.reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid, grid, p * p)
    coverage = (blocks > 0).mean(-1)
    counts = np.stack([(blocks == j).sum(-1) for j in range(1, int(owner.max()) + 1)], -1)
    mask = np.where(coverage > 0, counts.argmax(-1) + 1, 0)
    return mask.astype(int), np.round(coverage, 3)


def _badge(kind: int, p: int) -> np.ndarray:
    """The recurring distractors: a black-and-white checker and a white ring on black, one patch each."""
    yy, xx = np.mgrid[0:p, 0:p]
    if kind == 0:
        on = (yy // (p // 4) + xx // (p // 4)) % 2 == 0
    else:
        r = np.hypot(yy - (p - 1) / 2, xx - (p - 1) / 2)
        on = (r > p * 0.22) & (r < p * 0.42)
    return np.where(on[..., None], 245.0, 15.0) * np.ones(3)


def _place_distractors(rng, img: np.ndarray, mask: np.ndarray, spec: WorldSpec) -> np.ndarray:
    """Badges on grid cells no object touches; returns the per-patch distractor mask."""
    distractor = np.zeros_like(mask)
    if rng.random() >= spec.distractor_prob:
        return distractor
    p = spec.image_size // spec.grid
    free = np.flatnonzero(mask.ravel() == 0)
    for cell in rng.choice(free, size=int(rng.integers(1, spec.max_distractors + 1)), replace=False):
        r, c = divmod(int(cell), spec.grid)
        img[r * p:(r + 1) * p, c * p:(c + 1) * p] = _badge(int(rng.integers(2)), p)
        distractor[r, c] = 1
    return distractor


def _questions(rng: np.random.Generator, objects: list[dict], spec: WorldSpec) -> list[dict]:
    """Each QA names the object it is about (`object`, 1-based; 0 = about all objects or none)."""
    def qa(kind, answer, obj, **names):
        return {"type": kind, "question": QUESTION_TEMPLATES[kind].format(**names), "answer": answer, "object": obj}

    largest = 1 + max(range(len(objects)), key=lambda j: objects[j]["area"])
    out = [qa("single", objects[largest - 1]["shape"], largest)]
    colours, shapes = [o["colour"] for o in objects], [o["shape"] for o in objects]
    by_colour = [j for j, o in enumerate(objects) if colours.count(o["colour"]) == 1]
    by_shape = [j for j, o in enumerate(objects) if shapes.count(o["shape"]) == 1]
    k = spec.questions_per_attribute
    for j in sorted(int(j) for j in rng.permutation(by_colour)[:k]):
        out.append(qa("shape", objects[j]["shape"], j + 1, colour=objects[j]["colour"]))
    for j in sorted(int(j) for j in rng.permutation(by_shape)[:k]):
        out.append(qa("colour", objects[j]["colour"], j + 1, shape=objects[j]["shape"]))
    out.append(qa("count", COUNT_WORDS[len(objects)], 0))
    present = int(rng.integers(len(objects)))
    out.append(qa("exist", "yes", present + 1, colour=colours[present], shape=shapes[present]))
    # An absent kind that shares its colour or its shape with a present object half of the time,
    # so "no" needs the binding of colour to shape, not just a glance at the colours.
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in set(zip(colours, shapes))]
    near = [(c, s) for c, s in absent if c in colours or s in shapes]
    pool = near if near and rng.random() < 0.5 else absent
    colour, shape = pool[rng.integers(len(pool))]
    out.append(qa("exist", "no", 0, colour=colour, shape=shape))
    return out


def render(split: str, seed: int, shard: int, index: int, spec: WorldSpec = WorldSpec()):
    """Return (PIL RGB image, metadata dict) for one sample of the world."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _rng(split, seed, shard, index)
    img, textures = _background(rng, spec.image_size)
    objects, owner = _place_objects(rng, spec)
    for j, o in enumerate(objects):
        jitter = rng.integers(-20, 21, size=3)
        img[owner == j + 1] = np.clip(np.array(COLOURS[o["colour"]]) + jitter, 0, 255)
    mask, coverage = _patch_masks(owner, spec.grid)
    distractor = _place_distractors(rng, img, mask, spec)
    qa = _questions(rng, objects, spec)
    meta = {
        # The world version leads the key: provenance that names a v1 image cannot be read as a v2 one.
        "key": f"w{WORLD_VERSION}-{split}-s{seed}-{shard:05d}-{index:05d}",
        "world": WORLD_VERSION,
        "split": split,
        "seed": seed,
        "size": [spec.image_size, spec.image_size],
        "grid": [spec.grid, spec.grid],
        "background": textures,
        "objects": objects,
        # Per patch, raster grid: object index (0 = none), object coverage, distractor badge (0/1).
        "mask": mask.tolist(),
        "coverage": coverage.tolist(),
        "distractor": distractor.tolist(),
        "answer": qa[0]["answer"],
        "qa": qa,
    }
    return Image.fromarray(img.astype(np.uint8), "RGB"), meta


def parse_key(key: str) -> tuple[str, int, int, int]:
    """(split, seed, shard, index) of a toy sample key, so its ground truth can be rendered again."""
    try:
        world, split, seed, shard, index = key.split("-")
        if world != f"w{WORLD_VERSION}" or split not in SPLITS or not seed.startswith("s"):
            raise ValueError
        return split, int(seed[1:]), int(shard), int(index)
    except ValueError:
        raise ValueError(f"{key!r} is not a key of toy world v{WORLD_VERSION} "
                         f"(w{WORLD_VERSION}-SPLIT-sSEED-SHARD-INDEX)") from None


def patch_kinds(meta: dict) -> np.ndarray:
    """Per patch, flat in raster order: 'object', 'distractor' or 'background'."""
    mask, distractor = np.ravel(meta["mask"]), np.ravel(meta["distractor"])
    return np.where(mask > 0, "object", np.where(distractor > 0, "distractor", "background"))
