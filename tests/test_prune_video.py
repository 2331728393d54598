"""Video, multi-image and NeXT crop modes of the pruner, on random-weight tiny models of each class:
keep 1.0 is exactly unpruned, per-frame / per-image / per-crop budgets, and pruned generation equals plain
generation on the prompt pruned by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_prune import QUESTIONS, generate, hand_pruned_generate, make_codebook, prompt, pruned_llm_input
from tiny_models import VIDEO_KINDS, build

from vrc_dist.prune.baselines import make_method
from vrc_dist.prune.hooks import prune_visual_tokens
from vrc_dist.prune.layout import crop_ids
from vrc_dist.prune.methods import keep_count

FRAMES = 3


def video_inputs(model, tokenizer, n_videos=2, seed=0):
    """A left-padded batch of `n_videos` prompts, one video of FRAMES frames each, placeholders expanded
    to the model's own per-video token count; and each video's features as the model encodes them."""
    tokenizer.padding_side = "left"
    pix = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (n_videos, FRAMES, 3, 40, 40))).float()
    with torch.no_grad():
        feats = model.model.get_video_features(pix).pooler_output
    per_video = feats.reshape(n_videos, -1, feats.shape[-1])
    text = [f"USER: {'<video>' * per_video.shape[1]}\n{q} ASSISTANT:" for q in QUESTIONS[:n_videos]]
    return {**tokenizer(text, return_tensors="pt", padding=True), "pixel_values_videos": pix}, per_video


def split_frames(kind, video):
    """(frames [F, P, D], newline or None): a video's features split by hand, per the class's layout."""
    if kind == "llava_onevision":  # 2x2-pooled frames, then one newline for the whole video
        return video[:-1].reshape(FRAMES, -1, video.shape[-1]), video[-1:]
    return video.reshape(FRAMES, -1, video.shape[-1]), None


@pytest.fixture(scope="module", params=VIDEO_KINDS)
def video(request):
    model, (_, tokenizer) = build(request.param)
    inputs, per_video = video_inputs(model, tokenizer)
    return request.param, model, inputs, per_video


@pytest.mark.parametrize("name", ["codebook", "random", "fastv"])
def test_video_keep_one_is_exactly_unpruned(video, tmp_path, name):
    kind, model, inputs, per_video = video
    codebook = make_codebook(tmp_path / "cb", np.random.default_rng(1).normal(size=(6, 48)))
    expected = generate(model, inputs)
    with prune_visual_tokens(model, method=make_method(name, 1.0, codebook=codebook, fastv_layer=1)) as pruner:
        assert torch.equal(generate(model, inputs), expected)
    per_frame = split_frames(kind, per_video[0])[0].shape[1]
    assert pruner.kept == pruner.total == [per_frame] * (2 * FRAMES)


@pytest.mark.parametrize("name", ["codebook", "fastv"])
def test_video_frames_each_get_their_budget(video, tmp_path, name):
    kind, model, inputs, per_video = video
    codebook = make_codebook(tmp_path / "cb", np.random.default_rng(1).normal(size=(6, 48)))
    with prune_visual_tokens(model, method=make_method(name, 0.3, codebook=codebook, fastv_layer=1)) as pruner:
        out = generate(model, inputs)
    per_frame = split_frames(kind, per_video[0])[0].shape[1]
    assert pruner.kept == [keep_count(0.3, per_frame)] * (2 * FRAMES)
    assert [(u.kind, u.item, u.part, u.row) for u in pruner.units] == [
        ("video", v, f, v) for v in range(2) for f in range(FRAMES)]
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)


def test_video_batch_with_unequal_kept_counts_equals_the_hand_pruned_prompt(video, tmp_path):
    kind, model, inputs, per_video = video
    frames = [split_frames(kind, v) for v in per_video]
    # Prototypes: every 2nd token of video 0's frames, the first of video 1's: some tokens redundant, not all.
    protos = torch.cat([frames[0][0][:, ::2].flatten(0, 1), frames[1][0][:, :1].flatten(0, 1)])
    codebook = make_codebook(tmp_path / "cb", protos.numpy())
    threshold = 0.9
    with prune_visual_tokens(model, codebook, threshold=threshold) as pruner:
        got = generate(model, inputs)

    kept_blocks, counts = [], []
    for tokens, newline in frames:  # the paper's threshold rule per frame, from the codebook's own search
        kept = []
        for frame in tokens:
            s = codebook.max_similarity(frame.numpy())
            keep = np.flatnonzero(s < threshold) if (s < threshold).any() else [int(np.argmin(s))]
            kept.append(frame[torch.as_tensor(keep)])
            counts.append(len(keep))
        kept_blocks.append(torch.cat(kept + ([] if newline is None else [newline])))
    assert pruner.kept == counts
    assert sum(counts[:FRAMES]) != sum(counts[FRAMES:]) and max(counts) < tokens.shape[1]
    reference = hand_pruned_generate(model, inputs, model.config.video_token_id, kept_blocks)
    assert torch.equal(got[:, inputs["input_ids"].shape[1]:], reference)


def test_video_to_a_model_without_a_video_token_is_a_clear_error(tmp_path):
    model, processor = build("llava")
    inputs = processor(images=[Image.new("RGB", (40, 40))], text=["USER: <image>\nwhat is it? ASSISTANT:"],
                       return_tensors="pt")
    codebook = make_codebook(tmp_path / "cb", np.ones((2, 48)))
    with prune_visual_tokens(model, codebook, keep=0.5), pytest.raises(ValueError, match="has no video token"):
        model(**inputs, pixel_values_videos=torch.zeros(1, FRAMES, 3, 40, 40))


@pytest.mark.parametrize("keep", [0, 1.5])
def test_video_keep_outside_the_unit_interval_is_a_clear_error(tmp_path, keep):
    codebook = make_codebook(tmp_path / "cb", np.ones((2, 48)))
    with pytest.raises(ValueError, match=r"keep ratio must be in \(0, 1\]"):
        with prune_visual_tokens(build("llava_onevision")[0], codebook, keep=keep):
            pass


# --- multi-image and LLaVA-NeXT crop modes ---

def next_batch(processor, seed: int, height: int, width: int):
    """A left-padded NeXT batch: one random image of height x width per question."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in QUESTIONS]
    return processor(images=images, text=[prompt(q) for q in QUESTIONS], return_tensors="pt", padding=True), rng


