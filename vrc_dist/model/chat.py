"""The chat prompt every stage asks the model with: one user turn, the image placeholder, then the text.

The probe, the evaluation harness and the pruner's callers all build it here, so the conversation the model
sees is one literal (LLaVA-1.5's order: image before question, docs/METHOD.md step 1).
"""
from __future__ import annotations


def conversation(text: str) -> list[dict]:
    """One user message: the image, then `text`; for `apply_chat_template(..., add_generation_prompt=True)`."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def chat_prompt(processor, text: str) -> str:
    """The templated prompt string of `conversation(text)` with the generation prompt, as the processor makes it."""
    return processor.apply_chat_template(conversation(text), add_generation_prompt=True)


# The original LLaVA repository's `llava_v1` conversation (llava/conversation.py, SeparatorStyle.TWO, sep " "),
# which the reference scripts wrap the prompt in (`probe.conversation: llava_v1`, docs/METHOD.md).
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def llava_v1_prompt(prompt: str, image: str = "<image>") -> str:
    """The reference scripts' prompt text: `conv_templates["llava_v1"]` with `<image>\n{prompt}` as the user turn."""
    return f"{LLAVA_V1_SYSTEM} USER: {image}\n{prompt} ASSISTANT:"
