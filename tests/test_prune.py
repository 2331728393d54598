"""The pruner on random-weight tiny LLaVA models: exactness at keep 1.0, equality with a hand-pruned prompt,
FastV against a layer-by-layer reference, newline tokens, and clear errors."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from tiny_models import build
from vrc_dist.baselines import make_method
from vrc_dist.codebook import Codebook
from vrc_dist.prune import keep_count, prune_visual_tokens

QUESTIONS = ["what is it?", "what colour is the big object in this picture?"]


def make_codebook(path, vectors: np.ndarray) -> Codebook:
    n = len(vectors)
    ints = pa.array(np.zeros(n, np.int32))
    prov = pa.table({"key": [f"k{i}" for i in range(n)], "shard": ["s"] * n, "token_index": ints,
                     "cluster": ints, "support": ints, "cluster_size": ints})
    cb = Codebook.create(path, "test", "tiny", vectors.shape[1])
    cb.commit(vectors.astype(np.float32), prov, {})
    return Codebook.open(path)


def prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


@pytest.fixture(scope="module")
def llava():
    model, processor = build("llava")
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in QUESTIONS]
    inputs = processor(images=images, text=[prompt(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    return model, inputs


@pytest.fixture(scope="module")
def features(llava):
    model, inputs = llava
    with torch.no_grad():
        return model.model.get_image_features(inputs["pixel_values"]).pooler_output  # list of [L, D]


@pytest.fixture(scope="module")
def codebook(tmp_path_factory, features):
    # Prototypes at every 3rd token of image 0 and every 2nd of image 1: those are redundant, others mostly not.
    return make_codebook(tmp_path_factory.mktemp("cb") / "cb", torch.cat([features[0][::3], features[1][::2]]).numpy())


def generate(model, inputs, **kw):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, **kw)


@pytest.mark.parametrize("name", ["codebook", "random", "cls", "pool", "fastv"])
def test_keep_one_is_exactly_unpruned(llava, codebook, name):
    model, inputs = llava
    expected = generate(model, inputs)
    with prune_visual_tokens(model, method=make_method(name, 1.0, codebook=codebook, fastv_layer=1)) as pruner:
        got = generate(model, inputs)
    assert torch.equal(got, expected)
    assert pruner.kept == pruner.total == [25, 25]


def test_threshold_prunes_rows_unequally_and_equals_the_hand_pruned_prompt(llava, features, codebook):
    model, inputs = llava
    threshold = 0.9
    with prune_visual_tokens(model, codebook, threshold=threshold) as pruner:
        got = generate(model, inputs)
    kept = [codebook.max_similarity(f.numpy()) < threshold for f in features]
    assert pruner.kept == [int(k.sum()) for k in kept]
    assert pruner.kept[0] != pruner.kept[1] and 0 < min(pruner.kept) and max(pruner.kept) < 25

    # Reference: the prompt built by hand with only the kept features, left-padded, through plain generate.
    ids, embed = inputs["input_ids"], model.get_input_embeddings()
    rows = []
    for b, keep in enumerate(kept):
        row = ids[b][inputs["attention_mask"][b].bool()]
        at = (row == model.config.image_token_id).nonzero().flatten()
        rows.append(torch.cat([embed(row[:at[0]]), features[b][torch.from_numpy(keep)], embed(row[at[-1] + 1:])]))
    width = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        embeds[b, width - len(r):], mask[b, width - len(r):] = r, 1
    with torch.no_grad():
        reference = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got[:, ids.shape[1]:], reference)


def test_keep_ratio_counts_and_original_order(llava, codebook, features):
    model, inputs = llava
    seen = []
    with prune_visual_tokens(model, method=make_method("codebook-plain", 0.2, codebook=codebook)) as pruner:
        hook = model.model.language_model.register_forward_pre_hook(  # after the pruner's: sees its output
            lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
        with torch.no_grad():
            model(**inputs)
        hook.remove()
    assert pruner.kept == [5, 5]  # round(0.2 * 25)
    s = codebook.max_similarity(features[0].numpy())
    expected = np.sort(np.argsort(s, kind="stable")[:5])
    ids = inputs["input_ids"][0]
    after = len(ids) - 1 - int((ids == model.config.image_token_id).nonzero().max())  # text tokens after the image
    assert torch.allclose(seen[0][0, -(5 + after):-after], features[0][expected])


def _diverse_reference(tokens: np.ndarray, protos: np.ndarray, k: int) -> list[int]:
    """The diversity rule from scratch: each step, among unchosen tokens, the one whose highest cosine
    to any prototype or any token chosen so far is lowest (first index on ties)."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    v, p = unit(tokens.astype(np.float64)), unit(protos.astype(np.float64))
    chosen = []
    for _ in range(k):
        redundancy = [max((p @ v[i]).max(), max((v[c] @ v[i] for c in chosen), default=-1.0))
                      if i not in chosen else np.inf for i in range(len(v))]
        chosen.append(int(np.argmin(redundancy)))
    return sorted(chosen)


