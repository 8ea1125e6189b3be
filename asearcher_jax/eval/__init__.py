"""Evaluation: the agent over QA datasets, Avg@k / Pass@k per dataset and metric."""

from asearcher_jax.eval.harness import evaluate
from asearcher_jax.eval.report import aggregate, format_table

__all__ = ["aggregate", "evaluate", "format_table"]
