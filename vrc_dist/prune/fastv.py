"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", 2024) in the pruning harness.

Layers 0..K-1 see every token. The attention the prompt's last token pays to each image token in layer
K-1 (averaged over heads) ranks them, and from layer K on only the top keep-ratio of each image's tokens
remain, keeping their original positions (FastV drops them from the sequence, it does not renumber).
The hooks gather the hidden states, rotary embeddings, position ids and 4-D mask at layer K; in decode
steps the layers from K on have a shorter cache, so their mask keeps only the surviving columns.
Every row must remove the same number of tokens (equal image sizes), so the batch stays rectangular.
Each image, crop or video frame is ranked within its own budget, as at the input (vrc_dist/prune/layout.py);
`crops="base-only"` is refused: the crops would still reach layers 0..K-1.
"""
from __future__ import annotations

import sys

import torch

from vrc_dist.config import FASTV_LAYER
from vrc_dist.model.adapter import given_cache
from vrc_dist.prune.hooks import HookedPruner
from vrc_dist.prune.layout import layout
from vrc_dist.prune.methods import check_keep, keep_count


class FastV:
    name = "fastv"

    def __init__(self, keep: float, layer: int = FASTV_LAYER):
        self.keep = check_keep(keep)
        if layer < 1:
            raise ValueError(f"FastV prunes after a layer K >= 1, got K={layer}")
        self.layer = layer

    def pruner(self, model, crops: str = "all"):
        if crops == "base-only":
            raise ValueError("fastv prunes inside the LLM, so it cannot give it the base image only; "
                             "use crops='all' or 'per-crop'")
        return FastVPruner(model, self, crops)


def _gather(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-row index along `dim` of a batch-first tensor (broadcast batch of 1 allowed)."""
    x = x.expand(idx.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    view = idx.view(shape).expand(*x.shape[:dim], idx.shape[1], *x.shape[dim + 1:])
    return x.gather(dim, view)


class FastVPruner(HookedPruner):
    def __init__(self, model, fastv: FastV, crops: str = "all"):
        super().__init__(model, crops)
        self.fastv = fastv
        layers = model.model.language_model.layers
        if fastv.layer >= len(layers):
            raise ValueError(f"FastV layer K={fastv.layer} but the language model has {len(layers)} layers")
        self.layers = layers
        self._pad = None
        self._attention = None
        self._keep_idx = None  # [B, T'] positions surviving layer K (prefill), kept for decode
        self._length = None  # unpruned prompt length
        self._step = None  # this forward's gathered (mask, position_embeddings, position_ids)

    def attach(self):
        m = self.model.model
        self._handles = [
            *self._hooks(),
            m.language_model.register_forward_pre_hook(self._before_llm, with_kwargs=True),
            self.layers[self.fastv.layer - 1].self_attn.register_forward_pre_hook(self._rank, with_kwargs=True),
        ]
        for layer in self.layers[self.fastv.layer:]:
            self._handles.append(layer.register_forward_pre_hook(self._before_layer, with_kwargs=True))
        return self

    def _before_llm(self, module, args, kwargs):
        cache = given_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        self._step, self._phase = None, None
        if past == 0:
            self._keep_idx = None
        if self._visual_prefill(past):
            self._phase = "prefill"
            embeds = kwargs["inputs_embeds"]
            mask = kwargs.get("attention_mask")
            self._pad = None if mask is None else mask.bool()
            self._length = embeds.shape[1]
            self.units, _ = layout(self.model, self._input_ids, embeds, self.tap, self.crops)
        elif past > 0 and self._keep_idx is not None:
            self._phase = "decode"
        return args, kwargs

    @torch.no_grad()
    def _rank(self, attn, args, kwargs):
        if self._phase != "prefill":
            return
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own rotary convention
        batch, length, _ = h.shape
        q = attn.q_proj(h[:, -1:]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        q = rope(q, q, cos[:, -1:], sin[:, -1:])[0]
        k = rope(k, k, cos, sin)[0].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, heads, T]
        if self._pad is not None:
            scores = scores.masked_fill(~self._pad[:, None, :], float("-inf"))
        self._attention = torch.softmax(scores.float(), dim=-1).mean(1)

    def _select(self) -> torch.Tensor:
        self.kept, self.total = [], []
        keep = torch.ones(self._attention.shape[0], self._length, dtype=torch.bool, device=self._attention.device)
        for unit in self.units:
            n = keep_count(self.fastv.keep, len(unit.positions))
            order = torch.argsort(self._attention[unit.row, unit.positions], descending=True, stable=True)
            keep[unit.row, unit.positions[order[n:]]] = False
            self.kept.append(n)
            self.total.append(len(unit.positions))
        rows = [k.nonzero().flatten() for k in keep]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("FastV needs every row of the batch to remove the same number of tokens "
                             "(images of equal token count); batch unequal images separately")
        return torch.stack(rows)

    def _before_layer(self, layer, args, kwargs):
        if self._phase is None:
            return args, kwargs
        if self._step is None:
            self._step = self._prefill_step(kwargs) if self._phase == "prefill" else self._decode_step(kwargs)
        mask, pos_emb, pos_ids = self._step
        kwargs = dict(kwargs, attention_mask=mask, position_embeddings=pos_emb, position_ids=pos_ids)
        if self._phase == "prefill" and args[0].shape[1] == self._length:  # layer K: the one that shrinks
            args = (_gather(args[0], self._keep_idx, 1), *args[1:])
        return args, kwargs

    def _prefill_step(self, kwargs):
        idx = self._keep_idx = self._select()
        mask = kwargs.get("attention_mask")
        if mask is not None:  # [B, 1, T, T]: rows and columns of the surviving positions
            mask = _gather(_gather(mask, idx, 2), idx, 3)
        cos, sin = kwargs["position_embeddings"]
        pos_ids = kwargs.get("position_ids")
        return mask, (_gather(cos, idx, 1), _gather(sin, idx, 1)), (
            None if pos_ids is None else _gather(pos_ids, idx, 1))

    def _decode_step(self, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None:  # columns: the surviving prompt positions, then everything generated since
            new = torch.arange(self._length, mask.shape[-1], device=mask.device).expand(len(self._keep_idx), -1)
            mask = _gather(mask, torch.cat([self._keep_idx, new], dim=1), 3)
        return mask, kwargs["position_embeddings"], kwargs.get("position_ids")
