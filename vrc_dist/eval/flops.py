"""The one analytic FLOP model of a LLaVA language model (the evaluation table and bench/probe_gpu.py use it).

Per decoder layer, with n new tokens after c cached ones, hidden d, query width d_q = heads * head_dim,
key/value width d_kv, MLP width m:
    2 n d (d_q + 2 d_kv) + 2 n d_q d + 6 n d m     (projections and gated MLP)
  + 2 d_q (2 n c + n^2)                             (causal QK^T and AV over the c cached and n new positions;
                                                     with c = 0, half of the 2 * 2 n^2 d_q of a full square)
plus 2 d V for the LM head at the last position only.
"""
from __future__ import annotations


def layer_flops(cfg, n: float, context: float = 0) -> float:
    """FLOPs of one decoder layer for `n` new tokens after `context` cached ones."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d, m = cfg.hidden_size, cfg.intermediate_size
    dq, dkv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    return 2 * n * d * (dq + 2 * dkv) + 2 * n * dq * d + 6 * n * d * m + 2 * n * n * dq + 4 * n * context * dq


def lm_head_flops(cfg) -> float:
    return 2 * cfg.hidden_size * cfg.vocab_size


def forward_flops(cfg, n: float, context: float = 0) -> float:
    """FLOPs of `n` new tokens after `context` cached ones through every layer, logits at the last position."""
    return cfg.num_hidden_layers * layer_flops(cfg, n, context) + lm_head_flops(cfg)


def prefill_flops(cfg, n_full: float, n_kept: float, first_pruned_layer: int = 0) -> float:
    """Language-model prefill FLOPs of one sequence; layers from `first_pruned_layer` on see n_kept tokens."""
    layers = [n_full] * first_pruned_layer + [n_kept] * (cfg.num_hidden_layers - first_pruned_layer)
    return sum(layer_flops(cfg, n) for n in layers) + lm_head_flops(cfg)
