"""The geometry report of one model's token embeddings (``helmlm analyze``): what the functions of this package
measure, together, with a null baseline beside every delta.

:func:`analyze_embeddings` takes the input-embedding table, the tokenizer and the documents (the caller loads them),
and returns a JSON-able dict; :func:`write_report` writes ``report.json``, ``report.md`` and the plots of
:mod:`helmlm.analysis.plots`.

The delta-hyperbolicity is measured on the ``points`` most frequent tokens (distances: Euclidean, or geodesic for a
Lorentz table), and on two nulls of the same size, each drawn ``null_draws`` times: Gaussian points with the same
mean and covariance (for a Lorentz table: in the tangent space at the origin, mapped back by ``expmap0``), and random
other rows of the same table.

The ``disk_points`` most frequent tokens (default: the same ``points``) and the word groups are also drawn in the
Poincaré disk (:mod:`helmlm.analysis.disk`: radii exact, angles a projection): ``disk.png``, and ``disk.html`` (with
the token, its rank and count on hover) where plotly is installed.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from helmlm.analysis.disk import disk_layout
from helmlm.analysis.frequency import (
    GROUPS,
    embedding_norms,
    fit_power_law,
    frequency_vs_norm,
    token_counts,
    token_groups,
)
from helmlm.analysis.hyperbolicity import (
    EXACT_MAX_POINTS,
    delta_hyperbolicity,
    gaussian_like,
    pairwise_distances,
    random_rows,
)
from helmlm.errors import DataError
from helmlm.geometry import expmap0, logmap0

PLOTLY_MISSING = "plotly is not installed; `pip install 'helmlm[plots]'` adds it"


def lorentz_distances(points: Tensor, c: float) -> Tensor:
    """Geodesic distance matrix ``sqrt(c) arcosh(-<x_i, x_j>_L / c)`` of Lorentz points, fp64."""
    x = points.to(torch.float64)
    inner = x[:, 1:] @ x[:, 1:].T - x[:, :1] @ x[:, :1].T
    return (c ** 0.5 * torch.acosh((-inner / c).clamp_min(1.0))).fill_diagonal_(0)


def distance_matrix(points: Tensor, c: float | None) -> Tensor:
    """Euclidean distances, or geodesic ones for Lorentz points (``c`` given)."""
    return pairwise_distances(points) if c is None else lorentz_distances(points, c)


def gaussian_null(points: Tensor, c: float | None, seed: int) -> Tensor:
    """:func:`gaussian_like` of ``points``; for Lorentz points, drawn in the tangent space at the origin (their
    ``logmap0``) and mapped back by ``expmap0``."""
    if c is None:
        return gaussian_like(points, seed=seed)
    return expmap0(gaussian_like(logmap0(points, c), seed=seed), c)


def _delta(points: Tensor, c: float | None, seed: int) -> dict[str, Any]:
    result = delta_hyperbolicity(distance_matrix(points, c), exact=len(points) <= EXACT_MAX_POINTS, seed=seed)
    return {"delta": result.delta, "relative_delta": result.relative_delta, "diameter": result.diameter,
            "exact": result.exact, "base_points": result.base_points}


def _summary(draws: list[dict[str, Any]]) -> dict[str, Any]:
    values = [d["relative_delta"] for d in draws]
    return {"relative_delta_mean": statistics.fmean(values),
            "relative_delta_std": statistics.stdev(values) if len(values) > 1 else 0.0, "draws": draws}


def delta_with_nulls(table: Tensor, chosen: Tensor, c: float | None, null_draws: int = 5, seed: int = 0,
                     tick=lambda: None) -> dict:
    """Relative delta of the rows ``chosen`` of ``table``, beside the Gaussian and random-rows nulls; ``tick()``
    after each of the ``1 + 2 null_draws`` point sets."""
    points = table[chosen].to(torch.float64)

    def measured(point_set: Tensor) -> dict[str, Any]:
        result = _delta(point_set, c, seed)
        tick()
        return result

    tokens = measured(points)
    gaussian = [measured(gaussian_null(points, c, seed + 1 + draw)) for draw in range(null_draws)]
    others = [measured(random_rows(table.to(torch.float64), len(chosen), seed=seed + 101 + draw, exclude=chosen))
              for draw in range(null_draws)]
    return {"tokens": tokens, "gaussian_null": _summary(gaussian), "random_tokens_null":
            _summary(others), "points": len(chosen), "distance": "euclidean" if c is None else "lorentz geodesic"}


def ricci_with_null(table: Tensor, chosen: Tensor, c: float | None, null_draws: int, seed: int,
                    k: int = 10, tick=lambda: None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ollivier-Ricci curvature of the k-NN graph of the chosen rows and of Gaussian nulls (summaries, and the raw
    edge curvatures for the plot); ``{"unavailable": ...}`` without the ``ricci`` extra. ``tick()`` after each of
    the ``1 + null_draws`` graphs."""
    from helmlm.analysis.ricci import knn_graph, ollivier_ricci, summary

    points = table[chosen].to(torch.float64)
    try:
        tokens = ollivier_ricci(knn_graph(distance_matrix(points, c), k))
    except ImportError as err:  # networkx, POT or scipy: the ricci extra
        return {"unavailable": f"{err.name or err} is not installed: pip install 'helmlm[ricci]'"}, {}
    tick()
    nulls = []
    for draw in range(null_draws):
        nulls.append(ollivier_ricci(knn_graph(distance_matrix(gaussian_null(points, c, seed + 1 + draw), c), k)))
        tick()
    return ({"k": k, "tokens": summary(tokens), "gaussian_null": [summary(n) for n in nulls]},
            {"tokens": tokens, "gaussian_null": np.concatenate(nulls)})


