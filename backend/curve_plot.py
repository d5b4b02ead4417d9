"""The learning curve as a PNG: mAP and AP50 against labeled images, one point per round, and the fitted
forecast curve when there is one.

Drawn with matplotlib's object API on an Agg canvas (no pyplot: no global state, safe in threads, no
display needed). matplotlib is imported inside the function so importing this module costs nothing.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def render_curve_png(
    labels: Sequence[int | None],
    maps: Sequence[float | None],
    ap50s: Sequence[float | None],
    *,
    title: str,
    fit: Mapping[str, Any] | None = None,
    horizon: int = 0,
) -> bytes:
    """PNG bytes of the curve. Rounds without a label count or a metric are left out of that line; `fit`
    is a forecast's `params` ({"a", "b", "c", "n_ref"}), drawn dashed up to `horizon` labels past the last
    round."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for values, name, style in ((maps, "mAP", "o-"), (ap50s, "AP50", "s-")):
        points = [(n, v) for n, v in zip(labels, values, strict=True) if n is not None and v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, style, label=name, markersize=4)
    known = [n for n in labels if n is not None]
    if fit and known:
        n = np.linspace(min(known), max(known) + max(horizon, 1), 100)
        curve = fit["a"] - fit["b"] * (n / fit["n_ref"]) ** (-fit["c"])
        axes.plot(n, curve, "--", color="grey", label="mAP fit")
        axes.axhline(fit["a"], color="grey", linewidth=0.5, label="fitted plateau")
    if not known:
        axes.text(0.5, 0.5, "no rounds yet", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("labeled images")
    axes.set_ylabel("validation metric")
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
