"""Architecture of the tiny LLaVA: real `transformers` classes, LLaVA-1.5's layout in miniature."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vrc_dist.toy.tokenizer import build_processor, build_tokenizer
from vrc_dist.toy.world import GRID, IMAGE_SIZE


@dataclass
class TinyLlavaSpec:
    image_size: int = IMAGE_SIZE
    # The world's grid (12 x 12): LLaVA-1.5's 24 x 24 in miniature, small enough to train on a CPU.
    patch_size: int = IMAGE_SIZE // GRID
    vision_hidden: int = 96
    vision_layers: int = 4  # features come from layer -2, as in LLaVA-1.5
    text_hidden: int = 128
    text_layers: int = 3
    heads: int = 4

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_model(spec: TinyLlavaSpec = TinyLlavaSpec(), seed: int = 0):
    """A randomly initialised tiny LLaVA plus its processor, ready to train or save."""
    import torch

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, spec.image_size, spec.patch_size)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=3 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor
