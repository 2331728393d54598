"""The committed toy checkpoint: loads like a real one, is deterministic, and answers held-out images."""
import pytest
import torch

from vrc_dist.eval.answers import first_token_answers
from vrc_dist.model.loading import load_checkpoint
from vrc_dist.toy import TOY_MODEL_DIR
from vrc_dist.toy.evaluate import toy_accuracy
from vrc_dist.toy.world import render

EVAL_SEED = 100  # never used to make training data


@pytest.fixture(scope="module")
def toy():
    return load_checkpoint(TOY_MODEL_DIR)


@pytest.fixture(scope="module")
def eval_samples():
    samples = []
    for i in range(150):
        image, meta = render("eval", EVAL_SEED, 0, i)
        samples.append({"key": meta["key"], "image": image, "meta": meta})
    return samples


def _logits(model, processor, image, question):
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True
    )
    with torch.no_grad():
        return model(**processor(images=image, text=text, return_tensors="pt")).logits


def test_reload_from_disk_gives_identical_logits(toy, tmp_path):
    model, processor = toy
    image, meta = render("eval", EVAL_SEED, 1, 0)
    before = _logits(model, processor, image, meta["qa"][0]["question"])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = _logits(*load_checkpoint(tmp_path), image, meta["qa"][0]["question"])
    fresh = _logits(*load_checkpoint(TOY_MODEL_DIR), image, meta["qa"][0]["question"])
    assert torch.equal(before, again) and torch.equal(before, fresh)


def test_generate_answers_one_word_then_stops(toy, eval_samples):
    model, processor = toy
    sample = eval_samples[0]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["meta"]["qa"][0]["question"]}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=sample["image"], text=text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    words = processor.tokenizer.convert_ids_to_tokens(out[0, inputs["input_ids"].shape[1]:].tolist())
    assert words[0] == first_token_answers(model, processor, [sample["image"]], [sample["meta"]["qa"][0]["question"]])[0]
    assert words[1] == processor.tokenizer.eos_token


def test_held_out_accuracy(toy, eval_samples):
    """A regression guard of the committed checkpoint, a few points under what it scores on these 150
    images (single 0.953, shape 0.973, colour 0.987, count 0.873, exist 0.943; its card, on 400: 0.963,
    0.976, 0.982, 0.865, 0.934). Count, the hardest type, is held at the card's bar of 0.85 itself."""
    accuracy = toy_accuracy(*toy, eval_samples)
    assert accuracy["single"]["total"] == 150
    assert accuracy["single"]["accuracy"] >= 0.92, accuracy
    assert accuracy["shape"]["accuracy"] >= 0.93, accuracy
    assert accuracy["colour"]["accuracy"] >= 0.95, accuracy
    assert accuracy["count"]["accuracy"] >= 0.85, accuracy
    assert accuracy["exist"]["accuracy"] >= 0.90, accuracy
