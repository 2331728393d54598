"""The lmms-eval model `vrc_llava`: transformers' own LLaVA classes with vrc-dist's visual token pruning.

    vrc lmms-eval --model vrc_llava \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,codebook=codebooks/llava15,keep=0.111 --tasks pope

Model args (lmms-eval's `--model_args k=v,...`):
  pretrained  a LLaVA checkpoint directory, a hub id already in the local cache, or `toy`; its config's
              model_type picks LlavaForConditionalGeneration, LlavaNextForConditionalGeneration or
              LlavaOnevisionForConditionalGeneration
  codebook    a codebook directory or `toy` (needed by the codebook methods; checked against the model's
              embedding dimension before any data is read)
  keep        keep ratio in (0, 1]; or threshold (codebook methods only): keep tokens whose redundancy is below it
  method      any `vrc eval` method (default codebook): codebook, codebook-null, codebook-diverse,
              codebook-diverse-null, codebook-plain, divprune, random, cls, fastv, pool. oracle and anti-oracle
              read the toy world's per-patch ground truth, which lmms-eval requests do not carry: refused.
  seed, fastv_layer, group_sim   as in `vrc eval` (random baseline / null codebooks, FastV's K, diverse rule)
  device      auto (cuda if available), cpu, cuda, cuda:1 ...;  dtype  auto (bfloat16 on GPU, float32 on CPU),
              float32, bfloat16, float16
  batch_size  requests per forward (also lmms-eval's --batch_size; the model arg wins when both are given)

Requests are answered in lmms-eval's order, in batches of consecutive requests of the same task and
generation settings, so the random baseline draws for images in the same order as in `vrc eval` and a
batch size changes no answer. Per request, the visual tokens kept / before pruning and the language model's
prefill time (its share of the batch's prefill, pruning included) are returned as extra fields of the
request's token counts: lmms-eval writes them into each sample of `--log_samples` output
(`token_counts`: visual_tokens_kept, visual_tokens_total, prefill_ms), and their means per batch go
to lmms-eval's throughput summary in the results JSON (avg_visual_tokens_kept, avg_prefill_ms, ...).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Optional

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger

from vrc_dist.lmms.args import ModelArgs, check_model_args
from vrc_dist.prune import prune_visual_tokens

IMAGE_TOKEN = "<image>"


@dataclass
class PruneCounts(TokenCounts):
    """lmms-eval's per-request token counts, plus what pruning did to the request."""

    visual_tokens_kept: Optional[int] = None
    visual_tokens_total: Optional[int] = None
    prefill_ms: Optional[float] = None

    def to_dict(self):
        d = super().to_dict()
        for name in ("visual_tokens_kept", "visual_tokens_total", "prefill_ms"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d


class _PrefillTimer:
    """Seconds of the language model's first forward in each generate/forward call (the prefill).
    Hooks installed once, before any pruner's, so the pruner's own work is inside the measurement."""

    def __init__(self, module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending, self.seconds, self._start = False, 0.0, None
        self._handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def arm(self):
        self.pending, self.seconds = True, 0.0

    def _enter(self, *_):
        if self.pending:
            if self.cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

    def _exit(self, *_):
        if self.pending:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds, self.pending = time.perf_counter() - self._start, False


class VrcLlava(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "toy", codebook: str | None = None, keep: float | None = None,
                 threshold: float | None = None, method: str = "codebook", seed: int = 0, fastv_layer: int = 2,
                 group_sim: float | None = None, device: str = "auto", dtype: str = "auto", batch_size: int = 1,
                 max_batch_size: int | None = None, crops: str = "all", **unknown) -> None:
        super().__init__()
        # Everything is checked, and the codebook opened against the checkpoint's config, before weights load
        # (and before lmms-eval reads any task data, which it does after building the model).
        self.args: ModelArgs = check_model_args(
            pretrained=pretrained, codebook=codebook, keep=keep, threshold=threshold, method=method, seed=seed,
            fastv_layer=fastv_layer, group_sim=group_sim, device=device, dtype=dtype, batch_size=batch_size,
            crops=crops, unknown=unknown)
        a = self.args
        from transformers import AutoProcessor

        self._device = a.device
        self._model = a.model_class.from_pretrained(a.path, dtype=a.dtype).to(a.device).eval()
        self.processor = AutoProcessor.from_pretrained(a.path)
        self.processor.tokenizer.padding_side = "left"  # the last position must be every row's prompt end
        self.tokenizer = self.processor.tokenizer
        self.batch_size_per_gpu = a.batch_size
        self.method = a.make_method()
        self.crops = a.crops
        self._timer = _PrefillTimer(self._model.model.language_model, a.device)
        eval_logger.info(f"vrc_llava: {a.describe()}")

    # lmms-eval passes --batch_size and --device beside the model args; the model args win.
    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        args = lmms_utils.simple_parse_args_string(arg_string)
        for k, v in (additional_config or {}).items():
            if v is not None and k not in args:
                args[k] = v
        return cls(**args)

    @property
    def model(self):
        return self._model

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    # -- prompts -------------------------------------------------------------------------------------------

    def _messages(self, context: str, n_images: int, answer: str | None = None) -> list[dict]:
        """The user turn as the model's own chat template wants it: images first (LLaVA's layout, and what
        `vrc eval` feeds), or where the context puts `<image>` placeholders."""
        if IMAGE_TOKEN in context:
            parts = context.split(IMAGE_TOKEN)
            if len(parts) - 1 != n_images:
                raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_TOKEN} placeholders for {n_images} images")
            content = []
            for i, part in enumerate(parts):
                if i:
                    content.append({"type": "image"})
                if part.strip():
                    content.append({"type": "text", "text": part.strip()})
        else:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not hasattr(v, "convert"):
                raise ValueError(f"task {task!r}: vrc_llava takes images only, got a {type(v).__name__} "
                                 "(video and audio inputs are not supported)")
        return [v.convert("RGB") for v in visuals]

    def _inputs(self, texts: list[str], images: list) -> dict:
        kwargs = {"images": images} if images else {}
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, **kwargs)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    # -- requests ------------------------------------------------------------------------------------------

    def _batches(self, requests: list[Instance]):
        """Consecutive requests of one task and one set of generation settings, at most batch_size each."""
        batch, key = [], None
        for i, req in enumerate(requests):
            context, gen_kwargs, _, _, task, split = req.args
            k = (task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))
            if batch and (k != key or len(batch) == self.batch_size):
                yield batch
                batch = []
            batch.append(i)
            key = k
        if batch:
            yield batch

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list:
        results = [None] * len(requests)
        for idx in self._batches(requests):
            args = [requests[i].args for i in idx]
            gen_kwargs = dict(args[0][1])
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new_tokens = int(gen_kwargs.pop("max_new_tokens", 128))
            temperature = float(gen_kwargs.pop("temperature", 0) or 0)
            do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
            sampling = {"do_sample": True, "temperature": temperature,
                        "top_p": gen_kwargs.pop("top_p", None) or 1.0} if do_sample else {"do_sample": False}
            num_beams = int(gen_kwargs.pop("num_beams", 1) or 1)
            texts, images, per_request = [], [], []
            for context, _, doc_to_visual, doc_id, task, split in args:
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                texts.append(self.processor.apply_chat_template(self._messages(context, len(visuals)),
                                                                add_generation_prompt=True))
                images += visuals
                per_request.append(len(visuals))
            inputs = self._inputs(texts, images)
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with prune_visual_tokens(self.model, method=self.method, crops=self.crops) as pruner:
                self._timer.arm()
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                          pad_token_id=self.tokenizer.pad_token_id,
                                          eos_token_id=self.tokenizer.eos_token_id, **sampling)
            new = out[:, inputs["input_ids"].shape[1]:]
            decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            counts = self._counts(pruner, per_request, inputs, new)
            for j, (i, text) in enumerate(zip(idx, decoded)):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results[i] = GenerationResult(text=text, token_counts=counts[j])
                self.cache_hook.add_partial("generate_until", (args[j][0], args[j][1]), text)
            self._log_batch(args[0][4], counts)
        return results

    def _counts(self, pruner, per_request: list[int], inputs: dict, new: torch.Tensor | None) -> list[PruneCounts]:
        """Per request: visual tokens kept / total (per image, in order), input tokens the language model
        saw after pruning, generated tokens, and its share of the batch's prefill time."""
        kept, total = pruner.by_item("image")
        prefill_ms = 1e3 * self._timer.seconds / len(per_request)
        lengths = inputs["attention_mask"].sum(1).tolist()
        counts, pos = [], 0
        for j, n in enumerate(per_request):
            k, t = (sum(kept[pos:pos + n]), sum(total[pos:pos + n])) if len(kept) >= pos + n else (None, None)
            pos += n
            output = None
            if new is not None:
                output = int((new[j] != self.tokenizer.pad_token_id).sum()) if self.tokenizer.pad_token_id is not None \
                    else int(new.shape[1])
            counts.append(PruneCounts(input_tokens=int(lengths[j] - (t - k)) if k is not None else int(lengths[j]),
                                      output_tokens=output, visual_tokens_kept=k, visual_tokens_total=t,
                                      prefill_ms=round(prefill_ms, 3)))
        return counts

    def _log_batch(self, task: str, counts: list[PruneCounts]) -> None:
        kept = [c.visual_tokens_kept for c in counts if c.visual_tokens_kept is not None]
        total = [c.visual_tokens_total for c in counts if c.visual_tokens_total is not None]
        extra = {"requests": len(counts), "prefill_ms": sum(c.prefill_ms for c in counts) / len(counts)}
        if kept:
            extra["visual_tokens_kept"] = sum(kept) / len(kept)
            extra["visual_tokens_total"] = sum(total) / len(total)
        eval_logger.info(f"vrc_llava {task}: batch of {len(counts)}, " +
                         ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
        seconds = sum(c.prefill_ms for c in counts) / 1e3
        tokens = sum(c.output_tokens or 0 for c in counts)
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=tokens,
                    avg_speed=tokens / seconds if seconds else 0.0, additional_metrics=extra)

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list:
        """(loss, greedy) per request, as lmms-eval's own llava_hf returns it: the mean negative
        log-likelihood of the continuation's tokens (multiple_choice takes the argmin), and whether greedy
        decoding gives exactly the continuation. The continuation follows the image, so the pruner removing
        image tokens leaves it at the end of the sequence, where it is read."""
        results = [None] * len(requests)
        for i, req in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            messages = self._messages(context, len(visuals), continuation.strip())
            prompt = self.processor.apply_chat_template(messages[:1], add_generation_prompt=True)
            # The continuation's ids: the prompt's text followed by it, minus the prompt's own ids.
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full_ids = self.tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
            if full_ids[:len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
                raise ValueError(f"task {task!r}: the continuation {continuation!r} does not tokenise apart from "
                                 "the prompt")
            n = len(full_ids) - len(prompt_ids)
            inputs = self._inputs([prompt + continuation], visuals)
            with prune_visual_tokens(self.model, method=self.method, crops=self.crops) as pruner:
                self._timer.arm()
                logits = self.model(**inputs, logits_to_keep=n + 1).logits[0, :-1].float()
            cont = inputs["input_ids"][0, -n:]
            logprobs = torch.log_softmax(logits, -1)
            loss = -logprobs.gather(-1, cont[:, None]).mean()
            # Wrapped: lmms-eval 0.7.3's evaluator turns a bare (float, bool) into its str() (evaluator.py,
            # unwrap_generation_output), which multiple_choice scoring cannot unpack; a GenerationResult's
            # `text` is passed through as it is, with the pruning counts beside it.
            counts = self._counts(pruner, [len(visuals)], inputs, None)
            results[i] = GenerationResult(text=(float(loss), bool((logits.argmax(-1) == cont).all())),
                                          token_counts=counts[0])
            self._log_batch(task, counts)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        task = requests[0].task_name if requests else "?"
        raise NotImplementedError(f"vrc_llava does not answer multi-round generation requests (task {task!r}); "
                                  "it supports generate_until and loglikelihood tasks")
