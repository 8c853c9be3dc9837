"""Evaluation: code pass@k in a sandbox, dialogue diversity / style fidelity / quality.

Light at import time: only the metrics and the sandbox are imported here; ``sfr.eval.code``,
``sfr.eval.dialogue`` and ``sfr.eval.generation`` (which need torch/transformers) load on use.
"""
from sfr.eval.metrics import (
    bootstrap_interval,
    cross_style_self_bleu,
    cross_style_similarity,
    distinct_n,
    embedding_diversity,
    mode_statistics,
    paired_bootstrap,
    pass_at_k,
    self_bleu,
)
from sfr.eval.sandbox import ProgramResult, SandboxLimits, check_program

__all__ = ["ProgramResult", "SandboxLimits", "bootstrap_interval", "check_program", "cross_style_self_bleu",
           "cross_style_similarity", "distinct_n", "embedding_diversity", "mode_statistics", "paired_bootstrap", "pass_at_k", "self_bleu"]
