"""The one figure style (dispersion.report.figures): every figure of the package renders to a
PNG and an SVG of the same figure, with one legend outside the panel grid, no empty panel,
titles clear of each other, and Spearman's rho, p and n on panels that show a correlation."""

import io
import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from conftest import exact_p
from scipy.stats import spearmanr

from dispersion.analyses.bins import BIN_SCHEMA
from dispersion.analyses.clusters import figure_clusters, plot_clusters
from dispersion.measure.clusters import CLUSTERS_SCHEMA
from dispersion.analyses.context import CONTEXT_BIN_SCHEMA, plot_context
from dispersion.analyses.domains import plot_domains
from dispersion.analyses.gap import figure_gap, plot_gap
from dispersion.analyses.heldout import plot_heldout
from dispersion.analyses.layers import layer_table, plot_layers
from dispersion.analyses.registry import Section, publish_section
from dispersion.analyses.trajectory import plot_trajectory
from dispersion.analyses.vendi import plot_vendi
from dispersion.core.layout import figure_path
from dispersion.core.storage import Store
from dispersion.measure.binning import correlations
from dispersion.measure.condensation import CondensationMap
from dispersion.measure.gap import GAP_SCHEMA
from dispersion.report import figures as F
from dispersion.report.condensation import plot_condensation
from dispersion.report.markdown import plot_bins, publish_report
from dispersion.training.finetune import FINETUNE_SCHEMA, figure_finetune
from dispersion.training.sweep import plot_sweep

PNG = b"\x89PNG\r\n\x1a\n"


# -- synthetic tables ---------------------------------------------------------------------------

