"""Token-embedding geometry (issue 13): frequency power law, frequency vs norm, delta-hyperbolicity with null
baselines. Pure functions on tensors and arrays; nothing here plots."""

from helmlm.analysis.frequency import (
    GROUPS,
    embedding_norms,
    fit_power_law,
    frequency_vs_norm,
    token_counts,
    token_groups,
)
from helmlm.analysis.hyperbolicity import (
    Delta,
    delta_hyperbolicity,
    gaussian_like,
    pairwise_distances,
    random_rows,
)

__all__ = ["GROUPS", "Delta", "delta_hyperbolicity", "embedding_norms", "fit_power_law", "frequency_vs_norm",
           "gaussian_like", "pairwise_distances", "random_rows", "token_counts", "token_groups"]
