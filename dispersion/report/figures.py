"""The one figure style of the package (matplotlib, Agg backend). Every figure is drawn on a
:class:`Figure` and rendered by :meth:`Figure.render`, so all figures look alike:

* a grid of panels in constrained layout: the title never overlaps the panels' titles;
* one tick style, fonts and a light grid on every panel; log axes labelled with round plain
  numbers (1-2-5, 1-3 or decades by span), the same way on every panel;
* one legend per figure, outside the panel grid (:meth:`Figure.legend`), never on the data;
* colours: :func:`revision_colors` (viridis without its faint yellow end) for checkpoints in
  training order, :func:`category_colors` (tab10) for models, splits and methods;
* :meth:`Figure.annotate` writes Spearman's rho, its p-value and n (:func:`spearman`, the
  scipy call of the correlation tables) in a corner of a panel free of data;
* :meth:`Figure.render` gives the PNG (150 dpi) with the same figure as SVG beside it
  (:class:`FigureBytes`); :func:`figure_files` names both for publishing to a store
  (``results/report/{run}/{name}.png`` and ``.svg``), :func:`write_figure` writes one to a path.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dispersion.core.ids import revision_order

DPI = 150
SEQUENTIAL = "viridis"
SEQUENTIAL_RANGE = (0.0, 0.8)  # the colormap's last 20 % (pale yellow-green) is hard to see on white
CATEGORICAL = "tab10"
FONT = {"title": 9.0, "label": 8.0, "tick": 7.0, "legend": 7.5, "note": 6.5, "suptitle": 10.5}
TICKS: dict[str, Any] = {"direction": "out", "length": 3.0, "width": 0.6, "pad": 2.0, "labelsize": FONT["tick"]}
GRID: dict[str, Any] = {"color": "#e3e3e3", "linewidth": 0.5}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # with colour, so that series differ without it too
NOTE_GID = "spearman"  # the gid of every rho/p/n annotation (searchable in the SVG)


def rows_of(table: pa.Table, **eq) -> list[dict]:
    """Rows of ``table`` whose columns equal the given values."""
    return [r for r in table.to_pylist() if all(r.get(k) == v for k, v in eq.items())]


def sequential_colors(n: int, cmap: str = SEQUENTIAL) -> list[tuple]:
    """``n`` colours in order along ``cmap`` within :data:`SEQUENTIAL_RANGE`."""
    import matplotlib

    colormap = matplotlib.colormaps[cmap]
    lo, hi = SEQUENTIAL_RANGE
    return [colormap(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]


def revision_colors(revisions: Iterable[str], cmap: str = SEQUENTIAL) -> dict[str, tuple]:
    """One colour per revision, ordered by training step (first: dark, last: green, never pale)."""
    revs = sorted(set(revisions), key=revision_order)
    return dict(zip(revs, sequential_colors(len(revs), cmap)))


def category_colors(names: Iterable[Any]) -> dict[Any, tuple]:
    """One distinct colour per name (tab10, in the given order; cycles past ten)."""
    import matplotlib

    colormap = matplotlib.colormaps[CATEGORICAL]
    return {n: colormap(i % 10) for i, n in enumerate(dict.fromkeys(names))}


class FigureBytes(bytes):
    """A rendered figure: the PNG bytes themselves, with the same figure as SVG in ``svg``."""

    svg: bytes | None

    def __new__(cls, png: bytes, svg: bytes | None = None) -> FigureBytes:
        obj = super().__new__(cls, png)
        obj.svg = svg
        return obj


def figure_files(figure: bytes) -> dict[str, bytes]:
    """The files of a rendered figure by extension: ``png``, and ``svg`` when it has one."""
    out = {"png": bytes(figure)}
    svg = getattr(figure, "svg", None)
    if svg:
        out["svg"] = svg
    return out


def write_figure(figure: bytes, path: str | os.PathLike) -> str:
    """Write a rendered figure to a local path or fsspec URL: SVG when the path ends in
    ``.svg``, else the PNG. Returns the path."""
    import fsspec

    data = bytes(figure)
    if str(path).lower().endswith(".svg"):
        svg = getattr(figure, "svg", None)
        if not svg:
            raise ValueError(f"{path}: this figure was rendered without an SVG")
        data = svg
    fs, target = fsspec.core.url_to_fs(str(path))
    parent = target.rsplit("/", 1)[0] if "/" in target else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(target, "wb") as fh:
        fh.write(data)
    return str(path)


@dataclass(frozen=True)
class Rho:
    """Spearman's rho of one series, its two-sided p-value and the number of points."""

    rho: float
    p: float
    n: int
    low: float | None = None   # its interval (bootstrap, see dispersion.measure.bootstrap), if any
    high: float | None = None

    def text(self) -> str:
        p = "p < 0.001" if self.p < 1e-3 else f"p = {self.p:.2g}" if math.isfinite(self.p) else "p = nan"
        ci = f" [{self.low:+.2f}, {self.high:+.2f}]" if self.low is not None and self.high is not None else ""
        return f"ρ = {self.rho:+.2f}{ci}, {p}, n = {self.n}".replace("-", "−")