@pytest.mark.parametrize("keep", [0.04, 0.2, 0.5, 0.8, 1.0])
def test_diverse_keep_equals_the_from_scratch_reference(llava, tmp_path, keep):
    model, _ = llava
    d = model.config.text_config.hidden_size
    rng = np.random.default_rng(1)
    protos = rng.normal(size=(6, d))
    # Tokens near prototypes, near each other (groups of a few), and unlike anything, mixed.
    groups = rng.normal(size=(5, d))
    tokens = np.concatenate([protos[rng.integers(6, size=10)] + 0.5 * rng.normal(size=(10, d)),
                             groups[rng.integers(5, size=15)] + 0.5 * rng.normal(size=(15, d)),
                             rng.normal(size=(5, d))])[rng.permutation(30)]
    method = make_method("codebook", keep, codebook=make_codebook(tmp_path / "cb", protos))
    method.attach(model)
    _, idx = method.reduce(torch.from_numpy(tokens).float(), 0)
    assert idx.tolist() == _diverse_reference(tokens, protos, keep_count(keep, 30))


def test_diverse_keep_spreads_over_near_duplicates(llava, tmp_path):
    model, _ = llava
    d = model.config.text_config.hidden_size
    rng = np.random.default_rng(0)
    background, big, small = (rng.normal(size=d) for _ in range(3))
    # Ten near-copies of one large object, slightly less like the background than one small object's token.
    tokens = np.stack([big + 0.01 * rng.normal(size=d) for _ in range(10)] + [small + 0.3 * background])
    method = make_method("codebook", 2 / 11, codebook=make_codebook(tmp_path / "cb", background[None]))
    method.attach(model)
    plain = make_method("codebook-plain", 2 / 11, codebook=method.codebook)
    plain.attach(model)
    t = torch.from_numpy(tokens).float()
    assert plain.reduce(t, 0)[1].tolist() != [0, 10] and 10 not in plain.reduce(t, 0)[1].tolist()
    assert 10 in method.reduce(t, 0)[1].tolist()


def test_keep_count():
    assert keep_count(0.111, 144) == 16 and keep_count(0.056, 144) == 8 and keep_count(0.001, 144) == 1
    assert keep_count(1.0, 576) == 576


