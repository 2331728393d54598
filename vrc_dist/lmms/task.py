"""`vrc lmms-task`: toy eval shards as an lmms-eval task, `vrc_toy`, that runs offline.

TASKDIR gets
- vrc_toy.parquet: one row per (image, question), in `vrc eval`'s order (shard order, then the sample's
  questions): id, key, image (PNG, the Hugging Face `Image` feature, so `datasets` decodes it), question,
  answer, type;
- utils.py: doc_to_visual / doc_to_text / process_results (vrc_dist/lmms/task_utils.py);
- vrc_toy.yaml: greedy generation of a few tokens, exact match of the first word, overall and per question type.
The Parquet file is written with pyarrow alone, so this command needs neither lmms-eval nor `datasets`.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

TASK = "vrc_toy"
# Every toy answer is one word, one token; a few more tokens show what the model says after it.
MAX_NEW_TOKENS = 4


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def task_yaml(data_file: Path, qtypes: list[str]) -> str:
    metrics = ["exact_match", *(f"acc_{t}" for t in qtypes)]
    metric_list = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    return (
        f"# Written by `vrc lmms-task`: toy eval questions, scored like `vrc eval` (first word == answer).\n"
        f"task: {TASK}\n"
        f"dataset_path: parquet\n"
        f"dataset_kwargs:\n"
        f"  data_files:\n"
        f"    test: {json.dumps(str(data_file))}\n"
        f"test_split: test\n"
        f"output_type: generate_until\n"
        f"doc_to_visual: !function utils.doc_to_visual\n"
        f"doc_to_text: !function utils.doc_to_text\n"
        f"doc_to_target: answer\n"
        f"generation_kwargs:\n"
        f"  max_new_tokens: {MAX_NEW_TOKENS}\n"
        f"  temperature: 0\n"
        f"  do_sample: false\n"
        f"process_results: !function utils.process_results\n"
        f"metric_list:\n{metric_list}"
        f"metadata:\n"
        f"  version: 1.0\n"
    )


def write_task(shards, out) -> dict:
    """Write the task for toy samples from `shards` (any --shards form) into directory `out`."""
    from vrc_dist.toy.data import load_toy_samples
    from vrc_dist.toy.world import QUESTION_TYPES

    samples = load_toy_samples(shards)
    if not samples:
        raise ValueError(f"no toy samples in {' '.join(map(str, shards))}")
    rows = {"id": [], "key": [], "image": [], "question": [], "answer": [], "type": []}
    for s in samples:
        png = _png(s["image"])
        for i, qa in enumerate(s["meta"]["qa"]):
            rows["id"].append(f"{s['key']}/{i}")
            rows["key"].append(s["key"])
            rows["image"].append({"bytes": png, "path": None})
            rows["question"].append(qa["question"])
            rows["answer"].append(qa["answer"])
            rows["type"].append(qa["type"])
    features = {name: {"dtype": "string", "_type": "Value"} for name in rows if name != "image"}
    features["image"] = {"_type": "Image"}
    schema = pa.schema([
        ("id", pa.string()), ("key", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("question", pa.string()), ("answer", pa.string()), ("type", pa.string()),
    ], metadata={"huggingface": json.dumps({"info": {"features": {n: features[n] for n in rows}}})})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_file = (out / f"{TASK}.parquet").resolve()
    pq.write_table(pa.Table.from_pydict(rows, schema=schema), data_file)
    shutil.copyfile(Path(__file__).with_name("task_utils.py"), out / "utils.py")
    qtypes = [t for t in QUESTION_TYPES if t in set(rows["type"])]
    (out / f"{TASK}.yaml").write_text(task_yaml(data_file, qtypes))
    return {"images": len(samples), "questions": len(rows["id"]), "types": qtypes, "dir": str(out)}