def _bins(models=(("gpt2-tiny", ("step0", "step30", "step300")), ("llama-small", ("step0", "step300"))),
          datasets=("code", "code-test"), layers=("0", "1", "final"), n_bins=8, vendi=True,
          seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for model, revs in models:
        for rev in revs:
            for ds in datasets:
                for layer in layers:
                    for scope, pool in (("across", "last"), ("across", "mean"), ("within", "tokens")):
                        ppl = np.sort(rng.lognormal(4, 1, n_bins))
                        disp = 0.5 + 0.05 * np.log(ppl) + rng.normal(0, 0.02, n_bins)
                        for b in range(n_bins):
                            rows.append({"model": model, "revision": rev, "dataset": ds, "sample": "s", "spec": "x",
                                         "layer": layer, "site": "block", "pool": pool, "scope": scope, "bin": b,
                                         "n": 10, "mean_ppl": float(ppl[b]), "median_ppl": float(ppl[b]),
                                         "dispersion": float(disp[b]),
                                         "vendi": float(3 + disp[b] * 4) if vendi and scope == "across" else None,
                                         "selected": b % 2 == 0})
    return pa.Table.from_pylist(rows, schema=BIN_SCHEMA)


def _corr(bins: pa.Table) -> pa.Table:
    groups: dict[tuple, list] = {}
    for r in bins.to_pylist():
        groups.setdefault(tuple(r[k] for k in ("model", "revision", "dataset", "sample", "spec", "layer", "site",
                                              "pool", "scope")), []).append(r)
    out = []
    for key, rs in groups.items():
        c = correlations([r["mean_ppl"] for r in rs], [r["dispersion"] for r in rs])
        out.append(dict(zip(("model", "revision", "dataset", "sample", "spec", "layer", "site", "pool", "scope"), key),
                        bins="all", n_bins=c["n"], pearson_r=c["pearson_r"], pearson_p=c["pearson_p"],
                        spearman_r=c["spearman_r"], spearman_p=c["spearman_p"]))
    return pa.Table.from_pylist(out)


def _context_bins() -> pa.Table:
    rng = np.random.default_rng(1)
    rows = []
    for rev in ("step0", "step300"):
        for c in (16, 64):
            for alignment in ("segment", "next"):
                ppl = np.sort(rng.lognormal(3, 2, 6))
                for b in range(6):
                    rows.append({"model": "gpt2-tiny", "revision": rev, "dataset": "prose", "sample": "s", "spec": "x",
                                 "layer": "final", "site": "block", "pool": f"c{c}", "scope": "across", "bin": b,
                                 "n": 10, "mean_ppl": float(ppl[b]), "median_ppl": float(ppl[b]),
                                 "dispersion": float(rng.uniform(0.2, 0.9)), "vendi": None, "selected": True,
                                 "context": c, "alignment": alignment})
    return pa.Table.from_pylist(rows, schema=CONTEXT_BIN_SCHEMA)


def _gap() -> pa.Table:
    rows = []
    for model in ("gpt2-tiny", "llama-small"):
        for k, rev in enumerate(("step0", "step300")):
            for dom in ("digits", "python"):
                for metric in ("cosine", "euclidean"):
                    rows.append({"model": model, "revision": rev, "step": int(rev[4:]), "domain": dom,
                                 "reference": "everyday", "metric": metric, "n_domain": 10, "n_reference": 30,
                                 "within": 0.5 + 0.1 * k, "reference_within": 0.4, "between": 0.6, "gap": 1.1 + 0.2 * k,
                                 "within_se": 0.01, "reference_within_se": 0.01, "between_se": 0.01, "tied": True})
    return pa.Table.from_pylist(rows, schema=GAP_SCHEMA)


def _clusters() -> pa.Table:
    rows = []
    for model in ("gpt2-tiny", "llama-small"):
        for k, step in enumerate((0, 30, 100, 300)):
            rows.append({"model": model, "revision": f"step{step}", "step": step, "dataset": "code", "layer": "final",
                         "site": "block", "anchor": "context", "n": 5, "context": 32, "n_clusters": 12,
                         "n_occurrences": 96, "within": 0.1 / (k + 1), "between": 0.2 * (k + 1), "ratio": 2.0 * (k + 1),
                         "within_euclidean": 1.0, "between_euclidean": 2.0, "train_loss": 8.0 - k,
                         "val_loss": 8.1 - k})
    return pa.Table.from_pylist(rows, schema=CLUSTERS_SCHEMA)


def _finetune() -> pa.Table:
    rows = []
    for method in ("lora", "full"):
        for domain, role in (("prose", "target"), ("code", "control")):
            for checkpoint in ("base", "finetuned"):
                rows.append({"model": "gpt2-tiny", "method": method, "domain": domain, "role": role,
                             "checkpoint": checkpoint, "ppl": 300.0 if checkpoint == "base" else 250.0,
                             "dispersion": 0.8, "within": 0.7, "n_segments": 100, "pool": "last",
                             "split": "validation"})
    return pa.Table.from_pylist(rows, schema=FINETUNE_SCHEMA)


def _maps() -> list[CondensationMap]:
    rng = np.random.default_rng(2)
    out = []
    for rev in ("step0", "step300"):
        layers = ["0", "1", "2", "final"]
        counts = rng.integers(0, 50, (4, 16)).astype(np.int64)
        out.append(CondensationMap(layers=layers, depths=np.array([0, 1, 2, 3]), edges=np.linspace(-1, 1, 17),
                                   counts=counts, n_pairs=counts.sum(1), mean=np.array([0.1, 0.2, 0.4, 0.5]),
                                   median=np.zeros(4), std=np.zeros(4), n_sequences=5, model="gpt2-tiny",
                                   revision=rev))
    return out


def _trajectory():
    rows, scores = [], []
    for model in ("gpt2-tiny", "llama-small"):
        for k, step in enumerate((0, 30, 100, 300)):
            for ds in ("prose", "code"):
                rows.append({"model": model, "revision": f"step{step}", "step": step, "dataset": ds,
                             "corpus_ppl": 1000.0 / (k + 1), "dispersion": 0.2 + 0.1 * k + (ds == "code") * 0.05,
                             "within": 0.3 + 0.05 * k * k, "gap_digits_cosine": 2 - 0.1 * k,
                             "gap_digits_euclidean": 0.5 + 0.3 * k})
            scores.append({"model": model, "revision": f"step{step}", "task": "val_loss", "score": 8.0 - k})
    return rows, pa.Table.from_pylist(scores)


def _sweep() -> pa.Table:
    rows = []
    for loss, lam in (("none", 0.0), ("dispersion", 0.1), ("dispersion", 1.0)):
        for dom in ("prose", "code"):
            for step in (0, 10, 20):
                rows.append({"loss": loss, "lam": lam, "lr": 1e-3, "seed": 0, "domain": dom, "split": "validation",
                             "step": step, "ppl": 100.0 / (step + 1) + lam})
    return pa.Table.from_pylist(rows)


BINS = _bins()
SINGLE = _bins(models=(("smollm2-135m", ("main",)),), datasets=("prose", "code"), n_bins=5,
               layers=tuple(str(k) for k in range(12)) + ("final",), vendi=False)

FIGURES = {
    "bins": lambda: plot_bins(BINS, layer="final", site="block", pool="last"),
    "domains": lambda: plot_domains(BINS, layer="final", site="block"),
    "layers": lambda: plot_layers(BINS, layer_table(BINS, _corr(BINS)), scope="across", pool="last"),
    "layers_single": lambda: plot_layers(SINGLE, layer_table(SINGLE, _corr(SINGLE)), scope="across", pool="last"),
    "vendi": lambda: plot_vendi(BINS, layer="final", site="block", pool="last"),
    "heldout": lambda: plot_heldout(BINS, {"embedded:code": {"validation": "code", "test": "code-test"}},
                                    layer="final", site="block"),
    "context": lambda: plot_context(_context_bins(), alignment="segment"),
    "trajectory": lambda: plot_trajectory(*_trajectory()),
    "gap": lambda: figure_gap(_gap()),
    "clusters": lambda: figure_clusters(_clusters()),
    "finetune": lambda: figure_finetune(_finetune()),
    "condensation": lambda: plot_condensation(_maps()),
    "sweep": lambda: plot_sweep(_sweep()),
}
CORRELATION_FIGURES = ("bins", "domains", "vendi", "heldout", "context", "trajectory")


@pytest.fixture(scope="module")
def drawn():
    """Every figure rendered once: name -> (FigureBytes, the matplotlib figure it came from)."""
    import matplotlib.pyplot as plt

    seen: list = []
    original = F.Figure.render

    def render(self, title):
        seen.append(self.fig)
        self.plt = SimpleNamespace(close=lambda fig: None)  # kept open: inspected below, as drawn
        return original(self, title)

    F.Figure.render = render
    try:
        out = {}
        for name, make in FIGURES.items():
            result = make()
            out[name] = (result, seen[-1])
        yield out
    finally:
        F.Figure.render = original
        for fig in seen:
            plt.close(fig)


def _panels(fig):
    return [a for a in fig.axes if a.get_subplotspec() is not None and a.get_visible()]


@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_is_a_png_with_its_svg(drawn, name):
    from PIL import Image

    result, _ = drawn[name]
    assert bytes(result)[:8] == PNG
    img = Image.open(io.BytesIO(bytes(result)))
    assert img.size[0] >= 300 and img.size[1] >= 200
    assert img.info["dpi"][0] == pytest.approx(F.DPI, abs=1)
    assert result.svg.lstrip().startswith(b"<?xml") and b"<svg" in result.svg
    files = F.figure_files(result)
    assert set(files) == {"png", "svg"} and files["png"] == bytes(result)


@pytest.mark.parametrize("name", FIGURES)
def test_one_legend_per_figure_outside_the_panels(drawn, name):
    _, fig = drawn[name]
    assert len(fig.legends) == 1
    assert all(a.get_legend() is None for a in fig.axes)
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for a in _panels(fig):
        assert not legend.overlaps(a.get_window_extent(renderer)), f"{name}: the legend covers a panel"


@pytest.mark.parametrize("name", FIGURES)
def test_titles_clear_of_each_other_and_inside_the_canvas(drawn, name):
    _, fig = drawn[name]
    renderer = fig.canvas.get_renderer()
    sup = fig._suptitle.get_window_extent(renderer)
    for a in _panels(fig):
        title = a.title.get_window_extent(renderer)
        assert title.y1 <= sup.y0 + 0.5 or not title.overlaps(sup), f"{name}: suptitle overlaps a panel title"
    tight = fig.get_tightbbox(renderer)
    assert tight.x0 >= -0.02 and tight.x1 <= fig.get_figwidth() + 0.02, f"{name}: text runs off the canvas"


@pytest.mark.parametrize("name", FIGURES)
def test_no_empty_panel(drawn, name):
    _, fig = drawn[name]
    for a in _panels(fig):
        assert a.lines or a.collections or a.images or a.patches, f"{name}: an empty panel {a.get_title()!r}"


def test_single_revision_layers_figure_drops_the_second_checkpoint_column(drawn):
    _, fig = drawn["layers_single"]
    panels = _panels(fig)
    assert len(panels) == 2 * 2  # two datasets x (layer lines, rho per layer)
    assert not any(a.get_visible() is False for a in fig.axes)
    assert len(fig.legends[0].get_texts()) <= 4  # the revision and the two marker meanings, not 13 layers


@pytest.mark.parametrize("name", CORRELATION_FIGURES)
def test_correlation_panels_carry_rho_p_and_n(drawn, name):
    result, fig = drawn[name]
    notes = [art for a in fig.axes for art in a.artists if art.get_gid() == F.NOTE_GID]
    assert notes, f"{name}: no rho annotation"
    renderer = fig.canvas.get_renderer()
    for note in notes:
        texts = [t.get_text() for t in note.get_child().get_children()]
        assert texts and all("ρ = " in t and "p" in t and "n = " in t for t in texts)
        box = note.get_window_extent(renderer)
        panel = note.axes.get_window_extent(renderer)
        assert panel.x0 - 1 <= box.x0 and box.x1 <= panel.x1 + 1 and panel.y0 - 1 <= box.y0 and box.y1 <= panel.y1 + 1
    assert "ρ = ".encode() in result.svg and b"n = " in result.svg


def test_bins_annotations_equal_scipy_on_the_plotted_points(drawn):
    _, fig = drawn["bins"]
    want = set()
    for r in _corr(BINS).to_pylist():
        if r["layer"] == "final" and (r["pool"] == "last" or r["scope"] == "within"):
            want.add(F.Rho(r["spearman_r"], r["spearman_p"], r["n_bins"]).text())
    got = {t.get_text() for a in fig.axes for art in a.artists if art.get_gid() == F.NOTE_GID
           for t in art.get_child().get_children()}
    assert got == want


def test_no_annotation_box_covers_a_data_point(drawn):
    for name in CORRELATION_FIGURES:
        _, fig = drawn[name]
        renderer = fig.canvas.get_renderer()
        for a in fig.axes:
            for note in (art for art in a.artists if art.get_gid() == F.NOTE_GID):
                box = note.get_window_extent(renderer)
                for ax in [x for x in fig.axes if x.get_subplotspec() == a.get_subplotspec()]:
                    for line in ax.get_lines():
                        pts = ax.transData.transform(np.asarray(line.get_xydata(), dtype=float))
                        inside = [(x, y) for x, y in pts if box.x0 < x < box.x1 and box.y0 < y < box.y1]
                        assert not inside, f"{name}: the rho box of {a.get_title()!r} covers data"


def test_spearman_helper_matches_scipy_and_formats():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    y = [2.0, 1.0, 4.0, 3.0, 6.0]
    r = F.spearman(x, y)
    ref = spearmanr(x, y)
    p = exact_p(x, y)  # 5 pairs: the exact p of every ordering, not scipy's t approximation
    assert r is not None and r.rho == pytest.approx(ref.statistic) and r.p == pytest.approx(p) and r.n == 5
    assert r.text() == f"ρ = +{ref.statistic:.2f}, p = {p:.2g}, n = 5"
    assert F.Rho(-0.5, 1e-5, 30).text() == "ρ = −0.50, p < 0.001, n = 30"
    assert F.spearman([1, 2], [3, 4]) is None                 # too few points
    assert F.spearman([1, 2, 3], [1, 1, 1]) is None           # constant side
    assert F.spearman([1, 2, math.nan, 4], [1, 3, 2, 5]).n == 3  # non-finite pairs dropped


def test_revision_colours_leave_out_the_faint_end():
    import matplotlib

    colors = F.revision_colors(["step300", "step0", "step30", "step100"])
    assert list(colors) == ["step0", "step30", "step100", "step300"]
    assert colors["step300"] == matplotlib.colormaps["viridis"](F.SEQUENTIAL_RANGE[1])

    def contrast_on_white(rgba):  # WCAG 2 contrast ratio
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
        return 1.05 / (0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2] + 0.05)

    assert contrast_on_white(colors["step300"]) > 1.8
    assert contrast_on_white(matplotlib.colormaps["viridis"](1.0)) < 1.3  # the faint end left out
    assert len(set(F.category_colors(["a", "b", "c"]).values())) == 3


