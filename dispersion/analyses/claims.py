"""The claims ledger: each claim of paper 001 that a run can test, its statistic with an
interval, and a verdict after a Holm correction over every claim row the run tested.

One entry of :data:`CLAIMS` per claim: its statement, its paper section, the sign the paper
reports for its statistic, and ``test(ctx)``: the rows that test it in this run, or one line
saying why the run cannot (a step not enabled, one layer extracted, ...).

Verdict of a row with a p-value, at level alpha = 1 - ``analysis.bootstrap.level``, with the
Holm-adjusted p (Holm 1979: the i-th smallest of m p-values times m - i + 1, made monotone):

* ``supported``     p_holm < alpha and the statistic has the paper's sign;
* ``contradicted``  p_holm < alpha and the opposite sign;
* ``inconclusive``  otherwise, or no p-value (one measurement without an interval).

Where the paper's text and its authors' code measure differently (across-segment Eq. 1 vs the
per-bin mean of within-segment dispersion) both are tested, as separate rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dispersion.analyses.bins import PARTITION_KEYS, Partition, boot_seed, last_revisions, partitions
from dispersion.analyses.registry import StepContext
from dispersion.core.ids import revision_order
from dispersion.core.layout import result_path
from dispersion.measure.bootstrap import bootstrap_binned, bootstrap_p, interval

CLAIMS_SCHEMA = pa.schema([
    ("claim", pa.string()), ("paper", pa.string()), ("statement", pa.string()),
    ("model", pa.string()), ("revision", pa.string()), ("dataset", pa.string()), ("detail", pa.string()),
    ("statistic", pa.string()), ("expected", pa.string()), ("value", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("interval", pa.string()), ("n", pa.int64()),
    ("p", pa.float64()), ("p_holm", pa.float64()), ("verdict", pa.string()), ("note", pa.string()),
])
VERDICTS = ("supported", "contradicted", "inconclusive", "not tested")


@dataclass
class Evidence:
    """One row testing a claim: ``value`` of ``statistic`` with its interval and p-value."""

    model: str | None
    revision: str | None
    dataset: str | None
    detail: str
    statistic: str
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    interval: str = ""      # how the interval was made
    n: int | None = None    # what the statistic is computed over (bins, checkpoints, models)
    p: float | None = None  # two-sided, of "the statistic is 0"
    note: str = ""


@dataclass(frozen=True)
class Claim:
    name: str
    paper: str
    statement: str
    sign: int  # the sign paper 001 reports for the statistic
    test: Callable[[ClaimContext], list[Evidence] | str]
    how: str = ""  # the statistic and how its interval is made (docs/ANALYSES.md)


@dataclass
class ClaimContext:
    """What the claims read: the run's tables (this call's, else the stored ones) and shards."""

    step: StepContext
    _parts: dict[tuple, Partition] = field(default_factory=dict)
    _markers: dict[tuple, list[dict]] | None = None

    def table(self, name: str) -> pa.Table | None:
        if name in self.step.tables:
            return self.step.tables[name]
        rel = result_path(name, self.step.config.name)
        return self.step.store.read_table(rel) if self.step.store.exists(rel) else None

    def partition(self, key: dict) -> Partition:
        k = tuple(key[c] for c in PARTITION_KEYS)
        if k not in self._parts:
            if self._markers is None:
                self._markers = partitions(self.step.store, self.step.units)
            self._parts[k] = Partition(self.step.store, dict(zip(PARTITION_KEYS, k)), self._markers[k])
        return self._parts[k]

    def resampled_rho(self, row: dict) -> np.ndarray:
        """The bootstrap Spearman rhos of one ``correlations`` row (all bins), drawn as the
        row's interval was (same seed, so rows of one partition are paired)."""
        a = self.step.analysis
        part = self.partition(row)
        ppl = part.feature("ppl")
        vectors, within = part.target(row["layer"], row["site"], row["pool"] if row["scope"] == "across" else _any_pool(
            part, row["layer"], row["site"]))
        across = row["scope"] == "across"
        return bootstrap_binned(ppl, bin_size=a.bin_size, vectors=vectors if across else None,
                                within=None if across else within, n_boot=a.bootstrap.n,
                                seed=boot_seed(a.bootstrap, row))["all"]["spearman_r"]


def _any_pool(part: Partition, layer: str, site: str) -> str:
    return sorted(p for (la, s, p) in part.targets if (la, s) == (layer, site))[0]


