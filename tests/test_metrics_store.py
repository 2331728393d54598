"""Parquet tables, atomic commits and the manifest; plus one shard through a fake prober (no model, no Ray)."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from fakes import DIM, FakeProber, L, fake_result
from PIL import Image

from vrc_dist.build.manifest import Manifest
from vrc_dist.build.read import read_table
from vrc_dist.build.schema import TABLES, TOKEN_FIELDS, table_path
from vrc_dist.build.work import process_shard
from vrc_dist.build.writer import ShardWriter
from vrc_dist.data.shards import ShardSpec


def test_writer_commits_three_tables_with_contract_schemas(tmp_path):
    w = ShardWriter(tmp_path, "s0", DIM, flush_images=2)
    for i in range(3):
        w.add_result(fake_result(f"k{i}"), 10, 12, warnings=["bad sidecar"] if i == 1 else None)
    w.add_error("k9", "cannot decode image")
    assert not table_path(tmp_path, "tokens", "s0").exists()  # nothing visible before commit
    counts = w.commit()
    assert counts == {"images_ok": 3, "images_error": 1, "tokens": 3 * L, "candidates": 6}
    images = pq.read_table(table_path(tmp_path, "images", "s0")).to_pylist()
    assert [r["status"] for r in images] == ["ok", "ok", "ok", "error"]
    assert images[1]["warning"] == "bad sidecar" and images[3]["error"] == "cannot decode image"
    cand = pq.read_table(table_path(tmp_path, "candidates", "s0"))
    vtype = cand.schema.field("vector").type
    assert pa.types.is_fixed_size_list(vtype) and vtype.list_size == DIM and vtype.value_type == pa.float16()
    tok = pq.read_table(table_path(tmp_path, "tokens", "s0"))
    assert tok.column_names == ["key", "shard", *[n for n, _ in TOKEN_FIELDS]] and tok.num_rows == 3 * L
    assert not list(tmp_path.rglob("*.tmp"))


def test_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path, "s0", DIM)
    w.add_result(fake_result("k"), 1, 1)
    w.abort()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_missing_token_column_names_the_image(tmp_path):
    r = fake_result("k")
    del r.tokens["jsd_global"]
    with pytest.raises(ValueError, match="'k'.*jsd_global"):
        ShardWriter(tmp_path, "s0", DIM).add_result(r, 1, 1)


def test_manifest_round_trip_and_reader_uses_only_done_shards(tmp_path):
    m = Manifest.create(tmp_path, {"probe": {"divergence": "reference"}})
    m.data["model_info"] = {"embed_dim": DIM}
    for name in ("a", "b"):
        w = ShardWriter(tmp_path, name, DIM)
        w.add_result(fake_result(f"{name}0"), 1, 1)
        counts = w.commit()
        if name == "a":  # b's files exist but the manifest never heard of it (killed before recording)
            m.record_shard(name, {"status": "done", **counts})
    loaded = Manifest.load(tmp_path)
    assert loaded.done() == ["a"] and loaded.data["divergence"] == "reference"
    assert {"torch", "ray", "vrc-dist", "transformers"} <= set(loaded.data["versions"])
    assert read_table(tmp_path, "images", columns=["key"]).column("key").to_pylist() == ["a0"]
    assert read_table(tmp_path, "tokens").num_rows == L


def test_manifest_refuses_foreign_json(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="not a vrc-dist metrics manifest"):
        Manifest.load(tmp_path)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def test_process_shard_records_bad_images_and_keeps_good_ones(tmp_path):
    shard = tmp_path / "s.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "good", "png": png()})
        w.write({"__key__": "corrupt", "png": b"\x89PNG not really"})
        w.write({"__key__": "empty", "png": b""})
        w.write({"__key__": "explodes", "png": png()})
        w.write({"__key__": "good2", "png": png(), "json": b"{oops"})
    entry = process_shard(FakeProber(), ShardSpec(str(shard), "s"), tmp_path / "out")
    assert entry["status"] == "done" and entry["error"] is None
    assert (entry["images_ok"], entry["images_error"]) == (2, 3)
    rows = {r["key"]: r for r in pq.read_table(table_path(tmp_path / "out", "images", "s")).to_pylist()}
    assert "cannot decode" in rows["corrupt"]["error"] and "probe failed: RuntimeError: boom" in rows["explodes"]["error"]
    assert rows["good2"]["status"] == "ok" and "not valid JSON" in rows["good2"]["warning"]


def test_process_shard_missing_writes_nothing_truncated_keeps_prefix(tmp_path):
    out = tmp_path / "out"
    entry = process_shard(FakeProber(), ShardSpec(str(tmp_path / "gone.tar"), "gone"), out)
    assert entry["status"] == "failed" and "cannot open" in entry["error"]
    assert not any(table_path(out, t, "gone").exists() for t in TABLES)
    shard = tmp_path / "t.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(8):
            w.write({"__key__": f"k{i}", "png": png()})
    shard.write_bytes(shard.read_bytes()[:3000])
    entry = process_shard(FakeProber(), ShardSpec(str(shard), "t"), out)
    assert entry["status"] == "done" and "corrupt" in entry["error"] and entry["images_ok"] >= 1
