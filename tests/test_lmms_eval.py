"""vrc_llava through lmms-eval itself, offline, on the toy task written by `vrc lmms-task`.

Runs where lmms-eval is installed: `make test` runs this file a second time in .venv-lmms (`make lmms-venv`),
with VRC_REQUIRE_LMMS=1 so that a missing lmms-eval fails there instead of skipping. In the project's own venv
it is skipped (lmms-eval is not installed there on purpose: see the Makefile and requirements-lmms.lock).

The numbers must be `vrc eval`'s: the same questions in the same order, the same first-word scoring, the
same seeds (the random baseline draws per image in request order, so batching changes nothing).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("VRC_REQUIRE_LMMS"):
    import lmms_eval  # noqa: F401  (the lmms venv: a missing lmms-eval is a failure)
else:
    pytest.importorskip("lmms_eval", reason="lmms-eval lives in .venv-lmms; `make test` runs this file there")

from vrc_dist.codebook import Codebook
from vrc_dist.eval import evaluate, records_from_samples
from vrc_dist.lmms.launch import register_model
from vrc_dist.lmms.task import write_task
from vrc_dist.model import load_checkpoint
from vrc_dist.toy.data import load_toy_samples
from vrc_dist.toy.world import QUESTION_TYPES
from vrc_dist.toy.write_shards import make_shards

pytestmark = pytest.mark.timeout(900)

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
VRC = str(Path(sys.executable).parent / "vrc")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy eval shards (the issue's: seed 100, 40 images, 293 questions in world v2), their task, and a private HF cache."""
    tmp = tmp_path_factory.mktemp("lmms")
    make_shards(tmp / "eval", 1, 40, seed=100, split="eval")
    write_task([str(tmp / "eval")], tmp / "task")
    env = {**OFFLINE, "HF_HOME": str(tmp / "hf")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"shards": str(tmp / "eval"), "task": str(tmp / "task"), "tmp": tmp, "env": env}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def vrc_eval_rows(world):
    """`vrc eval --methods codebook,random --keep 1.0,0.111` with its defaults (seed 0, batch 64), in-process."""
    model, processor = load_checkpoint("toy")
    rows = evaluate(model, processor, records_from_samples(load_toy_samples([world["shards"]])), ["codebook", "random"], [1.0, 0.111],
                    codebook=Codebook.open("toy", expected_dim=model.config.text_config.hidden_size), repeats=1)
    return {(r["method"], r["keep"]): r for r in rows}