def _main_rows(ctx: ClaimContext, scope: str) -> list[dict]:
    """Correlation rows (all bins) at the main layer/site/pool of each model's last revision."""
    corr = ctx.table("correlations")
    if corr is None or not corr.num_rows:
        return []
    a = ctx.step.analysis
    last = last_revisions(corr)
    pool = a.pool if scope == "across" else "tokens"
    return [r for r in corr.to_pylist() if r["bins"] == "all" and r["scope"] == scope and r["layer"] == str(a.layer)
            and r["site"] == a.site and r["pool"] == pool and r["revision"] == last[r["model"]]]


def _interval_note(r: dict) -> tuple[str, float | None, str]:
    if r.get("n_boot"):
        return f"bootstrap, {r['n_boot']} resamples of segments", r.get("boot_p"), ""
    return "", r.get("spearman_p"), "no bootstrap (analysis.bootstrap.n = 0): asymptotic p over bins"


# -- the claims --------------------------------------------------------------------------------

def _falls(ctx: ClaimContext) -> list[Evidence] | str:
    seeds = ctx.step.config.sampling.seeds
    spread = f"sample seed {seeds[0]} of {len(seeds)}; correlations_seeds has the spread over seeds" if seeds else ""
    rows = []
    for scope, what in (("across", "across segments, Eq. 1 (paper text)"),
                        ("within", "within segments, per-bin mean (authors' code)")):
        for r in _main_rows(ctx, scope):
            how, p, note = _interval_note(r)
            rows.append(Evidence(r["model"], r["revision"], r["dataset"],
                                 f"{what}; layer {r['layer']}, site {r['site']}, pool {r['pool']}",
                                 "Spearman rho", r["spearman_r"], r.get("ci_low"), r.get("ci_high"), how,
                                 r["n_bins"], p, "; ".join(x for x in (note, spread) if x)))
    return rows or "no correlation rows at the main layer, site and pool (too few bins?)"


def _rho_difference(ctx: ClaimContext, later: dict, earlier: dict, detail: str, how: str) -> Evidence:
    """rho of the ``later`` correlations row minus the ``earlier`` one's, with the interval and
    p of the difference of their resampled rhos (``how``: the interval's method, ``{n}`` its
    resamples); without resamples, the difference alone."""
    a = ctx.step.analysis
    value = later["spearman_r"] - earlier["spearman_r"]
    key = (later["model"], later["revision"], later["dataset"], detail, "difference of Spearman rho", value)
    if not a.bootstrap.n:
        return Evidence(*key, n=later["n_bins"], note="no bootstrap (analysis.bootstrap.n = 0)")
    diff = ctx.resampled_rho(later) - ctx.resampled_rho(earlier)
    ci = interval(diff, a.bootstrap.level)
    return Evidence(*key, ci.low, ci.high, how.format(n=ci.n_boot), later["n_bins"], bootstrap_p(diff))


def _depth(ctx: ClaimContext) -> list[Evidence] | str:
    corr = ctx.table("correlations")
    a = ctx.step.analysis
    if corr is None or not corr.num_rows:
        return "no correlations"
    last = last_revisions(corr)
    groups: dict[tuple, dict[str, dict]] = {}
    for r in corr.to_pylist():
        if (r["bins"] == "all" and r["scope"] == "across" and r["site"] == a.site and r["pool"] == a.pool
                and r["revision"] == last[r["model"]]):
            groups.setdefault((r["model"], r["revision"], r["dataset"]), {})[r["layer"]] = r
    out = []
    for _, by_layer in sorted(groups.items()):  # by (model, revision, dataset)
        if len(by_layer) < 2:
            continue
        order = sorted(by_layer, key=lambda la: (la == "final", int(la) if la.isdigit() else 0))
        shallow, deep = by_layer[order[0]], by_layer[order[-1]]
        detail = f"rho(layer {deep['layer']}) - rho(layer {shallow['layer']}); site {a.site}, pool {a.pool}"
        # paired: one partition, one seed
        out.append(_rho_difference(ctx, deep, shallow, detail, "paired bootstrap, {n} resamples of segments"))
    return out or "one layer extracted (extraction.layers): nothing to compare across depth"


