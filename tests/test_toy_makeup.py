"""The ground-truth make-up of a codebook's prototypes, from their provenance keys alone."""
import numpy as np

from vrc_dist.cli import main
from vrc_dist.toy.makeup import prototype_makeup
from vrc_dist.toy.world import patch_kinds, render


def test_shares_count_each_prototype_by_the_kind_of_its_patch():
    metas = [render("train", 4, 0, i)[1] for i in range(3)]
    kinds = [patch_kinds(m) for m in metas]
    picks = [(m["key"], int(t)) for m, k in zip(metas, kinds) for t in np.flatnonzero(k == "object")[:2]]
    picks += [(metas[0]["key"], int(np.flatnonzero(kinds[0] == "background")[0]))]
    makeup = prototype_makeup([{"key": key, "token_index": t} for key, t in picks])
    assert makeup["prototypes"] == {"object": 6 / 7, "background": 1 / 7, "distractor": 0.0}
    every = np.concatenate(kinds)
    assert makeup["base rate"] == {k: float(np.mean(every == k)) for k in ("object", "background", "distractor")}


def test_a_codebook_not_built_on_the_toy_world_is_a_clear_error(tmp_path, capsys):
    import pyarrow as pa

    from vrc_dist.codebook import Codebook

    cb = Codebook.create(tmp_path / "cb", "other", "some-model", 4)
    prov = pa.table({"key": ["COCO_000001"], "shard": ["s0"], "token_index": pa.array([3], pa.int32()),
                     "cluster": pa.array([0], pa.int32()), "support": pa.array([1], pa.int32()),
                     "cluster_size": pa.array([1], pa.int32())})
    cb.commit(np.ones((1, 4), np.float32), prov, {})
    assert main(["toy", "makeup", "--codebook", str(tmp_path / "cb")]) == 2
    assert "'COCO_000001' is not a key of toy world v2" in capsys.readouterr().err
