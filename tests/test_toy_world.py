"""The toy world: shards round-trip through webdataset, are deterministic, and splits never overlap."""
import hashlib
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vrc_dist.toy.world import COLOURS, COUNT_WORDS, SHAPES, parse_key, render
from vrc_dist.toy.write_shards import make_shards


def _read(paths):
    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)
    return [(s["__key__"], s["png"], json.loads(s["json"])) for s in ds]


def test_shards_round_trip_through_webdataset(tmp_path):
    paths = make_shards(tmp_path, shards=2, per_shard=5, seed=3, split="eval")
    samples = _read(paths)
    assert [k for k, _, _ in samples] == [f"w2-eval-s3-{s:05d}-{i:05d}" for s in range(2) for i in range(5)]
    for key, png, meta in samples:
        image, expected = render(*parse_key(key))
        assert meta == json.loads(json.dumps(expected))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(image))


def test_mask_matches_object_pixels():
    for i in range(20):
        image, meta = render("train", 0, 0, i)
        coverage = np.asarray(meta["coverage"])
        mask = np.asarray(meta["mask"])
        patch_pixels = (meta["size"][0] // meta["grid"][0]) ** 2
        # Every visible object pixel lies in exactly one patch, so areas and coverage must agree.
        assert np.isclose(coverage.sum() * patch_pixels, sum(o["area"] for o in meta["objects"]), atol=0.01 * 144)
        assert ((mask > 0) == (coverage > 0)).all()
        assert set(np.unique(mask)) == set(range(len(meta["objects"]) + 1))  # every object is seen


def test_distractors_are_the_recurring_badges_on_object_free_patches():
    p = 144 // 12
    badges = set()
    for i in range(30):
        image, meta = render("eval", 2, 0, i)
        pixels, distractor, mask = np.asarray(image), np.asarray(meta["distractor"]), np.asarray(meta["mask"])
        assert not (distractor & (mask > 0)).any()
        for r, c in zip(*np.nonzero(distractor)):
            badges.add(pixels[r * p:(r + 1) * p, c * p:(c + 1) * p].tobytes())
    assert len(badges) == 2  # two fixed patterns, recurring across images: redundancy by construction


def test_world_vocabulary_and_answers():
    metas = [render("train", 1, 0, i)[1] for i in range(80)]
    for m in metas:
        objects = m["objects"]
        assert 1 <= len(objects) <= 6
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)  # every object can be named
        assert m["qa"][0]["type"] == "single"
        assert m["answer"] == max(objects, key=lambda o: o["area"])["shape"]
        areas = sorted((o["area"] for o in objects), reverse=True)
        assert len(areas) == 1 or areas[0] >= 1.5 * areas[1]  # the largest object is clearly the largest
        assert all(o["shape"] in SHAPES and o["colour"] in COLOURS for o in objects)
        for qa in m["qa"]:
            named = objects[qa["object"] - 1] if qa["object"] else None
            if qa["type"] == "count":
                assert qa["answer"] == COUNT_WORDS[len(objects)]
            elif qa["type"] == "exist":
                present = any(f"{o['colour']} {o['shape']}" in qa["question"] for o in objects)
                assert qa["answer"] == ("yes" if present else "no") and (named is not None) == present
            elif qa["type"] in ("shape", "colour"):
                assert qa["answer"] == named[qa["type"]] and named["colour" if qa["type"] == "shape" else "shape"] in qa["question"]
        assert sorted(qa["answer"] for qa in m["qa"] if qa["type"] == "exist") == ["no", "yes"]
    assert len({t for m in metas for t in m["background"]}) >= 3
    assert max(len(m["background"]) for m in metas) >= 3  # several regions of different textures
    assert len({o["shape"] for m in metas for o in m["objects"]}) == len(SHAPES)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_shards(tmp_path / "a", 1, 6, seed=7)
    b = make_shards(tmp_path / "b", 1, 6, seed=7)
    c = make_shards(tmp_path / "c", 1, 6, seed=8)
    assert a[0].read_bytes() == b[0].read_bytes()
    assert [png for _, png, _ in _read(a)] != [png for _, png, _ in _read(c)]


def test_train_and_eval_splits_share_no_image(tmp_path):
    def digests(split):
        paths = make_shards(tmp_path / split, 2, 50, seed=0, split=split)
        return {hashlib.sha256(np.asarray(Image.open(io.BytesIO(p))).tobytes()).hexdigest() for _, p, _ in _read(paths)}

    assert not digests("train") & digests("eval")


@pytest.mark.parametrize("shards,per_shard,message", [(0, 5, "--shards"), (2, -1, "--per-shard"), (-3, 5, "--shards")])
def test_bad_counts_fail_clearly(tmp_path, shards, per_shard, message):
    with pytest.raises(ValueError, match=message):
        make_shards(tmp_path, shards, per_shard)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_fails_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot create output directory"):
        make_shards(blocker / "shards", 1, 1)


def test_failure_mid_shard_leaves_no_partial_tar(tmp_path, monkeypatch):
    import vrc_dist.toy.write_shards as ws

    calls = {"n": 0}
    real = ws.render

    def flaky(*args, **kwargs):  # a crash we cannot otherwise cause deterministically
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("renderer crashed")
        return real(*args, **kwargs)

    monkeypatch.setattr(ws, "render", flaky)
    with pytest.raises(RuntimeError):
        make_shards(tmp_path, shards=2, per_shard=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-00000.tar"]  # the complete one only


def test_make_image_writes_the_rendered_png(tmp_path, capsys):
    from vrc_dist.cli import main

    out = tmp_path / "new" / "img.png"
    assert main(["toy", "make-image", "--out", str(out), "--seed", "3", "--index", "2", "--split", "train"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(render("train", 3, 0, 2)[0]))
    assert "toy image w2-train-s3-00000-00002" in capsys.readouterr().out


def test_a_key_of_another_world_version_is_refused():
    assert parse_key("w2-train-s1-00003-00007") == ("train", 1, 3, 7)
    with pytest.raises(ValueError, match="not a key of toy world v2"):
        parse_key("train-s1-00003-00007")  # a v1 key: its image is not the v2 image of that seed