def test_figures_are_published_as_png_and_svg(tmp_path):
    store = Store(str(tmp_path))
    fig = figure_gap(_gap())
    publish_section(store, "run", Section("gap", "Gap", "001", figures={"gap": fig}))
    assert store.exists(figure_path("run", "gap")) and store.exists(figure_path("run", "gap", "svg"))
    assert figure_path("run", "gap").endswith("/run/gap.png")
    with open(store.path(figure_path("run", "gap", "svg")), "rb") as fh:
        assert fh.read() == fig.svg
    publish_report(store, "run", BINS, _corr(BINS), layer="final", site="block", pool="last")
    for ext in ("png", "svg", "md"):
        assert store.exists(f"results/report/run.{ext}")


def test_path_writers_keep_png_and_write_svg_by_suffix(tmp_path):
    png = plot_gap(_gap(), tmp_path / "g" / "gap.png")
    assert png.read_bytes()[:8] == PNG
    svg = plot_clusters(_clusters(), tmp_path / "clusters.svg")
    assert b"<svg" in svg.read_bytes()[:500]
    F.write_figure(plot_condensation(_maps()), tmp_path / "c.svg")
    assert (tmp_path / "c.svg").read_bytes().lstrip().startswith(b"<?xml")
    with pytest.raises(ValueError, match="without an SVG"):
        F.write_figure(b"\x89PNG", tmp_path / "x.svg")


