"""Shard listing and per-sample error capture on real tar files written here."""
import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from vrc_dist.data.shards import ShardOpenError, ShardReadError, expand_shards, iter_samples, shard_name


def png(color=(200, 10, 10), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path, n, start=0):
    with wds.TarWriter(str(path)) as w:
        for i in range(start, start + n):
            w.write({"__key__": f"img{i:03d}", "png": png(), "json": json.dumps({"i": i}).encode()})
    return path


def raw_tar(path, members):
    """A tar with exactly these (name, bytes) members, in order: names TarWriter would refuse."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_expand_braces_globs_and_literals(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"train-{i:03d}.tar", 1)
    braces = expand_shards(str(tmp_path / "train-{000..002}.tar"))
    assert [s.name for s in braces] == ["train-000", "train-001", "train-002"]
    assert [s.url for s in expand_shards(str(tmp_path / "train-*.tar"))] == [s.url for s in braces]
    # duplicates dropped, order kept; a literal missing path is kept (it becomes a failed shard)
    specs = expand_shards([str(tmp_path / "train-001.tar"), str(tmp_path / "*.tar"), str(tmp_path / "gone.tar")])
    assert [s.name for s in specs] == ["train-001", "train-000", "train-002", "gone"]


def test_every_form_names_the_same_shards(tmp_path):
    """The forms every command's --shards accepts (one function, vrc_dist.data.expand_shards)."""
    d = tmp_path / "dir"
    d.mkdir()
    for i in range(3):
        write_shard(d / f"train-{i:03d}.tar", 1)
    (d / "notes.txt").write_text("not a shard")
    want = [str(d / f"train-{i:03d}.tar") for i in range(3)]
    forms = [str(d), f"file://{d}/*.tar", str(d / "*.tar"), str(d / "train-{000..002}.tar"), d,
             "::".join(want), [str(d / "train-000.tar"), str(d / "train-00[12].tar")]]
    for form in forms:
        assert [s.url for s in expand_shards(form)] == want, form
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty' holds no \\*.tar files"):
        expand_shards(str(tmp_path / "empty"))


def test_glob_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="matched no files"):
        expand_shards(str(tmp_path / "nope-*.tar"))
    with pytest.raises(ValueError, match="no shards"):
        expand_shards([])


def test_same_stem_in_two_directories_gets_distinct_stable_names(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        write_shard(tmp_path / d / "000.tar", 1)
    names = [s.name for s in expand_shards(str(tmp_path / "*/000.tar"))]
    assert len(set(names)) == 2 and all(n.startswith("000-") for n in names)
    assert names == [s.name for s in expand_shards(str(tmp_path / "*/000.tar"))]


def test_shard_names_are_safe_file_stems():
    assert shard_name("s3://bucket/x/train-0001.tar.gz") == "train-0001"
    assert shard_name("/data/we ird:name.tar") == "we_ird_name"
    assert shard_name("/data/..tar") == "shard"
    assert "/" not in shard_name("pipe:curl -s http://h/a/../b.tar")


def test_good_shard_streams_samples_in_order_with_sidecars(tmp_path):
    samples = list(iter_samples(str(write_shard(tmp_path / "s.tar", 3))))
    assert [s.key for s in samples] == ["img000", "img001", "img002"]
    assert all(s.error is None and s.image.startswith(b"\x89PNG") for s in samples)
    assert samples[2].meta == {"i": 2} and samples[2].image_member == "img002.png"


def test_missing_shard_is_an_open_error(tmp_path):
    with pytest.raises(ShardOpenError, match="gone.tar"):
        list(iter_samples(str(tmp_path / "gone.tar")))


@pytest.mark.parametrize("content", [b"", None])
def test_empty_shard_is_a_read_error(tmp_path, content):
    path = tmp_path / "empty.tar"
    if content is None:
        tarfile.open(path, "w").close()  # a valid tar with no members
    else:
        path.write_bytes(content)
    with pytest.raises(ShardReadError, match="empty"):
        list(iter_samples(str(path)))


def test_truncated_tar_keeps_the_samples_before_the_break(tmp_path):
    path = write_shard(tmp_path / "t.tar", 6)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(ShardReadError, match="corrupt"):
        for s in iter_samples(str(path)):
            got.append(s)
    assert len(got) >= 2 and all(s.error is None for s in got[:-1])
    last = got[-1]  # the sample being read when the data ended: kept only if its image is whole
    assert "broke off" in (last.error or last.warnings[0])


def test_garbage_is_a_read_error(tmp_path):
    path = tmp_path / "g.tar"
    path.write_bytes(b"not a tar at all " * 100)
    with pytest.raises(ShardReadError):
        list(iter_samples(str(path)))


def test_bad_samples_are_recorded_not_raised(tmp_path):
    path = raw_tar(tmp_path / "bad.tar", [
        ("ok.png", png()),
        ("../escape.png", png()),  # path traversal: refused
        ("/abs.png", png()),
        ("nojson.png", png()), ("nojson.json", b"{not json"),  # image kept, sidecar ignored with a warning
        ("onlytext.txt", b"hello"),  # no image member
        ("dup.png", png()), ("dup.png", png()),  # same member twice
        ("again.png", png()), ("sep.png", png()), ("again.json", b"{}"),  # key again, not adjacent
        ("corrupt.png", b"\x89PNG garbage"),  # decodes later, in the worker: not the reader's business
        ("README", b"no extension: skipped as webdataset does"),
    ])
    samples = {s.key: s for s in iter_samples(str(path))}
    assert samples["ok"].error is None
    assert "traversal" in samples["../escape"].error
    assert "absolute" in samples["/abs"].error
    assert samples["nojson"].error is None and samples["nojson"].meta is None
    assert "not valid JSON" in samples["nojson"].warnings[0]
    assert "no image member" in samples["onlytext"].error
    assert "duplicate member" in samples["dup"].error
    assert "duplicate key" in samples["again"].error and samples["sep"].error is None
    assert samples["corrupt"].error is None and samples["corrupt"].image == b"\x89PNG garbage"
    assert "README" not in samples


def test_oversized_member_is_refused_without_reading_it(tmp_path):
    path = raw_tar(tmp_path / "big.tar", [("big.png", b"\0" * 5000), ("small.png", png())])
    samples = list(iter_samples(str(path), max_member_bytes=4096))
    assert "5000 bytes" in samples[0].error and samples[1].error is None


def test_gzipped_shard_and_file_url(tmp_path):
    src = write_shard(tmp_path / "s.tar", 2).read_bytes()
    import gzip

    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(src))
    assert len(list(iter_samples(f"file://{tmp_path}/s.tar.gz"))) == 2
    assert expand_shards(f"file://{tmp_path}/s.tar.gz")[0].name == "s"
