"""Adapter over the `transformers` LLaVA classes: what the probe needs, and nothing it doesn't.

The probe sees every LLaVA variant the same way: an image becomes L projected visual tokens on a
(gh, gw) grid, and any block of n token embeddings can be spliced between the prompt's prefix and
suffix to get the first generated token's logits.
- LLaVA-NeXT and OneVision: only the base image (the whole picture resized to the tower's input) is
  used; the anyres tiles and newline embeddings are left out, so the grid is the tower's patch grid.
- SigLIP towers (OneVision) have no CLS token: `cls` is None and the probe's cls_sim is NaN.
- Batched logits reuse the prompt prefix's KV cache, computed once per prompt and expanded to the
  batch; the last layer's output and the LM head are computed for the final position only; and a
  forward never holds more than `token_budget` tokens (batch x full sequence length).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import DynamicCache

from vrc_dist.config import DEFAULT_PROMPT, DEFAULT_TOKEN_BUDGET
from vrc_dist.model.chat import conversation, llava_v1_prompt

LEADING_A = "\u2581A"  # the SentencePiece piece "▁A" the reference scripts skip when it comes first


def leading_a_token_id(tokenizer, model_id: str = "") -> int:
    """The id of the vocabulary piece "▁A" (LLaMA's SentencePiece: 319), which `probe.skip_leading_a` skips.

    The reference compares `convert_ids_to_tokens(id) == "\u2581A"`, so only that exact piece counts; a
    tokenizer without it (byte-level BPE spells it "ĠA", word-level tokenizers have none) would never
    trigger the rule, so that is an error rather than a silent no-op."""
    token_id = tokenizer.get_vocab().get(LEADING_A)
    if token_id is None:
        raise ModelError(f"probe.skip_leading_a: the tokenizer of {model_id or 'this model'} has no {LEADING_A!r} "
                         "piece (the rule is the reference scripts' for SentencePiece tokenizers such as LLaVA-1.5's)")
    return int(token_id)


class ModelError(ValueError):
    pass


# transformers 5.24 renamed the KV-cache argument of its model forwards from `past_key_values` to `cache`
# (the old name is deprecated, to be removed in 5.40). Both names are supported, for the lock's older range.

def cache_argument(module: torch.nn.Module) -> str:
    """The name under which `module.forward` takes its KV cache in the installed transformers."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def given_cache(kwargs: dict):
    """The KV cache a forward pre-hook was given, under either name (None if none)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


@dataclass
class VisualFeatures:
    """One image as the model sees it, before the language model."""

    cls: torch.Tensor | None  # [Dv] ViT CLS at the feature layer; None for towers without one
    patches: torch.Tensor  # [L, Dv] ViT patch features at the feature layer, raster order
    tokens: torch.Tensor  # [L, D] projected visual tokens, in the LLM's input-embedding space
    grid: tuple[int, int]  # (gh, gw), L = gh * gw


@dataclass
class KVContext:
    """Per-layer keys/values of a batch-1 sequence, reusable as a cached prefix of any length <= `length`."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # each [1, heads, length, head_dim]
    length: int


@contextmanager
def last_position_only(layer):
    """Run the last decoder layer's attention output projection and MLP on the final position only.

    Only that position's output is ever read, and the layer still computes keys and values for every
    position, so the result there is exact; the residual adds broadcast, leaving the other positions'
    outputs meaningless. Saves most of one layer: ~40% of a 2-layer toy LM, ~2% of a 32-layer one.
    """

    def final_position(module, args):
        return (args[0][:, -1:],)

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(final_position),
               layer.mlp.register_forward_pre_hook(final_position)]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LlavaAdapter:
    def __init__(
        self,
        model,
        image_processor,
        tokenizer,
        model_id: str,
        revision: str = "",
        prompt: str = DEFAULT_PROMPT,
        pad_token_id: int | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        conversation: str = "template",
    ):
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
        self.conversation = conversation
        self.model_id, self.revision = model_id, revision
        self.config = model.config
        self.device, self.dtype = model.device, model.dtype
        self.token_budget = token_budget
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.language_model = model.model.language_model
        self._cache_arg = cache_argument(self.language_model)
        self.lm_head = model.lm_head
        self.pad_token_id = self._pad_token_id(pad_token_id)
        embed = model.get_input_embeddings()
        with torch.no_grad():
            self.pad_embedding = embed(torch.tensor([self.pad_token_id], device=self.device))[0]
            prefix_ids, suffix_ids = self._prompt_ids(prompt)
            self.prefix_embeddings = embed(prefix_ids.to(self.device))
            self.suffix_embeddings = embed(suffix_ids.to(self.device))
        self.prompt = prompt
        self._prefix_context: KVContext | None = None

    def _pad_token_id(self, override: int | None) -> int:
        candidates = (override, self.tokenizer.pad_token_id, getattr(self.config.get_text_config(), "pad_token_id", None))
        pad = next((c for c in candidates if c is not None), None)
        if pad is None:
            raise ModelError(f"{self.model_id}: no pad token id in the tokenizer or config; set probe pad_token_id")
        vocab = self.model.get_input_embeddings().num_embeddings
        if not 0 <= pad < vocab:
            raise ModelError(f"{self.model_id}: pad token id {pad} outside the embedding table (size {vocab})")
        return int(pad)

    def _prompt_ids(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids before and after the image placeholder of the chat-templated prompt.

        Tokenized as the LLaVA processors do (the tokenizer's defaults, BOS included) but with the
        placeholder left unexpanded, so it marks where every visual block goes.
        """
        if self.conversation != "template":
            return self._conversation_ids(prompt)
        if not self.tokenizer.chat_template:
            raise ModelError(f"{self.model_id}: the tokenizer has no chat template to build the prompt with")
        text = self.tokenizer.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"][0]
        where = (ids == self.config.image_token_id).nonzero().flatten()
        if len(where) != 1:
            raise ModelError(
                f"{self.model_id}: the templated prompt has {len(where)} image placeholders "
                f"(id {self.config.image_token_id}), expected 1: {text!r}"
            )
        return ids[: where[0]], ids[where[0] + 1 :]

    def _conversation_ids(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix and suffix ids of a named conversation, tokenized as the reference's `tokenizer_image_token`:
        each side of `<image>` on its own, BOS kept on the first only."""
        if self.conversation != "llava_v1":
            raise ModelError(f"probe.conversation {self.conversation!r}; expected template or llava_v1")
        before, after = llava_v1_prompt(prompt).split("<image>")
        prefix, suffix = self.tokenizer(before)["input_ids"], self.tokenizer(after)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and suffix[:1] == [bos] and prefix[:1] == [bos]:
            suffix = suffix[1:]
        return torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long)

    @contextmanager
    def after_token(self, token_id: int):
        """Within the block, every logits call reads the next step's logits after `token_id` was generated:
        the token's embedding is appended to the prompt's suffix (`probe.skip_leading_a`)."""
        saved = self.suffix_embeddings
        with torch.no_grad():
            token = self.model.get_input_embeddings()(torch.tensor([token_id], device=self.device))
        self.suffix_embeddings = torch.cat([saved, token])
        try:
            yield
        finally:
            self.suffix_embeddings = saved

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid of the tower's input size (what encode_image returns for every image)."""
        size, patch = self.config.vision_config.image_size, self.config.vision_config.patch_size
        h, w = (size, size) if isinstance(size, int) else size
        return h // patch, w // patch

    @property
    def model_type(self) -> str:
        return self.config.model_type

    # ---- vision side -------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> VisualFeatures:
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        if pixels.dim() == 5:  # anyres: [images, tiles, C, H, W]; tile 0 is the whole image resized
            pixels = pixels[:, 0]
        pixels = pixels.to(self.device, self.dtype)
        patch = self.config.vision_config.patch_size
        grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        hidden = self.vision_tower(pixels, output_hidden_states=True).hidden_states
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        selected = torch.cat([hidden[i] for i in layers], dim=-1)[0]
        n_patches = grid[0] * grid[1]
        has_cls = selected.shape[0] == n_patches + 1
        cls = selected[0] if has_cls else None
        strategy = self.config.vision_feature_select_strategy
        features = selected[1:] if strategy == "default" else selected
        if features.shape[0] != n_patches:
            raise ModelError(
                f"{self.model_id}: {features.shape[0]} visual tokens (strategy {strategy!r}) do not form the "
                f"{grid[0]}x{grid[1]} patch grid; the probe's windows need one token per patch"
            )
        patches = selected[1:] if has_cls else selected
        return VisualFeatures(cls=cls, patches=patches, tokens=self.projector(features), grid=grid)

    # ---- language side -----------------------------------------------------------------------

    def sequence_length(self, n: int) -> int:
        """Full sequence length with a visual block of n tokens."""
        return len(self.prefix_embeddings) + n + len(self.suffix_embeddings)

    def batch_size(self, n: int) -> int:
        """How many blocks of n tokens fit in one forward under the token budget."""
        return max(1, self.token_budget // self.sequence_length(n))

    @torch.no_grad()
    def context(self, block: torch.Tensor | None = None) -> KVContext:
        """KV cache of the prefix followed by `block` [n, D]; the prefix alone is cached per prompt."""
        if block is None and self._prefix_context is not None:
            return self._prefix_context
        seq = self.prefix_embeddings if block is None else torch.cat([self.prefix_embeddings, block])
        cache = DynamicCache(config=self.config.get_text_config())
        self.language_model(inputs_embeds=seq[None], use_cache=True, **{self._cache_arg: cache})
        if any(layer.is_sliding for layer in cache.layers):
            raise ModelError(f"{self.model_id}: sliding-window attention layers; KV reuse is not supported")
        ctx = KVContext([(layer.keys, layer.values) for layer in cache.layers], len(seq))
        if block is None:
            self._prefix_context = ctx
        return ctx

    @torch.no_grad()
    def first_token_logits(
        self, blocks: torch.Tensor, context: KVContext | None = None, shared: int = 0
    ) -> torch.Tensor:
        """First-token logits [B, V] (float32) for visual blocks [B, n, D] spliced into the prompt.

        `context` caches the prefix plus a block whose first `shared` tokens all of `blocks` share
        (default: the prefix alone); only the rest of each block and the suffix are computed.
        """
        context = context or self.context()
        reused = len(self.prefix_embeddings) + shared
        if reused > context.length:
            raise ValueError(f"shared={shared} reaches past the cached context ({context.length} tokens)")
        step = self.batch_size(blocks.shape[1])
        out = [self._continue(context, reused, blocks[i : i + step, shared:]) for i in range(0, len(blocks), step)]
        return torch.cat(out)

    def _continue(self, context: KVContext, reused: int, rest: torch.Tensor) -> torch.Tensor:
        b = len(rest)
        cache = DynamicCache(
            ddp_cache_data=[(k[:, :, :reused].expand(b, -1, -1, -1), v[:, :, :reused].expand(b, -1, -1, -1)) for k, v in context.layers],
            config=self.config.get_text_config(),
        )
        suffix = self.suffix_embeddings.expand(b, -1, -1)
        seq = torch.cat([rest.to(self.dtype), suffix], dim=1)
        with last_position_only(self.language_model.layers[-1]):
            hidden = self.language_model(inputs_embeds=seq, use_cache=True, **{self._cache_arg: cache}).last_hidden_state
        return self.lm_head(hidden[:, -1]).float()

    @torch.no_grad()
    def reference_logits(self, block: torch.Tensor, generate_tokens: int = 0) -> torch.Tensor:
        """First-token logits [V] the way the reference scripts get them: one full forward of the whole
        sequence at batch size 1, no cache; with `generate_tokens` > 0, a greedy `generate` of that many
        tokens whose first step's logits are returned (the extra tokens are the reference's cost)."""
        seq = torch.cat([self.prefix_embeddings, block.to(self.dtype), self.suffix_embeddings])[None]
        if generate_tokens == 0:
            return self.model(inputs_embeds=seq).logits[0, -1].float()
        out = self.model.generate(
            inputs_embeds=seq,
            attention_mask=torch.ones(seq.shape[:2], dtype=torch.long, device=self.device),
            max_new_tokens=generate_tokens,
            min_new_tokens=generate_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_token_id,
        )
        return out.logits[0][0].float()

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)]).strip()

    @property
    def info(self) -> dict:
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "model_type": self.model_type,
            "embed_dim": int(self.prefix_embeddings.shape[-1]),
            "grid": list(self.grid),
            "pad_token_id": self.pad_token_id,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "prompt": self.prompt,
        }
