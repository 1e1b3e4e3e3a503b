"""The column reference of the catalog's main views (docs/CATALOG.md is generated from it).

Analysis tables (``context_bins``, ``layers``, ``gap``, ...) are described in
docs/ANALYSES.md beside their step; every result view also gets ``run`` and, where its rows
name a revision, ``step`` (below, under ``bins``). A column name with ``{C}`` stands for one
column per configured context length.
"""

from __future__ import annotations

import re

_PARTITION = {
    "model": "the config's model name",
    "revision": "the checkpoint: `main`, `step1000`, a hub commit, a checkpoint folder name",
    "step": "the training step the revision names (`step1000` -> 1000; OLMo's `stage1-step1000-tokens4B` "
            "-> 1000); NULL for `main` or a commit hash. Sort checkpoints by this, not by `revision`",
    "dataset": "the config's dataset name",
    "sample": "key of the segment sample (dataset, tokenizer, number, length, seed, shard size); "
              "`specs` shows its settings",
    "spec": "key of the extraction settings (layers, sites, pools, BOS rule, dtype); `specs.extraction` "
            "shows them",
    "run": "the name of the run (its config's `name`) that produced the row; results of several configs "
           "in one root differ here",
    "run_id": "the id of that scan: `runs/{run_id}/manifest.json`, a row of `runs`",
    "seed": "the sampling seed of the sample (`sampling.seed`, or one of `sampling.seeds`)",
}

_RESULT = {
    "layer": "text: `0` (embeddings), `1`..`n` (block outputs), `final` (after the final norm); order "
             "numerically with `TRY_CAST(layer AS INT) NULLS LAST`",
    "site": "`block` (residual stream), `attn` / `mlp` (sub-layer outputs before the residual add), "
            "`resid_mid`, `mlp_in` (see docs/ANALYSES.md)",
    "pool": "how a segment's token states become one vector: `last` token, `mean` over tokens, `c{C}` "
            "(the state at context length C); `tokens` in `bins`/`correlations` means the within-segment "
            "scope (no pooling)",
    "scope": "`across`: Eq. 1 over the pooled vectors of a bin's segments; `within`: mean within-segment "
             "token dispersion of a bin's segments",
}

