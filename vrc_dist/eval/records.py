"""The question/answer record contract of the evaluation harness.

A QARecord is one question about one image: the pixels, the question, the accepted answers (the first is the
one the first generated token is checked against: answers are single words) and a question type (accuracy is
also reported per type). `truth` is optional per-patch ground truth (mask, coverage) for the oracle baselines.
Toy shards satisfy the contract through `records_from_samples`; real benchmark data is converted to it the
same way, one record per question.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QARecord:
    image: np.ndarray  # HWC uint8 pixels (anything the model's processor takes)
    question: str
    answers: tuple[str, ...]
    type: str
    truth: tuple[np.ndarray, np.ndarray] | None = None  # flat per-patch (mask, coverage), when known

    def __post_init__(self):
        if not self.answers:
            raise ValueError(f"QA record {self.question!r}: no answer")


def records_from_samples(samples: list[dict]) -> list[QARecord]:
    """One record per question of samples {'image', 'meta': {'qa': [{'question', 'answer' or 'answers', 'type'}],
    optional 'mask' and 'coverage'}} (what vrc_dist.toy.data.load_toy_samples reads), in sample order."""
    records = []
    for s in samples:
        meta = s["meta"]
        truth = (np.ravel(meta["mask"]), np.ravel(meta["coverage"])) if "mask" in meta and "coverage" in meta else None
        for qa in meta["qa"]:
            answers = tuple(qa["answers"]) if "answers" in qa else (qa["answer"],)
            records.append(QARecord(s["image"], qa["question"], answers, qa["type"], truth))
    return records
