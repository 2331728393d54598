from pathlib import Path

import numpy as np
import pytest
import tiny_models
from PIL import Image

from vrc_dist.config import ProbeConfig
from vrc_dist.probe.prober import TOKEN_COLUMNS, Prober, batches, windows

# Divergences are differences of nearly equal probabilities, so float32 rounding of the logits
# (~1e-6, different in batched and one-at-a-time forwards) moves a divergence D by ~sqrt(D) * 1e-6:
# on the toy model, where D is 1e-11 to 1e-5, that is up to 1e-2 relative. Divergences are therefore
# compared on the sqrt(D) scale, where that rounding is an absolute ~1e-7 and a real disagreement (a
# wrong window, a wrong ablation) is the size of sqrt(D) itself. In float64 everything must agree to 1e-5.
FLOAT_TOL = dict(rtol=1e-5, atol=0)
SQRT_DIVERGENCE_TOL = dict(rtol=1e-5, atol=1e-6)
DIVERGENCES = ("jsd_region", "jsd_global", "score")
TOY_CONFIG = Path(__file__).resolve().parents[1] / "vrc_dist" / "configs" / "toy.yaml"
TOY_IMAGES = 12


def test_windows_in_the_interior_are_centred():
    w = windows((5, 5), 3)
    assert w[12].tolist() == [6, 7, 8, 11, 12, 13, 16, 17, 18]  # (2, 2)
    assert w[7].tolist() == [1, 2, 3, 6, 7, 8, 11, 12, 13]  # (1, 2): the top edge is not crossed


@pytest.mark.parametrize(
    "token, top_left",
    [
        (0, (0, 0)), (4, (0, 2)), (20, (2, 0)), (24, (2, 2)),  # corners
        (2, (0, 1)), (22, (2, 1)), (10, (1, 0)), (14, (1, 2)),  # edge midpoints: top, bottom, left, right
    ],
)  # fmt: skip
def test_windows_shift_inward_at_edges_and_corners(token, top_left):
    w = windows((5, 5), 3)[token]
    r, c = top_left
    assert w.tolist() == [(r + dr) * 5 + c + dc for dr in range(3) for dc in range(3)]
    assert token in w and len(set(w.tolist())) == 9


def test_windows_on_a_rectangular_grid_clamp_rows_and_columns_separately():
    w = windows((4, 6), 3)  # 4 rows, 6 columns, token = row * 6 + col
    assert w[5].tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17]  # (0, 5): top-right corner
    assert w[19].tolist() == [6, 7, 8, 12, 13, 14, 18, 19, 20]  # (3, 1): bottom edge
    assert all(i in row for i, row in enumerate(w))


@pytest.mark.parametrize("grid", [(2, 8), (8, 2), (2, 2)])
def test_window_that_does_not_fit_is_an_error(grid):
    with pytest.raises(ValueError, match="3x3 window does not fit"):
        windows(grid, 3)


def test_batches_respect_size_and_start_slack():
    starts = np.array([0, 1, 2, 12, 13, 25, 26])
    assert [b.tolist() for b in batches(starts, 4, slack=12)] == [[0, 1, 2, 3], [4, 5], [6]]
    assert [b.tolist() for b in batches(np.zeros(5, dtype=int), 2, slack=0)] == [[0, 1], [2, 3], [4]]


def picture(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (50, 70, 3), dtype=np.uint8))


def assert_same_results(a, b, exact: bool = False):
    assert (a.key, a.grid, a.answer, a.answer_token_id) == (b.key, b.grid, b.answer, b.answer_token_id)
    assert list(a.tokens) == list(TOKEN_COLUMNS) == list(b.tokens)
    for name in TOKEN_COLUMNS:
        x, y = a.tokens[name], b.tokens[name]
        assert x.shape == y.shape, name
        if name in DIVERGENCES and not exact:
            np.testing.assert_allclose(np.sqrt(x), np.sqrt(y), **SQRT_DIVERGENCE_TOL, err_msg=name)
        elif x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, **FLOAT_TOL, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    np.testing.assert_array_equal(a.candidate_index, b.candidate_index)
    np.testing.assert_array_equal(a.candidate_vectors, b.candidate_vectors)


