"""Held-out accuracy of a LLaVA checkpoint on the toy world, per question type (answers: vrc_dist/eval/answers.py)."""
from __future__ import annotations

from collections import defaultdict

from vrc_dist.eval.answers import first_token_answers
from vrc_dist.toy.world import QUESTION_TYPES


def toy_accuracy(model, processor, samples: list[dict]) -> dict[str, dict]:
    """Accuracy per question type: {type: {"correct", "total", "accuracy"}}."""
    rows = [(s["image"], qa) for s in samples for qa in s["meta"]["qa"]]
    predicted = first_token_answers(model, processor, [r[0] for r in rows], [r[1]["question"] for r in rows])
    counts = defaultdict(lambda: [0, 0])
    for (_, qa), answer in zip(rows, predicted):
        counts[qa["type"]][0] += answer == qa["answer"]
        counts[qa["type"]][1] += 1
    return {
        t: {"correct": c, "total": n, "accuracy": c / n}
        for t in QUESTION_TYPES
        if t in counts
        for c, n in [counts[t]]
    }


def format_accuracy(result: dict[str, dict]) -> str:
    lines = ["| question type | correct | total | accuracy |", "|---|---:|---:|---:|"]
    for t, r in result.items():
        lines.append(f"| {t} | {r['correct']} | {r['total']} | {r['accuracy']:.3f} |")
    return "\n".join(lines)
