"""Last-token perplexity vs dispersion at several context lengths (paper 001 Sec. 2.2, Fig. 4).

For each context length c (``extraction.context_lengths``, with pool ``context`` extracted),
every sampled segment gives a prefix x_1..x_c. Because the model is causal, one forward pass
over the full segment gives, for every c at once, exactly what a pass over the prefix alone
gives (tested in tests/test_extract.py):

* ``alignment = "segment"`` (the paper's Fig. 4 setup: segments of length c): last-token
  perplexity ``exp(-log p(x_c | x_<c))`` against the dispersion (Eq. 1 per bin) of the
  last-token states h_c of the bin's prefixes;
* ``alignment = "next"``: the state h_c against the perplexity of the prediction it makes,
  ``exp(-log p(x_{c+1} | x_<=c))`` (the paper's reading, "contexts with confident next-token
  predictions are pushed apart"); not defined for c = L.

Segments are binned by that last-token perplexity (bins of B, Algorithm 1 flags K bins);
correlations as in the main analysis.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dispersion.analyses.bins import BIN_SCHEMA, CORR_SCHEMA, PARTITION_KEYS, Partition, binned, partitions
from dispersion.analyses.registry import BootstrapSpec, Section, Step, StepContext
from dispersion.core.errors import ConfigError
from dispersion.core.storage import Store
from dispersion.report.markdown import md_table

ALIGNMENTS = ("segment", "next")
_EXTRA = [("context", pa.int32()), ("alignment", pa.string())]
CONTEXT_BIN_SCHEMA = pa.schema(list(BIN_SCHEMA) + [pa.field(n, t) for n, t in _EXTRA])
CONTEXT_CORR_SCHEMA = pa.schema(list(CORR_SCHEMA) + [pa.field(n, t) for n, t in _EXTRA])


def context_partition(part: Partition, context_lengths: list[int], *, layer: str, site: str, bin_size: int,
                      select_bins: int | None, boot: BootstrapSpec | None = None) -> tuple[list[dict], list[dict]]:
    """Bin and correlation rows of one (model@revision, dataset sample) for every context length."""
    bins_rows: list[dict] = []
    corr_rows: list[dict] = []
    for c in context_lengths:
        vectors, _ = part.target(layer, site, f"c{c}")
        for alignment in ALIGNMENTS:
            column = f"last_nll_c{c}" if alignment == "segment" else f"next_nll_c{c}"
            nll = part.feature(column).astype(np.float64)
            ok = np.isfinite(nll)
            if ok.sum() < 3 * bin_size:
                continue  # c = L has no next token; too few segments for three bins
            key = {**part.key, "layer": layer, "site": site, "pool": f"c{c}", "scope": "across",
                   "context": c, "alignment": alignment}
            b, r = binned(key, np.exp(nll[ok]), bin_size=bin_size, select_bins=select_bins, vectors=vectors[ok],
                          boot=boot)
            bins_rows += b
            corr_rows += r
    return bins_rows, corr_rows


def context_analysis(store: Store, units: Iterable, context_lengths: list[int], *, layer: str, site: str,
                     bin_size: int, select_bins: int | None,
                     boot: BootstrapSpec | None = None) -> dict[str, pa.Table]:
    """``context_bins`` and ``context_correlations`` over every partition of the done units."""
    all_bins: list[dict] = []
    all_corr: list[dict] = []
    for values, markers in partitions(store, units).items():
        part = Partition(store, dict(zip(PARTITION_KEYS, values)), markers)
        b, c = context_partition(part, context_lengths, layer=layer, site=site, bin_size=bin_size,
                                 select_bins=select_bins, boot=boot)
        all_bins += b
        all_corr += c
    return {"context_bins": pa.Table.from_pylist(all_bins, schema=CONTEXT_BIN_SCHEMA),
            "context_correlations": pa.Table.from_pylist(all_corr, schema=CONTEXT_CORR_SCHEMA)}


def plot_context(bins: pa.Table, *, alignment: str = "segment") -> bytes:
    """PNG (with its SVG) like Fig. 4: one panel per context length (columns) and model x
    dataset (rows); x = bin mean last-token perplexity (log), y = dispersion of last-token
    states; one line per revision with its Spearman rho, p and n."""
    from dispersion.report.figures import Figure, revision_colors, rows_of, spearman

    t = rows_of(bins, alignment=alignment)
    contexts = sorted({r["context"] for r in t})
    panels = sorted({(r["model"], r["dataset"]) for r in t})
    colors = revision_colors({r["revision"] for r in t})
    fig = Figure(len(panels), len(contexts))
    for i, (model, ds) in enumerate(panels):
        sub = [r for r in t if r["model"] == model and r["dataset"] == ds]
        for j, c in enumerate(contexts):
            ax = fig.ax(i, j)
            rhos = []
            for rev, color in colors.items():
                pts = sorted((r["mean_ppl"], r["dispersion"]) for r in sub
                             if r["revision"] == rev and r["context"] == c)
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, lw=1, color=color, label=rev)
                    rhos.append((None, color, spearman(*zip(*pts))))
            fig.style(ax, f"{model} · {ds} · c={c}", "bin mean last-token perplexity",
                      "avg pairwise cosine distance", logx=True)
            fig.annotate(ax, rhos)
    fig.legend("revision")
    return fig.render(f"Last-token perplexity vs dispersion at context lengths ({alignment} alignment)")


# -- the step ------------------------------------------------------

def run(ctx: StepContext) -> Section:
    cfg = ctx.config
    if "context" not in cfg.extraction.pools or not cfg.extraction.context_lengths:
        raise ConfigError("analysis.steps: 'context' needs extraction.pools to include 'context' "
                          "and extraction.context_lengths")
    _, _, layer, site, _ = ctx.main()
    tables = context_analysis(ctx.store, ctx.units, cfg.extraction.context_lengths, layer=layer, site=site,
                              bin_size=cfg.analysis.bin_size, select_bins=cfg.analysis.select_bins,
                              boot=cfg.analysis.bootstrap)
    corr = tables["context_correlations"]
    corr = corr.filter(pc.equal(corr["bins"], "all"))
    return STEP.section(tables=tables,
                   figures={"context": plot_context(tables["context_bins"], alignment="segment"),
                            "context_next": plot_context(tables["context_bins"], alignment="next")},
                   markdown=md_table(corr, ["model", "revision", "dataset", "context", "alignment", "n_bins",
                                             "pearson_r", "spearman_r", "ci_low", "ci_high"]))


STEP = Step(name="context", title="Last-token perplexity at context lengths", paper="001 Sec. 2.2, Fig. 4",
            tables=("context_bins", "context_correlations"), run=run)