def analyze_embeddings(table: Tensor, tokenizer, documents: Iterable[str], *, lorentz_curvature: float | None = None,
                       max_tokens: int | None = 1_000_000, points: int = 300, null_draws: int = 5, bins: int = 10,
                       seed: int = 0, progress: bool = True, log=print,
                       disk_points: int | None = None) -> dict[str, Any]:
    """Counts, power-law fit, frequency vs norm, word groups, the Poincaré disk and delta-hyperbolicity with nulls
    (module docstring)."""
    from tqdm.auto import tqdm

    table = table.detach().to(torch.float64).cpu()
    bar = tqdm(total=max_tokens, disable=not progress, desc="counting tokens", unit="tok")
    counts = token_counts(tokenizer, documents, table.shape[0], max_tokens, progress=lambda n: bar.update(n - bar.n))
    bar.close()
    if counts.sum() == 0:
        raise DataError("the corpus gave no tokens; check the --corpus source")
    norms = embedding_norms(table, lorentz_curvature)
    seen = np.flatnonzero(counts > 0)
    if seen.size < 4:
        raise DataError(f"only {seen.size} distinct tokens occur in the corpus; the analysis needs more text")
    order = seen[np.argsort(-counts[seen], kind="stable")]
    chosen = torch.as_tensor(order[:points].copy())
    report = {
        "vocab_size": int(table.shape[0]), "embedding_dim": int(table.shape[1]),
        "geometry": "euclidean" if lorentz_curvature is None else f"lorentz (c = {lorentz_curvature:g})",
        "corpus_tokens": int(counts.sum()), "distinct_tokens": int(seen.size),
        "power_law": fit_power_law(counts),
        "frequency_vs_norm": frequency_vs_norm(counts, norms.numpy(), bins),
        "groups": token_groups(tokenizer, counts, norms.numpy(), GROUPS),
    }
    report["disk"], report["_disk"] = disk_layout(table, tokenizer, counts, order[:disk_points or points],
                                                  lorentz_curvature, GROUPS)
    if len(chosen) > EXACT_MAX_POINTS:
        log(f"note: {len(chosen)} points is more than the {EXACT_MAX_POINTS} of the exact delta; sampling 16 base "
              "points (a lower bound)")
    with tqdm(total=1 + 2 * null_draws, disable=not progress, desc="delta: tokens and nulls", unit="set") as bar:
        report["delta"] = delta_with_nulls(table, chosen, lorentz_curvature, null_draws, seed, tick=bar.update)
    with tqdm(total=1 + null_draws, disable=not progress, desc="Ricci: tokens and nulls", unit="graph") as bar:
        report["ricci"], report["_ricci"] = ricci_with_null(table, chosen, lorentz_curvature, null_draws, seed,
                                                            tick=bar.update)
    report["_counts"], report["_norms"] = counts, norms.numpy()  # for the plots; not written to JSON
    return report


