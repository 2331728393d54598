"""Held-out accuracy of a LLaVA checkpoint on the toy world, through the standard transformers path."""
from __future__ import annotations

from collections import defaultdict

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vrc_dist.model import resolve_checkpoint
from vrc_dist.toy.world import QUESTION_TYPES


def load_checkpoint(path):
    """"toy" or a checkpoint directory, through the same `from_pretrained` calls a user makes."""
    path = resolve_checkpoint(str(path))
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, processor


@torch.no_grad()
def first_token_answers(model, processor, images, questions, batch_size: int = 64) -> list[str]:
    """Greedy first answer word per (image, question): the only token the method ever reads."""
    processor.tokenizer.padding_side = "left"  # the last position must be the prompt's end
    answers = []
    for i in range(0, len(images), batch_size):
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True,
            )
            for q in questions[i:i + batch_size]
        ]
        inputs = processor(images=images[i:i + batch_size], text=texts, return_tensors="pt", padding=True)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        answers += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return answers


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