def _training(ctx: ClaimContext) -> list[Evidence] | str:
    corr = ctx.table("correlations")
    a = ctx.step.analysis
    if corr is None:
        return "no correlations"
    groups: dict[tuple, dict[str, dict]] = {}
    for r in corr.to_pylist():
        if (r["bins"] == "all" and r["scope"] == "across" and r["layer"] == str(a.layer) and r["site"] == a.site
                and r["pool"] == a.pool):
            groups.setdefault((r["model"], r["dataset"]), {})[r["revision"]] = r
    out = []
    for _, by_rev in sorted(groups.items()):  # by (model, dataset)
        revs = sorted(by_rev, key=revision_order)
        if len(revs) < 2 or not revs[0].startswith("step"):
            continue
        first, last = by_rev[revs[0]], by_rev[revs[-1]]
        detail = f"rho({revs[-1]}) - rho({revs[0]}); layer {a.layer}, site {a.site}, pool {a.pool}"
        # independent resamples per revision
        out.append(_rho_difference(ctx, last, first, detail, "bootstrap, {n} resamples per revision"))
    return out or "no model with an early (stepN) and a later checkpoint in this run"


def fisher_interval(rho: float, n: int, level: float) -> tuple[float | None, float | None]:
    """Interval of a Spearman rho over ``n`` pairs from Fisher's z with the Bonett-Wright (2000)
    standard error :math:`\\sqrt{(1 + \\rho^2 / 2) / (n - 3)}`; None below 4 pairs and at
    |rho| = 1 (z is infinite there: the interval is not defined, not a point)."""
    from scipy.stats import norm

    if n < 4 or rho is None or not math.isfinite(rho) or abs(rho) >= 1.0:
        return None, None
    z = math.atanh(rho)
    half = norm.ppf((1 + level) / 2) * math.sqrt((1 + rho * rho / 2) / (n - 3))
    return math.tanh(z - half), math.tanh(z + half)


def _spearman_rows(ctx: ClaimContext, table: str, step: str, n_col: str, detail: Callable[[dict], str],
                   keep: Callable[[dict], bool] = lambda r: True, note: str | Callable[[dict], str] = "",
                   p_of: Callable[[dict], float | None] = lambda r: r["spearman_p"]) -> list[Evidence] | str:
    t = ctx.table(table)
    if t is None:
        return f"step {step} not run (add it to analysis.steps)"
    level = ctx.step.analysis.bootstrap.level
    out = []
    for r in t.to_pylist():
        if not keep(r) or r["spearman_r"] is None:
            continue
        lo, hi = fisher_interval(r["spearman_r"], r[n_col], level)
        out.append(Evidence(r.get("model"), r.get("revision"), r.get("dataset") or r.get("domain") or r.get("queryset"),
                            detail(r),
                            "Spearman rho", r["spearman_r"], lo, hi, "Fisher z (Bonett-Wright)" if lo is not None
                            else "", r[n_col], p_of(r), note(r) if callable(note) else note))
    return out or f"step {step} gave no correlation"


def _gap(ctx: ClaimContext) -> list[Evidence] | str:
    return _spearman_rows(ctx, "gap_spearman", "gap", "n",
                          lambda r: f"gap vs {r['task']} ({r['metric']}, domain {r['domain']}) over models")


def _trajectory(ctx: ClaimContext) -> list[Evidence] | str:
    return _spearman_rows(ctx, "trajectory_spearman", "trajectory", "n_checkpoints",
                          lambda r: f"{r['measure']} vs {r['task']} over checkpoints",
                          keep=lambda r: r["measure"] != "corpus_ppl")  # perplexity is the table's check, not the claim


def _hardness(ctx: ClaimContext) -> list[Evidence] | str:
    return _spearman_rows(ctx, "hardness_spearman", "hardness", "n_fractions",
                          lambda r: f"fraction answered right vs slice dispersion; {r['n_queries']} queries, "
                                    f"slices of {r['slice_size']}, pool {r['accuracy']:.0%} right",
                          keep=lambda r: r["signal"] == "dispersion",
                          p_of=lambda r: r["perm_p"] if r.get("perm_p") is not None else r["spearman_p"],
                          note=lambda r: f"permutation p, {r['n_perm']} relabellings of the pool"
                          if r.get("perm_p") is not None else "asymptotic p over the fraction means (slices share "
                                                             "queries: too small)")


def _finetune(ctx: ClaimContext) -> list[Evidence] | str:
    t = ctx.table("finetune")
    if t is None:
        return "step finetune not run (add it to analysis.steps)"
    rows = {(r["model"], r["method"], r["domain"], r["role"], r["checkpoint"]): r for r in t.to_pylist()}
    out = []
    for (model, method, domain, role, ckpt), r in sorted(rows.items()):
        base = rows.get((model, method, domain, role, "base"))
        if ckpt != "finetuned" or role != "target" or base is None:
            continue
        out.append(Evidence(model, method, domain, f"{method} fine-tuning, dispersion on its own domain",
                            "dispersion after - before", r["dispersion"] - base["dispersion"],
                            note="one sample, no interval yet"))
    return out or "the finetune table holds no target-domain pair"