def markdown(report: dict[str, Any], title: str) -> str:
    pl, fvn, d = report["power_law"], report["frequency_vs_norm"], report["delta"]
    lines = [f"# Token-embedding geometry: {title}", "",
             f"{report['vocab_size']} tokens x {report['embedding_dim']} ({report['geometry']}); corpus: "
             f"{report['corpus_tokens']:,} tokens, {report['distinct_tokens']:,} distinct.", "",
             "## Frequency power law", "",
             f"alpha = {pl['alpha']:.3f} ± {pl['alpha_sigma']:.3f} for counts >= xmin = {pl['xmin']:g} "
             f"({pl['n_tail']} of {pl['n']} tokens); KS distance {pl['ks_distance']:.4f}. Log-likelihood ratio "
             f"(normalised) vs lognormal R = {pl['vs_lognormal']['R']:.2f} (p = {pl['vs_lognormal']['p']:.3g}), "
             f"vs exponential R = {pl['vs_exponential']['R']:.2f} (p = {pl['vs_exponential']['p']:.3g}); R > 0 "
             "favours the power law.", "",
             "## Frequency vs norm", "",
             f"Spearman rho (count, norm) over the {fvn['seen_tokens']} seen tokens: {fvn['spearman_rho']:.3f} "
             f"(p = {fvn['spearman_p']:.3g}). Bin 0: tokens never seen; bins 1.. : quantiles of count.", "",
             "| bin | tokens | count range | mean count | mean norm | median norm |", "|---|---|---|---|---|---|"]
    lines += [f"| {b['bin']} | {b['tokens']} | {b['count_min']}-{b['count_max']} | {b['count_mean']:.1f} | "
              f"{b['norm_mean']:.4f} | {b['norm_median']:.4f} |" for b in fvn["bins"]]
    lines += ["", "## Word groups (HypLoRA README)", "", "| group | words (single tokens) | mean count | mean norm |",
              "|---|---|---|---|"]
    lines += [f"| {g['group']} | {', '.join(g['words']) or '-'} | {g['count_mean']:.1f} | {g['norm_mean']:.4f} |"
              for g in report["groups"]]
    if "disk" in report:
        lines += _disk_lines(report["disk"])
    how = "exact" if d["tokens"]["exact"] else f"lower bound from {d['tokens']['base_points']} base points"
    lines += ["", "## Delta-hyperbolicity", "",
              f"The {d['points']} most frequent tokens, {d['distance']} distances ({how}). Relative delta = "
              "2 delta / diameter (0: a tree).", "", "| point set | relative delta |", "|---|---|",
              f"| the tokens | {d['tokens']['relative_delta']:.4f} |"]
    for name, key in (("Gaussian, same mean and covariance", "gaussian_null"),
                      ("random other tokens of the table", "random_tokens_null")):
        lines.append(f"| null: {name} ({len(d[key]['draws'])} draws) | {d[key]['relative_delta_mean']:.4f} ± "
                     f"{d[key]['relative_delta_std']:.4f} |")
    lines += ["", "## Ollivier-Ricci curvature", ""]
    r = report["ricci"]
    if "unavailable" in r:
        lines.append(f"Not computed: {r['unavailable']}")
    else:
        lines += _ricci_lines(r)
    if report.get("experts", {}).get("layers"):
        lines += _expert_lines(report["experts"])
    return "\n".join(lines) + "\n"


