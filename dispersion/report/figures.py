"""Shared plotting helpers (matplotlib, Agg backend): a grid of panels, one colour per
revision ordered by training step, PNG bytes out. Each analysis module draws its own figure
with these, so all figures look alike."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable

import pyarrow as pa

from dispersion.core.ids import revision_order


def rows_of(table: pa.Table, **eq) -> list[dict]:
    """Rows of ``table`` whose columns equal the given values."""
    return [r for r in table.to_pylist() if all(r.get(k) == v for k, v in eq.items())]


def revision_colors(revisions: Iterable[str], cmap: str = "viridis") -> dict[str, tuple]:
    import matplotlib

    revs = sorted(set(revisions), key=revision_order)
    colormap = matplotlib.colormaps[cmap]
    return {r: colormap(i / max(len(revs) - 1, 1)) for i, r in enumerate(revs)}


class Figure:
    """A rows x cols grid of panels."""

    def __init__(self, rows: int, cols: int, width: float = 4.2, height: float = 3.2):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.fig, self.axes = plt.subplots(max(rows, 1), max(cols, 1), squeeze=False,
                                           figsize=(width * max(cols, 1), height * max(rows, 1)))

    def ax(self, row: int, col: int):
        return self.axes[row][col]

    @staticmethod
    def style(ax, title: str, xlabel: str, ylabel: str, *, logx: bool = False, legend: bool = True) -> None:
        import matplotlib.ticker

        if logx:
            ax.set_xscale("log")
            lo, hi = ax.get_xlim()
            if hi > 10 * lo:  # a decade tick is visible: label decades only
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            else:             # narrower than a decade: plain labels on the minor ticks
                ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)

    def png(self, title: str) -> bytes:
        self.fig.suptitle(title, fontsize=10)
        self.fig.tight_layout()
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=100)
        self.plt.close(self.fig)
        return buf.getvalue()


def png_of(plot, *args, **kwargs) -> bytes:
    """Bytes of a PNG that ``plot(..., path)`` writes to a file."""
    fd, tmp = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    try:
        plot(*args, tmp, **kwargs)
        with open(tmp, "rb") as fh:
            return fh.read()
    finally:
        os.remove(tmp)
