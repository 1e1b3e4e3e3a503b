"""The ``hardness`` step's figures and report section."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dispersion.analyses.hardness.tables import SetResult, Variant, last_revisions
from dispersion.measure.bootstrap import standard_error
from dispersion.report.figures import Figure, category_colors, spearman
from dispersion.report.markdown import md_table


def plot_hardness(results: Sequence[SetResult], variant: Variant) -> bytes:
    """Like paper 001 Fig. 8 with Tables 3-4 beside it: per query set (rows) and model at its
    last revision (columns), the slices' mean dispersion +- s.e. (left axis) and mean
    perplexity +- s.e. (right axis) against the fraction correct, each with Spearman's rho over
    the fractions. Every revision's numbers are in the tables."""
    rs = [r for r in last_revisions(results) if r.variant == variant and r.slices is not None]
    sets = list(dict.fromkeys(r.queryset for r in rs))
    models = list(dict.fromkeys(r.model for r in rs))
    fig = Figure(max(len(sets), 1), max(len(models), 1), width=3.8)
    colors = category_colors(["dispersion", "perplexity"])
    ylabel = "avg pairwise cosine distance" if variant.scope == "across" else "mean within-query dispersion"
    for i, qs in enumerate(sets):
        for j, model in enumerate(models):
            ax = fig.ax(i, j)
            r = next((r for r in rs if r.queryset == qs and r.model == model), None)
            if r is None or r.slices is None:
                fig.off(ax)
                continue
            x, rhos = r.slices.fractions * 100, []
            ax2 = fig.twin(ax)
            for a, what, fmt in ((ax, "dispersion", "o-"), (ax2, "perplexity", "s--")):
                vals = r.slices.dispersion if what == "dispersion" else r.slices.ppl
                mean = vals.mean(1)
                se = vals.std(1, ddof=1) / math.sqrt(vals.shape[1]) if vals.shape[1] > 1 else None
                a.errorbar(x, mean, yerr=se, fmt=fmt, ms=3, lw=1, capsize=2, color=colors[what], label=what)
                rhos.append((what, colors[what], spearman(list(r.slices.fractions), list(mean))))
            ax2.set_ylabel("mean perplexity of the query text")
            fig.style(ax, f"{qs} · {model}@{r.revision} · S = {r.slices.size}", "fraction correct in the slice (%)",
                      ylabel)
            fig.annotate(ax, rhos)
    fig.legend("mean ± s.e. over seeds")
    return fig.render(f"Hardness: dispersion and perplexity vs fraction correct (layer {variant.layer}, "
                      f"{variant.scope}, pool {variant.pool})")


def plot_calibration(results: Sequence[SetResult], variant: Variant) -> bytes:
    """B.1.3: predicted vs true accuracy of the test slices (every seed), per query set, one
    colour per model at its last revision, with the diagonal and the mean MAE."""
    rs = [r for r in last_revisions(results) if r.variant == variant and r.calibrations]
    sets = list(dict.fromkeys(r.queryset for r in rs))
    fig = Figure(1, max(len(sets), 1), width=3.2, height=3.0)
    colors = category_colors(f"{r.model}@{r.revision}" for r in rs)
    for j, qs in enumerate(sets):
        ax = fig.ax(0, j)
        ax.plot([0, 100], [0, 100], "--", color="grey", lw=0.8)
        maes = []
        for r in (r for r in rs if r.queryset == qs):
            name = f"{r.model}@{r.revision}"
            x = np.concatenate([c.test_y for c in r.calibrations]) * 100
            y = np.concatenate([c.predictions for c in r.calibrations]) * 100
            ax.plot(x, y, "o", ms=2.5, alpha=0.6, color=colors[name], label=name)
            maes.append(f"{r.model} {np.mean([c.mae for c in r.calibrations]):.1f}")
        fig.style(ax, f"{qs}\nMAE (pp): {', '.join(maes)}", "true accuracy of the test slice (%)",
                  "predicted from dispersion (%)")
    fig.legend("model@revision")
    return fig.render(f"Calibration by dispersion on held-out test slices (layer {variant.layer}, "
                      f"{variant.scope}, pool {variant.pool})")


# --------------------------------------------------------------------------- #
# markdown
# --------------------------------------------------------------------------- #
def _mean_of(rows: list[dict], col: str) -> str:
    """The mean of a column over rows (nulls left out), one decimal; ``-`` when all are null."""
    vals = [r[col] for r in rows if r.get(col) is not None]
    return f"{np.mean(vals):.1f}" if vals else "-"


def _fmt_rho(r: float | None, p: float | None) -> str:
    if r is None:
        return "-"
    ptxt = "p < 0.001" if p is not None and p < 1e-3 else f"p = {p:.3f}" if p is not None else ""
    return f"{r:+.2f} ({ptxt})"