def _knnlm(ctx: ClaimContext) -> list[Evidence] | str:
    t = ctx.table("knnlm_verdict")
    if t is None:
        return "step knnlm not run (add it to analysis.steps)"
    out = []
    for r in t.to_pylist():
        if r["att_more_dispersed"] is None:
            continue
        more, other = ("resid_mid", "block") if r["att_more_dispersed"] else ("block", "resid_mid")
        pair = f"ppl({other}) - ppl({more}, the more dispersed)"
        if r.get("pair_ppl_diff") is None:
            ppl = {"resid_mid": r["att_knn_ppl"], "block": r["ffn_knn_ppl"]}
            out.append(Evidence(r["model"], r["revision"], None, f"final block, at the configured (lambda, T): {pair}",
                                "kNN-LM perplexity difference", ppl[other] - ppl[more],
                                note="no interval (analysis.bootstrap.n = 0)"))
            continue
        detail = f"final block, each key at its tuned (lambda, T): {pair}"
        sign = 1.0 if more == "resid_mid" else -1.0  # pair_ppl_diff is ppl(block) - ppl(resid_mid)
        lo, hi = sorted((sign * r["pair_ci_low"], sign * r["pair_ci_high"]))
        out.append(Evidence(r["model"], r["revision"], None, detail, "kNN-LM perplexity difference",
                            sign * r["pair_ppl_diff"], lo, hi,
                            f"bootstrap over {r['pair_windows']} evaluation windows ({r['pair_tokens']} tokens"
                            f"{_samples(r.get('pair_samples'))})",
                            r["pair_tokens"], r["pair_p"]))
    return out or "no final-block resid_mid/block pair in the kNN-LM step"


def _samples(n: int | None) -> str:
    return f", {n} evaluation samples pooled" if n and n > 1 else ""


def _push_away(ctx: ClaimContext) -> str:
    return "training claim: `dispersion train` with a dispersion loss measures it, not a scan"


CLAIMS: tuple[Claim, ...] = (
    Claim("perplexity_falls_with_dispersion", "001 Sec. 2.2(1), Fig. 2",
          "bins of lower perplexity are more dispersed (rho of bin mean perplexity vs dispersion < 0)", -1, _falls,
          how="Spearman rho at the main layer, site and pool, each model's last revision; across segments "
              "(Eq. 1, the paper's text) and within segments (the authors' code) as separate rows; bootstrap "
              "over segments"),
    Claim("stronger_with_depth", "001 Sec. 2.2(2), Fig. 5",
          "the negative correlation strengthens in deeper layers", -1, _depth,
          how="rho(deepest layer) - rho(shallowest); paired bootstrap"),
    Claim("emerges_with_training", "001 Sec. 2.2(2)",
          "the negative correlation emerges with training (trained rho below the early checkpoint's)", -1,
          _training, how="rho(last checkpoint) - rho(first stepN checkpoint); bootstrap per revision"),
    Claim("finetuning_raises_dispersion", "001 Sec. 2.2(3), Fig. 6",
          "fine-tuning raises dispersion on the fine-tuning domain", 1, _finetune,
          how="dispersion after - before on the fine-tuning domain; no interval yet (inconclusive)"),
    Claim("dispersion_rises_with_accuracy", "001 Sec. 3.1, B.1.2",
          "slices answered more often right are more dispersed", 1, _hardness,
          how="Spearman of fraction right vs slice dispersion over the fractions; Fisher z interval, "
              "permutation p (correctness labels permuted, slices drawn again)"),
    Claim("gap_ranks_models", "001 Sec. 3.2, B.2",
          "the dispersion gap ranks models by task score", 1, _gap,
          how="Spearman of the gap vs a task score over models; Fisher z (Bonett-Wright) interval; p exact "
              "(every ordering) up to 9 models, else scipy's"),
    Claim("dispersion_tracks_training", "001 B.2.2, Fig. 33",
          "dispersion tracks task score across checkpoints", 1, _trajectory,
          how="Spearman over checkpoints; Fisher z interval; p exact (every ordering) up to 9 checkpoints, "
              "else scipy's"),
    Claim("dispersed_key_is_better", "001 Sec. 3.3",
          "the more dispersed sub-layer is the better kNN-LM key", 1, _knnlm,
          how="kNN-LM perplexity of the less dispersed final-block key minus the more dispersed one's, each at "
              "its tuned (lambda, T); bootstrap over evaluation windows"),
    Claim("push_away_lowers_perplexity", "001 Sec. 3.4; 002-004",
          "training with a push-away (dispersion) loss lowers perplexity", 1, _push_away,
          how="not tested by a scan (`dispersion train`)"),
)