@pytest.fixture(scope="module", params=tiny_models.KINDS)
def tiny_probers(request, tmp_path_factory):
    path = tiny_models.save(request.param, tmp_path_factory.mktemp(request.param))
    cfg = ProbeConfig(model=str(path), device="cpu", dtype="float32", token_budget=300)
    batched = Prober(cfg)
    # Thresholds inside this random model's range, halfway between two tokens' values so that no
    # flag sits on a knife edge: some tokens are low-info, some not.
    t = batched.probe(picture(), "calibration").tokens
    cfg.jsd_thres, cfg.top1_thres = midpoint(t["score"], 0.6), midpoint(t["top1_prob"], 0.6)
    return batched, Prober(cfg, engine="reference", adapter=batched.adapter)


def midpoint(values, q):
    v = np.sort(values)
    i = int(q * len(v))
    return float((v[i - 1] + v[i]) / 2)


def test_batched_equals_one_at_a_time_on_tiny_models(tiny_probers):
    batched, reference = tiny_probers
    a, b = batched.probe(picture(), "img-0"), reference.probe(picture(), "img-0")
    assert_same_results(a, b)
    assert a.grid == (5, 5) and len(a.tokens["score"]) == 25
    assert 0 < a.tokens["low_info"].sum() < 25, "thresholds should split this image's tokens"


def test_result_follows_the_contract(tiny_probers):
    prober = tiny_probers[0]
    r = prober.probe(picture(1), "k")
    t = r.tokens
    np.testing.assert_array_equal(t["row"] * 5 + t["col"], t["token_index"])
    np.testing.assert_allclose(t["score"], t["jsd_region"] + 16 * t["jsd_global"], rtol=1e-12)
    cfg = prober.cfg
    np.testing.assert_array_equal(t["low_info"], (t["score"] < cfg.jsd_thres) & (t["top1_prob"] < cfg.top1_thres))
    np.testing.assert_array_equal(t["candidate"], t["low_info"] & (t["image_cluster_size"] <= 8))
    assert set(t["image_cluster"].tolist()) <= set(range(8))
    np.testing.assert_array_equal(np.bincount(t["image_cluster"])[t["image_cluster"]], t["image_cluster_size"])
    assert r.candidate_index.dtype == np.int32 and r.candidate_vectors.dtype == np.float16
    vectors, grid = prober.visual_tokens(picture(1))
    assert vectors.dtype == np.float32 and grid == (5, 5)
    np.testing.assert_array_equal(r.candidate_vectors, vectors[r.candidate_index].astype(np.float16))
    if prober.adapter.model_type == "llava_onevision":
        assert np.isnan(t["cls_sim"]).all() and (t["cls_sim_rank"] == -1).all()
    else:
        assert sorted(t["cls_sim_rank"].tolist()) == list(range(25))
        assert np.all(np.diff(t["cls_sim"][np.argsort(t["cls_sim_rank"])]) <= 0)
    info = prober.model_info
    assert info["divergence"] == "reference" and info["embed_dim"] == vectors.shape[1] and info["grid"] == [5, 5]


def test_divergence_convention_is_configurable_and_recorded(tiny_probers):
    batched = tiny_probers[0]
    jsd = Prober(ProbeConfig(**{**vars(batched.cfg), "divergence": "jsd"}), adapter=batched.adapter)
    assert jsd.model_info["divergence"] == "jsd"
    a, b = batched.probe(picture(), "x").tokens, jsd.probe(picture(), "x").tokens
    assert not np.allclose(a["jsd_global"], b["jsd_global"])
    np.testing.assert_array_equal(a["top1_prob"], b["top1_prob"])


def test_bad_engine_and_convention_are_errors(tiny_probers):
    adapter = tiny_probers[0].adapter
    with pytest.raises(ValueError, match="engine"):
        Prober(ProbeConfig(), engine="fast", adapter=adapter)
    with pytest.raises(ValueError, match="divergence"):
        Prober(ProbeConfig(divergence="kl"), adapter=adapter)


