"""The parts of the lmms-eval integration that need no lmms-eval (they run in the project's own venv):
vrc_llava's model-arg checks and `vrc lmms-task`'s dataset. tests/test_lmms_eval.py runs lmms-eval itself."""
from __future__ import annotations

import importlib.util
import json

import pyarrow.parquet as pq
import pytest
import tiny_models

from vrc_dist.cli import main
from vrc_dist.lmms.args import ModelArgError, check_model_args
from vrc_dist.toy.data import load_toy_samples
from vrc_dist.toy.write_shards import make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    make_shards(out, 1, 6, seed=100, split="eval")
    return str(out)


@pytest.mark.parametrize("args, message", [
    (dict(codebook="toy", keep=0.5, method="nope"), "unknown method 'nope'; expected one of codebook"),
    (dict(codebook="toy", keep=0.0), "keep ratio must be in (0, 1], got 0.0"),
    (dict(codebook="toy", keep=1.5), "keep ratio must be in (0, 1], got 1.5"),
    (dict(codebook="toy", keep="half"), "keep='half' is not a number"),
    (dict(keep=0.5), "method 'codebook' needs codebook="),
    (dict(codebook="toy"), "give exactly one of keep"),
    (dict(codebook="toy", keep=0.5, threshold=0.3), "give exactly one of keep"),
    (dict(keep=0.5, threshold=0.3, method="random"), "give exactly one of keep"),
    (dict(threshold=0.3, method="random"), "threshold= works with the codebook methods"),
    (dict(keep=0.5, method="oracle"), "per-patch ground truth"),
    (dict(codebook="/nonexistent/codebook", keep=0.5), "codebook '/nonexistent/codebook'"),
    (dict(codebook="toy", keep=0.5, batch_size=0), "batch_size must be at least 1"),
    (dict(codebook="toy", keep=0.5, dtype="int8"), "dtype 'int8'"),
    (dict(codebook="toy", keep=0.5, unknown={"kepe": 0.5}), "unknown model args kepe"),
    (dict(codebook="toy", keep=0.5, crops="tiles"), "crops='tiles'; expected one of all, per-crop, base-only"),
    (dict(keep=0.5, method="fastv", crops="base-only"), "fastv prunes inside the LLM"),
])
def test_bad_model_args_are_one_line_errors(args, message):
    with pytest.raises(ModelArgError) as e:
        check_model_args(pretrained="toy", **args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_codebook_of_another_dimension_is_refused(tmp_path):
    ckpt = tiny_models.save("llava", tmp_path / "tiny")  # language embeddings of width 48; the toy codebook's are 128
    with pytest.raises(ModelArgError, match="embedding dim mismatch: codebook .* has dim 128, the model has dim 48"):
        check_model_args(pretrained=str(ckpt), codebook="toy", keep=0.5)


def test_baselines_need_no_codebook_and_good_args_pass():
    a = check_model_args(pretrained="toy", keep="0.111", method="random", batch_size="4")
    assert (a.codebook, a.keep, a.batch_size, a.model_class.__name__) == (None, 0.111, 4, "LlavaForConditionalGeneration")
    a = check_model_args(pretrained="toy", codebook="toy", threshold=0.5)
    assert a.make_method().threshold == 0.5


def test_lmms_task_writes_vrc_evals_questions_in_its_order(shards, tmp_path, capsys):
    assert main(["lmms-task", "--shards", shards, "--out", str(tmp_path / "task")]) == 0
    assert "vrc_toy" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "task" / "vrc_toy.parquet")
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}
    rows = table.to_pylist()
    expected = [(s["key"], qa["question"], qa["answer"], qa["type"]) for s in load_toy_samples([shards])
                for qa in s["meta"]["qa"]]
    assert [(r["key"], r["question"], r["answer"], r["type"]) for r in rows] == expected
    assert rows[0]["image"]["bytes"].startswith(b"\x89PNG")
    yaml_text = (tmp_path / "task" / "vrc_toy.yaml").read_text()
    assert "task: vrc_toy" in yaml_text and str(tmp_path / "task" / "vrc_toy.parquet") in yaml_text
    assert (tmp_path / "task" / "utils.py").is_file()


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is not None, reason="lmms-eval is installed here")
def test_lmms_eval_without_lmms_eval_says_how_to_get_it(capsys):
    assert main(["lmms-eval", "--model", "vrc_llava", "--tasks", "vrc_toy"]) == 2
    err = capsys.readouterr().err
    assert "lmms-eval is not installed" in err and "make lmms-venv" in err
