"""What a non-editable install ships: the toy checkpoint, the toy codebook and the configs are package data,
and `--model toy --codebook toy` works from any directory, with no checkout beside it."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, unpacked as a site directory of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp.glob("vrc_dist-*.whl")
    site = tmp / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def run_installed(site: Path, cwd: Path, code: str) -> subprocess.CompletedProcess:
    # -I would drop PYTHONPATH too; instead the site comes first, ahead of the venv's editable finder.
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_wheel_ships_the_toy_world_and_runs_eval_outside_the_checkout(installed, tmp_path):
    shipped = {p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.is_file()}
    assert "vrc_dist/toy/checkpoint/model.safetensors" in shipped
    assert "vrc_dist/configs/toy.yaml" in shipped
    assert any(p.startswith("vrc_dist/toy/codebook/v0001/") for p in shipped)
    assert "vrc_dist/toy/codebook/manifest.json" in shipped

    work = tmp_path / "elsewhere"
    work.mkdir()
    code = f"""
import sys, vrc_dist
assert vrc_dist.__file__.startswith({str(installed)!r}), vrc_dist.__file__
from vrc_dist.cli import main
assert main(["toy", "make-shards", "--out", "shards", "--shards", "1", "--per-shard", "6", "--seed", "100",
             "--split", "eval"]) == 0
sys.exit(main(["eval", "--model", "toy", "--codebook", "toy", "--shards", "shards", "--keep", "1.0,0.111",
               "--methods", "codebook", "--repeats", "1", "--out", "eval"]))
"""
    done = run_installed(installed, work, code)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (work / "eval" / "results.md").read_text()
    assert "| codebook | 0.111 |" in table


def test_wheel_ships_the_reference_preset_and_resolves_it_outside_the_checkout(installed, tmp_path):
    assert (installed / "vrc_dist" / "configs" / "reference-llava15.yaml").is_file()
    code = f"""
from vrc_dist.config import BuildConfig, load, preset_path
path = preset_path("reference-llava15")
assert str(path).startswith({str(installed)!r}), path
cfg = load(BuildConfig, path)
assert cfg.probe.conversation == "llava_v1" and cfg.probe.skip_leading_a and cfg.cluster.min_images == 64
"""
    done = run_installed(installed, tmp_path, code)
    assert done.returncode == 0, done.stderr[-3000:]
