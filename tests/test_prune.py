"""The pruner on random-weight tiny LLaVA models: exactness at keep 1.0, equality with a hand-pruned prompt,
FastV against a layer-by-layer reference, newline tokens, and clear errors."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from tiny_models import build

from vrc_dist.codebook.store import Codebook
from vrc_dist.prune.baselines import make_method
from vrc_dist.prune.hooks import prune_visual_tokens
from vrc_dist.prune.methods import keep_count

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


def pruned_llm_input(model, inputs, **prune):
    """(pruner, the inputs_embeds the LLM receives) for one forward inside prune_visual_tokens(**prune)."""
    seen = []
    with prune_visual_tokens(model, **prune) as pruner, torch.no_grad():
        hook = model.model.language_model.register_forward_pre_hook(  # after the pruner's: sees its output
            lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
        model(**inputs)
        hook.remove()
    return pruner, seen[0]


def hand_pruned_generate(model, inputs, token_id, kept_blocks):
    """Plain generate on the prompt rebuilt by hand: each row's text embeddings around its kept visual
    embeddings, left-padded."""
    ids, embed = inputs["input_ids"], model.get_input_embeddings()
    rows = []
    for b, kept in enumerate(kept_blocks):
        row = ids[b][inputs["attention_mask"][b].bool()]
        at = (row == token_id).nonzero().flatten()
        with torch.no_grad():
            rows.append(torch.cat([embed(row[:at[0]]), kept, embed(row[at[-1] + 1:])]))
    width = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        embeds[b, width - len(r):], mask[b, width - len(r):] = r, 1
    with torch.no_grad():
        return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False)


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
    reference = hand_pruned_generate(model, inputs, model.config.image_token_id,
                                     [features[b][torch.from_numpy(keep)] for b, keep in enumerate(kept)])
    assert torch.equal(got[:, inputs["input_ids"].shape[1]:], reference)


@pytest.mark.parametrize("name", ["codebook", "codebook-plain"])  # the paper's rule, under both its names
def test_keep_ratio_counts_and_original_order(llava, codebook, features, name):
    model, inputs = llava
    pruner, seen = pruned_llm_input(model, inputs, method=make_method(name, 0.2, codebook=codebook))
    assert pruner.kept == [5, 5]  # round(0.2 * 25)
    s = codebook.max_similarity(features[0].numpy())
    expected = np.sort(np.argsort(s, kind="stable")[:5])
    ids = inputs["input_ids"][0]
    after = len(ids) - 1 - int((ids == model.config.image_token_id).nonzero().max())  # text tokens after the image
    assert torch.allclose(seen[0, -(5 + after):-after], features[0][expected])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cover_spread_reference(tokens: np.ndarray, protos: np.ndarray, k: int, group_sim: float = 0.9) -> list[int]:
    """The keep rule from scratch in float64 loops (first index on ties): cover each distinct group
    with its medoid, least redundant group first; then the grid token farthest from all kept."""
    v, p, n = _unit(tokens.astype(np.float64)), _unit(protos.astype(np.float64)), len(tokens)
    redundancy = [(p @ v[i]).max() for i in range(n)]
    covered, chosen = [False] * n, []
    while len(chosen) < k and not all(covered):
        first = min((i for i in range(n) if not covered[i]), key=lambda i: redundancy[i])
        group = [j for j in range(n) if not covered[j] and v[first] @ v[j] > group_sim]
        medoid = max(group, key=lambda j: sum(1.0 if g == j else v[j] @ v[g] for g in group))
        chosen.append(medoid)
        covered = [c or v[medoid] @ v[j] > group_sim for j, c in enumerate(covered)]
    side = int(np.sqrt(n))
    xy = [divmod(i, side) if side * side == n else (0, i) for i in range(n)]
    while len(chosen) < k:
        def distance(i):
            return min((xy[i][0] - xy[c][0]) ** 2 + (xy[i][1] - xy[c][1]) ** 2 for c in chosen)
        chosen.append(max((i for i in range(n) if i not in chosen), key=distance))
    return sorted(chosen)


@pytest.mark.parametrize("n", [36, 30])  # a square grid, and a layout that is not one (multi-crop)
@pytest.mark.parametrize("keep", [0.04, 0.2, 0.5, 0.8, 1.0])
def test_codebook_keep_equals_the_from_scratch_reference(llava, tmp_path, keep, n):
    model, _ = llava
    d = model.config.text_config.hidden_size
    rng = np.random.default_rng(1)
    protos, groups = rng.normal(size=(6, d)), rng.normal(size=(5, d))
    # Near-copies of prototypes (redundant), groups of alike tokens with uneven spread (so the medoid
    # is not the first token found), and tokens unlike anything, mixed.
    spread = rng.choice([0.05, 0.15, 0.25], size=(n // 2, 1))
    tokens = np.concatenate([protos[rng.integers(6, size=n // 3)] + 0.05 * rng.normal(size=(n // 3, d)),
                             groups[rng.integers(5, size=n // 2)] + spread * rng.normal(size=(n // 2, d)),
                             rng.normal(size=(n - n // 3 - n // 2, d))])[rng.permutation(n)]
    method = make_method("codebook-diverse", keep, codebook=make_codebook(tmp_path / "cb", protos))
    method.attach(model)
    _, idx = method.reduce(torch.from_numpy(tokens).float(), 0)
    assert idx.tolist() == _cover_spread_reference(tokens, protos, keep_count(keep, n))


def test_codebook_keep_covers_each_object_once_then_spreads(llava, tmp_path):
    model, _ = llava
    d = model.config.text_config.hidden_size
    rng = np.random.default_rng(0)
    background, big, small = (rng.normal(size=d) for _ in range(3))
    # A 4x4 grid: background everywhere, a large object on the top-left 3x3 (its edge patches a little
    # different, as after a vision tower), a small one at the bottom right.
    tokens = np.stack([background + 0.02 * rng.normal(size=d) for _ in range(16)])
    for i in (0, 1, 2, 4, 5, 6, 8, 9, 10):
        tokens[i] = big + (0.02 if i == 5 else 0.2) * rng.normal(size=d)
    tokens[15] = small
    codebook = make_codebook(tmp_path / "cb", background[None])
    kept = {}
    for name in ("codebook-diverse", "codebook"):
        method = make_method(name, 4 / 16, codebook=codebook)
        method.attach(model)
        kept[name] = method.reduce(torch.from_numpy(tokens).float(), 0)[1].tolist()
    assert 15 not in kept["codebook"]  # the paper's rule spends all four on the large object
    # One token per object (the large one's most typical: its centre, 5), one of the background (its
    # most typical, 7), then the grid token farthest from those three (12).
    assert kept["codebook-diverse"] == [5, 7, 12, 15]


def test_paper_rule_is_the_default_of_prune_visual_tokens(llava, codebook, features):
    model, inputs = llava
    with prune_visual_tokens(model, codebook, keep=0.2) as default:
        got = generate(model, inputs)
    with prune_visual_tokens(model, method=make_method("codebook", 0.2, codebook=codebook)):
        assert torch.equal(generate(model, inputs), got)
    with prune_visual_tokens(model, codebook, keep=0.2, diverse=True) as extension:
        generate(model, inputs)
    assert default.kept == [5, 5] and not default.method.diverse and extension.method.diverse


def test_null_codebook_is_seeded_noise_of_the_codebooks_shape(llava, codebook):
    model, _ = llava
    tokens = torch.from_numpy(np.random.default_rng(3).normal(size=(25, codebook.dim))).float()

    def null(seed, name="codebook-null"):
        method = make_method(name, 0.2, codebook=codebook, seed=seed)
        method.attach(model)
        return method

    a, b, c = null(0), null(0), null(1)
    assert a.vectors.shape == codebook.vectors.shape and not np.allclose(a.vectors, codebook.vectors)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert not np.array_equal(a.vectors, c.vectors)
    assert torch.equal(a.reduce(tokens, 0)[1], b.reduce(tokens, 0)[1])
    assert torch.equal(a.score(tokens, 0), null(0, "codebook-diverse-null").score(tokens, 0))
    real = make_method("codebook", 0.2, codebook=codebook)
    real.attach(model)
    assert not torch.equal(real.score(tokens, 0), a.score(tokens, 0))


def _divprune_reference(tokens: np.ndarray, k: int) -> list[int]:
    """DivPrune from scratch in float64 loops: the token whose nearest other token is farthest, then each
    time the token whose nearest kept token is farthest (first index on ties)."""
    v, n = _unit(tokens.astype(np.float64)), len(tokens)
    dist = [[1 - v[i] @ v[j] for j in range(n)] for i in range(n)]
    chosen = [max(range(n), key=lambda j: min(dist[i][j] for i in range(n) if i != j))]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: min(dist[c][j] for c in chosen)))
    return sorted(chosen)


@pytest.mark.parametrize("keep", [0.04, 0.2, 0.5, 0.9])
def test_divprune_equals_the_from_scratch_reference(keep):
    rng = np.random.default_rng(2)
    groups = rng.normal(size=(4, 12))
    tokens = np.concatenate([groups[rng.integers(4, size=20)] + 0.1 * rng.normal(size=(20, 12)),
                             rng.normal(size=(10, 12))])
    _, idx = make_method("divprune", keep).reduce(torch.from_numpy(tokens).float(), 0)
    assert idx.tolist() == _divprune_reference(tokens, keep_count(keep, 30))


def test_oracle_orders_objects_round_robin_and_anti_oracle_reverses_it():
    # A 3x3 grid: object 1 on 0, 1, 4 (coverage .5, 1, .9), object 2 on 8 (.3); the rest background.
    mask, coverage = np.array([1, 1, 0, 0, 1, 0, 0, 0, 2]), np.array([.5, 1, 0, 0, .9, 0, 0, 0, .3])
    tokens = torch.zeros(9, 4)
    kept = {}
    for name in ("oracle", "anti-oracle"):
        method = make_method(name, 3 / 9)
        method.truth = [(mask, coverage)]
        kept[name] = method.reduce(tokens, 0)[1].tolist()
    assert kept == {"oracle": [1, 4, 8], "anti-oracle": [5, 6, 7]}
    method = make_method("oracle", 0.5)
    with pytest.raises(ValueError, match="per-patch masks"):
        method.reduce(tokens, 0)


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
    pruner, seen = pruned_llm_input(model, inputs, codebook=codebook, keep=0.25)
    newline = model.model.image_newline
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    n_newline = n_image - pruner.total[0]
    assert n_newline > 0 and pruner.kept == [keep_count(0.25, t) for t in pruner.total]
    assert int((seen[0] == newline).all(-1).sum()) == n_newline  # every newline survives


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