def test_fastv_prefill_matches_layer_by_layer_reference(llava):
    model, inputs = llava
    one = {k: v[1:] for k, v in inputs.items()}  # the unpadded row: no mask needed in the reference
    with prune_visual_tokens(model, method=make_method("fastv", 0.4, fastv_layer=1)) as pruner, torch.no_grad():
        got = model(**one, logits_to_keep=1).logits[0, -1]
    assert pruner.kept == [10]

    lm = model.model.language_model
    with torch.no_grad():
        embeds = lm.embed_tokens(one["input_ids"])
        feats = model.model.get_image_features(one["pixel_values"]).pooler_output[0]
        is_image = one["input_ids"][0] == model.config.image_token_id
        embeds[0, is_image] = feats
        pos = torch.arange(embeds.shape[1])[None]
        cos, sin = lm.rotary_emb(embeds, pos)
        layer0, layer1 = lm.layers
        # Last token's attention in layer 0, by eager attention's own weights.
        model.config.text_config._attn_implementation = "eager"
        try:
            h = layer0.input_layernorm(embeds)
            _, weights = layer0.self_attn(h, position_embeddings=(cos, sin), attention_mask=_causal(len(pos[0])))
        finally:
            model.config.text_config._attn_implementation = "sdpa"
        hidden = layer0(embeds, position_embeddings=(cos, sin), position_ids=pos)
        score = weights[0, :, -1].mean(0)[is_image]
        image_pos = is_image.nonzero().flatten()
        drop = image_pos[torch.argsort(score, descending=True, stable=True)[10:]]
        keep = torch.tensor([i for i in range(len(pos[0])) if i not in set(drop.tolist())])
        hidden = layer1(hidden[:, keep], position_embeddings=(cos[:, keep], sin[:, keep]), position_ids=pos[:, keep])
        expected = model.lm_head(lm.norm(hidden))[0, -1]
    assert torch.allclose(got, expected, atol=1e-5)


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def test_fastv_generates_with_padding(llava):
    model, inputs = llava
    with prune_visual_tokens(model, method=make_method("fastv", 0.3, fastv_layer=1)) as pruner:
        out = generate(model, inputs)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6) and pruner.kept == [8, 8]


def test_llava_next_keeps_newlines_and_every_crop(tmp_path):
    model, processor = build("llava_next")
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)) for _ in QUESTIONS]
    inputs = processor(images=images, text=[prompt(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    vectors = rng.normal(size=(8, model.config.text_config.hidden_size))
    codebook = make_codebook(tmp_path / "cb", vectors)
    expected = generate(model, inputs)
    with prune_visual_tokens(model, codebook, keep=1.0):
        assert torch.equal(generate(model, inputs), expected)
    seen = []
    with prune_visual_tokens(model, codebook, keep=0.25) as pruner, torch.no_grad():
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
        model(**inputs)
        hook.remove()
    newline = model.model.image_newline
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    n_newline = n_image - pruner.total[0]
    assert n_newline > 0 and pruner.kept == [keep_count(0.25, t) for t in pruner.total]
    assert int((seen[0][0] == newline).all(-1).sum()) == n_newline  # every newline survives


def test_onevision_codebook_pruning(tmp_path):
    model, (image_processor, tokenizer) = build("llava_onevision")
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (80, 40, 3), dtype=np.uint8))
    pix = image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        n = len(model.model.get_image_features(pix["pixel_values"], pix["image_sizes"]).pooler_output[0])
    text = prompt("what is it?").replace("<image>", "<image>" * n)
    inputs = {**tokenizer(text, return_tensors="pt"), **pix}
    codebook = make_codebook(tmp_path / "cb", np.random.default_rng(3).normal(size=(4, 48)))
    expected = generate(model, inputs)
    with prune_visual_tokens(model, codebook, keep=1.0):
        assert torch.equal(generate(model, inputs), expected)
    with prune_visual_tokens(model, codebook, keep=0.1) as pruner:
        out = generate(model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    assert pruner.kept == [keep_count(0.1, pruner.total[0])] and pruner.total[0] < n  # newlines not counted


def test_dim_mismatch_is_a_clear_error(llava, tmp_path):
    model, inputs = llava
    wrong = make_codebook(tmp_path / "cb", np.ones((3, 7)))
    with pytest.raises(ValueError, match="dim mismatch.*dim 7.*dim 48"):
        with prune_visual_tokens(model, wrong, keep=0.5):
            pass


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan"), "half"])
@pytest.mark.parametrize("name", ["codebook", "random", "cls", "pool", "fastv"])
def test_bad_keep_is_a_clear_error(codebook, keep, name):
    with pytest.raises(ValueError, match=r"keep ratio must be in \(0, 1\]"):
        make_method(name, keep, codebook=codebook)
