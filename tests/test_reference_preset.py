"""Issue 14 point 5: the reference scripts' probe conventions as settings, and the `reference-llava15` preset.

probe.tokens (a [CLS]-similarity rank subset), probe.conversation: llava_v1, probe.skip_leading_a, each
checked against a computation by hand on the tiny random LLaVA models.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image

from vrc_dist.config import (
    BuildConfig,
    ConfigError,
    ProbeConfig,
    config_source,
    load,
    load_probe_config,
    parse_token_ranks,
    preset_path,
    recorded_probe,
)
from vrc_dist.model import LEADING_A, leading_a_token_id, llava_v1_prompt
from vrc_dist.probe import PROBED_COLUMNS, TOKEN_COLUMNS, Prober, windows
from vrc_dist.probe.divergence import divergence, top1_of_head
from vrc_dist.probe.dpc import dpc_knn_exact
from vrc_dist.probe.prober import cls_similarity

SUBSET = "1-3,7-9,20-25"  # 12 of the tiny models' 25 tokens
SUBSET_RANKS = [1, 2, 3, 7, 8, 9, 20, 21, 22, 23, 24, 25]
REFERENCE_RANKS = [(1, 24), (37, 44), (73, 80), (145, 152), (217, 224), (289, 296), (361, 368), (433, 440),
                   (505, 512), (569, 576)]
SQRT_TOL = dict(rtol=1e-5, atol=1e-6)  # divergences compared on the sqrt scale, as in test_probe.py


def picture(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (50, 70, 3), dtype=np.uint8))


def config(path, **settings) -> ProbeConfig:
    return ProbeConfig(model=str(path), device="cpu", dtype="float32", token_budget=300, **settings)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return tiny_models.save("llava", tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def full_prober(tiny_llava):
    return Prober(config(tiny_llava))


class CountingAdapter:
    """Counts the variants (sequences) that go through the LM, in either engine."""

    def __init__(self, adapter):
        self.adapter, self.variants = adapter, 0

    def __enter__(self):
        first, reference = self.adapter.first_token_logits, self.adapter.reference_logits

        def counted_first(blocks, *a, **k):
            self.variants += len(blocks)
            return first(blocks, *a, **k)

        def counted_reference(block, *a, **k):
            self.variants += 1
            return reference(block, *a, **k)

        self.adapter.first_token_logits, self.adapter.reference_logits = counted_first, counted_reference
        return self

    def __exit__(self, *exc):
        del self.adapter.first_token_logits, self.adapter.reference_logits


# ---- probe.tokens ----------------------------------------------------------------------------------


def test_token_ranks_parse_strings_lists_and_single_ranks():
    assert parse_token_ranks("all") is None
    assert parse_token_ranks("1-24, 37-44") == [(1, 24), (37, 44)]
    assert parse_token_ranks(["1-3", 7, "9"]) == [(1, 3), (7, 7), (9, 9)]
    assert parse_token_ranks(5) == [(5, 5)]
    assert load(ProbeConfig, None, ["tokens=[1-3, 7]"]).tokens == ["1-3", 7]  # a YAML list through --set


@pytest.mark.parametrize("spec, message", [
    ("0-3", "1-based"), ("5-3", "low-high"), ("1-3,3-5", "ascend without overlapping"),
    ("7,2", "ascend without overlapping"), ("x", "not a rank"), ("1-", "not a rank"), ([], "empty"),
])  # fmt: skip
def test_bad_token_ranks_are_errors_naming_the_setting(spec, message):
    with pytest.raises(ConfigError, match=f"probe.tokens.*{message}"):
        load(ProbeConfig, None, [f"tokens={json.dumps(spec)}"])


def test_bad_settings_of_the_other_options_are_errors():
    with pytest.raises(ConfigError, match="conversation.*one of template, llava_v1"):
        load(ProbeConfig, None, ["conversation=vicuna"])
    with pytest.raises(ConfigError, match="skip_leading_a.*expected bool"):
        load(ProbeConfig, None, ["skip_leading_a=yes please"])
    with pytest.raises(ConfigError, match="tokens.*does not fit"):
        load(ProbeConfig, None, ["tokens=true"])


def test_only_the_requested_ranks_are_probed(tiny_llava, full_prober):
    """Ranks map through cls_sim_rank (rank r is cls_sim_rank r - 1); the leave-one-out passes run for the
    subset only; its metrics are those of the full run; the rest are NaN / -1 / False, never candidates."""
    full = full_prober.probe(picture(), "img")
    for engine in ("batched", "reference"):
        subset = Prober(config(tiny_llava, tokens=SUBSET, jsd_thres=np.inf, top1_thres=np.inf), engine=engine,
                        adapter=full_prober.adapter)
        with CountingAdapter(full_prober.adapter) as counter:
            r = subset.probe(picture(), "img")
        t = r.tokens
        assert list(t) == list(TOKEN_COLUMNS)
        probed = np.isin(t["cls_sim_rank"] + 1, SUBSET_RANKS)
        assert probed.sum() == 12
        np.testing.assert_array_equal(~np.isnan(t["score"]), probed)
        if engine == "reference":  # one forward per variant: the intact image, then 4 per probed token
            assert counter.variants == 1 + 4 * 12
        else:  # window-only variants once per distinct window, and never more than the reference's
            n_windows = len(np.unique(windows((5, 5), 3)[probed], axis=0))
            assert counter.variants == 1 + 12 + n_windows + 12 + n_windows
        # tokens outside the subset: every token's columns kept, the probed-only ones NaN / -1 / False
        for name in ("token_index", "row", "col", "cls_sim", "cls_sim_rank"):
            np.testing.assert_array_equal(t[name], full.tokens[name])
        for name in PROBED_COLUMNS:
            rest = t[name][~probed]
            assert (np.isnan(rest).all() if rest.dtype.kind == "f" else (rest == (False if rest.dtype.kind == "b"
                                                                               else -1)).all()), name
        # probed tokens: the same windows, the same whole-image ablations as when every token is probed
        np.testing.assert_allclose(t["top1_prob"][probed], full.tokens["top1_prob"][probed], rtol=1e-5)
        np.testing.assert_array_equal(t["top1_token_id"][probed], full.tokens["top1_token_id"][probed])
        for name in ("jsd_region", "jsd_global", "score"):
            np.testing.assert_allclose(np.sqrt(t[name][probed]), np.sqrt(full.tokens[name][probed]), **SQRT_TOL)
        # thresholds at infinity: every probed token is low-info, the DPC filter alone decides
        assert t["low_info"][probed].all() and not t["candidate"][~probed].any()
        assert set(r.candidate_index.tolist()) <= set(np.flatnonzero(probed).tolist())
        assert r.answer_token_id == full.answer_token_id


def test_image_dpc_runs_over_the_probed_tokens_only(tiny_llava, full_prober):
    prober = Prober(config(tiny_llava, tokens=SUBSET, jsd_thres=np.inf, top1_thres=np.inf,
                           cluster_size_thres=1), adapter=full_prober.adapter)
    r = prober.probe(picture(), "img")
    t = r.tokens
    vectors, _ = prober.visual_tokens(picture())
    by_rank = np.argsort(t["cls_sim_rank"])  # the subset's tokens in rank order, as the probe feeds DPC
    who = by_rank[np.array(SUBSET_RANKS) - 1]
    labels = dpc_knn_exact(vectors[who], 5, 8, seed=0).labels
    np.testing.assert_array_equal(t["image_cluster"][who], labels)
    sizes = np.bincount(labels, minlength=8)[labels]
    np.testing.assert_array_equal(t["image_cluster_size"][who], sizes)
    np.testing.assert_array_equal(r.candidate_index, np.sort(who[sizes <= 1]))
    assert 0 < len(r.candidate_index) < 12, "the size filter should keep some probed tokens, not all"
    np.testing.assert_array_equal(r.candidate_vectors, vectors[r.candidate_index].astype(np.float16))
    # clustering all 25 tokens gives other clusters: the subset is what the filter sees
    all_labels = dpc_knn_exact(vectors, 5, 8, seed=0).labels
    assert not np.array_equal(np.bincount(all_labels, minlength=8)[all_labels][who], sizes)


def test_tokens_all_takes_the_path_of_old(tiny_llava, full_prober):
    """`all` probes every token in raster order and returns the columns unchanged; every rank listed,
    in rank order, gives the same metrics (the subset machinery itself changes nothing)."""
    feats = full_prober.adapter.encode_image(picture())
    rank = cls_similarity(feats.cls, feats.patches)[1]
    np.testing.assert_array_equal(full_prober._probed(feats, rank, "img"), np.arange(25))
    full = full_prober.probe(picture(), "img")
    every = Prober(config(tiny_llava, tokens="1-25"), adapter=full_prober.adapter).probe(picture(), "img")
    for name in TOKEN_COLUMNS:
        if name in ("jsd_region", "jsd_global", "score"):
            np.testing.assert_allclose(np.sqrt(every.tokens[name]), np.sqrt(full.tokens[name]), **SQRT_TOL)
        elif name not in ("image_cluster", "image_cluster_size", "candidate", "low_info"):
            np.testing.assert_allclose(every.tokens[name], full.tokens[name], rtol=1e-5)


def test_ranks_beyond_the_token_count_are_a_clear_error(tiny_llava, full_prober):
    with pytest.raises(ConfigError, match=r"probe.tokens asks for rank 26, .* 25 visual tokens"):
        Prober(config(tiny_llava, tokens="1-3,20-26"), adapter=full_prober.adapter)
    with pytest.raises(ConfigError, match=r"probe.tokens asks for rank 576"):
        Prober(config(tiny_llava, tokens=",".join(f"{a}-{b}" for a, b in REFERENCE_RANKS)),
               adapter=full_prober.adapter)


def test_a_rank_subset_needs_a_cls_token(tmp_path):
    path = tiny_models.save("llava_onevision", tmp_path / "ov")
    prober = Prober(config(path, tokens="1-5"))
    with pytest.raises(ConfigError, match="no CLS token; use tokens: all"):
        prober.probe(picture(), "img")


def test_metrics_store_and_report_take_unprobed_rows(tiny_llava, full_prober, tmp_path):
    import pyarrow.parquet as pq

    from vrc_dist.cli.probe import write_parquet
    from vrc_dist.eval.report import decile_table

    prober = Prober(config(tiny_llava, tokens=SUBSET), adapter=full_prober.adapter)
    r = prober.probe(picture(), "img")
    write_parquet(r, prober.model_info, prober.cfg, tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet").to_pydict()
    assert sum(np.isnan(table["score"])) == 13 and table["image_cluster"].count(-1) == 13
    deciles = decile_table(r.tokens, np.full(25, 25))
    assert np.isfinite(deciles["score"][[0, 2, 8, 9]]).all()  # ranks 1-3, 7-9, 20-25 fall in these deciles


# ---- probe.conversation ----------------------------------------------------------------------------


def test_llava_v1_prompt_is_the_reference_string():
    assert llava_v1_prompt("What does this image show? You must provide a single word that best describes the "
                           "image.") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat does this image show? You "
        "must provide a single word that best describes the image. ASSISTANT:"
    )


def test_llava_v1_conversation_is_tokenized_like_tokenizer_image_token(tiny_llava, full_prober):
    """Each side of <image> tokenized on its own, BOS kept on the first side only; the probe then runs."""
    prober = Prober(config(tiny_llava, conversation="llava_v1"))
    adapter, tok = prober.adapter, prober.adapter.tokenizer
    before, after = llava_v1_prompt(prober.cfg.prompt).split("<image>")
    embed = adapter.model.get_input_embeddings()
    prefix, suffix = tok(before)["input_ids"], tok(after)["input_ids"]
    assert prefix[0] == tok.bos_token_id and suffix[0] == tok.bos_token_id
    with torch.no_grad():
        torch.testing.assert_close(adapter.prefix_embeddings, embed(torch.tensor(prefix)), rtol=0, atol=0)
        torch.testing.assert_close(adapter.suffix_embeddings, embed(torch.tensor(suffix[1:])), rtol=0, atol=0)
    assert len(adapter.prefix_embeddings) != len(full_prober.adapter.prefix_embeddings)  # not the template's
    r = prober.probe(picture(), "img")
    assert np.isfinite(r.tokens["score"]).all()
    with pytest.raises(ConfigError, match="conversation 'llava_v1', but the adapter given was built with 'template'"):
        Prober(config(tiny_llava, conversation="llava_v1"), adapter=full_prober.adapter)


# ---- probe.skip_leading_a --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_with_leading_a(tiny_llava, tmp_path_factory):
    """The tiny model, in the llava_v1 conversation (as the preset), with its tokenizer's vocabulary renamed
    so that its most frequent greedy first token over all variants is the piece "▁A": the rule then fires
    in every kind of pass, for some variants and not for others."""
    prober = Prober(config(tiny_llava, conversation="llava_v1"), engine="reference")
    tok, greedy = prober.adapter.tokenizer, []
    first = prober._first_logits
    prober._first_logits = lambda *a, **k: greedy.append(first(*a, **k)) or greedy[-1]
    prober.probe(picture(), "img")
    top1 = torch.cat(greedy).argmax(-1).numpy()
    in_prompt = {int(i) for i in torch.cat(prober.adapter._prompt_ids(ProbeConfig.prompt))}
    ids, counts = np.unique(top1, return_counts=True)
    a_id = next(int(i) for i in ids[np.argsort(-counts, kind="stable")]
                if int(i) not in tok.all_special_ids and int(i) not in in_prompt)
    path = tmp_path_factory.mktemp("leading_a")
    tiny_models.save("llava", path)
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    (word,) = [w for w, i in vocab.items() if i == a_id]
    vocab[LEADING_A] = vocab.pop(word)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return path, a_id


def hand_logits(adapter, block: torch.Tensor, a_id: int | None) -> torch.Tensor:
    """One full forward of prefix + block + suffix; if its greedy token is `a_id`, one more with it appended."""
    embed = adapter.model.get_input_embeddings()
    seq = torch.cat([adapter.prefix_embeddings, block, adapter.suffix_embeddings])
    with torch.no_grad():
        logits = adapter.model(inputs_embeds=seq[None]).logits[0, -1].float()
        if a_id is not None and int(logits.argmax()) == a_id:
            seq = torch.cat([seq, embed(torch.tensor([a_id]))])
            logits = adapter.model(inputs_embeds=seq[None]).logits[0, -1].float()
    return logits


def test_leading_a_token_is_the_sentencepiece_piece(tiny_with_leading_a, full_prober):
    path, a_id = tiny_with_leading_a
    from transformers import AutoTokenizer

    assert leading_a_token_id(AutoTokenizer.from_pretrained(path)) == a_id
    with pytest.raises(ValueError, match="skip_leading_a: the tokenizer .* has no '▁A' piece"):
        Prober(config(full_prober.cfg.model, skip_leading_a=True), adapter=full_prober.adapter)


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_leading_a_reads_the_second_step_of_every_pass_that_starts_with_it(tiny_with_leading_a, engine):
    path, a_id = tiny_with_leading_a
    prober = Prober(config(path, conversation="llava_v1", skip_leading_a=True), engine=engine)
    assert prober.leading_a_id == a_id
    r = prober.probe(picture(), "img")
    adapter, cfg = prober.adapter, prober.cfg
    v = adapter.encode_image(picture()).tokens
    pad = adapter.pad_embedding
    win = windows((5, 5), 3)
    fired = {}

    def run(kind, block):
        first = hand_logits(adapter, block, None)
        fired.setdefault(kind, []).append(int(first.argmax()) == a_id)
        return hand_logits(adapter, block, a_id)

    intact = run("intact", v)
    single = torch.stack([run("single", v[i : i + 1]) for i in range(25)])
    region_a = torch.stack([run("region A", v[win[i]]) for i in range(25)])
    region_b, global_b = [], []
    for i in range(25):
        block = v[win[i]].clone()
        block[list(win[i]).index(i)] = pad
        region_b.append(run("region B", block))
        block = v.clone()
        block[win[i]] = pad
        global_b.append(run("global B", block))
    region_b, global_b = torch.stack(region_b), torch.stack(global_b)
    fired = {kind: sum(f) for kind, f in fired.items()}
    print(f"leading-A fired per pass: {fired}; the probe skipped {prober.leading_a_skipped}")
    assert fired["intact"] == 1  # the intact image's answer is "▁A": every global divergence reads step 2 of A
    assert 0 < fired["region A"] < 25 and 0 < fired["region B"] < 25 and 0 < fired["global B"] < 25
    if engine == "reference":
        assert prober.leading_a_skipped == sum(fired.values())
    t = r.tokens
    prob, top = top1_of_head(single, cfg.k_head)
    np.testing.assert_allclose(t["top1_prob"], prob.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(t["top1_token_id"], top.numpy())
    assert r.answer_token_id == int(intact.argmax())
    jsd_region = divergence(region_a, region_b, cfg.k_div).numpy()
    jsd_global = divergence(intact.expand_as(global_b), global_b, cfg.k_div).numpy()
    np.testing.assert_allclose(np.sqrt(t["jsd_region"]), np.sqrt(jsd_region), **SQRT_TOL)
    np.testing.assert_allclose(np.sqrt(t["jsd_global"]), np.sqrt(jsd_global), **SQRT_TOL)
    # and it is not what the probe gives without the rule
    plain = Prober(config(path, conversation="llava_v1"), engine=engine, adapter=adapter).probe(picture(), "img")
    assert plain.answer_token_id == a_id  # (the step after it is "▁A" again here: the rule skips one token only)
    assert (plain.tokens["top1_token_id"] == a_id).all()
    assert not np.allclose(plain.tokens["top1_prob"], t["top1_prob"])
    assert not np.allclose(plain.tokens["jsd_global"], t["jsd_global"])


# ---- the preset ------------------------------------------------------------------------------------


def test_the_reference_preset_has_the_reference_values():
    path = preset_path("reference-llava15")
    assert path.parent.name == "configs" and path.parent.parent.name == "vrc_dist"  # package data
    cfg = load(BuildConfig, path)
    p, c = cfg.probe, cfg.cluster
    assert parse_token_ranks(p.tokens) == REFERENCE_RANKS
    assert sum(b - a + 1 for a, b in REFERENCE_RANKS) == 96
    assert (p.conversation, p.skip_leading_a, p.dtype, p.pad_token_id) == ("llava_v1", True, "float16", 0)
    assert (p.jsd_thres, p.top1_thres, p.divergence) == (2e-3, 0.15, "reference")
    assert (p.image_dpc_k, p.image_dpc_clusters, p.cluster_size_thres) == (5, 8, 8)
    assert (p.dup, p.k_head, p.k_div, p.window, p.k_region, p.k_global) == (1, 50, 10, 3, 1, 16)
    assert (c.k, c.n_clusters, c.min_images, c.prototype_mode) == (5, 64, 64, "members")  # kept: > 64 images
    assert p.prompt == ProbeConfig.prompt
    assert load_probe_config(path) == p  # `vrc probe --preset` reads its probe section


def test_preset_selection_errors():
    with pytest.raises(ConfigError, match="preset 'reference-llava16' not found; known presets: .*reference-llava15"):
        preset_path("reference-llava16")
    with pytest.raises(ConfigError, match="not both"):
        config_source("x.yaml", "reference-llava15")
    assert config_source(None, "reference-llava15") == preset_path("reference-llava15")


def test_vrc_probe_and_build_take_the_preset(tiny_llava, tmp_path, capsys):
    from vrc_dist.build.arguments import add_arguments, config_from_args
    from vrc_dist.cli import main

    image = tmp_path / "in.png"
    picture().save(image)
    args = ["probe", "--preset", "reference-llava15", "--model", str(tiny_llava), "--image", str(image),
            "--set", "device=cpu", "--set", "dtype=float32"]
    assert main(args) == 2  # ranks up to 576 on a 25-token model
    assert "probe.tokens asks for rank 576" in capsys.readouterr().err
    assert main([*args, "--set", "tokens=1-3,7-9,20-25", "--set", "skip_leading_a=false"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + 25 and sum(" nan " in line for line in lines[3:]) == 13

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--preset", "reference-llava15", "--set", "cluster.min_images=8"]))
    assert cfg.probe.conversation == "llava_v1" and cfg.cluster.min_images == 8 and cfg.cluster.n_clusters == 64


def test_records_made_before_these_settings_compare_equal_to_their_defaults():
    from vrc_dist.codebook.clustering import _same_probe
    from vrc_dist.config import to_dict

    now = to_dict(ProbeConfig())
    old = {k: v for k, v in now.items() if k not in ("tokens", "conversation", "skip_leading_a")}
    assert recorded_probe(old) == now and _same_probe(old, now)
    assert not _same_probe(old, {**now, "tokens": "1-24"})