@pytest.fixture(scope="module")
def next_model():
    model, processor = build("llava_next")
    processor.tokenizer.padding_side = "left"
    return model, processor


def test_two_images_of_different_sizes_in_one_prompt_get_their_own_budgets(next_model, tmp_path):
    model, processor = next_model
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in [(40, 80, 3), (80, 80, 3)]]
    # Adjacent placeholders: the two images are one run of image tokens, told apart only by the encoder.
    inputs = processor(images=images, text=["USER: <image><image>\nwhat is it? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    codebook = make_codebook(tmp_path / "cb", torch.cat([feats[0][::3], feats[1][::4]]).numpy())
    expected = generate(model, inputs)
    with prune_visual_tokens(model, codebook, keep=1.0):
        assert torch.equal(generate(model, inputs), expected)
    pruner, seen = pruned_llm_input(model, inputs, codebook=codebook, keep=0.2)
    newline = model.model.image_newline
    kept = []
    for f in feats:  # each image on its own: the lowest-similarity 20% of its content, in order, newlines kept
        content = ~(f == newline).all(-1)
        s = codebook.max_similarity(f[content].numpy())
        k = keep_count(0.2, int(content.sum()))
        chosen = np.flatnonzero(content.numpy())[np.sort(np.argsort(s, kind="stable")[:k])]
        kept.append(f[np.sort(np.concatenate([chosen, np.flatnonzero(~content.numpy())]))])
    assert pruner.total == [int((~(f == newline).all(-1)).sum()) for f in feats] and len(set(pruner.total)) == 2
    assert pruner.kept == [keep_count(0.2, t) for t in pruner.total]
    block = torch.cat(kept)
    ids = inputs["input_ids"][0]
    start = int((ids == model.config.image_token_id).nonzero()[0])
    assert torch.equal(seen[0, start:start + len(block)], block)


def _packed_crop_reference(model, size):
    """Each crop-grid token's crop number, read off the model's own packing of features that carry their
    crop number (base image 0, crops 1.. in raster order)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    vision = model.config.vision_config
    n = image_size_to_num_patches(size, model.config.image_grid_pinpoints, vision.image_size)
    side = vision.image_size // vision.patch_size
    coded = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, side * side, 48)
    packed, _ = model.model.pack_image_features([coded], torch.tensor([size]), "default",
                                                image_newline=torch.full((48,), -1.0))
    grid = packed[0][side * side:, 0]
    return grid[grid >= 0].long(), int((grid < 0).sum())


@pytest.mark.parametrize("size", [(40, 80), (80, 40), (80, 80), (50, 70), (70, 33)])
def test_crop_ids_follow_the_models_own_packing(next_model, size):
    model, _ = next_model
    reference, rows = _packed_crop_reference(model, size)
    assert torch.equal(crop_ids(model, size, rows, len(reference) // rows), reference)


def test_per_crop_gives_each_crop_its_budget(next_model, tmp_path):
    model, processor = next_model
    inputs, rng = next_batch(processor, 5, 50, 70)
    codebook = make_codebook(tmp_path / "cb", rng.normal(size=(8, 48)))
    expected = generate(model, inputs)
    with prune_visual_tokens(model, codebook, keep=1.0, crops="per-crop"):
        assert torch.equal(generate(model, inputs), expected)
    with prune_visual_tokens(model, codebook, keep=0.3, crops="per-crop") as pruner:
        generate(model, inputs)
    reference, _ = _packed_crop_reference(model, (50, 70))
    crops = torch.bincount(reference).tolist()[1:]
    per_image = [25] + [c for c in crops if c]
    assert pruner.total == per_image * 2
    assert pruner.kept == [keep_count(0.3, t) for t in pruner.total]
    assert [u.part for u in pruner.units] == list(range(len(per_image))) * 2
    with prune_visual_tokens(model, codebook, keep=0.3) as joint:  # crops="all": one budget per image
        generate(model, inputs)
    assert joint.total == [sum(per_image)] * 2


def test_base_only_gives_the_llm_the_pruned_base_image_alone(next_model, tmp_path):
    model, processor = next_model
    inputs, _ = next_batch(processor, 6, 40, 80)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    base = [f[:25] for f in feats]  # the base image comes first, 5x5 tokens, no newline
    codebook = make_codebook(tmp_path / "cb", torch.cat([base[0][::2], base[1][::3]]).numpy())
    token = model.config.image_token_id
    with prune_visual_tokens(model, codebook, keep=1.0, crops="base-only") as pruner:
        got = generate(model, inputs)
    assert pruner.kept == pruner.total == [25, 25]
    assert torch.equal(got[:, inputs["input_ids"].shape[1]:], hand_pruned_generate(model, inputs, token, base))
    with prune_visual_tokens(model, codebook, keep=0.2, crops="base-only") as pruner:
        got = generate(model, inputs)
    kept = [b[np.sort(np.argsort(codebook.max_similarity(b.numpy()), kind="stable")[:5])] for b in base]
    assert pruner.kept == [5, 5]
    assert torch.equal(got[:, inputs["input_ids"].shape[1]:], hand_pruned_generate(model, inputs, token, kept))


def test_bad_crops_mode_and_fastv_base_only_are_clear_errors(next_model, tmp_path):
    model, _ = next_model
    codebook = make_codebook(tmp_path / "cb", np.ones((2, 48)))
    with pytest.raises(ValueError, match="crops must be one of all, per-crop, base-only, got 'tiles'"):
        with prune_visual_tokens(model, codebook, keep=0.5, crops="tiles"):
            pass
    with pytest.raises(ValueError, match="fastv prunes inside the LLM"):
        with prune_visual_tokens(model, method=make_method("fastv", 0.5), crops="base-only"):
            pass


def test_onevision_per_crop_follows_its_resized_crop_grid(tmp_path):
    model, (image_processor, tokenizer) = build("llava_onevision")
    model.config.vision_aspect_ratio = "anyres_max_1"  # a 10x10 crop grid is more than 1 crop's worth: resized to 5x5
    image = Image.fromarray(np.random.default_rng(7).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    pix = image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pix["pixel_values"], pix["image_sizes"]).pooler_output[0]
    assert len(feats) == 25 + 5 * 6  # base, then 5 rows of 5 tokens and a newline
    inputs = {**tokenizer(f"USER: {'<image>' * len(feats)}\nwhat is it? ASSISTANT:", return_tensors="pt"), **pix}
    codebook = make_codebook(tmp_path / "cb", np.random.default_rng(8).normal(size=(4, 48)))
    expected = generate(model, inputs)
    with prune_visual_tokens(model, codebook, keep=1.0, crops="per-crop") as pruner:
        assert torch.equal(generate(model, inputs), expected)
    positions = torch.cat([u.positions for u in pruner.units])
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    content = start + (~(feats == model.model.image_newline).all(-1)).nonzero().flatten()
    assert torch.equal(positions.sort().values, content)  # every content token in exactly one unit
    # nearest-cell resize of the 2x2 crops: rows 0-2 / columns 0-2 of the 5x5 grid come from crop 1, and so on
    sizes = [len(u.positions) for u in pruner.units]
    assert [u.part for u in pruner.units] == [0, 1, 2, 3, 4] and sizes == [25, 9, 6, 6, 4]
