"""Pruning at inference (docs/METHOD.md step 9): the hook harness, selection methods, baselines and FastV."""
from vrc_dist.prune.baselines import CODEBOOK_METHODS, METHODS, NULL_OF, make_method
from vrc_dist.prune.hooks import HookedPruner, InputPruner, prune_visual_tokens
from vrc_dist.prune.methods import GROUP_SIM, CodebookMethod, Method, ScoreMethod, check_keep, keep_count
