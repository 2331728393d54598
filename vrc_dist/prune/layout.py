"""Where each image, crop and video frame sits in a LLaVA prompt, so that each gets its own budget.

By the time the language model runs, the visual features are merged into `inputs_embeds` and only the
placeholder ids (`image_token_id`, `video_token_id`) say where they went. How many of those positions
belong to each image or video is known only to the model's own encoder (NeXT and OneVision images vary
in length with their size and crops), so a FeatureTap records what `get_image_features` and
`get_video_features` returned; the model scatters those features over its placeholders in order.

Units, each pruned to its own budget (docs/METHOD.md step 9):
- an image, with `crops="all"` (the default: base image and every AnyRes crop together);
- a NeXT / OneVision crop with `crops="per-crop"` (part 0 is the base image, parts 1.. the crops in
  raster order); with `crops="base-only"` the crops are removed outright and the base image is the unit,
  the reference's evaluation mode for LLaVA-NeXT;
- a video frame: the content tokens of a video split into its frames, in order.
Learned newline tokens are layout, not content: they are never in a unit and always kept (except the
crops' row newlines in base-only mode, which go with their crops).
"""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass

import torch

CROPS = ("all", "per-crop", "base-only")


@dataclass(frozen=True)
class Unit:
    """One budget. `positions` are the sequence positions of its content tokens in `row`, ascending."""

    kind: str  # "image" or "video"
    item: int  # image or video number in the batch, in order of appearance
    part: int | None  # frame of a video, or crop of a per-crop image (0 = base); None for a whole image
    row: int
    positions: torch.Tensor


@dataclass
class Encoded:
    """What one call of the model's feature encoder returned for the whole batch."""

    lengths: list[int]  # placeholder tokens per image or video
    sizes: list[tuple[int, int]] | None = None  # image (height, width) before processing, NeXT / OneVision
    frames: int | None = None  # frames per video


class _Restore:
    """Undoes a FeatureTap's wrapper: the instance attribute goes, the class's method shows through again."""

    def __init__(self, obj, name: str):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


