"""Identify-then-probe at inference (docs/METHOD.md step 9): drop visual tokens before the LLM's first layer.

    with prune_visual_tokens(model, "toy", keep=0.111) as pruner:
        out = model.generate(**inputs)
    pruner.kept  # visual tokens each image kept, in order of appearance

The pruner hooks a transformers LLaVA model (LLaVA-1.5, LLaVA-NeXT, OneVision) at the language model's
input, where the image features are already merged into `inputs_embeds`: every contiguous run of image
placeholder tokens is one image (all its crops, for NeXT and OneVision). A method reduces each run, the
rows are left-padded again, and the sequence the LLM sees is genuinely shorter, so prefill cost falls.
Positions are contiguous after removal (as if the shorter prompt had been typed), like the reference.
Learned newline tokens (NeXT, OneVision) are layout, not content: always kept and not counted in L.

Inside `generate` the decode steps are corrected too: the 2-D attention mask `generate` keeps growing
still has the unpruned length, so each decode step gets the pruned mask instead, and position ids given
by the caller are shifted by the number of tokens removed from that row.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from vrc_dist.codebook.store import Codebook
from vrc_dist.model.adapter import given_cache
from vrc_dist.prune.methods import GROUP_SIM, CodebookMethod, Method


def image_runs(is_image: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each contiguous run of True in a 1-D bool tensor: one run per image."""
    edges = torch.diff(is_image.int(), prepend=is_image.new_zeros(1).int(), append=is_image.new_zeros(1).int())
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def newline_mask(model, block: torch.Tensor) -> torch.Tensor:
    """Which rows of an image's token block are the model's learned `image_newline` (NeXT, OneVision)."""
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return torch.zeros(len(block), dtype=torch.bool, device=block.device)
    return (block == newline.to(block)).all(-1)


class HookedPruner:
    """Forward hooks on a LLaVA model that see its input ids and count kept tokens per image."""

    def __init__(self, model):
        self.model = model
        self.kept: list[int] = []  # content tokens kept per image, last prefill
        self.total: list[int] = []  # content tokens per image before pruning, last prefill
        self._input_ids = None
        self._handles = []

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _capture(self, module, args, kwargs):
        # The merged embeddings no longer say where the image was; the input ids do.
        self._input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self._input_ids is None and kwargs.get("pixel_values") is not None:
            raise ValueError("visual token pruning needs input_ids (it finds the image by its placeholder tokens)")


class InputPruner(HookedPruner):
    """Hooks that apply a Method to every image run before the first LLM layer; see the module docstring."""

    def __init__(self, model, method: Method):
        super().__init__(model)
        self.method = method
        self.image_token_id = model.config.image_token_id
        self._state = None  # (pruned 2-D mask, tokens removed per row, pruned length) for decode steps

    def attach(self):
        self._handles = self.method.attach(self.model)
        self._handles.append(self.model.model.register_forward_pre_hook(self._capture, with_kwargs=True))
        lm = self.model.model.language_model
        self._handles.append(lm.register_forward_pre_hook(self._before_llm, with_kwargs=True))
        return self

    def _before_llm(self, module, args, kwargs):
        cache = given_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        ids = self._input_ids
        if past == 0 and ids is not None and (ids == self.image_token_id).any():
            return args, self._prefill(kwargs)
        if past > 0 and self._state is not None:
            return args, self._decode(kwargs, past)
        return args, kwargs

    def _reduce_image(self, block: torch.Tensor, image: int) -> torch.Tensor:
        newline = newline_mask(self.model, block)
        content = (~newline).nonzero().flatten()
        tokens, idx = self.method.reduce(block[content], image)
        self.kept.append(len(tokens))
        self.total.append(len(content))
        if not newline.any():
            return tokens
        if idx is None:
            raise ValueError(f"method {self.method.name!r} merges tokens, so it cannot keep this model's newline tokens")
        return block[torch.sort(torch.cat([content[idx], newline.nonzero().flatten()])).values]

    def _prefill(self, kwargs):
        embeds = kwargs["inputs_embeds"]
        batch, length, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        valid = torch.ones(batch, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        self.kept, self.total, rows, image = [], [], [], 0
        for b in range(batch):
            is_image = self._input_ids[b] == self.image_token_id
            pieces, pos = [], 0
            for start, end in image_runs(is_image):
                pieces.append(embeds[b, pos:start][valid[b, pos:start]])
                pieces.append(self._reduce_image(embeds[b, start:end], image))
                image, pos = image + 1, end
            pieces.append(embeds[b, pos:][valid[b, pos:]])
            rows.append(torch.cat(pieces))
        new_len = max(len(r) for r in rows)
        new_embeds = embeds.new_zeros(batch, new_len, embeds.shape[-1])
        new_mask = torch.zeros(batch, new_len, dtype=torch.long, device=embeds.device)
        for b, r in enumerate(rows):  # left padding: the last position is every row's prompt end
            new_embeds[b, new_len - len(r):] = r
            new_mask[b, new_len - len(r):] = 1
        removed = valid.sum(1) - new_mask.sum(1)
        self._state = (new_mask, removed, new_len)
        kwargs = dict(kwargs, inputs_embeds=new_embeds)
        if mask is not None or not new_mask.all():
            kwargs["attention_mask"] = new_mask.to(mask.dtype if mask is not None else torch.long)
        if kwargs.get("position_ids") is not None:  # generate's convention: count of real tokens before
            kwargs["position_ids"] = (new_mask.cumsum(-1) - 1).clamp(min=0)
        return kwargs

    def _decode(self, kwargs, past):
        new_mask, removed, new_len = self._state
        step = kwargs["inputs_embeds"].shape[1]
        extra = new_mask.new_ones(new_mask.shape[0], past + step - new_len)
        kwargs = dict(kwargs, attention_mask=torch.cat([new_mask, extra], dim=1))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] - removed[:, None].to(kwargs["position_ids"])
        return kwargs


@contextmanager
def prune_visual_tokens(model, codebook: Codebook | str | None = None, *, keep: float | None = None,
                        threshold: float | None = None, diverse: bool = False, group_sim: float = GROUP_SIM,
                        method=None):
    """Prune visual tokens of `model` inside the block: by codebook (keep ratio or similarity threshold; the
    paper's rule, or this project's `diverse` extension), or by another `method` (see vrc_dist.prune.baselines).
    Yields the pruner; `.kept` lists tokens kept per image."""
    if method is None:
        if codebook is None:
            raise ValueError("give a codebook (with keep= or threshold=) or a method")
        method = CodebookMethod(codebook, keep=keep, threshold=threshold, diverse=diverse, group_sim=group_sim)
    elif codebook is not None or keep is not None or threshold is not None:
        raise ValueError("a method carries its own settings: give either method= or codebook/keep/threshold")
    pruner = method.pruner(model) if hasattr(method, "pruner") else InputPruner(model, method)
    pruner.attach()
    try:
        yield pruner
    finally:
        pruner.detach()
