"""Greedy first answer tokens through the standard transformers path (the plain model, no pruning)."""
from __future__ import annotations

import torch

from vrc_dist.model.chat import chat_prompt


@torch.no_grad()
def first_token_logits(model, processor, images, questions, batch_size: int = 64) -> torch.Tensor:
    """[N, vocab] next-token logits at the end of each (image, question) chat prompt."""
    processor.tokenizer.padding_side = "left"  # the last position must be the prompt's end
    out = []
    for i in range(0, len(images), batch_size):
        texts = [chat_prompt(processor, q) for q in questions[i:i + batch_size]]
        inputs = processor(images=images[i:i + batch_size], text=texts, return_tensors="pt", padding=True)
        out.append(model(**inputs, logits_to_keep=1).logits[:, -1])
    return torch.cat(out)


def first_token_answers(model, processor, images, questions, batch_size: int = 64) -> list[str]:
    """Greedy first answer word per (image, question): the only token the method ever reads."""
    logits = first_token_logits(model, processor, images, questions, batch_size)
    return processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
