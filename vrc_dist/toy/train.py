"""Train the tiny LLaVA on toy train shards, on the CPU, in minutes.

Two stages, as LLaVA itself is built on a pretrained vision encoder: first the vision tower learns
to say, for every patch, the shape and colour of the object covering it (the world's per-patch
mask is the label); then the whole model learns to answer questions. Without the first stage a
from-scratch language model sits at the answer prior for thousands of steps before it learns to
read the image, far beyond a CPU budget of minutes.

Large LLaVA models keep most of their answers when most visual tokens are dropped (the premise of
token pruning), and name what a single visual token shows (the paper's Figure 1). A tiny model
trained only on full grids does neither, and learns to read the image very slowly. So some
batches drop a random subset of visual tokens (log-uniform keep counts) that keeps at least one
token of every object, and some ("focus" batches) show only a few tokens of the object the
question is about. Background tokens are never shown alone with a target: how the model treats
them is left to emerge. Questions about scenes of several objects are oversampled, because
binding a question to its object is what a small LM learns last.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vrc_dist.toy import TOY_MODEL_DIR
from vrc_dist.toy.data import encode_samples, load_toy_samples, prompt_ids
from vrc_dist.toy.model import TinyLlavaSpec, build_model
from vrc_dist.toy.world import COLOURS, QUESTION_TEMPLATES, SHAPES


@dataclass
class TrainConfig:
    shards: list[str] = field(default_factory=lambda: ["out/toy/train"])  # --shards forms (SHARDS_HELP)
    out: str = str(TOY_MODEL_DIR)
    vision_steps: int = 3000
    steps: int = 5200
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 150
    full_image_prob: float = 0.3
    focus_prob: float = 0.35  # batches that show only a few tokens, always including the asked-about object
    focus_max_tokens: int = 16
    # Questions about scenes of several objects need binding (find the object the question names, read
    # its other attribute), a size comparison (the single-word prompt) or counting. They are sampled this
    # many times more often: binding emerges late, and only with enough such questions.
    several_weight: float = 2.0
    # Outside focus batches, a sequence asks all of its image's questions in turn: the answers cost
    # ten tokens each, the 144 visual tokens are paid once.
    multi_turn: bool = True
    # The world asks one "yes" and one "no" existence question per image, so in one sequence the second
    # answer is the opposite of the first: a checkpoint trained without this answered the second with
    # the opposite of whatever the first answer was (480 of 480 held-out prompts, a false first answer
    # included) and never learned existence (0.504). With it, a sequence asks at most one.
    exist_once: bool = True
    # A curriculum: during this fraction of the QA stage, a "no" existence question names a kind
    # of which neither the colour nor the shape is in the image. The world's own "no" questions mostly
    # share a colour or a shape with a present object, so nothing the answer position can attend to
    # tells yes from no at first order, and this LM stays at loss ln 2 on existence for thousands of
    # steps. Far "no"s give it a first-order cue (was anything the question names found at all?),
    # which starts existence learning; the world's harder "no"s take over afterwards. Measured against
    # the same run without it: held-out existence 0.911 against 0.661, the other types unchanged (README).
    exist_far_until: float = 0.0
    # Batches of this share ask count questions only, one per sequence, over every visual token (ours).
    # Count is one answer of about six in a multi-turn sequence, and in the mixed QA stage it plateaued
    # at 0.75 held-out; the same LM trained on count alone for 600 steps reached 0.84, so the mixture,
    # not the model, held it. Measured against the same run without it: count 0.865 against 0.767,
    # existence 0.934 against 0.970 (README).
    count_batch_prob: float = 0.0
    seed: int = 3
    max_minutes: float = 23.0
    # A checkpoint to continue from: its vision tower is kept (stage 1 is skipped) and the QA stage
    # starts from its weights (the committed checkpoint's second run; its card gives both commands).
    init: str | None = None
    threads: int = 2
    log_every: int = 100


def patch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Vision-tower patch features at LLaVA's feature layer (-2, CLS dropped), before the projector.

    `pixels` are uint8 [B, 3, H, W]; scaled here as the processor does (mean 0.5, std 0.5)."""
    pixels = pixels.float() / 127.5 - 1.0
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