def spearman(x: Sequence[float], y: Sequence[float]) -> Rho | None:
    """Spearman's rho of paired values (the same scipy call as the correlation tables);
    ``None`` when undefined (fewer than 3 finite pairs, or a constant side)."""
    from dispersion.measure.binning import correlations

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None
             and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None
    try:
        c = correlations([p[0] for p in pairs], [p[1] for p in pairs])
    except ValueError:
        return None
    return Rho(float(c["spearman_r"]), float(c["spearman_p"]), int(c["n"]))


class Figure:
    """A rows x cols grid of panels in the package's one style (see the module docstring).

    Draw on :meth:`ax`, finish each panel with :meth:`style`, add :meth:`annotate` where a
    panel shows a correlation, one :meth:`legend` (or :meth:`colorbar`) for the figure, then
    :meth:`render`.
    """

    def __init__(self, rows: int, cols: int, width: float = 3.4, height: float = 2.6):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.layout_engine import ConstrainedLayoutEngine

        self.plt = plt
        rows, cols = max(rows, 1), max(cols, 1)
        self.fig = plt.figure(figsize=(width * cols, height * rows),
                              layout=ConstrainedLayoutEngine(w_pad=0.04, h_pad=0.04, hspace=0.04, wspace=0.03))
        self.axes = self.fig.subplots(rows, cols, squeeze=False)
        self._notes: list[tuple[Any, Any]] = []

    def ax(self, row: int, col: int):
        return self.axes[row][col]

    def twin(self, ax):
        """A second y axis on the right of ``ax`` (its lines join the figure's legend)."""
        ax2 = ax.twinx()
        ax2.grid(False)
        return ax2

    @staticmethod
    def style(ax, title: str, xlabel: str, ylabel: str, *, logx: bool = False, logy: bool = False) -> None:
        """Title and axis labels of a panel; ``logx``/``logy``: a log axis."""
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)

    def off(self, ax) -> None:
        """Hide a panel of the grid that has nothing to show."""
        ax.set_visible(False)

    def annotate(self, ax, rhos: Sequence[tuple[str | None, Any, Rho | None]]) -> None:
        """Spearman's rho, p and n of the panel's series, one line each as ``(label, colour,
        Rho)`` (label ``None``: the colour alone names the series), in a corner of the panel
        free of data once the figure is drawn (the y range grows to make room when none is)."""
        from matplotlib.offsetbox import AnchoredOffsetbox, TextArea, VPacker

        lines = [(label, color, r) for label, color, r in rhos if r is not None]
        if not lines:
            return
        areas: list[Any] = [TextArea(f"{label}: {r.text()}" if label else r.text(),
                                     textprops={"color": color or "black", "fontsize": FONT["note"]})
                            for label, color, r in lines]
        box = AnchoredOffsetbox(loc="upper left", child=VPacker(children=areas, align="left", pad=0, sep=1),
                                pad=0.25, borderpad=0.35, frameon=True)
        box.patch.set(facecolor="white", edgecolor="#bbbbbb", alpha=0.85, linewidth=0.5,
                      boxstyle="round,pad=0.2,rounding_size=0.2")
        box.set_gid(NOTE_GID)
        box.set_zorder(10)
        top = self._stacked(ax)[-1]  # drawn above a twin axis' lines
        top.add_artist(box)
        self._notes.append((ax, box))

    def legend(self, title: str | None = None, *, handles: Sequence | None = None,
               labels: Sequence[str] | None = None, ncol: int | None = None, loc: Any = "outside lower center"):
        """The figure's one legend, outside the panel grid: every labelled series of every
        panel once (first appearance), or the ``handles``/``labels`` given."""
        if handles is None:
            seen: dict[str, Any] = {}
            for a in self.fig.axes:
                for h, lab in zip(*a.get_legend_handles_labels()):
                    if lab and not lab.startswith("_") and lab not in seen:
                        seen[lab] = h
            handles, labels = list(seen.values()), list(seen)
        labels = list(labels if labels is not None else [h.get_label() for h in handles])
        if not handles:
            return None
        if ncol is None:
            width = self.fig.get_figwidth()
            longest = max(len(lab) for lab in labels)
            ncol = 1 if "right" in loc else max(1, min(len(labels), int(width * 16 / (longest + 6))))
        return self.fig.legend(list(handles), labels, loc=loc, ncol=ncol, title=title, fontsize=FONT["legend"],
                               title_fontsize=FONT["legend"], frameon=False, handlelength=1.8, columnspacing=1.2)

    def colorbar(self, mappable, axes: Sequence, label: str, **kw):
        """One colour bar for the given panels (e.g. layer depth, density)."""
        cb = self.fig.colorbar(mappable, ax=list(axes), **{"shrink": 0.9, "aspect": 30, "pad": 0.01, **kw})
        cb.set_label(label, fontsize=FONT["label"])
        cb.ax.tick_params(**TICKS)
        return cb

    def render(self, title: str) -> FigureBytes:
        """The figure with its title as PNG (:data:`DPI`) and SVG; closes it."""
        import matplotlib

        try:
            self.fig.suptitle(title, fontsize=FONT["suptitle"])
            self._finish()
            self._fit_width()
            with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dispersion"}):
                png, svg = io.BytesIO(), io.BytesIO()
                self.fig.savefig(png, format="png", dpi=DPI)
                self.fig.savefig(svg, format="svg", metadata={"Date": None})
            return FigureBytes(png.getvalue(), svg.getvalue())
        finally:
            self.plt.close(self.fig)

    # -- inside ----------------------------------------------------------------------------

    def _stacked(self, ax) -> list:
        """``ax`` and its twins (axes on the same grid cell), in drawing order."""
        spec = ax.get_subplotspec()
        if spec is None:
            return [ax]
        return [a for a in self.fig.axes if a is ax or a.get_subplotspec() == spec]

    def _finish(self) -> None:
        import matplotlib.ticker

        cells: set = set()
        for a in self.fig.axes:
            if a.get_subplotspec() is None:  # a colour bar
                continue
            a.get_xlim(), a.get_ylim()  # autoscale now: ticks and corners below read the limits
            a.tick_params(which="both", **TICKS)
            a.tick_params(which="minor", length=TICKS["length"] * 0.6)
            a.title.set_fontsize(FONT["title"])
            a.xaxis.label.set_fontsize(FONT["label"])
            a.yaxis.label.set_fontsize(FONT["label"])
            for spine in a.spines.values():
                spine.set_linewidth(0.6)
            spec = a.get_subplotspec()
            key = None if spec is None else (spec.rowspan, spec.colspan)
            first = key not in cells
            cells.add(key)
            if first and not a.images:
                a.grid(True, which="major", **GRID)
                a.set_axisbelow(True)
            else:
                a.grid(False)
            for axis, scale in ((a.xaxis, a.get_xscale()), (a.yaxis, a.get_yscale())):
                if scale == "log":
                    _log_ticks(axis, matplotlib.ticker)
        if self._notes:
            self._place_notes()

    def _renderer(self) -> Any:
        return self.fig.canvas.get_renderer()  # type: ignore[attr-defined]  # Agg canvas

    def _fit_width(self) -> None:
        """Widen the figure until no title or label runs past its left or right edge (constrained
        layout keeps panels apart but does not grow the canvas)."""
        if not self._notes:
            self.fig.canvas.draw()  # else drawn by _place_notes
        for _ in range(3):
            tight = self.fig.get_tightbbox(self._renderer())  # inches
            width = self.fig.get_figwidth()
            over = max(-tight.x0, tight.x1 - width, 0.0)
            if over < 0.02:
                return
            self.fig.set_figwidth(width + 2 * over + 0.1)
            self.fig.canvas.draw()

    def _place_notes(self) -> None:
        """Each annotation in an empty corner of its panel; where every corner holds data, the
        y range grows by the box's height and the box goes above the data."""
        self.fig.canvas.draw()  # lays the figure out: boxes and panels have their sizes
        renderer = self._renderer()
        grown = False
        for ax, box in self._notes:
            stacked = self._stacked(ax)
            panel = ax.get_window_extent(renderer)
            ext = box.get_window_extent(renderer)
            w = min(ext.width / panel.width + 0.05, 1.0)  # a margin: markers have a size
            h = min(ext.height / panel.height + 0.06, 0.6)
            counts = _corner_counts(stacked, w, h)
            corner = min(counts, key=lambda c: counts[c])
            if counts[corner]:
                for a in stacked:
                    _grow_top(a, h)
                counts = _corner_counts(stacked, w, h)
                corner = min(("upper left", "upper right"), key=lambda c: counts[c])
                grown = True
            box.loc = _CORNERS[corner]
        if grown:
            self._log_ticks_all()  # the grown ranges may want other ticks (drawn when saved)

    def _log_ticks_all(self) -> None:
        import matplotlib.ticker

        for a in self.fig.axes:
            if a.get_subplotspec() is None:
                continue
            for axis, scale in ((a.xaxis, a.get_xscale()), (a.yaxis, a.get_yscale())):
                if scale == "log":
                    _log_ticks(axis, matplotlib.ticker)