def claims_doc() -> str:
    """The generated claims table of docs/ANALYSES.md."""
    out = ["| claim | paper | the paper says | sign | statistic, interval |", "|---|---|---|---|---|"]
    out += [f"| `{c.name}` | {c.paper} | {c.statement} | {'< 0' if c.sign < 0 else '> 0'} | {c.how} |"
            for c in CLAIMS]
    return "\n".join(out)


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as ``p``)."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def verdict(value: float | None, p_holm: float | None, sign: int, alpha: float) -> str:
    if value is None or p_holm is None or not math.isfinite(value) or p_holm >= alpha or value == 0:
        return "inconclusive"
    return "supported" if np.sign(value) == sign else "contradicted"


def claims_table(ctx: StepContext) -> pa.Table:
    """Every claim of :data:`CLAIMS`: its rows in this run with Holm-adjusted verdicts, or one
    ``not tested`` row saying why."""
    cc = ClaimContext(ctx)
    alpha = 1 - ctx.analysis.bootstrap.level
    tested: list[tuple[Claim, Evidence]] = []
    untested: list[tuple[Claim, str]] = []
    for claim in CLAIMS:
        got = claim.test(cc)
        if isinstance(got, str):
            untested.append((claim, got))
        else:
            tested += [(claim, e) for e in got]
    with_p = {i: e.p for i, (_, e) in enumerate(tested) if e.p is not None and math.isfinite(e.p)}
    adjusted = dict(zip(with_p, holm(list(with_p.values()))))
    rows = []
    for i, (claim, e) in enumerate(tested):
        ph = adjusted.get(i)
        rows.append({"claim": claim.name, "paper": claim.paper, "statement": claim.statement,
                     "model": e.model, "revision": e.revision, "dataset": e.dataset, "detail": e.detail,
                     "statistic": e.statistic, "expected": "< 0" if claim.sign < 0 else "> 0", "value": e.value,
                     "ci_low": e.ci_low, "ci_high": e.ci_high, "interval": e.interval, "n": e.n, "p": e.p,
                     "p_holm": ph, "verdict": verdict(e.value, ph, claim.sign, alpha),
                     "note": e.note or ("" if ph is not None else "no p-value: the verdict needs an interval")})
    for claim, why in untested:
        rows.append({"claim": claim.name, "paper": claim.paper, "statement": claim.statement,
                     "expected": "< 0" if claim.sign < 0 else "> 0", "verdict": "not tested", "note": why})
    return pa.Table.from_pylist(rows, schema=CLAIMS_SCHEMA)


def claims_markdown(table: pa.Table, level: float) -> str:
    """The report's first section: counts of verdicts, then one line per tested row."""
    rows = table.to_pylist()
    tested = [r for r in rows if r["verdict"] != "not tested"]
    counts = {v: sum(r["verdict"] == v for r in tested) for v in VERDICTS[:3]}

    def num(x: float | None) -> str:
        return "" if x is None or not math.isfinite(x) else f"{x:+.3f}"

    def p(x: float | None) -> str:
        return "" if x is None else ("< 0.001" if x < 1e-3 else f"{x:.2g}")

    out = [f"{len(tested)} tests of {len({r['claim'] for r in tested})} claims of paper 001 in this run, "
           f"{level:.0%} intervals, Holm-corrected over all {len(tested)}: **{counts['supported']} supported, "
           f"{counts['contradicted']} contradicted, {counts['inconclusive']} inconclusive**. "
           f"Table `claims` holds every row.", "",
           "| claim | model | revision | dataset | statistic | value | interval | n | p (Holm) | verdict |",
           "|---|---|---|---|---|---:|---|---:|---:|---|"]
    for r in tested:
        ci = f"[{num(r['ci_low'])}, {num(r['ci_high'])}]" if r["ci_low"] is not None else "none"
        out.append(f"| {r['claim']} ({r['expected']}) | {r['model'] or ''} | {r['revision'] or ''} | "
                   f"{r['dataset'] or ''} | {r['detail']} | {num(r['value'])} | {ci} | {r['n'] or ''} | "
                   f"{p(r['p_holm'])} | {r['verdict']} |")
    untested = [r for r in rows if r["verdict"] == "not tested"]
    if untested:
        out += ["", "Not tested in this run:", ""]
        out += [f"- `{r['claim']}` ({r['paper']}): {r['note']}" for r in untested]
    return "\n".join(out) + "\n"