@pytest.fixture(scope="module")
def lmms_run(world):
    """simple_evaluate on vrc_toy, memoised per model args: (results, samples in doc order)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    register_model()
    manager = TaskManager("WARNING", include_path=world["task"], include_defaults=False)
    cache = {}

    def run(model_args: str, batch_size: int = 1):
        key = (model_args, batch_size)
        if key not in cache:
            out = simple_evaluate(model="vrc_llava", model_args=model_args, tasks=["vrc_toy"], batch_size=batch_size,
                                  task_manager=manager, log_samples=True, bootstrap_iters=0, verbosity="WARNING")
            samples = sorted(out["samples"]["vrc_toy"], key=lambda s: s["doc_id"])
            cache[key] = (out["results"]["vrc_toy"], samples)
        return cache[key]

    return run


@pytest.mark.parametrize("method", ["codebook", "random"])
@pytest.mark.parametrize("keep", [1.0, 0.111])
def test_lmms_eval_accuracy_equals_vrc_eval(lmms_run, vrc_eval_rows, method, keep):
    results, samples = lmms_run(f"pretrained=toy,codebook=toy,keep={keep},method={method}")
    row = vrc_eval_rows[(method, keep)]
    assert len(samples) == row["questions"] == 293
    assert results["exact_match,none"] == pytest.approx(row["accuracy"], abs=1e-12)
    for qtype in QUESTION_TYPES:
        assert results[f"acc_{qtype},none"] == pytest.approx(row[f"acc_{qtype}"], abs=1e-12), qtype
    # What pruning did, per request, is in lmms-eval's own sample log.
    kept = {s["token_counts"][0]["visual_tokens_kept"] for s in samples}
    assert kept == {round(row["kept_tokens"])} and {s["token_counts"][0]["visual_tokens_total"] for s in samples} == {144}
    assert all(s["token_counts"][0]["prefill_ms"] > 0 for s in samples)


@pytest.mark.parametrize("method", ["codebook", "random"])
def test_batch_of_four_answers_as_batch_of_one(lmms_run, method):
    args = f"pretrained=toy,codebook=toy,keep=0.111,method={method}"
    _, one = lmms_run(args, batch_size=1)
    _, four = lmms_run(args, batch_size=4)
    assert [s["filtered_resps"] for s in four] == [s["filtered_resps"] for s in one]
    assert [s["token_counts"][0]["visual_tokens_kept"] for s in four] == \
           [s["token_counts"][0]["visual_tokens_kept"] for s in one]


def test_launcher_runs_lmms_eval_cli_offline_and_logs_pruning(world, tmp_path):
    """The issue's command, as a user types it; its results JSON and sample log carry the pruning numbers."""
    out = tmp_path / "out"
    cmd = [VRC, "lmms-eval", "--model", "vrc_llava", "--model_args", "pretrained=toy,codebook=toy,keep=0.111",
           "--tasks", "vrc_toy", "--include_path", world["task"], "--output_path", str(out), "--log_samples",
           "--batch_size", "4", "--limit", "40"]
    proc = subprocess.run(cmd, env={**os.environ, **world["env"]}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["vrc_toy"]["exact_match,none"] > 0.45  # 16 of 144 tokens; chance is ~0.2
    assert results["throughput"]["avg_visual_tokens_kept"] == 16 and results["throughput"]["avg_prefill_ms"] > 0
    (samples_file,) = out.rglob("*_samples_vrc_toy.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 40
    assert all(s["token_counts"][0]["visual_tokens_kept"] == 16 for s in samples)


@pytest.mark.parametrize("model_args, message", [
    ("pretrained=toy,codebook=toy,keep=0.5,method=nope", "unknown method 'nope'"),
    ("pretrained=toy,codebook=toy,keep=1.5", "keep ratio must be in (0, 1], got 1.5"),
    ("pretrained=toy,keep=0.5", "method 'codebook' needs codebook="),
    ("pretrained=TINY,codebook=toy,keep=0.5", "embedding dim mismatch"),
])
def test_bad_model_arg_fails_before_any_data_is_read(world, tmp_path, capsys, model_args, message):
    """The task's data file does not exist: an error about the model arg, not the data, shows it was checked first.
    In-process (`vrc` main, as the command runs it): the launcher's subprocess run is tested above."""
    import tiny_models

    from vrc_dist.cli import main

    task = tmp_path / "task"
    task.mkdir()
    for name in ("vrc_toy.yaml", "utils.py"):
        text = (Path(world["task"]) / name).read_text()
        (task / name).write_text(text.replace(str(Path(world["task"]) / "vrc_toy.parquet"), str(tmp_path / "missing.parquet")))
    if "TINY" in model_args:
        model_args = model_args.replace("TINY", str(tiny_models.save("llava", tmp_path / "tiny")))
    capsys.readouterr()
    rc = main(["lmms-eval", "--model", "vrc_llava", "--model_args", model_args, "--tasks", "vrc_toy",
               "--include_path", str(task)])
    captured = capsys.readouterr()
    assert rc == 2, captured.err[-2000:]
    assert message in captured.err and "missing.parquet" not in captured.out + captured.err
    assert captured.err.count("\n") == 1  # one line


def test_a_failed_evaluation_is_a_failed_command(world, tmp_path):
    """lmms-eval logs a failed evaluation and exits 0; the launcher does not."""
    proc = subprocess.run([VRC, "lmms-eval", "--model", "vrc_llava", "--model_args",
                           "pretrained=toy,codebook=toy,keep=0.5", "--tasks", "vrc_toy_nonexistent",
                           "--include_path", world["task"]], env={**os.environ, **world["env"]},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0


MC_UTILS = '''

import pyarrow.parquet as _pq

CHOICES = sorted(set(_pq.read_table({data!r}, columns=["answer"]).column("answer").to_pylist()))


def doc_to_choice(doc):
    return CHOICES


def doc_to_target_index(doc):
    return CHOICES.index(doc["answer"])
'''


def test_loglikelihood_requests_multiple_choice(world, lmms_run, tmp_path):
    """A multiple_choice task (every toy answer word a choice) is scored by vrc_llava's loglikelihood. Each choice
    is one token, so the lowest-loss choice is the truth wherever greedy generation's first word was."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    data = str(Path(world["task"]) / "vrc_toy.parquet")
    task = tmp_path / "mc"
    task.mkdir()
    (task / "utils.py").write_text((Path(world["task"]) / "utils.py").read_text() + MC_UTILS.format(data=data))
    (task / "mc.yaml").write_text(
        f"task: vrc_toy_mc\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(data)}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\ndoc_to_choice: !function utils.doc_to_choice\n"
        "doc_to_target: !function utils.doc_to_target_index\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    args = "pretrained=toy,codebook=toy,keep=0.111"
    out = simple_evaluate(model="vrc_llava", model_args=args, tasks=["vrc_toy_mc"], limit=40, log_samples=True,
                          task_manager=TaskManager("WARNING", include_path=str(task), include_defaults=False),
                          bootstrap_iters=0, verbosity="WARNING")
    mc = {s["doc_id"]: s for s in out["samples"]["vrc_toy_mc"]}
    _, generated = lmms_run(args)
    assert len(mc) == 40
    for s in generated[:40]:
        if s["exact_match"]:
            assert mc[s["doc_id"]]["acc"] == 1.0, s["doc_id"]
    assert all(m["token_counts"][0]["visual_tokens_kept"] == 16 for m in mc.values())
