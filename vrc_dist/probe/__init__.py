"""Identify, per image (docs/METHOD.md steps 1-7): the prober, the divergences, and DPC-KNN.

Exports are loaded on first use: DPC-KNN (numpy, faiss) is also used by the codebook's clustering, which
must not pull torch and transformers in with it.
"""
import importlib

_EXPORTS = {
    "ENGINES": "prober", "TOKEN_COLUMNS": "prober", "ImageResult": "prober", "Prober": "prober",
    "PROBED_COLUMNS": "prober", "windows": "prober",
    "CONVENTIONS": "divergence", "divergence": "divergence", "top1_of_head": "divergence",
    "DPCResult": "dpc", "dpc_knn": "dpc", "dpc_knn_exact": "dpc", "dpc_knn_faiss": "dpc",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