@torch.no_grad()
def frozen_features(model, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """`patch_features` of many images, in chunks, without gradients: the tower once it is frozen."""
    return torch.cat([patch_features(model, pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)])


def patch_labels(samples: list[dict]) -> torch.Tensor:
    """[N, L, 2] per-patch (shape, colour) class of the covering object; 0 is background."""
    out = []
    for s in samples:
        meta = s["meta"]
        owner = np.asarray(meta["mask"]).reshape(-1)
        shape = np.array([0] + [SHAPES.index(o["shape"]) + 1 for o in meta["objects"]])[owner]
        colour = np.array([0] + [list(COLOURS).index(o["colour"]) + 1 for o in meta["objects"]])[owner]
        out.append(np.stack([shape, colour], -1))
    return torch.as_tensor(np.stack(out))


def pretrain_vision(model, pixels, labels, cfg: "TrainConfig", rng, progress) -> None:
    """Stage 1: per-patch shape and colour classification at LLaVA's feature layer."""
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(SHAPES) + 1 + len(COLOURS) + 1)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Background is most of every grid; without down-weighting it the tower barely learns shapes.
    shape_weight = torch.tensor([0.2] + [1.0] * len(SHAPES))
    colour_weight = torch.tensor([0.2] + [1.0] * len(COLOURS))
    losses = []
    for step in range(cfg.vision_steps):
        _set_lr(opt, cfg, step, step / cfg.vision_steps)
        pick = torch.as_tensor(rng.integers(len(pixels), size=cfg.batch_size))
        out = head(patch_features(model, pixels[pick]))
        target = labels[pick]
        n_shape = len(SHAPES) + 1
        loss = F.cross_entropy(out[..., :n_shape].flatten(0, 1), target[..., 0].flatten(), weight=shape_weight) + F.cross_entropy(
            out[..., n_shape:].flatten(0, 1), target[..., 1].flatten(), weight=colour_weight
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0:
            progress(f"vision step {step + 1}/{cfg.vision_steps} patch loss {np.mean(losses[-cfg.log_every:]):.4f}")


def _set_lr(opt, cfg: "TrainConfig", step: int, done: float) -> float:
    """Linear warm-up, then cosine decay to zero as `done` goes from 0 to 1; returns the rate set."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * done))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def _keep_count(rng: np.random.Generator, n_tokens: int, full_prob: float) -> int:
    if rng.random() < full_prob:
        return n_tokens
    return int(round(math.exp(rng.uniform(0, math.log(n_tokens)))))


def _one_token_each(rng, owner: np.ndarray, objects) -> list[int]:
    """One random token index of each of `objects` (1-based) that covers any patch."""
    return [rng.choice(p) for j in objects if len(p := np.flatnonzero(owner == j))]


def _top_up(rng, chosen: list[int], candidates: np.ndarray, keep: int) -> list[int]:
    """`chosen` plus random `candidates` not in it, up to `keep` tokens."""
    return chosen + list(rng.permutation(np.setdiff1d(candidates, chosen))[: max(keep - len(chosen), 0)])


def _answerable_tokens(rng, keep: int, owner: np.ndarray) -> np.ndarray:
    """`keep` random token indices that include at least one token of every object.

    A subset that drops the object a question names teaches the model to answer from whichever
    object is left, which is the opposite of binding the question to its object."""
    chosen = _one_token_each(rng, owner, range(1, owner.max() + 1))
    return np.sort(np.asarray(_top_up(rng, chosen, np.arange(len(owner)), keep), dtype=int))


def _focus_tokens(rng, keep: int, owner: np.ndarray, target: int) -> np.ndarray:
    """`keep` token indices that always include the object(s) the answer is about, so it stays correct:
    one token of each, then more of theirs, then any others."""
    objects = [target] if target else range(1, owner.max() + 1)
    chosen = _top_up(rng, _one_token_each(rng, owner, objects), np.flatnonzero(np.isin(owner, objects)), keep)
    return np.sort(np.asarray(_top_up(rng, chosen, np.arange(len(owner)), keep), dtype=int))


def _row_weights(items, several_weight: float) -> np.ndarray:
    """Sampling probability of each QA row."""
    weights = np.array([several_weight if owner.max() > 1 else 1.0 for owner in items.owner])
    return weights / weights.sum()


def _batch_rows(rng, cfg: "TrainConfig", items, row_p: np.ndarray, count_rows: np.ndarray, n_tokens: int):
    """One batch's QA rows, the visual tokens each sequence shows, and whether it asks the image's other
    questions after the row's own (multi-turn): a count batch, a focus batch or a mixed one."""
    # Drawn only when enabled, so that runs without count batches replay the earlier recipe exactly.
    counting = cfg.count_batch_prob > 0 and rng.random() < cfg.count_batch_prob
    if counting:
        pick = rng.choice(count_rows, size=cfg.batch_size, p=row_p[count_rows] / row_p[count_rows].sum())
    else:
        pick = rng.choice(len(items.image), size=cfg.batch_size, p=row_p)
    # A focus batch's tokens answer only its own question; every object stays in the others.
    if not counting and rng.random() < cfg.focus_prob:
        keep = int(rng.integers(1, cfg.focus_max_tokens + 1))
        return pick, [_focus_tokens(rng, keep, items.owner[i], items.target[i]) for i in pick], False
    keep = n_tokens if counting else _keep_count(rng, n_tokens, cfg.full_image_prob)
    kept = [_answerable_tokens(rng, keep, items.owner[i]) for i in pick]
    return pick, kept, not counting and cfg.multi_turn


def _batch_loss(model, features, prefix, turns, kept: list[np.ndarray]):
    """Next-token loss on every answer word and the end-of-sequence after it.

    `turns[b]`: the (question ids after the image, answer id) pairs of sequence b, asked one after
    the other as a multi-turn chat about the same image; `kept[b]`: the visual tokens it shows."""
    embed = model.get_input_embeddings()
    tokens = model.model.multi_modal_projector(features)
    eos = model.config.text_config.eos_token_id
    seqs, rows, positions, labels = [], [], [], []
    for b in range(len(turns)):
        idx = torch.as_tensor(kept[b])
        text, at, answers = chat_text(prefix.tolist(), turns[b], eos)
        rows += [b] * len(at)
        positions += [len(prefix) + len(idx) + a for a in at]
        labels += answers
        seqs.append(torch.cat([embed(prefix), tokens[b, idx], embed(torch.tensor(text))]))
    length = max(len(s) for s in seqs)
    pad = embed(torch.tensor([model.config.text_config.pad_token_id]))
    # Right padding: under a causal mask, real positions never see the padding after them.
    batch = torch.stack([torch.cat([s, pad.expand(length - len(s), -1)]) for s in seqs])
    hidden = model.model.language_model(inputs_embeds=batch).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(positions)])
    return F.cross_entropy(logits, torch.tensor(labels))


