"""The PNG plots of a geometry report (matplotlib, the ``analysis`` extra): the frequency distribution with its
power-law fit, frequency against norm, delta beside its nulls, Ricci curvature beside its null, a routed
model's expert loads, and the most frequent tokens in the Poincaré disk."""

from __future__ import annotations

import textwrap
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


GROUP_MARKERS = {"G1": "s", "G2": "^", "G3": "D", "G4": "*"}


def plot_disk(report: dict[str, Any], path: Path) -> Path:
    """The tokens of ``report["_disk"]`` in the Poincaré disk, coloured by frequency-rank bin (most frequent
    darkest, drawn on top), with dashed circles of geodesic radius 1, 2, ... and the word groups' words labelled.
    The title names the map (:func:`helmlm.analysis.disk.describe_map`)."""
    info, raw = report["disk"], report["_disk"]
    rim = info["disk_radius"]
    fig, ax = plt.subplots(figsize=(7.2, 7.8))
    ax.add_patch(plt.Circle((0, 0), rim, fill=False, color="k", lw=1))
    for d in range(1, 12):
        r = rim * np.tanh(d / (2 * rim))
        if r > 0.985 * rim:
            break
        ax.add_patch(plt.Circle((0, 0), r, fill=False, color="0.6", lw=0.6, ls="--"))
        ax.text(0, r, f"d = {d}", fontsize=6, color="0.35", ha="center", va="center",
                bbox={"fc": "white", "ec": "none", "alpha": 0.7, "pad": 0.5})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(info["bins"])))
    for b in reversed(range(len(info["bins"]))):
        lo, hi = info["bins"][b]["ranks"]
        xy = raw["xy"][raw["bin"] == b]
        ax.plot(xy[:, 0], xy[:, 1], "o", ms=3.5, alpha=0.8, color=colors[b], mec="none",
                label=f"ranks {lo}-{hi} (count {info['bins'][b]['count_min']:,}-{info['bins'][b]['count_max']:,})")
    for group, marker in GROUP_MARKERS.items():
        words = [w for w in raw["words"] if w["group"] == group]
        if not words:
            continue
        xy = np.array([w["xy"] for w in words])
        ax.plot(xy[:, 0], xy[:, 1], marker, ms=7, mfc="none", mec="C3", mew=1.2, label=f"{group} words")
    _label_words(ax, raw["words"], rim)
    ax.set_xlim(-1.03 * rim, 1.03 * rim)
    ax.set_ylim(-1.03 * rim, 1.03 * rim)
    ax.set_aspect("equal")
    ax.axis("off")
    handles, labels = ax.get_legend_handles_labels()
    bins = len(info["bins"])  # drawn least frequent first (so the frequent ones lie on top), listed the other way
    order = [*reversed(range(bins)), *range(bins, len(handles))]
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=6.5, loc="upper left",
              bbox_to_anchor=(-0.02, 1.02), framealpha=0.85)
    ax.set_title(f"The {info['points']} most frequent tokens in the Poincaré disk\n"
                 + "\n".join(textwrap.wrap(f"Map: {info['map']}.", 95)), fontsize=8)
    return _save(fig, path)


def _label_words(ax, words: list[dict[str, Any]], rim: float) -> None:
    """Each word beside its point, one line lower (with a leader line) while it would overlap a label already
    placed."""
    placed: list[tuple[float, float]] = []
    for w in words:
        x, y = w["xy"]
        line = 0
        while any(abs(x - px) < 0.14 * rim and abs(y - 0.035 * rim * line - py) < 0.03 * rim for px, py in placed):
            line += 1
        placed.append((x, y - 0.035 * rim * line))
        ax.annotate(w["word"], (x, y), xytext=(4, 2 - 8.5 * line), textcoords="offset points", fontsize=7,
                    color="C3", va="center", arrowprops={"arrowstyle": "-", "color": "C3", "lw": 0.4, "alpha": 0.6,
                                                         "shrinkA": 0, "shrinkB": 3} if line else None)


def plot_report(report: dict[str, Any], out: Path) -> list[Path]:
    files = [plot_frequency(report, out / "frequency.png"), plot_frequency_vs_norm(report, out / "frequency_norm.png"),
             plot_delta(report, out / "delta.png")]
    if report.get("_ricci"):
        files.append(plot_ricci(report, out / "ricci.png"))
    if report.get("experts", {}).get("layers"):
        files.append(plot_experts(report, out / "experts.png"))
    if report.get("_disk"):
        files.append(plot_disk(report, out / "disk.png"))
    return files


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
