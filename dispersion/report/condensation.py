"""The embedding-condensation heatmap (papers 002 Fig. 2a / 003 Fig. 1) of
:class:`dispersion.measure.condensation.CondensationMap` objects."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from dispersion.core.errors import DataError
from dispersion.measure.condensation import (
    FIELD,
    CondensationMap,
    as_maps,
    depth_correlation,
)

__all__ = ["plot_condensation"]


def plot_condensation(maps: CondensationMap | Sequence[CondensationMap] | pa.Table,
                      path: str | os.PathLike | None = None, *, cols: int = 4, log_scale: bool = False,
                      title: str = "Embedding condensation: token cosine similarity per layer") -> bytes:
    """Heatmaps like papers 002 Fig. 2a / 003 Fig. 1: one panel per model@revision/label, side
    by side (``cols`` per row), layers on y (depth upwards), similarity bins on x, colour =
    density on one shared scale (``log_scale``: logarithmic; one colour bar); the panel title
    gives Spearman's rho (with p and n layers) and Kendall's tau of the layer mean with depth,
    the mean is marked per layer. Maps from a table are grouped by model (first appearance),
    then revision by step. Returns the PNG bytes with the same figure as SVG
    (:class:`dispersion.report.figures.FigureBytes`); also written to ``path`` if given (PNG;
    SVG when it ends in ``.svg``)."""
    from matplotlib.colors import LogNorm, Normalize

    from dispersion.core.ids import revision_order
    from dispersion.report.figures import Figure, Rho, write_figure

    ms = as_maps(maps)
    if not ms:
        raise DataError(f"{FIELD}: nothing to plot (no condensation maps)")
    if isinstance(maps, pa.Table):
        first = {m.model: i for i, m in reversed(list(enumerate(ms)))}
        ms = sorted(ms, key=lambda m: (first[m.model], revision_order(m.revision)))
    dens = [m.density for m in ms]
    vmax = max(float(d.max()) for d in dens) or 1.0
    norm: Normalize
    if log_scale:
        pos = [float(d[d > 0].min()) for d in dens if (d > 0).any()]
        norm = LogNorm(vmin=min(pos) if pos else 1e-3, vmax=vmax)
    else:
        norm = Normalize(vmin=0.0, vmax=vmax)
    ncols = max(1, min(cols, len(ms)))
    nrows = -(-len(ms) // ncols)
    fig = Figure(nrows, ncols, width=3.5, height=max(2.6, 0.12 * max(len(m.layers) for m in ms) + 1.6))
    im = None
    for i, (m, d) in enumerate(zip(ms, dens)):
        ax = fig.ax(i // ncols, i % ncols)
        shown = np.where(d > 0, d, np.nan) if log_scale else d
        im = ax.imshow(shown, origin="lower", aspect="auto", interpolation="nearest", cmap="magma", norm=norm,
                       extent=(float(m.edges[0]), float(m.edges[-1]), -0.5, len(m.layers) - 0.5))
        ax.plot(m.mean, np.arange(len(m.layers)), color="cyan", lw=0.8, marker="o", ms=2,
                label="mean similarity per layer")
        step = max(1, -(-len(m.layers) // 14))
        ticks = [k for k in range(len(m.layers)) if k % step == 0 or k == len(m.layers) - 1]
        ax.set_yticks(ticks, [m.layers[k] for k in ticks])
        ax.set_xticks(np.linspace(float(m.edges[0]), float(m.edges[-1]), 5))
        try:
            c = depth_correlation(m)
            stats_line = (Rho(c["spearman_r"], c["spearman_p"], int(c["n_layers"])).text()
                          + f" layers, τ = {c['kendall_tau']:+.2f}".replace("-", "−"))
        except DataError:
            stats_line = "ρ, τ: < 3 layers"
        Figure.style(ax, f"{m.title()}\n{stats_line}", "cosine similarity", "layer")
    for j in range(len(ms), nrows * ncols):
        fig.off(fig.ax(j // ncols, j % ncols))
    if im is not None:
        fig.colorbar(im, [a for row in fig.axes for a in row if a.get_visible()],
                     "density" + (" (log scale)" if log_scale else ""))
    fig.legend(loc="outside lower center")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        png = fig.render(title)
    if path is not None:
        write_figure(png, path)
    return png