def _log_ticks(axis, ticker) -> None:
    """Plain-number labels at 1-2-5 (or fewer, over many decades) on a log axis, the same on
    every panel whatever its span."""
    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and hi > lo):
        return
    decades = math.log10(hi / lo)
    if decades > 0.4:
        subs = ((1.0,) if decades > 3 else (1.0, 3.0) if decades > 1.5
                else (1.0, 2.0, 5.0) if decades > 1 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0))
        axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    else:  # a narrow range: a few evenly spaced round numbers
        axis.set_major_locator(ticker.MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(ticker.FuncFormatter(_tick_label))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(1.0, 10.0)))
    axis.set_minor_formatter(ticker.NullFormatter())


def _tick_label(v: float, _pos=None) -> str:
    """Plain numbers (``20``, ``1500``); powers of ten from 10^4 on (and below 10^-3) as 10^k."""
    if v > 0 and (v >= 1e4 or v < 1e-3):
        k = math.log10(v)
        if abs(k - round(k)) < 1e-9:
            return f"$10^{{{round(k)}}}$"
    return f"{v:g}"


_CORNERS = {"upper left": 2, "upper right": 1, "lower right": 4, "lower left": 3}  # matplotlib loc codes


def _grow_top(ax, h: float) -> None:
    """Raise the top of the y range so the data fill the lower ``1 - h`` of the panel."""
    lo, hi = ax.get_ylim()
    if ax.get_yscale() == "log" and lo > 0 and hi > 0:
        ax.set_ylim(lo, 10 ** (math.log10(lo) + (math.log10(hi) - math.log10(lo)) / (1 - h)))
    else:
        ax.set_ylim(lo, lo + (hi - lo) / (1 - h))


