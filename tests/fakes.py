"""Fakes shared by the suite: an ImageResult that honours the contract (docs/CONTRACTS.md) and a prober that
returns one per image without a model. Importable by name (pyproject's pytest `pythonpath`)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa

DIM, L = 6, 4  # embedding width and tokens per image of the fakes


def fake_result(key: str, dim: int = DIM, n_cand: int = 2, seed: int = 0, vectors=None):
    from vrc_dist.build.schema import TOKEN_FIELDS

    rng = np.random.default_rng(seed)
    tokens = {name: rng.random(L) if pa.types.is_floating(t) else rng.integers(0, 9, L) for name, t in TOKEN_FIELDS}
    tokens["token_index"] = np.arange(L)
    flags = np.zeros(L, bool)
    flags[:n_cand] = True
    tokens["low_info"] = tokens["candidate"] = flags
    vec = rng.random((n_cand, dim)).astype(np.float16) if vectors is None else vectors
    return SimpleNamespace(key=key, grid=(2, 2), answer="circle", answer_token_id=7, tokens=tokens,
                           candidate_index=np.arange(n_cand, dtype=np.int32), candidate_vectors=vec)


class FakeProber:
    def __init__(self, dim: int = DIM):
        self.model_info = {"model_id": "fake", "revision": None, "embed_dim": dim}
        self.dim = dim
        self.seen: list[tuple[str, tuple, str]] = []  # key, size, mode of what the prober got

    def probe(self, image, key):
        if key == "explodes":  # one pathological image must not cost the shard
            raise RuntimeError("boom")
        self.seen.append((key, image.size, image.mode))
        return fake_result(key, self.dim, seed=sum(map(ord, key)))