def _disk_lines(disk: dict[str, Any]) -> list[str]:
    lines = ["", "## Poincaré disk", "", f"`disk.png`: the {disk['points']} most frequent tokens and the word groups' "
             f"single-token words. Map: {disk['map']}.", "", "| frequency ranks | counts | mean geodesic radius |",
             "|---|---|---|"]
    lines += [f"| {b['ranks'][0]}-{b['ranks'][1]} | {b['count_min']:,}-{b['count_max']:,} | {b['radius_mean']:.3f} |"
              for b in disk["bins"]]
    words = [f"{w['word']} ({w['group']}, rank {w['rank'] or 'unseen'}, radius {w['radius']:.2f})"
             for w in disk["words"]]
    lines += ["", "Labelled: " + (", ".join(words) or "none of the groups' words is a single token") + "."]
    if disk.get("html") is not None:
        lines += ["", "`disk.html`: the same disk, interactive (hover: the token, its frequency rank and count)."
                  if disk["html"] else f"No `disk.html`: {PLOTLY_MISSING}."]
    return lines


def _ricci_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"Edges of the {r['k']}-nearest-neighbour graph of the same tokens (alpha 0.5, exact transport).", "",
              "| point set | edges | mean | median | share negative | 10% / 90% quantiles |", "|---|---|---|---|---|---|"]
    for name, rows in (("the tokens", [r["tokens"]]), ("null: Gaussian, same moments", r["gaussian_null"])):
        m = {key: statistics.fmean(x[key] for x in rows) for key in ("edges", "mean", "median", "share_negative",
                                                                      "q10", "q90")}
        lines.append(f"| {name} | {m['edges']:.0f} | {m['mean']:.3f} | {m['median']:.3f} | {m['share_negative']:.2f} | "
                     f"{m['q10']:.3f} / {m['q90']:.3f} |")
    return lines


def _expert_lines(experts: dict[str, Any]) -> list[str]:
    lines = ["", "## Experts", "", f"Routed layers over {experts['tokens']:,} corpus tokens (evaluation mode): the share "
             "of routed choices per expert and, for MiCE, each expert's curvature. Load entropy: 1 when balanced, 0 "
             "when one expert takes every token.", "", "| layer | load per expert | curvature per expert | load entropy |",
             "|---|---|---|---|"]
    for name, e in experts["layers"].items():
        curvatures = ", ".join(f"{c:.3g}" for c in e["curvatures"]) if "curvatures" in e else "-"
        lines.append(f"| {name} | {', '.join(f'{x:.3f}' for x in e['load'])} | {curvatures} | "
                     f"{e['load_entropy']:.3f} |")
    return lines


def write_report(report: dict[str, Any], out_dir: str | Path, title: str, overwrite: bool = False) -> list[Path]:
    """``report.json``, ``report.md``, the PNG plots and, with plotly, the interactive ``disk.html`` in ``out_dir``
    (refused if it holds a report, unless ``overwrite``); returns the files written."""
    out = Path(out_dir)
    if (out / "report.json").exists() and not overwrite:
        raise DataError(f"{out} already holds a report; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    if "disk" in report:
        report["disk"] = dict(report["disk"], html="disk.html" if _plotly() else False)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (out / "report.json").write_text(json.dumps(public, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report, title))
    files = [out / "report.json", out / "report.md"]
    try:
        from helmlm.analysis.plots import plot_report
    except ImportError:  # matplotlib missing: the numbers are written all the same
        pass
    else:
        files += plot_report(report, out)
    if report.get("disk", {}).get("html"):
        from helmlm.analysis.interactive import write_disk_html

        files.append(write_disk_html(report, out / "disk.html"))
    return files


def _plotly() -> bool:
    try:
        import plotly.graph_objects  # noqa: F401
    except ImportError:
        return False
    return True