def chat_text(prefix: list[int], turns, eos: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids after the image for a multi-turn chat, as the model's chat template lays it out, and
    the positions in them (relative to the text's start) that predict each answer and each </s>."""
    text, at, labels = [], [], []
    for k, (suffix, answer) in enumerate(turns):
        text += ([] if k == 0 else prefix[1:]) + list(suffix)  # a later turn: "USER :" without <s>
        at += [len(text) - 1, len(text)]
        labels += [answer, eos]
        text += [answer, eos]
    return text[:-1], at, labels  # the last </s> is only a label


def far_negatives(rng, samples: list[dict], items, processor) -> dict[int, tuple[int, ...]]:
    """Question ids after the image for each "no" existence row whose image leaves a kind with neither
    a present colour nor a present shape (TrainConfig.exist_far_until), drawn at random among them."""
    out = {}
    for row in np.flatnonzero((np.asarray(items.qtype) == "exist") & (np.asarray(items.target) == 0)):
        objects = samples[items.image[row]]["meta"]["objects"]
        far = [(c, s) for c in COLOURS for s in SHAPES
               if all(c != o["colour"] and s != o["shape"] for o in objects)]
        if far:
            colour, shape = far[rng.integers(len(far))]
            out[int(row)] = tuple(prompt_ids(processor, QUESTION_TEMPLATES["exist"].format(colour=colour, shape=shape))[1])
    return out


def _turns(rng, items, rows_of_image, row: int, several: bool, exist_once: bool = False,
           far: dict[int, tuple[int, ...]] | None = None) -> list[tuple[tuple[int, ...], int]]:
    """The row's question first (exactly the single-turn prompt the model is evaluated on), then, if
    `several`, the image's other questions in random order: more answers learned per forward pass.
    `exist_once`: no existence question after the first one (TrainConfig.exist_once says why);
    `far`: "no" existence questions asked as these far ones instead (`far_negatives`)."""
    rows = [row]
    if several:
        others = rows_of_image[items.image[row]]
        rows += rng.permutation(others[others != row]).tolist()
    if exist_once:
        exist = [r for r in rows if items.qtype[r] == "exist"]
        rows = [r for r in rows if items.qtype[r] != "exist" or r == exist[0]]
    far = far or {}
    return [(far.get(r, items.suffix[r]), items.answer[r]) for r in rows]


def _start(cfg: TrainConfig, spec: TinyLlavaSpec, rng, progress):
    """The model after stage 1 (or `cfg.init`'s, whose tower is kept), its processor, samples, encodings
    and stage 1's wall seconds (0 when it is skipped)."""
    if cfg.init:
        from vrc_dist.model import load_checkpoint

        model, processor = load_checkpoint(cfg.init)
    else:
        model, processor = build_model(spec, seed=cfg.seed)
    samples = load_toy_samples(cfg.shards)
    pixels, items = encode_samples(samples, processor)
    start = time.time()
    if not cfg.init:
        pretrain_vision(model, pixels, patch_labels(samples), cfg, rng, progress)
    return model, processor, samples, pixels, items, time.time() - start


def train(cfg: TrainConfig, spec: TinyLlavaSpec = TinyLlavaSpec(), progress=print) -> dict:
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model, processor, samples, pixels, items, vision_seconds = _start(cfg, spec, rng, progress)
    prefix = torch.tensor(items.prefix)
    # Stage 2 keeps the vision tower frozen, as LLaVA does: its features are computed once.
    model.model.vision_tower.requires_grad_(False)
    features = frozen_features(model, pixels)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    start, n_tokens, losses = time.time(), spec.n_tokens, []
    row_p = _row_weights(items, cfg.several_weight)
    rows_of_image = [np.flatnonzero(items.image == i) for i in range(len(samples))]
    far = far_negatives(rng, samples, items, processor) if cfg.exist_far_until > 0 else {}
    count_rows = np.flatnonzero(np.asarray(items.qtype) == "count")
    for step in range(cfg.steps):
        # Cosine decay over whichever budget runs out first, steps or wall time: on a busy machine
        # the run still ends annealed instead of being cut off at a high learning rate.
        done = max(step / cfg.steps, (time.time() - start) / (cfg.max_minutes * 60))
        if done >= 1.0:
            progress(f"budget reached after {step} steps")
            break
        lr = _set_lr(opt, cfg, step, done)
        pick, kept, several = _batch_rows(rng, cfg, items, row_p, count_rows, n_tokens)
        asked = far if done < cfg.exist_far_until else None
        turns = [_turns(rng, items, rows_of_image, i, several, cfg.exist_once, asked) for i in pick]
        loss = _batch_loss(model, features[items.image[pick]], prefix, turns, kept)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0:
            progress(f"qa step {step + 1}/{cfg.steps} loss {np.mean(losses[-cfg.log_every:]):.4f} "
                     f"lr {lr:.2e} {time.time() - start:.0f}s")
    model.eval()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"steps": len(losses), "seconds": round(time.time() - start, 1),
               "vision_steps": 0 if cfg.init else cfg.vision_steps, "vision_seconds": round(vision_seconds, 1),
               "final_loss": float(np.mean(losses[-50:])), "train_images": len(samples),
               "train_config": asdict(cfg), "architecture": asdict(spec)}
    if cfg.init:  # the card then tells the whole history, not only the last run
        from vrc_dist.model import resolve_checkpoint

        summary["continued_from"] = json.loads((resolve_checkpoint(cfg.init) / "training.json").read_text())
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary

