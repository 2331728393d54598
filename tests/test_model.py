import json

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image

from vrc_dist.model.adapter import ModelError
from vrc_dist.model.loading import load_llava, resolve_checkpoint

LOGIT_TOL = dict(rtol=1e-5, atol=2e-5)  # float32, different summation orders, logits of size ~1


@pytest.fixture(scope="module", params=tiny_models.KINDS)
def adapter(request, tmp_path_factory):
    path = tiny_models.save(request.param, tmp_path_factory.mktemp(request.param))
    return load_llava(str(path), device="cpu", dtype="float32", token_budget=100)


def picture(w=70, h=50, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_visual_tokens_are_the_models_own_base_image_features(adapter):
    feats = adapter.encode_image(picture())
    assert feats.grid == (tiny_models.GRID, tiny_models.GRID)
    assert feats.tokens.shape == (tiny_models.GRID**2, adapter.info["embed_dim"])
    pixels = adapter.image_processor(images=picture(), return_tensors="pt")
    extra = {"image_sizes": pixels["image_sizes"]} if "image_sizes" in pixels else {}
    own = adapter.model.get_image_features(pixel_values=pixels["pixel_values"], **extra).pooler_output[0]
    # LLaVA: exactly the image's tokens; NeXT/OneVision: the base image's tokens lead the packed sequence
    torch.testing.assert_close(feats.tokens, own[: len(feats.tokens)], rtol=0, atol=0)
    if adapter.model_type == "llava_onevision":  # SigLIP: no CLS
        assert feats.cls is None and feats.patches.shape[0] == len(feats.tokens)
    else:
        assert feats.cls.shape == (feats.patches.shape[1],)


def test_prompt_splits_around_the_placeholder(adapter):
    """Template "USER: <image>\n{prompt} ASSISTANT:": BOS USER : | image | prompt words ASSISTANT :"""
    tok, embed = adapter.tokenizer, adapter.model.get_input_embeddings()
    prefix_ids = tok("USER:", return_tensors="pt")["input_ids"][0]
    suffix_ids = tok(adapter.prompt + " ASSISTANT:", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    assert tok.convert_ids_to_tokens(prefix_ids.tolist()) == ["<s>", "user", ":"]
    with torch.no_grad():
        torch.testing.assert_close(adapter.prefix_embeddings, embed(prefix_ids), rtol=0, atol=0)
        torch.testing.assert_close(adapter.suffix_embeddings, embed(suffix_ids), rtol=0, atol=0)
        torch.testing.assert_close(adapter.pad_embedding, embed.weight[0], rtol=0, atol=0)


def test_batched_logits_match_full_forwards(adapter):
    feats = adapter.encode_image(picture())
    blocks = torch.stack([feats.tokens, feats.tokens.flip(0), torch.randn_like(feats.tokens)])
    assert adapter.batch_size(25) == 2  # budget 100 over 48-token sequences: two forwards here
    batched = adapter.first_token_logits(blocks)
    one_by_one = torch.stack([adapter.reference_logits(b) for b in blocks])
    assert batched.shape == (3, adapter.model.config.get_text_config().vocab_size)
    torch.testing.assert_close(batched, one_by_one, **LOGIT_TOL)
    generated = adapter.reference_logits(blocks[0], generate_tokens=3)
    torch.testing.assert_close(generated, one_by_one[0], **LOGIT_TOL)


def test_shared_image_context_gives_the_same_logits(adapter):
    v = adapter.encode_image(picture()).tokens
    context = adapter.context(v)
    ablated = v[None].repeat(2, 1, 1)
    ablated[0, 12:] = adapter.pad_embedding
    ablated[1, 14:] = adapter.pad_embedding
    got = adapter.first_token_logits(ablated, context, shared=12)
    torch.testing.assert_close(got, torch.stack([adapter.reference_logits(b) for b in ablated]), **LOGIT_TOL)
    with pytest.raises(ValueError, match="past the cached context"):
        adapter.first_token_logits(ablated, adapter.context(), shared=1)


def test_splice_equals_the_model_on_its_own_inputs(tmp_path):
    """The adapter's prefix + tokens + suffix is what LlavaForConditionalGeneration builds itself."""
    path = tiny_models.save("llava", tmp_path / "llava")
    adapter = load_llava(str(path), device="cpu", dtype="float32")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": adapter.prompt}]}],
        add_generation_prompt=True,
    )
    with torch.no_grad():
        own = adapter.model(**processor(images=picture(), text=text, return_tensors="pt")).logits[0, -1]
    spliced = adapter.first_token_logits(adapter.encode_image(picture()).tokens[None])[0]
    torch.testing.assert_close(spliced, own, **LOGIT_TOL)


def test_pad_id_override_and_info(tmp_path):
    path = tiny_models.save("llava", tmp_path / "llava")
    adapter = load_llava(str(path), device="cpu", dtype="float32", pad_token_id=3)
    assert adapter.info["pad_token_id"] == 3 and adapter.info["dtype"] == "float32"
    assert adapter.info["revision"].startswith("sha256:")
    torch.testing.assert_close(adapter.pad_embedding, adapter.model.get_input_embeddings().weight[3])
    with pytest.raises(ModelError, match="outside the embedding table"):
        load_llava(str(path), device="cpu", dtype="float32", pad_token_id=10**7)


def test_chat_template_saved_with_the_processor_only_is_found(tmp_path):
    """Hub LLaVA repos keep the template in chat_template.json, beside the processor, not the tokenizer."""
    path = tiny_models.save("llava", tmp_path / "llava")
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    adapter = load_llava(str(path), device="cpu", dtype="float32")
    assert len(adapter.prefix_embeddings) == 3 and adapter.tokenizer.chat_template == template


def test_cls_inside_the_visual_tokens_is_refused(tmp_path):
    """CLIP with strategy "full" keeps the CLS among the visual tokens: 26 tokens are not a 5x5 grid."""
    path = tiny_models.save("llava", tmp_path / "llava")
    config = json.loads((path / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (path / "config.json").write_text(json.dumps(config))
    adapter = load_llava(str(path), device="cpu", dtype="float32")
    with pytest.raises(ModelError, match="26 visual tokens .* do not form the 5x5 patch grid"):
        adapter.encode_image(picture())


def test_paths_that_are_not_llava_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="not a directory"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="no config.json in"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="model_type 'bert', expected one of llava, llava_next, llava_onevision"):
        resolve_checkpoint(str(tmp_path))


def test_toy_resolves_to_the_committed_checkpoint():
    from vrc_dist.toy import TOY_MODEL_DIR

    if not (TOY_MODEL_DIR / "config.json").is_file():
        pytest.skip("toy checkpoint not built yet")
    assert resolve_checkpoint("toy") == TOY_MODEL_DIR


# OneVision's full processor (AutoProcessor) needs torchvision for its video processor, which is not installed here.
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_load_checkpoint_builds_the_class_of_the_model_type(kind, tmp_path):
    """`vrc eval` and `vrc toy eval` load through load_checkpoint: the class of the config's model_type."""
    from vrc_dist.model.loading import MODEL_CLASSES, load_checkpoint

    model, processor = load_checkpoint(tiny_models.save(kind, tmp_path / kind))
    assert type(model) is MODEL_CLASSES[kind] and model.dtype == torch.float32 and not model.training
    assert processor.tokenizer is not None