COLUMNS: dict[str, dict[str, str]] = {
    "features": {
        "segment_id": "the segment (joins `segments` and `vectors`)",
        "n_tokens": "tokens in the segment",
        "n_scored": "tokens whose NLL is scored (the first has none without a BOS)",
        "nll_sum": "summed token NLL (nats)",
        "ppl": "segment perplexity, exp(nll_sum / n_scored)",
        "last_token_nll": "NLL of the segment's last token",
        "last_token_ppl": "exp(last_token_nll)",
        "last_nll_c{C}": "NLL of token C (the last of a C-token context)",
        "next_nll_c{C}": "NLL of token C + 1 given C tokens of context",
        **{k: _PARTITION[k] for k in ("dataset", "model", "revision", "sample", "spec", "step", "run", "run_id")},
    },
    "vectors": {
        "segment_id": "the segment",
        "vec": "the pooled hidden state (FLOAT[], stored as float16)",
        "norm": "L2 norm of the state before float16 storage",
        "within": "within-segment token dispersion: mean pairwise cosine distance of the segment's token "
                  "states at this layer and site (NaN for 1 token)",
        **{k: _RESULT[k] for k in ("layer", "site", "pool")},
        **{k: _PARTITION[k] for k in ("dataset", "model", "revision", "sample", "spec", "step", "run", "run_id")},
    },
    "segments": {
        "segment_id": "the segment, stable across models of one tokenizer",
        "doc_id": "the source document",
        "offset": "token offset of the segment in its document",
        "n_tokens": "tokens in the segment",
        "token_ids": "the segment's token ids (without BOS)",
        "text": "the segment decoded",
        "dataset": _PARTITION["dataset"], "sample": _PARTITION["sample"],
    },
    "bins": {
        **{k: _PARTITION[k] for k in ("model", "revision", "dataset", "sample", "spec")},
        **_RESULT,
        "bin": "bin index in perplexity order (Algorithm 1, paper 001 A.1.2)",
        "n": "segments in the bin",
        "mean_ppl": "mean segment perplexity of the bin",
        "median_ppl": "median segment perplexity of the bin",
        "dispersion": "mean pairwise cosine distance (Eq. 1) of the bin's vectors, or the within-scope mean",
        "vendi": "Vendi score of the bin (cosine kernel; NULL unless the vendi step ran)",
        "selected": "whether Algorithm 1 picked the bin (K bins uniform in perplexity)",
        "dispersion_se": "the bin's standard error: jackknife of Eq. 1 over its members (across), s / sqrt(n) "
                         "(within)",
        "seed": _PARTITION["seed"], "step": _PARTITION["step"], "run": _PARTITION["run"],
    },
    "correlations": {
        **{k: _PARTITION[k] for k in ("model", "revision", "dataset", "sample", "spec")},
        **_RESULT,
        "bins": "`all` bins or the `selected` ones (Algorithm 1)",
        "n_bins": "bins in the correlation",
        "pearson_r": "Pearson r of bin mean perplexity vs dispersion",
        "pearson_p": "its two-sided p-value",
        "spearman_r": "Spearman rho of bin mean perplexity vs dispersion",
        "spearman_p": "its two-sided p-value (asymptotic, over the bins)",
        "ci_low": "Spearman rho, lower end of its bootstrap percentile interval (segments resampled and "
                  "re-binned; docs/ANALYSES.md)",
        "ci_high": "Spearman rho, upper end of its bootstrap interval",
        "pearson_ci_low": "Pearson r, lower end of its bootstrap interval (the same resamples)",
        "pearson_ci_high": "Pearson r, upper end of its bootstrap interval",
        "n_boot": "resamples behind the intervals (`analysis.bootstrap.n`; undefined ones left out)",
        "ci_level": "the intervals' coverage (`analysis.bootstrap.level`)",
        "boot_p": "two-sided bootstrap p-value of rho = 0 (at least 2 / (n_boot + 1))",
        "boot_bias": "mean resampled rho minus rho: the interval leans toward 0 by about this much",
        "seed": _PARTITION["seed"], "step": _PARTITION["step"], "run": _PARTITION["run"],
    },
    "specs": {
        **{k: _PARTITION[k] for k in ("model", "revision", "dataset", "sample", "spec", "step")},
        "current": "the partition `features`, `vectors` and `segments` show for this model, revision, dataset",
        "complete": "every shard of the sample has its done marker",
        "shards": "shards of the sample", "done": "shards extracted", "segments": "segments of the sample",
        "run": "the name of the newest run that used the partition", "run_id": _PARTITION["run_id"],
        "num_segments": "sampling: segments per dataset", "segment_length": "sampling: tokens per segment",
        "seed": "sampling seed", "shard_size": "sampling: segments per shard",
        "extraction": "the extraction settings of that run (JSON)",
    },
    "runs": {
        "run_id": "`runs/{run_id}/manifest.json`: start time (UTC) and a digest of the config",
        "name": "the config's name (the `run` column of the other views)",
        "version": "dispersion's version", "python": "Python's version",
        "models": "the config's model names", "datasets": "the config's dataset names",
        "units": "work units planned", "ran": "units extracted by this run", "skipped": "units already done",
        "segments": "segments extracted by this run", "seconds": "extraction time",
        "config": "the whole run config (JSON)",
    },
    "revisions": {"revision": "every revision in the root", "step": _PARTITION["step"]},
}


def describe(view: str, column: str) -> str | None:
    """The description of ``view.column``; ``None`` when the reference lacks it."""
    cols = COLUMNS.get(view, {})
    if column in cols:
        return cols[column]
    for name, text in cols.items():
        if "{C}" in name and re.fullmatch(re.escape(name).replace(r"\{C\}", r"\d+"), column):
            return text
    return None


def columns_markdown() -> str:
    """docs/CATALOG.md."""
    out = ["# Catalog columns", "",
           "Generated from `dispersion/core/columns.py` (a test keeps this file equal to it). Open the catalog "
           "with `dispersion query \"SHOW TABLES\"`; `features_all`, `vectors_all`, `segments_all` have the "
           "columns of their current-spec views without `step`/`run`/`run_id` (see docs/GUARANTEES.md). With "
           "plain DuckDB on an `s3://` root, register an s3fs filesystem first "
           "(`con.register_filesystem(s3fs.S3FileSystem(...))`) and `SET VARIABLE dispersion_root = "
           "'s3://bucket/prefix'`.", ""]
    for view, cols in COLUMNS.items():
        out += [f"## `{view}`", "", "| column | meaning |", "|---|---|"]
        out += [f"| `{c}` | {text} |" for c, text in cols.items()]
        out.append("")
    return "\n".join(out)
