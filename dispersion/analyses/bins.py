"""Binned perplexity-vs-dispersion analysis over a scan's stored shards (paper 001 A.1.2).

For every (model@revision, dataset) and every stored (layer, site, pool):

* ``across`` scope: segments sorted by perplexity, bins of B, and per bin the average
  pairwise cosine distance of the members' pooled vectors (Eq. 1; paper text);
* ``within`` scope: per bin, the mean of the per-segment within-segment token dispersion
  (the quantity the authors' public code averages per bin); its ``pool`` is ``tokens``.

With ``vendi`` the across scope also gets the Vendi score of each bin (paper 001 A.5,
cosine kernel) beside its cosine dispersion. Bins selected by Algorithm 1
(``analysis.select_bins`` = K) are flagged; correlations of bin mean perplexity vs
dispersion (Pearson, Spearman) are reported over all bins and over the selected ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from dispersion.analyses.registry import BootstrapSpec
from dispersion.core.errors import DataError
from dispersion.core.ids import digest, revision_order
from dispersion.core.integrity import recorded
from dispersion.core.storage import Store
from dispersion.measure.binning import MIN_POINTS, bin_table, correlations, make_bins, uniform_perplexity_bins
from dispersion.measure.bootstrap import (
    bootstrap_bias,
    bootstrap_binned,
    bootstrap_p,
    eq1_jackknife_se,
    interval,
    standard_error,
)
from dispersion.measure.metrics import vendi_score
from dispersion.report.figures import rows_of

BIN_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("dataset", pa.string()), ("sample", pa.string()),
    ("seed", pa.int64()), ("spec", pa.string()),
    ("layer", pa.string()), ("site", pa.string()), ("pool", pa.string()), ("scope", pa.string()),
    ("bin", pa.int32()), ("n", pa.int32()), ("mean_ppl", pa.float64()), ("median_ppl", pa.float64()),
    ("dispersion", pa.float64()), ("vendi", pa.float64()), ("selected", pa.bool_()),
    ("dispersion_se", pa.float64()),  # the bin's standard error: jackknife of Eq. 1 (across), s/sqrt(n) (within)
])
CORR_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("dataset", pa.string()), ("sample", pa.string()),
    ("seed", pa.int64()), ("spec", pa.string()),
    ("layer", pa.string()), ("site", pa.string()), ("pool", pa.string()), ("scope", pa.string()),
    ("bins", pa.string()), ("n_bins", pa.int32()), ("pearson_r", pa.float64()), ("pearson_p", pa.float64()),
    ("spearman_r", pa.float64()), ("spearman_p", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()),  # Spearman's bootstrap interval
    ("pearson_ci_low", pa.float64()), ("pearson_ci_high", pa.float64()), ("n_boot", pa.int32()),
    ("ci_level", pa.float64()), ("boot_p", pa.float64()),  # two-sided bootstrap p of Spearman's rho = 0
    ("boot_bias", pa.float64()),  # mean resampled rho minus rho (see dispersion.measure.bootstrap.interval)
])


def _read(store: Store, files: Iterable[str], columns: list[str] | None, checksums: dict[str, str]) -> pa.Table:
    """The shards, each checked against the checksum its marker recorded."""
    return pa.concat_tables([store.read_shard(f, checksums.get(f), columns=columns) for f in files])


def _target(path: str) -> tuple[str, str, str]:
    parts = dict(p.split("=", 1) for p in path.split("/")[:-1] if "=" in p)
    return parts["layer"], parts["site"], parts["pool"]


def is_context_pool(pool: str) -> bool:
    """Pools ``c{c}`` hold last-token states of prefixes (see dispersion.measure.extract)."""
    return pool.startswith("c") and pool[1:].isdigit()


def _vectors(table: pa.Table) -> np.ndarray:
    col = table.column("vec").combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


class Partition:
    """One (model@revision, dataset sample, spec)'s stored shards, read from exactly the files
    its units' completion markers name, each checked against the checksum its marker recorded
    (a damaged one raises :class:`~dispersion.core.errors.IntegrityError`); every array comes
    back in segment-id order."""

    def __init__(self, store: Store, key: dict[str, str], markers: list[dict]):
        self.store, self.key, self.markers = store, key, markers
        self.checksums = recorded(markers)
        feats = _read(store, [m["features"] for m in markers], None, self.checksums)
        self._order = np.argsort(feats.column("segment_id").to_numpy())
        self.features = feats.take(pa.array(self._order))
        self.segment_ids = self.features.column("segment_id").to_numpy()
        self.targets: dict[tuple[str, str, str], list[str]] = {}
        for m in markers:
            for f in m["vectors"]:
                self.targets.setdefault(_target(f), []).append(f)

    def feature(self, name: str) -> np.ndarray:
        if name not in self.features.column_names:
            raise DataError(f"features of {self.key}: no column {name!r} (extract it: see extraction.*)")
        return self.features.column(name).to_numpy(zero_copy_only=False)

    def target(self, layer: str, site: str, pool: str) -> tuple[np.ndarray, np.ndarray]:
        """(pooled vectors as stored, float16 [N, d]; within-segment dispersion [N])."""
        files = self.targets.get((layer, site, pool))
        if not files:
            raise DataError(f"vectors of {self.key}: layer {layer} site {site} pool {pool} was not extracted")
        tab = _read(self.store, files, ["segment_id", "vec", "within"], self.checksums)
        order = np.argsort(tab.column("segment_id").to_numpy())
        if not np.array_equal(tab.column("segment_id").to_numpy()[order], self.segment_ids):
            raise DataError(f"{files[0]}: vectors and features of {self.key} cover different segments")
        within = tab.column("within").to_numpy(zero_copy_only=False)[order].astype(np.float64)
        return _vectors(tab)[order], within


def boot_seed(boot: BootstrapSpec, row_key: dict) -> int:
    """The resamples' seed of a partition: ``boot.seed`` and the partition's key, so every
    layer, site and pool of one partition is resampled alike (paired intervals)."""
    return boot.seed + int(digest({k: row_key.get(k) for k in PARTITION_KEYS}), 16)


def binned(row_key: dict, ppl: np.ndarray, *, bin_size: int, select_bins: int | None,
           vectors: np.ndarray | None = None, within: np.ndarray | None = None,
           vendi: bool = False, boot: BootstrapSpec | None = None) -> tuple[list[dict], list[dict]]:
    """Bin rows and correlation rows of one scope: ``vectors`` (across, Eq. 1 per bin, and the
    Vendi score per bin when ``vendi``) or ``within`` (mean within-segment dispersion). With
    ``boot`` (``n`` > 0) each correlation row carries its bootstrap intervals
    (:func:`dispersion.measure.bootstrap.bootstrap_binned`): ``ci_low``/``ci_high`` of
    Spearman's rho, ``pearson_ci_low``/``pearson_ci_high``, ``n_boot`` resamples kept and
    ``boot_p``, the two-sided bootstrap p-value of rho = 0."""
    try:
        table = bin_table(ppl, bin_size=bin_size, vectors=vectors, within=within)
        vs = bin_table(ppl, bin_size=bin_size, vectors=vectors, metric=vendi_score).across \
            if vendi and vectors is not None else None
    except ValueError as err:
        raise DataError(f"analysis of {row_key}: {err}") from None
    disp = table.across if vectors is not None else table.within
    if disp is None:
        raise TypeError("binned: pass vectors (across scope) or within (within scope)")
    members = make_bins(ppl, bin_size=bin_size).members
    per_bin = vectors if vectors is not None else within
    assert per_bin is not None
    se = [eq1_jackknife_se(per_bin[m]) if vectors is not None else standard_error(per_bin[m]) for m in members]
    selected = np.zeros(len(disp), np.bool_)
    if select_bins is not None:
        selected[uniform_perplexity_bins(table.mean_ppl, select_bins)] = True
    bins_rows = [{**row_key, "bin": b, "n": int(table.n[b]), "mean_ppl": float(table.mean_ppl[b]),
                  "median_ppl": float(table.median_ppl[b]), "dispersion": float(disp[b]),
                  "vendi": float(vs[b]) if vs is not None else None, "selected": bool(selected[b]),
                  "dispersion_se": se[b]}
                 for b in range(len(disp))]
    corr_rows = []
    subsets = [("all", np.ones(len(disp), np.bool_))] + ([("selected", selected)] if select_bins else [])
    for name, mask in subsets:
        try:
            c = correlations(table.mean_ppl[mask], disp[mask])
        except ValueError:  # constant input or too few bins: no correlation to report
            continue
        corr_rows.append({**row_key, "bins": name, "n_bins": c["n"], "pearson_r": c["pearson_r"],
                          "pearson_p": c["pearson_p"], "spearman_r": c["spearman_r"],
                          "spearman_p": c["spearman_p"]})
    if boot is not None and boot.n > 0 and corr_rows:
        resampled = bootstrap_binned(ppl, bin_size=bin_size, vectors=vectors, within=None if vectors is not None
                                     else within, n_boot=boot.n, seed=boot_seed(boot, row_key), select_k=select_bins)
        for row in corr_rows:
            rho = interval(resampled[row["bins"]]["spearman_r"], boot.level)
            r = interval(resampled[row["bins"]]["pearson_r"], boot.level)
            row.update(ci_low=rho.low, ci_high=rho.high, pearson_ci_low=r.low, pearson_ci_high=r.high,
                       n_boot=rho.n_boot, ci_level=boot.level,
                       boot_p=bootstrap_p(resampled[row["bins"]]["spearman_r"]),
                       boot_bias=bootstrap_bias(resampled[row["bins"]]["spearman_r"], row["spearman_r"]))
    return bins_rows, corr_rows


def analyze_partition(store: Store, key: dict[str, str], markers: list[dict], *, bin_size: int,
                      select_bins: int | None, vendi: bool = False,
                      boot: BootstrapSpec | None = None) -> tuple[list[dict], list[dict]]:
    """Bin rows and correlation rows for one (model@revision, dataset sample, spec)."""
    part = Partition(store, key, markers)
    ppl = part.feature("ppl")
    bins_rows: list[dict] = []
    corr_rows: list[dict] = []
    if len(ppl) < MIN_POINTS * bin_size:
        raise DataError(f"analysis of {key}: {len(ppl)} segments make fewer than {MIN_POINTS} bins of "
                        f"{bin_size} (analysis.bin_size)")
    within_done: set[tuple[str, str]] = set()
    for (layer, site, pool) in sorted(part.targets):
        if is_context_pool(pool):
            continue  # binned by last-token perplexity in dispersion.analyses.context
        # float16 as stored: each bin is converted to float64 inside the metric
        vectors, within = part.target(layer, site, pool)
        scopes: list[tuple[str, str, dict[str, Any]]] = [("across", pool, {"vectors": vectors, "vendi": vendi})]
        if (layer, site) not in within_done:
            within_done.add((layer, site))
            if np.isfinite(within).all():
                scopes.append(("within", "tokens", {"within": within}))
        for scope, scope_pool, kwargs in scopes:
            row_key = {**key, "layer": layer, "site": site, "pool": scope_pool, "scope": scope}
            b, c = binned(row_key, ppl, bin_size=bin_size, select_bins=select_bins, boot=boot, **kwargs)
            bins_rows += b
            corr_rows += c
    return bins_rows, corr_rows


def partitions(store: Store, units: Iterable) -> dict[tuple, list[dict]]:
    """Completion markers grouped by (model, revision, dataset, sample, seed, spec); every unit must be done."""
    groups: dict[tuple, list[dict]] = {}
    for u in units:
        marker = store.read_json(u.marker_rel)
        if not marker:
            raise DataError(f"{u.marker_rel}: work unit {u.describe()} is not done")
        groups.setdefault((u.mr.model, u.mr.revision, u.segments.dataset, u.segments.sample, u.segments.seed,
                           u.spec_key), []).append(marker)
    return groups


PARTITION_KEYS = ("model", "revision", "dataset", "sample", "seed", "spec")


def analyze(store: Store, units: Iterable, *, bin_size: int, select_bins: int | None,
            vendi: bool = False, boot: BootstrapSpec | None = None) -> dict[str, pa.Table]:
    """Bins and correlations for every (model@revision, dataset sample, spec) of the given
    work units (dispersion.measure.scan.WorkUnit), all of which must be done."""
    all_bins: list[dict] = []
    all_corr: list[dict] = []
    for values, markers in partitions(store, units).items():
        key = dict(zip(PARTITION_KEYS, values))
        b, c = analyze_partition(store, key, markers, bin_size=bin_size, select_bins=select_bins, vendi=vendi,
                                 boot=boot)
        all_bins.extend(b)
        all_corr.extend(c)
    return {"bins": pa.Table.from_pylist(all_bins, schema=BIN_SCHEMA),
            "correlations": pa.Table.from_pylist(all_corr, schema=CORR_SCHEMA)}


SEEDS_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("dataset", pa.string()), ("spec", pa.string()),
    ("layer", pa.string()), ("site", pa.string()), ("pool", pa.string()), ("scope", pa.string()),
    ("bins", pa.string()), ("n_seeds", pa.int32()), ("seeds", pa.string()),
    ("spearman_mean", pa.float64()), ("spearman_se", pa.float64()), ("spearman_min", pa.float64()),
    ("spearman_max", pa.float64()), ("pearson_mean", pa.float64()), ("pearson_se", pa.float64()),
])
_SEED_GROUP = ("model", "revision", "dataset", "spec", "layer", "site", "pool", "scope", "bins")


def over_seeds(corr: pa.Table) -> pa.Table:
    """``correlations_seeds``: per correlation cell, its rows over the repeated samples
    (``sampling.seeds``): their number, the mean of Spearman's rho and Pearson's r, the
    standard error of each mean (s / sqrt(k), None for one seed), rho's range."""
    groups: dict[tuple, list[dict]] = {}
    for r in corr.to_pylist():
        groups.setdefault(tuple(r[k] for k in _SEED_GROUP), []).append(r)
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        rho = np.array([r["spearman_r"] for r in rs], dtype=np.float64)
        r_ = np.array([r["pearson_r"] for r in rs], dtype=np.float64)
        rows.append({**dict(zip(_SEED_GROUP, key)), "n_seeds": len(rs),
                     "seeds": ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"])),
                     "spearman_mean": float(rho.mean()), "spearman_se": standard_error(rho),
                     "spearman_min": float(rho.min()), "spearman_max": float(rho.max()),
                     "pearson_mean": float(r_.mean()), "pearson_se": standard_error(r_)})
    return pa.Table.from_pylist(rows, schema=SEEDS_SCHEMA)


def first_seed(table: pa.Table, seed: int) -> pa.Table:
    """The rows of the first seed's sample (what the steps, the figures and the findings read)."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table["seed"], seed)) if "seed" in table.column_names else table


def scope_pool_panels(bins: pa.Table, layer: str, site: str) -> list[tuple[str, str]]:
    """The (scope, pool) panels present at (layer, site): across-segment scope first."""
    return sorted({(r["scope"], r["pool"]) for r in rows_of(bins, layer=layer, site=site)},
                  key=lambda sp: (sp[0] != "across", sp[1]))


def last_revisions(table: pa.Table) -> dict[str, str]:
    """Each model's most trained revision (highest step)."""
    revs: dict[str, set[str]] = {}
    for m, r in zip(table["model"].to_pylist(), table["revision"].to_pylist()):
        revs.setdefault(m, set()).add(r)
    return {m: max(rs, key=revision_order) for m, rs in revs.items()}
