"""Figures of routing statistics (matplotlib's Agg canvas; pyplot's global state is not used,
so plotting from a training process never touches a display or another figure)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def share_scale_max(experts: int) -> float:
    """Top of the load-share colour scale: 3× the uniform share 1/E (capped at 1). Fixed for a
    given E, so snapshots of one run, and runs with the same E, compare by eye; shares above it
    saturate (the printed numbers still say them)."""
    return min(1.0, 3.0 / experts)


def load_share_heatmap(layer_names: Sequence[str], panels: Sequence[tuple[str, np.ndarray]], title: str) -> Figure:
    """Heatmaps, one per (panel title, tokens [layers, experts] counts), of each expert's share
    of its layer's routed assignments (rows sum to 1; a balanced layer is 1/E everywhere), on
    the colour scale 0 … `share_scale_max(E)`."""
    shares = []
    for _, tokens in panels:
        totals = tokens.sum(axis=1, keepdims=True)
        shares.append(np.divide(tokens, totals, out=np.zeros_like(tokens, dtype=float), where=totals > 0))
    layers, experts = shares[0].shape
    top = share_scale_max(experts)
    width = max(5.0, 0.45 * experts + 2.5)
    figure = _figure(width * len(panels), max(2.5, 0.45 * layers + 1.5))
    axes = np.atleast_1d(figure.subplots(1, len(panels), squeeze=False)).flatten()
    for ax, (panel_title, _), share in zip(axes, panels, shares):
        image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        ax.set_xlabel("expert")
        ax.set_yticks(range(layers), layer_names)
        ax.set_xticks(range(experts) if experts <= 32 else np.linspace(0, experts - 1, 9).astype(int))
        if experts <= 16 and layers <= 24:  # numbers stay legible only on small grids
            for (row, col), value in np.ndenumerate(share):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < top / 2 else "black")
        ax.set_title(panel_title, fontsize=9)
    figure.colorbar(image, ax=list(axes), extend="max" if top < 1 else "neither").set_label(
        f"load share (uniform {1 / experts:.3g})", fontsize=8)
    figure.suptitle(title, fontsize=10)
    return figure


def active_experts_chart(layer_names: Sequence[str], mean: Sequence[float], p95: Sequence[float],
                         maximum: Sequence[float], target: Sequence[float], title: str) -> Figure:
    """Per layer: realised mean active experts per token (bar, whisker to p95, dot at max)
    against the target k_l (black tick)."""
    x = np.arange(len(layer_names))
    mean, p95, maximum, target = (np.asarray(v, dtype=float) for v in (mean, p95, maximum, target))
    figure = _figure(max(5.0, 0.6 * len(x) + 2.5), 3.4)
    ax = figure.add_subplot()
    ax.bar(x, mean, width=0.6, color="tab:blue", alpha=0.45, label="realised mean")
    ax.vlines(x, mean, p95, color="tab:blue", alpha=0.6, label="up to p95")
    ax.scatter(x, maximum, marker="^", color="tab:blue", s=14, label="max")
    ax.scatter(x, target, marker="_", color="black", s=400, linewidths=2, label="target k_l", zorder=3)
    ax.set_xticks(x, layer_names, rotation=45 if len(x) > 8 else 0)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("active experts per token")
    # Head room above the tallest mark for the legend.
    ax.set_ylim(0, max(1.0, float(np.nanmax(np.concatenate([maximum, target])))) * 1.4)
    ax.legend(fontsize=7, loc="upper right", ncols=4)
    ax.set_title(title, fontsize=9)
    return figure


def kappa_histograms(layer_names: Sequence[str], samples: Sequence[np.ndarray], max_scale: Sequence[float],
                     title: str, bins: int = 40) -> Figure:
    """One histogram per layer of κ over the sampled (pair, gate unit) entries, on a log axis
    spanning (1/U, U); κ = 1 is plain SwiGLU."""
    count = len(layer_names)
    cols = min(4, count)
    rows = -(-count // cols)
    figure = _figure(3.0 * cols, 2.3 * rows)
    axes = np.atleast_1d(figure.subplots(rows, cols, squeeze=False)).flatten()
    for ax, name, sample, scale in zip(axes, layer_names, samples, max_scale):
        edges = np.geomspace(1.0 / scale, scale, bins + 1) if scale > 1 else bins
        ax.hist(np.asarray(sample, dtype=float).ravel(), bins=edges, color="tab:purple")
        ax.set_xscale("log")
        if scale > 1:
            ax.set_xticks([1.0 / scale, 1.0, scale], [f"{1.0 / scale:.2g}", "1", f"{scale:.2g}"])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("κ", fontsize=8)
    for ax in axes[count:]:
        ax.set_visible(False)
    figure.suptitle(title)
    return figure


__all__ = ["share_scale_max", "load_share_heatmap", "active_experts_chart", "kappa_histograms"]
