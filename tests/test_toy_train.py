"""The toy trainer's sampling rules (the training run itself is measured by test_toy_model's accuracy)."""
import numpy as np

from vrc_dist.toy.data import EncodedQA
from vrc_dist.toy.train import _answerable_tokens, _row_weights
from vrc_dist.toy.world import render


def test_answerable_subsets_keep_every_object_and_the_asked_count():
    rng = np.random.default_rng(0)
    for i in range(30):
        owner = np.asarray(render("train", 3, 0, i)[1]["mask"]).reshape(-1)
        objects = set(np.unique(owner)) - {0}
        for keep in (1, 2, 5, 64):
            kept = _answerable_tokens(rng, keep, owner)
            assert objects <= set(owner[kept].tolist())
            assert len(kept) == max(keep, len(objects)) and len(set(kept.tolist())) == len(kept)
            assert np.all(np.diff(kept) > 0)


def test_scenes_of_several_objects_are_oversampled():
    items = EncodedQA(qtype=["single", "shape", "count"], owner=[np.array([0, 1, 1]), np.array([0, 1, 2]), np.array([2, 1])])
    assert np.allclose(_row_weights(items, 6.0), np.array([1, 6, 6]) / 13)
