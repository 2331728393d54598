"""Functions of the `vrc_toy` lmms-eval task; `vrc lmms-task` copies this file next to the task YAML as utils.py.

Scoring is `vrc eval`'s: a question is right when the first word of the answer equals the single-word truth
(the toy tokenizer lowercases, so both sides are compared lowercased). Besides `exact_match` over all
questions, each question type has its own metric, `acc_<type>`, averaged over that type's questions only.
Self-contained on purpose: lmms-eval imports it from the task directory, not from vrc_dist.
"""
import io

from PIL import Image


def doc_to_visual(doc):
    image = doc["image"]
    if isinstance(image, dict):  # a Parquet struct that `datasets` did not decode
        image = Image.open(io.BytesIO(image["bytes"]))
    return [image.convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].lower() if words else ""


def process_results(doc, results):
    ok = float(first_word(results[0]) == doc["answer"].lower())
    return {"exact_match": ok, f"acc_{doc['type']}": ok}