def summary_markdown(tables: dict[str, pa.Table], variant: Variant) -> str:
    """One row per model@revision and query set at the main variant, then the shift."""
    def match(r: dict) -> bool:
        return all(r.get(k) == val for k, val in variant.key().items())
    spear = [r for r in tables["hardness_spearman"].to_pylist() if match(r)]
    cal = [r for r in tables["hardness_calibration"].to_pylist() if match(r)]
    rank = [r for r in tables["hardness_ranking"].to_pylist() if match(r)]
    keys = list(dict.fromkeys((r["model"], r["revision"], r["queryset"]) for r in spear + rank))
    out = [f"Layer {variant.layer}, site {variant.site}, pool {variant.pool}, scope {variant.scope}. "
           "ρ: Spearman of the fraction correct against the slice means; calibration: mean ± s.e. over "
           "seeds of the test-slice MAE (percentage points; slices of the stated size), the regressor most "
           "often chosen, the constant predictor's MAE and the shuffled-label baseline's (labels permuted: "
           "what fitting noise reaches); whole-test error: the distance of the whole test part's predicted "
           "accuracy from its accuracy (calibrated / the calibration part's accuracy / shuffled labels); "
           "AUROC for a wrong answer (low mean distance / high perplexity "
           "flag it; > 0.5 supports that direction); tail: error rate of the flagged 10% vs the pool.", "",
           "| model@revision | query set | N | accuracy | S | ρ(fraction, dispersion) | ρ(fraction, ppl) | "
           "calibration MAE (slice size) | constant MAE | shuffled MAE | whole-test error | AUROC dispersion | "
           "AUROC ppl | tail error (dispersion / ppl / pool) |",
           "|---|---|---:|---:|---:|---|---|---|---:|---:|---|---:|---:|---|"]
    for m, rev, qs in keys:
        sp = {r["signal"]: r for r in spear if (r["model"], r["revision"], r["queryset"]) == (m, rev, qs)}
        cs = [r for r in cal if (r["model"], r["revision"], r["queryset"]) == (m, rev, qs)]
        rk = {r["signal"]: r for r in rank if (r["model"], r["revision"], r["queryset"]) == (m, rev, qs)}
        d, p = sp.get("dispersion", {}), sp.get("perplexity", {})
        if cs:
            maes = np.array([r["mae"] for r in cs])
            chosen = max(set(r["regressor"] for r in cs), key=[r["regressor"] for r in cs].count)
            se = standard_error(maes)
            size = f"S = {min(r['test_size'] for r in cs)}" + (
                f"-{max(r['test_size'] for r in cs)}" if len({r['test_size'] for r in cs}) > 1 else "")
            mean_txt = f"{maes.mean():.1f} ± {se:.1f}" if se is not None else f"{maes.mean():.1f}"
            cal_txt = f"{mean_txt} ({chosen}, {size})"
            const_txt = f"{np.mean([r['mae_constant'] for r in cs]):.1f}"

            shuffled_txt = _mean_of(cs, "mae_shuffled")
            whole_txt = " / ".join(_mean_of(cs, c) for c in ("test_error", "test_error_constant",
                                                             "test_error_shuffled"))
        else:
            cal_txt = const_txt = shuffled_txt = whole_txt = "-"
        dr = rk.get("mean_distance") or rk.get("within") or {}
        pr = rk.get("perplexity", {})

        def au(r: dict) -> str:
            return f"{r['auroc']:.3f}" if r.get("auroc") is not None else "-"
        tail = (f"{dr.get('tail_error_rate', float('nan')):.2f} / {pr.get('tail_error_rate', float('nan')):.2f} / "
                f"{pr.get('error_rate', float('nan')):.2f}")
        n = d.get("n_queries") or dr.get("n")
        acc = d.get("accuracy")
        if acc is None and dr.get("error_rate") is not None:
            acc = 1 - dr["error_rate"]
        out.append(f"| {m}@{rev} | {qs} | {n} | {acc:.3f} | {d.get('slice_size', '-')} | "
                   f"{_fmt_rho(d.get('spearman_r'), d.get('spearman_p'))} | "
                   f"{_fmt_rho(p.get('spearman_r'), p.get('spearman_p'))} | {cal_txt} | {const_txt} | "
                   f"{shuffled_txt} | {whole_txt} | "
                   f"{au(dr)} | {au(pr)} | {tail} |")
    shift = tables["hardness_shift"]
    if shift.num_rows:
        same = pc.and_(pc.equal(shift["layer"], variant.layer), pc.equal(shift["pool"], variant.pool))
        shift = shift.filter(pc.and_(same, pc.equal(shift["scope"], variant.scope)))
    if shift.num_rows:
        out += ["", "Distribution shift (B.1.4): calibration fitted on one query set, applied to another "
                "(MAE in percentage points):", "",
                md_table(shift, ["model", "revision", "fit_on", "applied_to", "mae", "mae_in_domain", "mae_constant"])]
    return "\n".join(out) + "\n"
