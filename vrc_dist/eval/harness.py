"""One harness for every pruning method: toy-world accuracy per question type, prefill FLOPs and time.

Questions come as QA records (vrc_dist/eval/records.py: image, question, answers, type), which toy shards
satisfy. Accuracy is the model's first answer token (answers are single words) against the first answer,
with position ids from the attention mask as `generate` makes them, so it equals greedy generation.
Prefill FLOPs are analytic, for the language model only (the vision tower costs the same for every
method): vrc_dist/eval/flops.py (FastV: layers < K at the unpruned n).
Wall time is measured around the language model's prefill (hooks) and around the whole forward.

Every accuracy comes with a bootstrap 95% interval over questions, and each codebook method run beside its
null control (baselines.NULL_OF) with the paired difference to it and that difference's interval: the same
resampled questions for both, so the interval is of the difference itself.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from vrc_dist.config import FASTV_LAYER
from vrc_dist.eval.flops import prefill_flops
from vrc_dist.eval.records import QARecord
from vrc_dist.model.chat import chat_prompt
from vrc_dist.prune.baselines import NULL_OF, make_method
from vrc_dist.prune.hooks import prune_visual_tokens
from vrc_dist.prune.methods import GROUP_SIM

BOOTSTRAP = 2000  # resamples per interval: the 2.5% / 97.5% quantiles move by < 0.002 beyond this


@dataclass
class Batch:
    inputs: dict
    answers: torch.Tensor
    qtypes: list[str]
    truth: list[tuple[np.ndarray, np.ndarray] | None]  # per question's image: ground-truth (mask, coverage), flat


def build_batches(processor, records: list[QARecord], batch_size: int) -> list[Batch]:
    """Every QA record, tokenised once and reused by every method."""
    tok = processor.tokenizer
    tok.padding_side = "left"  # the last position must be every row's prompt end
    batches = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        texts = [chat_prompt(processor, r.question) for r in chunk]
        inputs = processor(images=[r.image for r in chunk], text=texts, return_tensors="pt", padding=True)
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        answers = torch.tensor(tok.convert_tokens_to_ids([r.answers[0] for r in chunk]))
        batches.append(Batch(dict(inputs), answers, [r.type for r in chunk], [r.truth for r in chunk]))
    return batches


class _Timer:
    """Seconds spent inside a module's last forward (hooks, so the method under test is untouched), and
    of those, the seconds spent in the pre-hooks registered between this timer and `mark()`."""

    def __init__(self, module):
        self.module, self.seconds, self.before_mark, self._start = module, 0.0, 0.0, None
        self._handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def _enter(self, *_):
        self._start = time.perf_counter()

    def _mark(self, *_):
        self.before_mark = time.perf_counter() - self._start

    def _exit(self, *_):
        self.seconds = time.perf_counter() - self._start

    def mark(self):
        """A pre-hook that runs after every pre-hook registered so far; returns its handle."""
        self.before_mark = 0.0
        return self.module.register_forward_pre_hook(self._mark)

    def remove(self):
        for h in self._handles:
            h.remove()


@torch.no_grad()
def run_method(model, batches: list[Batch], method, repeats: int = 3) -> dict:
    """Accuracy per question type, mean tokens kept per image, prefill FLOPs and seconds per question.

    Each batch runs `repeats` times and the fastest time counts: on a shared machine the minimum is
    the least disturbed measurement. The LLM time includes the pruner's own work (scoring, choosing,
    repacking), which is also reported alone as `select_ms` (FastV's ranking runs inside layer K, so
    its select_ms is only the bookkeeping before layer 0).
    """
    cfg = model.config.text_config
    first_pruned = getattr(method, "layer", 0)  # FastV prunes after layer K; the rest before layer 0
    counts = defaultdict(lambda: [0, 0])
    kept, total, correct, flops, llm_s, forward_s, select_s = [], [], [], 0.0, 0.0, 0.0, 0.0
    timer = _Timer(model.model.language_model)
    try:
        for batch in batches:
            if hasattr(method, "truth"):  # the oracles read the world's ground truth
                method.truth = batch.truth
            times = []
            for _ in range(repeats):
                with prune_visual_tokens(model, method=method) as pruner:
                    mark = timer.mark()  # after the pruner's hook
                    try:
                        start = time.perf_counter()
                        logits = model(**batch.inputs, logits_to_keep=1).logits[:, -1]
                        times.append((time.perf_counter() - start, timer.seconds, timer.before_mark))
                    finally:
                        mark.remove()
            forward_s += min(t[0] for t in times)
            llm_s += min(t[1] for t in times)
            select_s += min(t[2] for t in times)
            for qtype, ok in zip(batch.qtypes, (logits.argmax(-1) == batch.answers).tolist()):
                counts[qtype][0] += ok
                counts[qtype][1] += 1
                correct.append(ok)
            image_kept, image_total = pruner.by_item("image")
            kept += image_kept
            total += image_total
            n_full = batch.inputs["attention_mask"].sum(1).tolist()
            for n, k, t in zip(n_full, image_kept, image_total):  # one image per question
                flops += prefill_flops(cfg, n, n - (t - k), first_pruned)
    finally:
        timer.remove()
    n_questions = sum(c[1] for c in counts.values())
    result = {
        "kept_tokens": sum(kept) / len(kept),
        "total_tokens": sum(total) / len(total),
        "accuracy": sum(c[0] for c in counts.values()) / n_questions,
        "questions": n_questions,
        "prefill_gflops": flops / n_questions / 1e9,
        "llm_prefill_ms": 1e3 * llm_s / n_questions,
        "forward_ms": 1e3 * forward_s / n_questions,
        "select_ms": 1e3 * select_s / n_questions,
        "correct": np.asarray(correct, bool),  # per question, in batch order: for the intervals
    }
    for qtype in counts:  # in the order the types first appear
        result[f"acc_{qtype}"] = counts[qtype][0] / counts[qtype][1]
    return result


def evaluate(model, processor, records: list[QARecord], methods, keeps, codebook=None, batch_size: int = 64,
             seed: int = 0, fastv_layer: int = FASTV_LAYER, group_sim: float = GROUP_SIM, repeats: int = 3,
             progress=None) -> list[dict]:
    """One row per (method, keep) over QA records; `relative` is accuracy over the unpruned accuracy."""
    batches = build_batches(processor, records, batch_size)
    rows = []
    for name in methods:
        for keep in keeps:
            method = make_method(name, keep, codebook=codebook, seed=seed, fastv_layer=fastv_layer,
                                 group_sim=group_sim)
            row = {"method": name, "keep": keep, **run_method(model, batches, method, repeats)}
            rows.append(row)
            if progress:
                progress(row)
    # Relative to the unpruned model: keep 1.0 removes nothing, so any method's 1.0 row is it.
    full = next((r for r in rows if r["keep"] == 1.0), None) or run_method(model, batches, make_method("random", 1.0), 1)
    for r in rows:
        r["relative"] = r["accuracy"] / full["accuracy"] if full["accuracy"] else float("nan")
    add_intervals(rows, seed)
    return rows


def bootstrap_interval(values: np.ndarray, resamples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` over resampled question indices [B, n]."""
    lo, hi = np.quantile(values[resamples].mean(1), [0.025, 0.975])
    return float(lo), float(hi)


def add_intervals(rows: list[dict], seed: int = 0) -> None:
    """acc_lo / acc_hi for every row; vs_null (+ _lo / _hi) for codebook rows whose null ran at the same keep.
    Consumes each row's per-question `correct`."""
    n = len(rows[0]["correct"])
    resamples = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))
    by_key = {(r["method"], r["keep"]): r["correct"] for r in rows}
    for r in rows:
        r["acc_lo"], r["acc_hi"] = bootstrap_interval(r["correct"].astype(float), resamples)
        null = by_key.get((NULL_OF.get(r["method"]), r["keep"]))
        if null is not None:
            diff = r["correct"].astype(float) - null
            r["vs_null"] = float(diff.mean())
            r["vs_null_lo"], r["vs_null_hi"] = bootstrap_interval(diff, resamples)
    for r in rows:
        del r["correct"]