def test_annotation_takes_an_empty_corner_or_makes_room_above_the_data():
    fig = F.Figure(1, 2)
    left, right = fig.ax(0, 0), fig.ax(0, 1)
    x = np.linspace(1, 10, 20)
    left.plot(x, x, "o-", label="rising")            # upper left and lower right empty
    right.errorbar(x, np.full(20, 5.0) + np.sin(x), yerr=0.5, fmt="o", label="flat")  # every corner crossed
    fig.annotate(left, [(None, "black", F.spearman(x, x))])
    fig.annotate(right, [("flat", "black", F.spearman(x, np.sin(x)))])
    ylim_before = right.get_ylim()
    fig.plt = SimpleNamespace(close=lambda f: None)
    fig.legend()
    result = fig.render("corners")
    assert bytes(result)[:8] == PNG
    notes = [art for a in fig.fig.axes for art in a.artists if art.get_gid() == F.NOTE_GID]
    upper_right, upper_left, lower_right = 1, 2, 4  # matplotlib's location codes
    assert {n.loc for n in notes if n.axes is left} <= {upper_left, lower_right}
    assert right.get_ylim()[1] > ylim_before[1]  # grown: the box sits above the data
    assert [n.loc for n in notes if n.axes is right][0] in (upper_left, upper_right)
    import matplotlib.pyplot as plt

    plt.close(fig.fig)


def test_the_main_figure_tells_revisions_apart_without_colour_and_says_what_each_panel_measures():
    import re

    svg = F.figure_files(plot_bins(BINS, layer="final", site="block", pool="last"))["svg"].decode()
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "gpt2-tiny · code · across segments, last pool" in texts
    assert "gpt2-tiny · code · within segments, token states" in texts  # not 'pool last'
    assert "bin mean perplexity (log scale)" in texts
    assert not any("pool last" in t for t in texts)
    # one marker shape per revision (step0, step30, step300), not colour alone
    shapes = set(re.findall(r'<path id="(m[0-9a-f]+)" d="([^"]+)"', svg))
    assert len({d for _, d in shapes}) >= 3