class FeatureTap:
    """Wraps the model's `get_image_features` / `get_video_features` to record each item's token count.

    A wrapper rather than a module hook because no module sees the packed per-image features; it is
    installed on the instance with the original's signature, which `generate` inspects to pass arguments."""

    def __init__(self, model):
        self.base = model.model
        self.last: dict[str, Encoded] = {}

    def attach(self) -> list[_Restore]:
        handles = []
        for kind in ("image", "video"):
            name = f"get_{kind}_features"
            original = getattr(self.base, name, None)
            if original is None:
                continue
            self.base.__dict__[name] = self._wrap(kind, original)
            handles.append(_Restore(self.base, name))
        return handles

    def _wrap(self, kind, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def tapped(*args, **kwargs):
            out = original(*args, **kwargs)
            given = signature.bind_partial(*args, **kwargs).arguments
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            self.last[kind] = self._encoded(kind, given, features)
            return out

        return tapped

    @staticmethod
    def _encoded(kind, given, features) -> Encoded:
        if kind == "image":
            sizes = given.get("image_sizes")
            sizes = None if sizes is None else [tuple(int(x) for x in s) for s in sizes]
            return Encoded([len(f) for f in features], sizes=sizes)
        videos, frames = given["pixel_values_videos"].shape[:2]
        # [videos, tokens, D] for OneVision and NeXT-Video, [videos * frames, tokens, D] for Video-LLaVA
        tokens = sum(f.numel() for f in features) // features[0].shape[-1]
        return Encoded([tokens // videos] * videos, frames=frames)

    def take(self, kind: str) -> Encoded | None:
        return self.last.pop(kind, None)


def newline_mask(model, block: torch.Tensor) -> torch.Tensor:
    """Which rows of an item's token block are the model's learned `image_newline` (NeXT, OneVision)."""
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return torch.zeros(len(block), dtype=torch.bool, device=block.device)
    return (block == newline.to(block)).all(-1)


def token_id(model, kind: str) -> int | None:
    return getattr(model.config, f"{kind}_token_id", None)


def layout(model, ids: torch.Tensor, embeds: torch.Tensor, tap: FeatureTap, crops: str = "all"):
    """(units, dropped): the budget units of a batch in order of appearance, and per row a bool mask of
    positions removed outright (base-only crops)."""
    units = []
    dropped = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for kind in ("image", "video"):
        tid = token_id(model, kind)
        where = (ids == tid).nonzero() if tid is not None else ids.new_zeros(0, 2)
        encoded = tap.take(kind)
        if not len(where):
            continue
        if encoded is None:
            raise ValueError(f"the prompt has {len(where)} {kind} tokens but the model encoded no {kind} in this "
                             f"forward: the pruner needs the pixel values, not precomputed features")
        if sum(encoded.lengths) != len(where):
            raise ValueError(f"the model encoded {sum(encoded.lengths)} {kind} features for {len(where)} {kind} "
                             f"tokens in the prompt (expanded inputs, e.g. num_return_sequences > 1, are not "
                             f"supported)")
        offset = 0
        for item, n in enumerate(encoded.lengths):
            row, start = _span(where[offset:offset + n], kind, item)
            offset += n
            block = embeds[row, start:start + n]
            newline = newline_mask(model, block)
            if kind == "video":
                units += _frames(item, row, start, newline, encoded.frames)
            else:
                size = None if encoded.sizes is None else encoded.sizes[item]
                units += _image(model, item, row, start, newline, size, crops, dropped)
    return units, dropped


def _span(where: torch.Tensor, kind: str, item: int) -> tuple[int, int]:
    rows, cols = where[:, 0], where[:, 1]
    if (rows != rows[0]).any() or (cols != cols[0] + torch.arange(len(cols), device=cols.device)).any():
        raise ValueError(f"{kind} {item}'s placeholder tokens are not one contiguous run in one row")
    return int(rows[0]), int(cols[0])


def _frames(item, row, start, newline, frames) -> list[Unit]:
    content = (~newline).nonzero().flatten() + start
    if len(content) % frames:
        raise ValueError(f"video {item}: {len(content)} content tokens do not split into {frames} equal frames")
    per_frame = len(content) // frames
    return [Unit("video", item, f, row, content[f * per_frame:(f + 1) * per_frame]) for f in range(frames)]


def _image(model, item, row, start, newline, size, crops, dropped) -> list[Unit]:
    content = (~newline).nonzero().flatten() + start
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    if crops == "all" or len(content) <= side * side:  # LLaVA-1.5, or a NeXT/OneVision image without crops
        return [Unit("image", item, None, row, content)]
    base, grid = content[:side * side], content[side * side:]
    if crops == "base-only":
        dropped[row, int(base[-1]) + 1:start + len(newline)] = True
        return [Unit("image", item, None, row, base)]
    if size is None:
        raise ValueError("per-crop pruning needs the image sizes the model was given (image_sizes)")
    rows = int(newline[side * side:].sum())
    crop = crop_ids(model, size, rows, len(grid) // rows).to(grid.device)
    return [Unit("image", item, 0, row, base)] + [
        Unit("image", item, c, row, grid[crop == c]) for c in crop.unique().tolist()]


def crop_ids(model, size: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """The AnyRes crop (1.. in raster order) of each token of an image's crop grid as the model lays it
    out: the crops stitched into one grid, its padding removed, possibly resized (OneVision), `rows` x
    `cols` tokens. Built with the model module's own grid and unpad functions, on crop numbers."""
    module = sys.modules[type(model.model).__module__]
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    crops_high, crops_wide = module.get_anyres_image_grid_shape(list(size), model.config.image_grid_pinpoints,
                                                                vision.image_size)
    r = torch.arange(crops_high * side) // side
    c = torch.arange(crops_wide * side) // side
    ids = (1 + r[:, None] * crops_wide + c[None, :]).float()
    ids = module.unpad_image(ids[None], size)
    if ids.shape[1:] != (rows, cols):  # OneVision shrinks large grids (anyres_max_9): follow it by nearest cell
        ids = torch.nn.functional.interpolate(ids[None], [rows, cols], mode="nearest")[0]
    return ids[0].flatten().long()