def test_cli_prints_a_table_and_writes_parquet(tiny_probers, tmp_path, capsys):
    import pyarrow.parquet as pq

    from vrc_dist.cli import main

    if tiny_probers[0].adapter.model_type != "llava":
        pytest.skip("one architecture is enough for the CLI")
    image = tmp_path / "in.png"
    picture().save(image)
    model = ["--model", tiny_probers[0].cfg.model, "--image", str(image), "--set", "device=cpu"]
    assert main(["probe", *model]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{image}: grid 5x5") and len(lines) == 3 + 25
    assert main(["probe", *model, "--out", str(tmp_path / "t.parquet")]) == 0
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column_names == ["key", *TOKEN_COLUMNS] and table.num_rows == 25
    assert b"divergence" in table.schema.metadata[b"model_info"]
    assert main(["probe", "--model", str(tmp_path), "--image", str(image)]) == 2
    assert "no config.json" in capsys.readouterr().err


# ---- the toy model on its own world ----------------------------------------------------------


def toy_config(*overrides):
    from vrc_dist.config import load_probe_config
    from vrc_dist.toy import TOY_MODEL_DIR

    if not (TOY_MODEL_DIR / "config.json").is_file():
        pytest.skip("toy checkpoint not built yet")
    return load_probe_config(TOY_CONFIG, ["device=cpu", *overrides])


@pytest.fixture(scope="module")
def toy_prober():
    return Prober(toy_config())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batched_equals_one_at_a_time_on_toy_images(dtype):
    from vrc_dist.toy.world import render

    batched = Prober(toy_config(f"dtype={dtype}"))
    reference = Prober(batched.cfg, engine="reference", adapter=batched.adapter)
    image = render("eval", 0, 0, 0)[0]
    assert_same_results(batched.probe(image, "eval-0"), reference.probe(image, "eval-0"), exact=dtype == "float64")


def test_toy_candidates_are_background(toy_prober):
    """Figure 4 in miniature: object tokens are more informative, and candidates are background."""
    from vrc_dist.toy.world import render

    background, tokens = [], []
    for i in range(TOY_IMAGES):
        image, meta = render("eval", 0, 1, i)
        r = toy_prober.probe(image, meta["key"])
        background.append(np.asarray(meta["mask"]).reshape(-1) == 0)
        tokens.append(r.tokens)
    bg = np.concatenate(background)
    cat = {c: np.concatenate([t[c] for t in tokens]) for c in ("candidate", "top1_prob", "score")}
    assert cat["candidate"].sum() >= TOY_IMAGES, "too few candidates to judge precision"
    assert bg[cat["candidate"]].mean() >= 0.9
    assert cat["top1_prob"][~bg].mean() > cat["top1_prob"][bg].mean()
    # Not asserted: the divergence score. This toy model's answer on a region of background is nearly
    # flat, so leaving one token out moves it more than it moves a confident answer on an object
    # (median score 0.026 vs 0.0005 on 60 eval images); top1_prob is what separates them here.


def test_the_toy_model_defaults_to_its_calibrated_config(tmp_path):
    """Without --config the toy model probes with vrc_dist/configs/toy.yaml (the 7B reference thresholds
    find no candidates on it); other models keep the reference defaults; a file given is taken as is."""
    from vrc_dist.config import load_probe_config, read_config_file

    toy = read_config_file(TOY_CONFIG)["probe"]
    calibrated = ("jsd_thres", "top1_thres", "cluster_size_thres", "pad_token_id")
    for cfg in (load_probe_config(), load_probe_config(None, ["model=toy"])):
        assert {k: getattr(cfg, k) for k in calibrated} == {k: toy[k] for k in calibrated}
    assert load_probe_config(None, ["model=toy", "top1_thres=0.5"]).top1_thres == 0.5  # overrides still win
    assert load_probe_config(None, ["model=/ckpt/llava-7b"]) == ProbeConfig(model="/ckpt/llava-7b")
    plain = tmp_path / "probe.yaml"
    plain.write_text("model: toy\n")
    assert load_probe_config(plain) == ProbeConfig()


def test_vrc_probe_on_the_toy_model_finds_candidates_without_a_config(tmp_path, capsys):
    from vrc_dist.cli import main
    from vrc_dist.toy.world import render

    toy_config()  # skips without the toy checkpoint
    image = tmp_path / "img.png"
    render("eval", 0, 1, 0)[0].save(image)
    assert main(["probe", "--model", "toy", "--image", str(image), "--set", "device=cpu"]) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    assert int(summary.split(" candidates")[0].rsplit(" ", 1)[1]) > 0, summary
