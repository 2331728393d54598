"""Identify-then-probe at inference (docs/METHOD.md step 9): drop visual tokens before the LLM's first layer.

    with prune_visual_tokens(model, "toy", keep=0.111) as pruner:
        out = model.generate(**inputs)
    pruner.kept  # content tokens each unit kept (an image, a crop or a video frame), in order of appearance

The pruner hooks a transformers LLaVA model (LLaVA-1.5, LLaVA-NeXT, OneVision, NeXT-Video) at the
language model's input, where the visual features are already merged into `inputs_embeds`. Each image,
crop or video frame (vrc_dist/prune/layout.py) is reduced to its own budget, the rows are left-padded
again, and the sequence the LLM sees is genuinely shorter, so prefill cost falls. Positions are
contiguous after removal (as if the shorter prompt had been typed), like the reference. Learned newline
tokens (NeXT, OneVision) are layout, not content: always kept and not counted.

Inside `generate` the decode steps are corrected too: the 2-D attention mask `generate` keeps growing
still has the unpruned length, so each decode step gets the pruned mask instead, and position ids given
by the caller are shifted by the number of tokens removed from that row.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from vrc_dist.codebook.store import Codebook
from vrc_dist.model.adapter import given_cache
from vrc_dist.prune.layout import CROPS, FeatureTap, Unit, layout, token_id
from vrc_dist.prune.methods import GROUP_SIM, CodebookMethod, Method


class HookedPruner:
    """Forward hooks on a LLaVA model that see its input ids and the encoder's output, and report the
    content tokens kept per unit."""

    def __init__(self, model, crops: str = "all"):
        if crops not in CROPS:
            raise ValueError(f"crops must be one of {', '.join(CROPS)}, got {crops!r}")
        self.model = model
        self.crops = crops
        self.tap = FeatureTap(model)
        self.units: list[Unit] = []  # last prefill's budget units, in order of appearance
        self.kept: list[int] = []  # content tokens kept per unit, last prefill
        self.total: list[int] = []  # content tokens per unit before pruning, last prefill
        self._input_ids = None
        self._handles = []

    def by_item(self, kind: str = "image") -> tuple[list[int], list[int]]:
        """(kept, total) content tokens per image (or video) of the last prefill, its crops or frames summed."""
        kept, total = {}, {}
        for unit, k, t in zip(self.units, self.kept, self.total):
            if unit.kind == kind:
                kept[unit.item] = kept.get(unit.item, 0) + k
                total[unit.item] = total.get(unit.item, 0) + t
        return list(kept.values()), list(total.values())

    def _hooks(self) -> list:
        """The tap and the input-id capture, which every pruner needs."""
        return [*self.tap.attach(), self.model.model.register_forward_pre_hook(self._capture, with_kwargs=True)]

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _capture(self, module, args, kwargs):
        # The merged embeddings no longer say where the image was; the input ids do.
        self._input_ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("pixel_values_videos") is not None and token_id(self.model, "video") is None:
            raise ValueError(f"{type(self.model).__name__} has no video token (config.video_token_id): "
                             "it cannot take a video prompt")
        if self._input_ids is None and (kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs")):
            raise ValueError("visual token pruning needs input_ids (it finds the image by its placeholder tokens)")

    def _visual_prefill(self, past: int) -> bool:
        ids = self._input_ids
        if past > 0 or ids is None:
            return False
        return any(t is not None and bool((ids == t).any()) for t in (token_id(self.model, k) for k in ("image", "video")))


class InputPruner(HookedPruner):
    """Hooks that apply a Method to every unit before the first LLM layer; see the module docstring."""

    def __init__(self, model, method: Method, crops: str = "all"):
        super().__init__(model, crops)
        self.method = method
        self._state = None  # (pruned 2-D mask, tokens removed per row, pruned length) for decode steps

    def attach(self):
        self._handles = self.method.attach(self.model) + self._hooks()
        lm = self.model.model.language_model
        self._handles.append(lm.register_forward_pre_hook(self._before_llm, with_kwargs=True))
        return self

    def _before_llm(self, module, args, kwargs):
        cache = given_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            self._state = None
        if self._visual_prefill(past):
            return args, self._prefill(kwargs)
        if past > 0 and self._state is not None:
            return args, self._decode(kwargs, past)
        return args, kwargs

    def _rows(self, embeds: torch.Tensor, keep: torch.Tensor, merged: dict) -> list[torch.Tensor]:
        """Each row's surviving embeddings in sequence order. A merging method's tokens take the place
        of the unit's first token (sort keys between it and the next position)."""
        rows = []
        for b in range(len(embeds)):
            positions = keep[b].nonzero().flatten()
            keys, parts = [positions.double()], [embeds[b, positions]]
            for first, tokens in merged.get(b, []):
                keys.append(first + torch.arange(len(tokens), dtype=torch.float64, device=embeds.device) / len(tokens))
                parts.append(tokens)
            rows.append(torch.cat(parts)[torch.argsort(torch.cat(keys))])
        return rows

    def _prefill(self, kwargs):
        embeds = kwargs["inputs_embeds"]
        batch, length, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        valid = torch.ones(batch, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        self.units, dropped = layout(self.model, self._input_ids, embeds, self.tap, self.crops)
        self.kept, self.total = [], []
        keep, merged = valid & ~dropped, {}
        for i, unit in enumerate(self.units):
            tokens, idx = self.method.reduce(embeds[unit.row, unit.positions], i)
            self.kept.append(len(tokens))
            self.total.append(len(unit.positions))
            keep[unit.row, unit.positions] = False
            if idx is None:
                merged.setdefault(unit.row, []).append((int(unit.positions[0]), tokens))
            else:
                keep[unit.row, unit.positions[idx]] = True
        rows = self._rows(embeds, keep, merged)
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
                        method=None, crops: str = "all"):
    """Prune visual tokens of `model` inside the block: by codebook (keep ratio or similarity threshold; the
    paper's rule, or this project's `diverse` extension), or by another `method` (see vrc_dist.prune.baselines).
    Each image, or each video frame, gets its own budget; `crops` says how a NeXT / OneVision image's AnyRes
    crops are budgeted ("all": together, "per-crop": each its own, "base-only": crops removed, base pruned).
    Yields the pruner; `.kept` lists content tokens kept per unit, `.units` says which unit each is."""
    if method is None:
        if codebook is None:
            raise ValueError("give a codebook (with keep= or threshold=) or a method")
        method = CodebookMethod(codebook, keep=keep, threshold=threshold, diverse=diverse, group_sim=group_sim)
    elif codebook is not None or keep is not None or threshold is not None:
        raise ValueError("a method carries its own settings: give either method= or codebook/keep/threshold")
    pruner = method.pruner(model, crops) if hasattr(method, "pruner") else InputPruner(model, method, crops)
    pruner.attach()
    try:
        yield pruner
    finally:
        pruner.detach()
