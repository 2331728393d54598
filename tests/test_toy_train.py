"""The toy trainer's sampling rules and its --shards (the training run itself is measured by test_toy_model's
accuracy)."""
import json

import numpy as np

from vrc_dist.cli import main
from vrc_dist.toy.data import EncodedQA, encode_samples
from vrc_dist.toy.model import build_model
from vrc_dist.toy.train import (
    TrainConfig,
    _answerable_tokens,
    _batch_rows,
    _keep_count,
    _row_weights,
    _turns,
    far_negatives,
)
from vrc_dist.toy.world import render
from vrc_dist.toy.write_shards import make_shards


def test_answerable_subsets_keep_every_object_and_the_asked_count():
    rng = np.random.default_rng(0)
    for i in range(30):
        owner = np.asarray(render("train", 3, 0, i)[1]["mask"]).reshape(-1)
        objects = set(np.unique(owner)) - {0}
        for keep in (1, 2, 5, 64):
            kept = _answerable_tokens(rng, keep, owner)
            assert objects <= set(owner[kept].tolist())
            assert len(kept) == max(keep, len(objects)) and len(set(kept.tolist())) == len(kept)
            assert np.all(np.diff(kept) > 0)


def test_count_batches_ask_count_alone_on_full_grids():
    owner = [np.asarray(render("train", 6, 0, i)[1]["mask"]).reshape(-1) for i in range(8)]
    qtype = ["single", "count", "exist", "shape"] * 8
    items = EncodedQA(qtype=qtype, image=np.repeat(np.arange(8), 4), owner=[owner[i // 4] for i in range(32)],
                      target=[0] * 32)
    row_p, count_rows = _row_weights(items, 2.0), np.flatnonzero(np.asarray(qtype) == "count")
    counted = TrainConfig(count_batch_prob=1.0, batch_size=16)
    for seed in range(5):
        pick, kept, several = _batch_rows(np.random.default_rng(seed), counted, items, row_p, count_rows, 144)
        assert {qtype[i] for i in pick} == {"count"} and not several
        assert all(np.array_equal(k, np.arange(144)) for k in kept)
    # Off (the default), the batch is exactly the one drawn before count batches existed.
    mixed = TrainConfig(batch_size=16, focus_prob=0.0, full_image_prob=0.0)
    pick, kept, several = _batch_rows(np.random.default_rng(1), mixed, items, row_p, count_rows, 144)
    rng = np.random.default_rng(1)
    assert np.array_equal(pick, rng.choice(32, size=16, p=row_p)) and several
    rng.random()  # the focus draw
    keep = _keep_count(rng, 144, 0.0)
    assert [len(k) for k in kept] == [len(_answerable_tokens(rng, keep, items.owner[i])) for i in pick]


def test_scenes_of_several_objects_are_oversampled():
    items = EncodedQA(qtype=["single", "shape", "count"], owner=[np.array([0, 1, 1]), np.array([0, 1, 2]), np.array([2, 1])])
    assert np.allclose(_row_weights(items, 6.0), np.array([1, 6, 6]) / 13)


def test_exist_once_leaves_one_existence_question_per_sequence():
    qtype = ["single", "exist", "count", "exist", "colour"]
    items = EncodedQA(qtype=qtype, image=np.zeros(5, int), suffix=[(i,) for i in range(5)], answer=list(range(5)))
    rows_of_image = [np.arange(5)]
    for row in range(5):
        for seed in range(4):
            rng = np.random.default_rng(seed)
            both = [a for _, a in _turns(rng, items, rows_of_image, row, True)]
            assert sorted(both) == list(range(5)) and both[0] == row  # the old rule: every question, asked first
            once = [a for _, a in _turns(np.random.default_rng(seed), items, rows_of_image, row, True, True)]
            assert once[0] == row and sum(qtype[a] == "exist" for a in once) == 1
            assert {a for a in once if qtype[a] != "exist"} == {0, 2, 4}


def test_far_negatives_name_neither_a_present_colour_nor_a_present_shape():
    _, processor = build_model()
    samples = [{"image": np.asarray(img), "meta": meta} for img, meta in (render("train", 5, 0, i) for i in range(40))]
    _, items = encode_samples(samples, processor)
    far = far_negatives(np.random.default_rng(0), samples, items, processor)
    tokens = processor.tokenizer.convert_ids_to_tokens
    no_rows = [r for r in range(len(items.qtype)) if items.qtype[r] == "exist" and items.target[r] == 0]
    assert set(far) <= set(no_rows) and len(far) >= 30  # most scenes leave such a kind
    for row, suffix in far.items():
        words = set(tokens(list(suffix)))
        objects = samples[items.image[row]]["meta"]["objects"]
        assert not words & ({o["colour"] for o in objects} | {o["shape"] for o in objects})
        assert suffix != items.suffix[row] and len(suffix) == len(items.suffix[row])  # same template
    row = next(iter(far))
    rows_of_image = [np.flatnonzero(items.image == i) for i in range(len(samples))]
    asked = _turns(np.random.default_rng(1), items, rows_of_image, row, False, True, far)
    assert asked == [(far[row], items.answer[row])]  # still answered "no"


def test_toy_train_and_eval_read_shards_in_every_form(tmp_path, capsys):
    make_shards(tmp_path / "sh", 2, 3, seed=9)
    make_shards(tmp_path / "more", 1, 2, seed=10)
    out = tmp_path / "model"
    assert main(["toy", "train", "--shards", str(tmp_path / "sh" / "*.tar"), "--shards", str(tmp_path / "more"),
                 "--out", str(out), "--set", "steps=1", "--set", "vision_steps=1", "--set", "batch_size=4"]) == 0
    training = json.loads((out / "training.json").read_text())
    assert training["train_images"] == 8
    assert training["vision_steps"] == 1 and "vision_seconds" in training  # the card's time includes stage 1
    capsys.readouterr()
    assert main(["toy", "eval", "--model", str(out), "--shards", str(tmp_path / "sh" / "train-0000{0..1}.tar"),
                 "--write-card"]) == 0
    assert "on 6 images from" in capsys.readouterr().out
    seconds = round(training["seconds"] + training["vision_seconds"])
    card = (out / "README.md").read_text()
    assert f"1 vision steps and 1 QA steps in {seconds} s" in card
    sh = f"--shards {tmp_path / 'sh' / '*.tar'} --shards {tmp_path / 'more'}"
    assert f"`vrc toy train {sh} --out {out} --set vision_steps=1 --set steps=1 --set batch_size=4`" in card
    assert main(["toy", "eval", "--model", str(out), "--shards", str(tmp_path / "gone.tar")]) == 2
    err = capsys.readouterr().err
    assert "cannot open shard" in err and "gone.tar" in err


def test_multi_turn_training_text_is_the_chat_template_of_the_conversation():
    from vrc_dist.toy.data import prompt_ids
    from vrc_dist.toy.model import build_model
    from vrc_dist.toy.train import chat_text

    _, processor = build_model()
    tok = processor.tokenizer
    qa = render("train", 3, 0, 1)[1]["qa"][:3]
    prefix, _ = prompt_ids(processor, qa[0]["question"])
    turns = [(tuple(prompt_ids(processor, q["question"])[1]), tok.convert_tokens_to_ids(q["answer"])) for q in qa]
    text, at, labels = chat_text(prefix, turns, tok.eos_token_id)
    messages = []
    for i, q in enumerate(qa):
        content = [{"type": "image"}, {"type": "text", "text": q["question"]}] if i == 0 else q["question"]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": q["answer"]}]
    expected = tok(processor.apply_chat_template(messages))["input_ids"]
    assert prefix + [processor.image_token_id] + text == expected[:-1]  # all but the final </s>, a label only
    full = text + [tok.eos_token_id]
    assert [full[a + 1] for a in at] == labels  # each position predicts the token after it
    assert tok.convert_ids_to_tokens(labels[::2]) == [q["answer"] for q in qa]
