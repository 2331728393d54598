"""Random-weight tiny checkpoints of the LLaVA classes, saved like real ones, for shape and plumbing tests.

Each is a 40 px tower with 8 px patches (a 5x5 grid, L = 25) and a 2-layer LM over the toy
tokenizer (plus a `<video>` token for the classes that take video: OneVision, NeXT-Video, Video-LLaVA). A larger init scale than the default 0.02 makes the logits depend visibly on the visual
tokens, so divergences are not all ~0 and batched-vs-reference comparisons mean something.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    Qwen2Config,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from vrc_dist.toy.tokenizer import CHAT_TEMPLATE, build_processor, build_tokenizer

IMAGE, PATCH = 40, 8
GRID = IMAGE // PATCH
PINPOINTS = [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE]]
KINDS = ("llava", "llava_next", "llava_onevision", "llava_next_video")  # the classes the probe adapter reads
VIDEO_KINDS = ("llava_onevision", "llava_next_video", "video_llava")
MEAN_STD = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def _vision(siglip: bool):
    cls = SiglipVisionConfig if siglip else CLIPVisionConfig
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
               image_size=IMAGE, patch_size=PATCH, initializer_range=0.2)


def _text(cls, vocab_size: int, pad_token_id: int):
    return cls(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab_size, pad_token_id=pad_token_id,
               max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)


def build(kind: str):
    """(model, processor) of `kind`, random weights, seeded. OneVision's processor object needs torchvision
    (for its video half), so for it and the other video classes `processor` is the (image processor,
    tokenizer) pair: tests expand the `<image>` / `<video>` placeholders themselves."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    common = dict(image_token_id=tokenizer.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu")
    if kind in VIDEO_KINDS:
        tokenizer.add_tokens(["<video>"], special_tokens=True)
        common["video_token_id"] = tokenizer.convert_tokens_to_ids("<video>")
    torch.manual_seed({"llava": 0, "llava_next": 1, "llava_onevision": 2, "llava_next_video": 3, "video_llava": 4}[kind])
    if kind == "llava":
        config = LlavaConfig(vision_config=_vision(False), text_config=_text(LlamaConfig, len(tokenizer), 0),
                             vision_feature_layer=-2, vision_feature_select_strategy="default", **common)
        return LlavaForConditionalGeneration(config).eval(), build_processor(tokenizer, IMAGE, PATCH)
    if kind == "llava_next":
        config = LlavaNextConfig(vision_config=_vision(False), text_config=_text(LlamaConfig, len(tokenizer), 0),
                                 vision_feature_layer=-2, vision_feature_select_strategy="default",
                                 image_grid_pinpoints=PINPOINTS, **common)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
            image_grid_pinpoints=PINPOINTS, **MEAN_STD)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                       vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                       num_additional_image_tokens=1)
        return LlavaNextForConditionalGeneration(config).eval(), processor
    if kind == "llava_onevision":
        config = LlavaOnevisionConfig(vision_config=_vision(True), text_config=_text(Qwen2Config, len(tokenizer), 0),
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      image_grid_pinpoints=PINPOINTS, **common)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=PINPOINTS, **MEAN_STD)
        return LlavaOnevisionForConditionalGeneration(config).eval(), (image_processor, tokenizer)
    if kind == "llava_next_video":
        config = LlavaNextVideoConfig(vision_config=_vision(False), text_config=_text(LlamaConfig, len(tokenizer), 0),
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      image_grid_pinpoints=PINPOINTS, spatial_pool_stride=2, **common)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
            image_grid_pinpoints=PINPOINTS, **MEAN_STD)
        return LlavaNextVideoForConditionalGeneration(config).eval(), (image_processor, tokenizer)
    if kind == "video_llava":
        config = VideoLlavaConfig(vision_config=_vision(False), text_config=_text(LlamaConfig, len(tokenizer), 0),
                                  vision_feature_layer=-2, vision_feature_select_strategy="default", **common)
        return VideoLlavaForConditionalGeneration(config).eval(), (None, tokenizer)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS + VIDEO_KINDS[-1:]}")


def save(kind: str, directory: Path) -> Path:
    """Write a tiny `kind` checkpoint (model, tokenizer, processor) to `directory` and return it."""
    model, processor = build(kind)
    model.save_pretrained(directory)
    for part in processor if isinstance(processor, tuple) else (processor,):
        if part is not None:
            part.save_pretrained(directory)
    return directory
