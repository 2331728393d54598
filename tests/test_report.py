"""`vrc report`: deciles computed right, every picture written and linked, pruned marks from a real model."""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import tiny_models

from vrc_dist.build.manifest import Manifest
from vrc_dist.build.writer import ShardWriter
from vrc_dist.cli import main
from vrc_dist.codebook.store import Codebook
from vrc_dist.eval.report import decile_table
from vrc_dist.probe.prober import ImageResult
from vrc_dist.toy.write_shards import make_shards

GRID = (5, 5)  # the tiny model's grid, so its tokens can mark pruned cells
L = GRID[0] * GRID[1]


def fake_result(key: str, rng) -> ImageResult:
    rank = rng.permutation(L)
    cols = {
        "token_index": np.arange(L), "row": np.arange(L) // GRID[1], "col": np.arange(L) % GRID[1],
        "cls_sim": 1 - rank / L, "cls_sim_rank": rank,
        "top1_prob": 0.1 + rank / L,  # rises with rank: decile means must rise too
        "top1_token_id": np.zeros(L), "jsd_region": rng.random(L) * 1e-3, "jsd_global": rng.random(L) * 1e-3,
        "score": rng.random(L), "low_info": rank < 8, "image_cluster": rank % 8, "image_cluster_size": np.full(L, 3),
        "candidate": rank < 6,
    }
    idx = np.flatnonzero(cols["candidate"]).astype(np.int32)
    return ImageResult(key, GRID, "circle", 5, cols, idx, rng.normal(size=(len(idx), 48)).astype(np.float16))


def make_run(tmp_path, model_path):
    shards = make_shards(tmp_path / "shards", 1, 3, seed=7, split="eval")
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset([str(shards[0])], shardshuffle=False)]
    run = tmp_path / "run"
    manifest = Manifest.create(run, {"probe": {"model": str(model_path), "divergence": "reference"}})
    writer = ShardWriter(run, "eval-00000", dim=48)
    rng = np.random.default_rng(0)
    for key in keys:
        writer.add_result(fake_result(key, rng), 96, 96)
    manifest.record_shard("eval-00000", {"url": str(shards[0]), "status": "done", **writer.commit()})
    return run, keys


def test_decile_table_orders_by_rank():
    rng = np.random.default_rng(1)
    tokens = fake_result("a", rng).tokens
    table = decile_table(tokens, np.full(L, L))
    assert np.all(np.diff(table["top1_prob"]) > 0)
    assert abs(table["top1_prob"][0] - (0.1 + np.arange(3).mean() / L)) < 1e-9  # ranks 0..2: 10 * rank / 25 < 1


def test_report_writes_linked_pictures(tmp_path):
    model_path = tiny_models.save("llava", tmp_path / "model")
    run, keys = make_run(tmp_path, model_path)
    n = 5
    ints = pa.array(np.arange(n, dtype=np.int32))
    prov = pa.table({"key": ["k"] * n, "shard": ["s"] * n, "token_index": ints, "cluster": ints,
                     "support": ints, "cluster_size": ints})
    Codebook.create(tmp_path / "cb", "t", "tiny", 48).commit(np.random.default_rng(2).normal(size=(n, 48)), prov, {})

    assert main(["report", str(run), "--codebook", str(tmp_path / "cb"), "--images", "2", "--keep", "0.25"]) == 0
    page = (run / "report" / "index.md").read_text()
    linked = re.findall(r"\]\(([^)]+\.png)\)", page)
    assert {"deciles.png", "codebook_support.png", "codebook_pca.png"} <= set(linked)
    assert [f"overlay_{k}.png" for k in keys[:2]] == [x for x in linked if x.startswith("overlay_")]
    for name in linked:
        assert (run / "report" / name).stat().st_size > 1000
    assert "pruned marks at keep 0.25" in page and "3 images ok" in page
    assert "Codebook t v0001" in page and str(tmp_path / "cb") not in page  # named, not by its machine path


def test_report_on_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no metrics manifest" in capsys.readouterr().err


def test_report_finds_pixels_through_any_shards_form_and_names_missing_images(tmp_path, monkeypatch, capsys):
    from vrc_dist.eval import report

    run, keys = make_run(tmp_path, tiny_models.save("llava", tmp_path / "model"))
    drawn = {}
    monkeypatch.setattr(report, "plot_overlay", lambda key, *a: drawn.__setitem__(key, a[3] is not None))
    assert main(["report", str(run), "--shards", str(tmp_path / "shards" / "*.tar")]) == 0
    assert drawn == {k: True for k in keys}  # every overlay on its pixels
    assert "Warning" not in (run / "report" / "index.md").read_text()

    other = make_shards(tmp_path / "other", 1, 2, seed=8, split="eval")
    assert main(["report", str(run), "--shards", str(other[0])]) == 2
    assert f"3 of 3 images not found in --shards {other[0]} ({keys[0]}" in capsys.readouterr().err

    (tmp_path / "shards" / "eval-00000.tar").unlink()  # the run's own shard moved: overlays without pixels, said so
    assert main(["report", str(run)]) == 0
    assert "Warning: 3 of 3 images not found in the run's recorded shards" in (run / "report" / "index.md").read_text()
