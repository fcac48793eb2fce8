"""The PNG plots of a geometry report (matplotlib, the ``analysis`` extra): the frequency distribution with its
power-law fit, frequency against norm, delta beside its nulls, Ricci curvature beside its null, and a routed
model's expert loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_frequency(report: dict[str, Any], path: Path) -> Path:
    """Log-log complementary CDF of the token counts, P(count >= k), with the fitted power law above xmin (a
    straight line of slope 1 - alpha)."""
    counts = np.sort(report["_counts"][report["_counts"] > 0])
    values = np.unique(counts)
    ccdf = 1 - np.searchsorted(counts, values, side="left") / counts.size
    pl = report["power_law"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog(values, ccdf, ".", alpha=0.6, label="tokens (seen at least once)")
    tail = values >= pl["xmin"]
    if tail.any():
        x = values[tail]
        ax.loglog(x, ccdf[tail][0] * (x / x[0]) ** (1 - pl["alpha"]), "-",
                  label=f"power law, alpha = {pl['alpha']:.2f} (k >= {pl['xmin']:g})")
    ax.set_xlabel("count k (occurrences in the corpus)")
    ax.set_ylabel("share of tokens with count >= k")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_frequency_vs_norm(report: dict[str, Any], path: Path) -> Path:
    counts, norms = report["_counts"], report["_norms"]
    seen = counts > 0
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.semilogx(counts[seen], norms[seen], ".", ms=2, alpha=0.3, label="a token")
    bins = [b for b in report["frequency_vs_norm"]["bins"] if b["bin"] > 0]
    ax.semilogx([b["count_mean"] for b in bins], [b["norm_mean"] for b in bins], "o-", color="C3",
                label="mean of a frequency bin")
    ax.set_xlabel("count in the corpus")
    ax.set_ylabel("embedding norm" + (" (geodesic)" if report["geometry"].startswith("lorentz") else ""))
    ax.set_title(f"Spearman rho = {report['frequency_vs_norm']['spearman_rho']:.3f}")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_delta(report: dict[str, Any], path: Path) -> Path:
    d = report["delta"]
    names = ["tokens", "Gaussian null", "random-tokens null"]
    draws = [[d["tokens"]["relative_delta"]], *[[x["relative_delta"] for x in d[k]["draws"]]
                                                 for k in ("gaussian_null", "random_tokens_null")]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, values in enumerate(draws):
        ax.plot([i] * len(values), values, "o", alpha=0.7)
        ax.hlines(np.mean(values), i - 0.25, i + 0.25, color="k")
    ax.set_xticks(range(3), names)
    ax.set_ylabel("relative delta (2 delta / diameter)")
    ax.set_title(f"{d['points']} most frequent tokens, {d['distance']}")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_ricci(report: dict[str, Any], path: Path) -> Path:
    """Histograms of the edge curvatures: the tokens' k-NN graph and the Gaussian nulls' (all draws pooled)."""
    raw = report["_ricci"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    bins = np.linspace(min(raw["tokens"].min(), raw["gaussian_null"].min()),
                       max(raw["tokens"].max(), raw["gaussian_null"].max()), 40)
    ax.hist(raw["tokens"], bins=bins, density=True, alpha=0.6, label="tokens")
    ax.hist(raw["gaussian_null"], bins=bins, density=True, alpha=0.5, label="Gaussian null (pooled draws)")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"Ollivier-Ricci curvature of an edge ({report['ricci']['k']}-NN graph)")
    ax.set_ylabel("density")
    ax.legend()
    return _save(fig, path)


def plot_experts(report: dict[str, Any], path: Path) -> Path:
    """Expert loads as a layers x experts heat map; each cell gives the load and, for MiCE, the curvature."""
    layers = report["experts"]["layers"]
    loads = np.array([entry["load"] for entry in layers.values()])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * loads.shape[1], 1.2 + 0.55 * loads.shape[0]))
    image = ax.imshow(loads, cmap="viridis", vmin=0, aspect="auto")
    for i, entry in enumerate(layers.values()):
        for j, load in enumerate(entry["load"]):
            text = f"{load:.2f}" + (f"\nc={entry['curvatures'][j]:.2g}" if "curvatures" in entry else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if load < loads.max() / 2 else "k")
    ax.set_xticks(range(loads.shape[1]))
    ax.set_yticks(range(loads.shape[0]), [name.removeprefix("model.") for name in layers])
    ax.set_xlabel("expert")
    ax.set_title(f"share of routed tokens ({report['experts']['tokens']:,} corpus tokens)")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def plot_report(report: dict[str, Any], out: Path) -> list[Path]:
    files = [plot_frequency(report, out / "frequency.png"), plot_frequency_vs_norm(report, out / "frequency_norm.png"),
             plot_delta(report, out / "delta.png")]
    if report.get("_ricci"):
        files.append(plot_ricci(report, out / "ricci.png"))
    if report.get("experts", {}).get("layers"):
        files.append(plot_experts(report, out / "experts.png"))
    return files


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
