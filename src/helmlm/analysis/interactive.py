"""The interactive Poincaré disk of a geometry report (plotly, optional): ``disk.html``, the picture of
:func:`helmlm.analysis.plots.plot_disk` with each token's string, frequency rank and count on hover. The page embeds
plotly.js, so it opens offline."""

from __future__ import annotations

import html
import textwrap
from pathlib import Path
from typing import Any

import numpy as np


def hover_text(token: str, rank: int | None, count: int, radius: float) -> str:
    """What hovering a point shows: the token as a Python literal (spaces and newlines visible, HTML escaped), its
    frequency rank and count, and its geodesic distance to the origin."""
    return (f"{html.escape(repr(token), quote=False)}<br>rank {rank if rank else 'unseen'}, count {count:,}"
            f"<br>geodesic radius {radius:.3f}")


def write_disk_html(report: dict[str, Any], path: Path) -> Path:
    """``report["_disk"]`` as a plotly figure, one trace per rank bin and one per word group, written to ``path``."""
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale

    info, raw = report["disk"], report["_disk"]
    rim = info["disk_radius"]
    fig = go.Figure()
    fig.add_shape(type="circle", x0=-rim, y0=-rim, x1=rim, y1=rim, line={"color": "black", "width": 1})
    for d in range(1, 12):
        r = rim * np.tanh(d / (2 * rim))
        if r > 0.985 * rim:
            break
        fig.add_shape(type="circle", x0=-r, y0=-r, x1=r, y1=r, line={"color": "#999", "width": 0.6, "dash": "dash"})
    colors = sample_colorscale("Viridis", list(np.linspace(0, 0.9, len(info["bins"]))))
    for b in reversed(range(len(info["bins"]))):
        chosen = np.flatnonzero(raw["bin"] == b)
        lo, hi = info["bins"][b]["ranks"]
        fig.add_trace(go.Scatter(
            x=raw["xy"][chosen, 0], y=raw["xy"][chosen, 1], mode="markers", name=f"ranks {lo}-{hi}",
            marker={"color": colors[b], "size": 6}, hoverinfo="text",
            hovertext=[hover_text(raw["tokens"][i], int(raw["ranks"][i]), int(raw["counts"][i]),
                                  float(raw["radius"][i])) for i in chosen]))
    for group in dict.fromkeys(w["group"] for w in raw["words"]):
        words = [w for w in raw["words"] if w["group"] == group]
        fig.add_trace(go.Scatter(
            x=[w["xy"][0] for w in words], y=[w["xy"][1] for w in words], mode="markers+text", name=f"{group} words",
            text=[w["word"] for w in words], textposition="top right", hoverinfo="text",
            marker={"symbol": "circle-open", "size": 10, "color": "crimson", "line": {"width": 2}},
            hovertext=[f"{group}: " + hover_text(w["word"], w["rank"], w["count"], w["radius"]) for w in words]))
    fig.update_layout(
        title={"text": f"The {info['points']} most frequent tokens in the Poincaré disk<br><sup>"
                       + "<br>".join(textwrap.wrap(html.escape(info["map"]), 120)) + "</sup>", "font": {"size": 14}},
        width=900, height=900, template="plotly_white", xaxis={"visible": False, "range": [-1.05 * rim, 1.05 * rim]},
        yaxis={"visible": False, "range": [-1.05 * rim, 1.05 * rim], "scaleanchor": "x"})
    fig.write_html(path, include_plotlyjs=True)
    return path
