"""vrc-dist: visual redundancy codebooks for LLaVA-family models, built on Ray, used to prune tokens.

The package reads as the pipeline (docs/ARCHITECTURE.md): data -> model -> probe -> build -> codebook -> prune
-> eval, with cli/ on top.
"""
