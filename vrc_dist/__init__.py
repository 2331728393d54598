"""vrc-dist: visual redundancy codebooks for LLaVA-family models, built on Ray, used to prune tokens."""

__version__ = "0.1.0"
