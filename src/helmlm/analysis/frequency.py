"""Token frequencies and their relation to embedding norms (the HypLoRA README's sections 2-3).

- :func:`token_counts`: how often each token id occurs when a tokenizer encodes a corpus;
- :func:`fit_power_law`: the discrete power-law fit of the counts (``powerlaw`` package: exponent, ``xmin``, KS
  distance, and likelihood-ratio tests against lognormal and exponential);
- :func:`frequency_vs_norm`: quantile bins of frequency that hold every token, with the mean embedding norm of each
  bin, and the Spearman correlation of frequency and norm;
- :func:`embedding_norms`: Euclidean norms, or for Lorentz points the geodesic distance to the origin;
- :func:`token_groups`: the README's four word groups, as a table of frequency and norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from helmlm.errors import DataError
from helmlm.geometry import distance, origin

# The HypLoRA README's groups, from frequent function words (G1) to specific content words (G4).
GROUPS = {
    "G1": ["to", "in", "have", "that", "and", "is", "for"],
    "G2": ["how", "much", "many", "time", "cost"],
    "G3": ["animal", "fruit", "number", "color", "size"],
    "G4": ["dog", "cow", "apple", "banana", "380", "480", "purple", "red", "medium", "small", "large"],
}


def token_counts(tokenizer, texts: Iterable[str], vocab_size: int, max_tokens: int | None = None,
                 progress=None) -> np.ndarray:
    """Occurrences of each token id (``(vocab_size,)`` int64) over ``texts``, without special tokens, stopping after
    ``max_tokens`` tokens. ``progress``: an optional callable receiving the token count so far."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    total = 0
    for text in texts:
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if max_tokens is not None:
            ids = ids[:max_tokens - total]
        if ids.size and ids.max() >= vocab_size:
            raise DataError(f"the tokenizer produced id {int(ids.max())}, outside the model's vocabulary of "
                             f"{vocab_size}: the tokenizer does not belong to this model")
        counts += np.bincount(ids, minlength=vocab_size)
        total += ids.size
        if progress is not None:
            progress(total)
        if max_tokens is not None and total >= max_tokens:
            break
    return counts


def fit_power_law(counts: Sequence[int] | np.ndarray) -> dict:
    """Fit a discrete power law ``p(x) ~ x^-alpha`` (for ``x >= xmin``) to the positive counts, as ``powerlaw.Fit``
    does (``xmin`` by minimal KS distance), and compare it with a lognormal and an exponential by log-likelihood
    ratio (``R > 0`` favours the power law; ``p`` is the significance of the sign of ``R``)."""
    import warnings

    import powerlaw

    data = np.asarray(counts)
    data = data[data > 0]
    if data.size < 10:
        raise DataError(f"a power-law fit needs at least 10 positive counts, got {data.size}")
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(data, discrete=True, verbose=False)
        out = {"alpha": float(fit.power_law.alpha), "alpha_sigma": float(fit.power_law.sigma),
               "xmin": float(fit.xmin), "ks_distance": float(fit.power_law.D),
               "n_tail": int((data >= fit.xmin).sum()), "n": int(data.size)}
        for other in ("lognormal", "exponential"):
            r, p = fit.distribution_compare("power_law", other, normalized_ratio=True)
            out[f"vs_{other}"] = {"R": float(r), "p": float(p)}
    return out


def embedding_norms(table: Tensor, lorentz_curvature: float | None = None) -> Tensor:
    """Per row: the Euclidean norm, or, for Lorentz points (``lorentz_curvature`` = c of ``<x, x>_L = -c``), the
    geodesic distance to the origin ``sqrt(c) arcosh(x_t / sqrt(c))``."""
    table = table.detach().to(torch.float64)
    if lorentz_curvature is None:
        return table.norm(dim=-1)
    o = origin(table.shape[-1] - 1, lorentz_curvature, dtype=torch.float64)
    return distance(table, o.expand_as(table), lorentz_curvature)


def frequency_vs_norm(counts: np.ndarray, norms: Tensor | np.ndarray, bins: int = 10) -> dict:
    """Every token in a bin: tokens never seen form bin 0; the seen ones are cut into ``bins`` quantile bins of
    their count. Per bin: token count, count range, mean count, mean / median / std of norm. Plus Spearman's rho of
    count and norm over the seen tokens (and its p-value)."""
    from scipy.stats import spearmanr

    counts, norms = np.asarray(counts), np.asarray(norms, dtype=np.float64)
    if counts.shape != norms.shape:
        raise DataError(f"{counts.shape[0]} counts but {norms.shape[0]} norms: the vocabulary of the tokenizer and "
                         "the embedding table differ")
    seen = np.flatnonzero(counts > 0)
    if seen.size < bins:
        raise DataError(f"only {seen.size} distinct tokens occur in the corpus; need at least {bins}")
    order = seen[np.argsort(counts[seen], kind="stable")]
    groups = [np.flatnonzero(counts == 0), *np.array_split(order, bins)]
    table = []
    for index, members in enumerate(groups):
        if members.size == 0:
            continue
        c, v = counts[members], norms[members]
        table.append({"bin": index, "tokens": int(members.size), "count_min": int(c.min()), "count_max": int(c.max()),
                      "count_mean": float(c.mean()), "norm_mean": float(v.mean()),
                      "norm_median": float(np.median(v)), "norm_std": float(v.std())})
    rho, p = spearmanr(counts[seen], norms[seen])
    return {"bins": table, "spearman_rho": float(rho), "spearman_p": float(p), "tokens": int(counts.size),
            "seen_tokens": int(seen.size)}


def single_token_id(tokenizer, word: str) -> int | None:
    """The id of ``word`` as one token: with a leading space (a word inside a sentence) if that is one token, else
    bare; None when it splits."""
    for text in (" " + word, word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
    return None


def token_groups(tokenizer, counts: np.ndarray, norms: Tensor | np.ndarray,
                 groups: dict[str, list[str]] = GROUPS) -> list[dict]:
    """Per group: its words that are single tokens, with their counts and norms, and the group's mean and range."""
    norms = np.asarray(norms, dtype=np.float64)
    rows = []
    for name, words in groups.items():
        found = {w: t for w in words if (t := single_token_id(tokenizer, w)) is not None}
        c = np.array([counts[t] for t in found.values()], dtype=np.float64)
        v = np.array([norms[t] for t in found.values()])
        rows.append({"group": name, "words": list(found), "missing": [w for w in words if w not in found],
                     "count_mean": float(c.mean()) if c.size else math.nan,
                     "count_range": [float(c.min()), float(c.max())] if c.size else None,
                     "norm_mean": float(v.mean()) if v.size else math.nan,
                     "norm_range": [float(v.min()), float(v.max())] if v.size else None})
    return rows