def _corner_counts(axes: Sequence, width: float, height: float) -> dict[str, int]:
    """Per corner of a panel (and its twins): the plotted points, points along line segments
    and bar corners under a box of this size (axes fraction)."""
    from matplotlib.collections import LineCollection, PathCollection

    pts = []
    for a in axes:
        to_axes = a.transData + a.transAxes.inverted()
        for line in a.get_lines():
            xy = np.asarray(line.get_xydata(), dtype=np.float64)
            if line.get_linestyle() not in ("None", "", " ") and len(xy) > 1:  # a segment crossing counts too
                t = np.linspace(0, 1, 12)[:, None, None]
                xy = (xy[:-1][None] * (1 - t) + xy[1:][None] * t).reshape(-1, 2)
            if len(xy):
                pts.append(to_axes.transform(xy))
        for coll in a.collections:
            if isinstance(coll, PathCollection):  # scatter markers
                xy = np.asarray(coll.get_offsets(), dtype=np.float64).reshape(-1, 2)
            elif isinstance(coll, LineCollection):  # error bars, vlines
                xy = np.concatenate([np.asarray(seg, np.float64).reshape(-1, 2) for seg in coll.get_segments()]
                                    or [np.zeros((0, 2))])
            else:
                continue
            if len(xy):
                pts.append(to_axes.transform(xy))
        for patch in a.patches:  # bars: their top corners and middle
            bb = patch.get_bbox()
            top = [[bb.x0, bb.y1], [bb.x1, bb.y1], [(bb.x0 + bb.x1) / 2, bb.y1], [bb.x0, bb.y0], [bb.x1, bb.y0]]
            pts.append(to_axes.transform(np.array(top)))
    xy = np.concatenate(pts) if pts else np.zeros((0, 2))
    xy = xy[np.isfinite(xy).all(axis=1)]
    regions = {"upper left": (0, 1 - height, width, 1), "upper right": (1 - width, 1 - height, 1, 1),
               "lower right": (1 - width, 0, 1, height), "lower left": (0, 0, width, height)}
    return {c: int(((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)).sum())
            for c, (x0, y0, x1, y1) in regions.items()}
