"""Soak: the Ray build over many toy images with 2 actors; memory must not grow per shard, throughput must hold.

The full run for the README's figures is `tests/reliability/soak.py --images 5000` (about an hour of this
2-core machine's CPU); this test runs the same code over VRC_SOAK_IMAGES images (default 1000) so that
`make test-all` stays affordable. Model: the toy checkpoint when it is there, else a tiny random LLaVA.
"""
from __future__ import annotations

import os

import pytest
from rel_helpers import doctor_errors

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(7200)]


def test_soak_memory_flat_throughput_holds_every_image_once(tmp_path):
    from soak import soak

    from vrc_dist.build.read import read_table
    from vrc_dist.toy import TOY_MODEL_DIR

    images = int(os.environ.get("VRC_SOAK_IMAGES", "1000"))
    if (os.path.isdir(TOY_MODEL_DIR) and os.listdir(TOY_MODEL_DIR)):
        model = "toy"
    else:
        from tiny_models import save

        model = str(save("llava", tmp_path / "model"))
    result = soak(images, per_shard=50, model=model, work=tmp_path, interval=5)
    assert result["status"] == "SUCCEEDED", result["log_tail"]
    s = result["summary"]
    got = read_table(result["out"], "images")
    pairs = list(zip(got["shard"].to_pylist(), got["key"].to_pylist()))
    assert len(pairs) == len(set(pairs)) == images, "images lost or duplicated"
    assert doctor_errors(result["out"]) == []
    for pid, start in s["rss_mb_start"].items():
        end = s["rss_mb_end"].get(pid)
        if end is not None:  # same actor process from the first sample to the last: no growth per shard
            assert end <= start * 1.25 + 100, f"actor {pid} RSS grew from {start:.0f} to {end:.0f} MB"
    assert s["images_per_s_end"] >= 0.5 * s["images_per_s_start"], s
