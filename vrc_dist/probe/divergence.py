"""How far apart two first-token distributions are (docs/METHOD.md step 5), and how confident one is (step 2).

Both work on the top-k head of a distribution only: the long tail of a 32k-152k vocabulary is noise
for a one-word answer, and the released thresholds were calibrated on these truncated quantities.
Computed in float64: the divergences are ~1e-3 to 1e-6, differences of nearly equal probabilities.
"""
from __future__ import annotations

import torch

CONVENTIONS = ("reference", "jsd")


def divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, k: int = 10, convention: str = "reference") -> torch.Tensor:
    """D(A, B) for each row of [B, V] logits (or one [V] pair): restricted to the top-k ids of A.

    reference: 0.5 * (mean_k M(log M - log P) + mean_k M(log M - log Q)), what the reference code's
        `F.kl_div(log P, M)` computes; its released thresholds are in this convention.
    jsd: the textbook Jensen-Shannon divergence in nats, 0.5 * (KL(P||M) + KL(Q||M)), summed over k.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"divergence convention {convention!r}; expected one of {CONVENTIONS}")
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    top_a, ids = logits_a.double().topk(k, dim=-1)
    log_p = top_a.log_softmax(-1)
    log_q = logits_b.double().gather(-1, ids).log_softmax(-1)
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    if convention == "reference":
        m = log_m.exp()
        return 0.5 * ((m * (log_m - log_p)).mean(-1) + (m * (log_m - log_q)).mean(-1))
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))


def top1_of_head(logits: torch.Tensor, k_head: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability, token id) of the most likely token after a softmax over the top `k_head` logits only."""
    top, ids = logits.double().topk(min(k_head, logits.shape[-1]), dim=-1)
    return top.softmax(-1)[..., 0], ids[..., 0]
