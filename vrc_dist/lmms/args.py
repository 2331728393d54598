"""`vrc_llava`'s model args, checked before anything heavy happens: no lmms-eval import, no weights loaded.

Reads only the checkpoint's config.json and the codebook's manifest and vectors, so a bad argument is a
one-line error before lmms-eval reads any task data (it builds the model first).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from vrc_dist.codebook import Codebook
from vrc_dist.model import MODEL_CLASSES, resolve_checkpoint, resolve_device_dtype
from vrc_dist.prune import CODEBOOK_METHODS, GROUP_SIM, METHODS, CodebookMethod, check_keep, make_method
from vrc_dist.prune.layout import CROPS

# Need the toy world's per-patch ground truth, which an lmms-eval request does not carry.
TOY_ONLY = ("oracle", "anti-oracle")
LMMS_METHODS = tuple(m for m in METHODS if m not in TOY_ONLY)
# Model types whose transformers processor includes a video processor.
VIDEO_PROCESSOR_TYPES = ("llava_onevision", "llava_next_video")


class ModelArgError(ValueError):
    pass


@dataclass
class ModelArgs:
    pretrained: str
    path: Path
    model_class: type
    codebook: Codebook | None
    keep: float | None
    threshold: float | None
    method: str
    seed: int
    fastv_layer: int
    group_sim: float
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    crops: str = "all"

    def make_method(self):
        if self.threshold is not None:
            diverse, null = CODEBOOK_METHODS[self.method]
            return CodebookMethod(self.codebook, threshold=self.threshold, diverse=diverse,
                                  group_sim=self.group_sim, null_seed=self.seed if null else None)
        return make_method(self.method, self.keep, codebook=self.codebook, seed=self.seed,
                           fastv_layer=self.fastv_layer, group_sim=self.group_sim)

    def describe(self) -> str:
        rule = f"keep {self.keep}" if self.threshold is None else f"threshold {self.threshold}"
        cb = "" if self.codebook is None else f", codebook {self.codebook.path} v{self.codebook.version:04d}"
        return (f"{self.pretrained} ({self.model_class.__name__}), method {self.method}, {rule}{cb}, "
                f"crops {self.crops}, seed {self.seed}, {self.device} {str(self.dtype).replace('torch.', '')}, batch {self.batch_size}")


def _number(name: str, value, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ModelArgError(f"vrc_llava: {name}={value!r} is not a number") from None


def check_model_args(pretrained="toy", codebook=None, keep=None, threshold=None, method="codebook", seed=0,
                     fastv_layer=2, group_sim=None, device="auto", dtype="auto", batch_size=1,
                     crops="all", unknown=None) -> ModelArgs:
    if unknown:
        raise ModelArgError(f"vrc_llava: unknown model args {', '.join(sorted(unknown))}; expected pretrained, "
                            "codebook, keep or threshold, method, seed, fastv_layer, group_sim, device, dtype, "
                            "batch_size, crops")
    method = str(method)
    if method in TOY_ONLY:
        raise ModelArgError(f"vrc_llava: method {method!r} reads the toy world's per-patch ground truth, which "
                            "lmms-eval requests do not carry; use `vrc eval` for it")
    if method not in LMMS_METHODS:
        raise ModelArgError(f"vrc_llava: unknown method {method!r}; expected one of {', '.join(LMMS_METHODS)}")
    if crops not in CROPS:
        raise ModelArgError(f"vrc_llava: crops={crops!r}; expected one of {', '.join(CROPS)}")
    if crops == "base-only" and method == "fastv":
        raise ModelArgError("vrc_llava: fastv prunes inside the LLM, so it cannot give it the base image only")
    if (keep is None) == (threshold is None):
        raise ModelArgError("vrc_llava: give exactly one of keep (a ratio in (0, 1]) or threshold")
    if keep is not None:
        try:
            keep = check_keep(_number("keep", keep))
        except ValueError as e:
            raise ModelArgError(f"vrc_llava: {e}") from None
    if threshold is not None:
        threshold = _number("threshold", threshold)
        if method not in CODEBOOK_METHODS:
            raise ModelArgError(f"vrc_llava: threshold= works with the codebook methods "
                                f"({', '.join(CODEBOOK_METHODS)}), not {method!r}; give keep=")
    batch_size = _number("batch_size", batch_size, int)
    if batch_size < 1:
        raise ModelArgError(f"vrc_llava: batch_size must be at least 1, got {batch_size}")
    seed, fastv_layer = _number("seed", seed, int), _number("fastv_layer", fastv_layer, int)
    group_sim = GROUP_SIM if group_sim is None else _number("group_sim", group_sim)
    try:
        path = resolve_checkpoint(str(pretrained))
        dev, dt = resolve_device_dtype(str(device), str(dtype))
    except ValueError as e:
        raise ModelArgError(f"vrc_llava: {e}") from None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)  # config.json only, with the class defaults hub configs omit
    model_class = MODEL_CLASSES[config.model_type]
    if config.model_type in VIDEO_PROCESSOR_TYPES and importlib.util.find_spec("torchvision") is None:
        # transformers builds these processors with a video processor, which requires torchvision.
        raise ModelArgError(f"vrc_llava: {pretrained}: the {model_class.__name__} processor needs torchvision (for "
                            "its video processor) and this environment has none; run it where torch has a matching "
                            "torchvision (pip install -e \".[lmms]\" there)")
    dim = config.text_config.hidden_size
    cb = None
    if method in CODEBOOK_METHODS:
        if codebook is None or codebook == "":
            raise ModelArgError(f"vrc_llava: method {method!r} needs codebook= (a codebook directory, or toy)")
        try:
            cb = Codebook.open(str(codebook), expected_dim=dim)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise ModelArgError(f"vrc_llava: codebook {codebook!r}: {e}") from None
    return ModelArgs(str(pretrained), path, model_class, cb, keep, threshold, method, seed, fastv_layer, group_sim,
                     dev, dt, batch_size, crops)
