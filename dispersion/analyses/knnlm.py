r"""Layer selection for kNN-LM by dispersion, checked against a real kNN-LM (paper 001 Sec. 3.3,
Table 1; B.3, Fig. 34).

**The claim (Sec. 3.3).** Of the candidate datastore keys of a transformer, the more dispersed
one makes the better kNN-LM key: in GPT-2's final block, :math:`h_{att} = h^{(L-1)} +
\mathrm{MHA}(\mathrm{LN}(h^{(L-1)}))` (site ``resid_mid``) is more dispersed than
:math:`h_{ffn} = h^{(L)}` (site ``block``), "making h_att the natural choice of key". The paper
does not run the kNN-LM; this step does, for every candidate key.

**Table 1 (dispersion).** From a pool of M non-overlapping windows ("chunks") of L tokens of
the validation split (L = ``window``, 512 in the paper, at most the model's context), N chunks
are drawn without replacement for N in ``chunks`` (10, 50, 100) and each of ``seeds`` (10)
seeds; the same chunk indices serve every site and layer. For each (layer, site) the
last-token states :math:`\{h_i\}_{i=1}^N` give the dispersion

.. math::
    D = \binom{N}{2}^{-1} \sum_{i<j} \Big[1 - \frac{h_i \cdot h_j}{\lVert h_i\rVert \lVert h_j\rVert}\Big]
    \quad \text{(Eq. 1)},

reported as mean and standard deviation (ddof = 1) over the seeds, at every layer (0..n,
``final``) and site of ``table1_sites``, not only the final block.

**Fig. 34 (per chunk).** For each pool window: the base model's perplexity over its scored
tokens and, per (layer, site), the within-window dispersion (mean pairwise cosine distance of
its L token states); the figure plots the final block's ``resid_mid`` and ``block``.

**The kNN-LM (Khandelwal et al. 2020).** Per candidate key (layer x site, ``sites`` at
``layers``): a datastore over windows of the training split (key = state at token t, value =
token t+1), FAISS search of the k nearest keys, p_kNN = softmax(-d / T) over their values,
p = lambda p_kNN + (1 - lambda) p_LM; perplexity on the evaluated windows of the pool
(:mod:`dispersion.measure.knnlm`). The evaluated tokens alternate by window between a ``tune``
and a ``test`` half: every perplexity in the tables is on the test half; the defaults
(k = 1024, lambda = 0.25, T = 1) are applied as they are, and (lambda, T) are also tuned on the
tune half (lambda over ``lambdas``; T over {``temperature``} and multiples ``temperature_scales``
of the median nearest-neighbour distance, since distances differ by orders of magnitude
between sites).

**The verdict.** Per model@revision: each candidate's dispersion (Table 1 at the largest N,
mean over seeds), base and kNN-LM perplexity and the improvement (base - kNN-LM, and in %);
Spearman's rho of dispersion against improvement over the candidates (default and tuned);
whether the most dispersed candidate is the best one; and the paper's own pair, ``resid_mid``
vs ``block`` of the final block: which is more dispersed, which gives the lower perplexity.

Datastores and evaluation passes are shards in the store, resumable
(:class:`dispersion.measure.knnlm.KnnUnit`); the ``knnlm`` flow builds them as Ray tasks
(``tasks/ray_knnlm.py``), the CLI in process. Differences from the paper: docs/ANALYSES.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from dispersion.analyses.registry import BootstrapSpec, Planned, Section, Step, StepContext
from dispersion.core.config import DatasetSpec, LayerRef, ScanConfig, Site, Strict
from dispersion.core.errors import ConfigError, DataError
from dispersion.core.storage import Store
from dispersion.measure.bootstrap import bootstrap_p, bootstrap_ppl_difference, interval
from dispersion.measure.knn_index import IndexSpec
from dispersion.measure.knnlm import ForwardSpec, KnnUnit, Target
from dispersion.measure.sources import ModelRevision
from dispersion.report.figures import Figure, category_colors, spearman
from dispersion.report.markdown import md_table

FIELD = "analysis.knnlm"


class KnnlmOptions(Strict):
    """Options of the ``knnlm`` step (``analysis.knnlm``).

    Attributes:
        datastore: the split the datastore is built from (default: the embedded prose, train).
        evaluation: the split of the Table-1 chunks and the evaluated tokens (prose, validation).
        window: chunk length L in tokens (paper: 512), at most the model's context (less BOS).
        datastore_tokens: datastore entries wanted, about (L - 1) per training window; None:
            every window of the split (the paper scale).
        pool_windows: M, the validation windows drawn (the Table-1 pool; Fig. 34's points).
        eval_windows: how many pool windows (spread evenly over the pool) the kNN-LM scores;
            alternately tune and test.
        chunks: the N of Table 1 (each at most M).
        seeds: repeats per N (paper: 10).
        sites: the candidate keys' sites (``resid_mid`` = h_att, ``block`` = h_ffn, ``mlp_in``
            = the knn-transformers key, or any registered site).
        table1_sites: the sites of Table 1 and Fig. 34 at every layer (default: ``sites``).
        layers: the candidate keys' layers: ``all`` blocks (at most ``max_layers`` of them,
            evenly spaced and ending at the final block) or a list of layer refs.
        max_layers: see ``layers``.
        k: neighbours retrieved (Khandelwal et al.: 1024), at most the datastore size.
        lam: interpolation weight lambda of p_kNN (0.25).
        temperature: T of softmax(-d / T) over squared L2 distances (1).
        lambdas: the lambda grid tuned on the tune half (0 included: no kNN at all).
        temperature_scales: T tuned over {``temperature``} and these multiples of the median
            squared distance to the nearest key.
        index: the FAISS index (exact up to ``index.exact_max`` keys, IVF-PQ beyond).
        prepend_bos: feed BOS before every window (None: ``extraction.prepend_bos``).
        models: the configured models measured (None: all).
        revisions: ``last`` (each model's last by step), ``all``, or a list.
        shard_windows: windows per shard (a work unit; a Ray task in the flow).
        batch_size: windows per forward pass (None: ``extraction.batch_size``).
        seed: seeds the window samples and the Table-1 draws.
        eval_seeds: independent evaluation samples (the seeds of their pool draws; None:
            ``[seed]``). The first one's pool gives Table 1, Fig. 34 and the candidates; on every
            one the final-block pair is scored against the same datastore, each sample tuning
            its own (λ, T), and the pair's difference is reported per sample and pooled.
    """

    datastore: DatasetSpec = Field(default_factory=lambda: DatasetSpec(
        name="knnlm-prose-train", embedded="prose", split="train"))
    evaluation: DatasetSpec = Field(default_factory=lambda: DatasetSpec(
        name="knnlm-prose-validation", embedded="prose", split="validation"))
    window: Annotated[int, Field(ge=3)] = 512
    datastore_tokens: Annotated[int, Field(ge=1)] | None = 200_000
    pool_windows: Annotated[int, Field(ge=2)] = 400
    eval_windows: Annotated[int, Field(ge=2)] = 100
    chunks: Annotated[list[Annotated[int, Field(ge=2)]], Field(min_length=1)] = [10, 50, 100]
    seeds: Annotated[int, Field(ge=1)] = 10
    sites: Annotated[list[Site], Field(min_length=1)] = ["resid_mid", "mlp_in", "block"]
    table1_sites: list[Site] | None = None
    layers: Literal["all"] | list[LayerRef] = "all"
    max_layers: Annotated[int, Field(ge=1)] = 6
    k: Annotated[int, Field(ge=1)] = 1024
    lam: Annotated[float, Field(ge=0, lt=1)] = 0.25
    temperature: Annotated[float, Field(gt=0)] = 1.0
    lambdas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=1)] = \
        [round(0.05 * i, 2) for i in range(19)]
    temperature_scales: list[Annotated[float, Field(gt=0)]] = [0.1, 0.3, 1.0, 3.0, 10.0]
    index: IndexSpec = Field(default_factory=IndexSpec)
    prepend_bos: bool | None = None
    models: list[str] | None = None
    revisions: Literal["last", "all"] | list[str] = "last"
    shard_windows: Annotated[int, Field(ge=1)] = 64
    batch_size: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0
    eval_seeds: Annotated[list[int], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _sizes(self) -> KnnlmOptions:
        from dispersion.measure.sites import SITES

        if self.eval_seeds is not None and len(set(self.eval_seeds)) != len(self.eval_seeds):
            raise ValueError(f"eval_seeds: give distinct seeds (got {self.eval_seeds})")

        for name in ("sites", "table1_sites"):
            for i, s in enumerate(getattr(self, name) or []):
                if s not in SITES:
                    raise ValueError(f"{name}.{i}: unknown site {s!r} (known: {', '.join(SITES)})")
        if max(self.chunks) > self.pool_windows:
            raise ValueError(f"chunks: N = {max(self.chunks)} exceeds pool_windows ({self.pool_windows})")
        if self.eval_windows > self.pool_windows:
            raise ValueError(f"eval_windows: {self.eval_windows} exceeds pool_windows ({self.pool_windows})")
        if same_text(self.datastore, self.evaluation):
            raise ValueError(f"evaluation: the same text as the datastore ({_describe(self.evaluation)}): every "
                             f"evaluated token would retrieve itself (p_kNN of the target near 1); evaluate on "
                             f"another split")
        return self

    @property
    def evaluation_seeds(self) -> list[int]:
        """The seeds of the evaluation samples; the first is the primary one."""
        return list(self.eval_seeds) if self.eval_seeds is not None else [self.seed]

    @property
    def t1_sites(self) -> list[str]:
        return list(dict.fromkeys(self.table1_sites if self.table1_sites is not None else self.sites))


def _describe(d: DatasetSpec) -> str:
    if d.hf is not None:
        return f"{d.hf.path}, split {d.hf.split}"
    if d.synthetic is not None:
        return f"synthetic {d.synthetic.kind} (seed {d.synthetic.seed}), split {d.split}"
    return f"embedded {d.embedded}, split {d.split}"


def same_text(a: DatasetSpec, b: DatasetSpec) -> bool:
    """Whether two dataset specs read the same documents (one split ``all`` covers the others)."""
    if a.embedded is not None and b.embedded is not None:
        return a.embedded == b.embedded and (a.split == b.split or "all" in (a.split, b.split))
    if a.hf is not None and b.hf is not None:
        return (a.hf.path, a.hf.name, a.hf.split) == (b.hf.path, b.hf.name, b.hf.split)
    if a.synthetic is not None and b.synthetic is not None:
        return a.synthetic == b.synthetic and (a.split == b.split or "all" in (a.split, b.split))
    return False


NGRAM = 32  # tokens of the n-grams the overlap check compares
MAX_SHARED = 0.5  # the share of evaluation n-grams also in the datastore that ends the step


def shared_ngrams(store_windows: Sequence[np.ndarray], eval_windows: Sequence[np.ndarray], n: int = NGRAM) -> float:
    """The share of the evaluation windows' n-grams (token ids) that occur in the datastore
    windows: 1.0 when the two are the same text, a few percent for text that shares
    boilerplate. Each n-gram is a 64-bit polynomial hash of its ids."""
    def hashes(windows: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for w in windows:
            ids = np.asarray(w, dtype=np.uint64)
            if ids.size < n:
                continue
            h = np.zeros(ids.size - n + 1, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for k in range(n):  # h = sum_k ids[i + k] * P^(n-1-k) mod 2^64
                    h = h * np.uint64(1_000_003) + ids[k:ids.size - n + 1 + k]
            out.append(h)
        return np.concatenate(out) if out else np.empty(0, np.uint64)

    ev = hashes(eval_windows)
    return float(np.isin(ev, hashes(store_windows)).mean()) if ev.size else 0.0


def check_overlap(store: Store, ws, we, opts: KnnlmOptions, log: Callable[[str], None]) -> float:
    """Refuse (one line) a datastore that holds most of the evaluation text; log the share."""
    def windows(seg) -> list[np.ndarray]:
        return [np.asarray(t, dtype=np.int64) for k in range(len(seg.shard_rows))
                for t in seg.read_shard(store, k).column("token_ids").to_pylist()]

    share = shared_ngrams(windows(ws), windows(we))
    if share >= MAX_SHARED:
        raise DataError(f"{FIELD}.evaluation: {share:.0%} of its {NGRAM}-token n-grams are in the datastore "
                        f"({_describe(opts.datastore)}): the evaluated tokens would retrieve themselves; "
                        f"evaluate on text the datastore does not hold")
    log(f"knnlm: {share:.2%} of the evaluation's {NGRAM}-token n-grams also occur in the datastore")
    return share


# --------------------------------------------------------------------------- #
# planning and building
# --------------------------------------------------------------------------- #
@dataclass
class ModelPlan:
    """One model@revision's kNN-LM: its windows, what its passes read, its units."""

    mr: ModelRevision
    n_layers: int
    length: int                      # window length L
    bos: int | None                  # the BOS id fed first (None: no BOS)
    spec: ForwardSpec
    store_units: list[KnnUnit]
    eval_units: list[KnnUnit]        # the primary evaluation sample's (Table 1, Fig. 34, every candidate)
    resamples: dict[int, list[KnnUnit]] = field(default_factory=dict)  # further evaluation samples, by seed

    @property
    def evals(self) -> dict[int | None, list[KnnUnit]]:
        """Every evaluation sample's units, the primary one first (key None)."""
        out: dict[int | None, list[KnnUnit]] = {None: self.eval_units}
        for seed, units in self.resamples.items():
            out[seed] = units
        return out

    @property
    def units(self) -> list[KnnUnit]:
        return [*self.store_units, *self.eval_units, *(u for us in self.resamples.values() for u in us)]


def candidate_layers(n_layers: int, layers: Literal["all"] | Sequence[LayerRef], max_layers: int) -> list[str]:
    """Layer names of the candidate keys: ``all`` = blocks 1..n, thinned to ``max_layers``
    evenly spaced blocks ending at block n; else the refs as ``extraction.layers`` reads them."""
    from dispersion.measure.capture import layer_names

    if layers == "all":
        if n_layers <= max_layers:
            return [str(i) for i in range(1, n_layers + 1)]
        picks = sorted({round(n_layers * (i + 1) / max_layers) for i in range(max_layers)})
        return [str(i) for i in picks]
    return layer_names(list(layers), n_layers)


def selected_revisions(config: ScanConfig, opts: KnnlmOptions, log: Callable[[str], None] = print) -> list:
    """The configured model@revisions this step measures (``models``, ``revisions``)."""
    from dispersion.core.ids import revision_order
    from dispersion.measure.sources import model_revisions

    mrs = model_revisions(config, log=log)
    names = list(dict.fromkeys(m.model for m in mrs))
    if opts.models is not None:
        unknown = [m for m in opts.models if m not in names]
        if unknown:
            raise ConfigError(f"{FIELD}.models: {unknown[0]!r} is not a configured model (models: {', '.join(names)})")
        mrs = [m for m in mrs if m.model in opts.models]
    out = []
    for name in dict.fromkeys(m.model for m in mrs):
        rs = sorted((m for m in mrs if m.model == name), key=lambda m: revision_order(m.revision))
        if opts.revisions == "last":
            out.append(rs[-1])
        elif opts.revisions == "all":
            out += rs
        else:
            out += [m for m in rs if m.revision in opts.revisions]
    if not out:
        raise ConfigError(f"{FIELD}.revisions: none of {opts.revisions} is a configured revision")
    return out


def plan(config: ScanConfig, store: Store, opts: KnnlmOptions, log: Callable[[str], None] = print) -> list[ModelPlan]:
    """Every measured model@revision's windows (sampled and published once per tokenizer and
    length) and units; nothing is computed."""
    from transformers import AutoConfig

    from dispersion.measure.capture import layer_names, resolve_bos, targets
    from dispersion.measure.knnlm import plan_units, prepare_windows
    from dispersion.measure.modeling import load_tokenizer, max_positions, num_layers, resolve_device, resolve_dtype
    from dispersion.measure.sampling import tokenizer_fingerprint

    bos_on = config.extraction.prepend_bos if opts.prepend_bos is None else opts.prepend_bos
    device = resolve_device(config.extraction.device)
    windows: dict[tuple, tuple] = {}
    plans = []
    for mr in selected_revisions(config, opts, log):
        mcfg = AutoConfig.from_pretrained(mr.source.location, revision=mr.source.revision,
                                          trust_remote_code=mr.source.trust_remote_code)
        n = num_layers(mcfg)
        limit = max_positions(mcfg)
        length = opts.window if limit is None else min(opts.window, limit - int(bos_on))
        if length < 3:
            raise ConfigError(f"{FIELD}.window: {mr.model} leaves {length} tokens per window")
        if length < opts.window:
            log(f"knnlm: {mr.model}@{mr.revision} reads {limit} positions: windows of {length} tokens")
        tok = load_tokenizer(mr.source, field=mr.field)
        fp = tokenizer_fingerprint(tok)
        if (fp, length) not in windows:
            count = None if opts.datastore_tokens is None else math.ceil(opts.datastore_tokens / (length - 1))
            ws = prepare_windows(config, store, tok, fp, opts.datastore, length=length, count=count,
                                 shard_size=opts.shard_windows, seed=opts.seed, log=log)
            wes = {s: prepare_windows(config, store, tok, fp, opts.evaluation, length=length,
                                      count=opts.pool_windows, shard_size=opts.shard_windows, seed=s, log=log)
                   for s in opts.evaluation_seeds}
            for we in wes.values():
                check_overlap(store, ws, we, opts, log)
            windows[(fp, length)] = (ws, wes)
        ws, wes = windows[(fp, length)]
        first, *more = opts.evaluation_seeds
        we = wes[first]
        pool = int(sum(we.shard_rows))
        every = max(1, pool // opts.eval_windows)
        count_eval = min(opts.eval_windows, math.ceil(pool / every))
        cand = targets(candidate_layers(n, opts.layers, opts.max_layers), opts.sites)
        t1 = list(dict.fromkeys([*targets(layer_names(["all"], n), opts.t1_sites), *cand]))
        spec = ForwardSpec(candidates=tuple(cand), table1=tuple(t1), prepend_bos=bos_on,
                           dtype=resolve_dtype(mr.dtype, device), eval_every=every, eval_count=count_eval,
                           batch_size=opts.batch_size or config.extraction.batch_size,
                           device=config.extraction.device)
        bos = resolve_bos(tok, f"{FIELD}.prepend_bos") if bos_on else None
        plans.append(ModelPlan(mr, n, length, bos, spec, plan_units(mr, opts.datastore.name, "store", ws, spec, bos),
                               plan_units(mr, opts.evaluation.name, "eval", we, spec, bos),
                               {s: plan_units(mr, opts.evaluation.name, "eval", wes[s], spec, bos) for s in more}))
    return plans


def plan_step(ctx: StepContext) -> Planned:
    """The step's units (every model@revision's datastore and evaluation shards), measured by
    the runner before :func:`run`; the model plans are what ``run`` reads besides."""
    plans = plan(ctx.config, ctx.store, ctx.options("knnlm"), log=ctx.log)
    return Planned(units=[u for p in plans for u in p.units], detail=plans)


# --------------------------------------------------------------------------- #
# measuring
# --------------------------------------------------------------------------- #
@dataclass
class Measured:
    """One model@revision's tables (rows) before they are joined."""

    table1: list[dict] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)  # the final-block pair per evaluation sample
    verdict: dict = field(default_factory=dict)


def table1_draws(pool: int, chunks: Sequence[int], seeds: int, seed: int) -> dict[tuple[int, int], np.ndarray]:
    """The chunk indices of every (N, seed): N of ``pool`` without replacement, shared by every
    site and layer."""
    return {(n, s): np.sort(np.random.default_rng([seed, n, s]).choice(pool, n, replace=False))
            for n in chunks if n <= pool for s in range(seeds)}


def measure(store: Store, p: ModelPlan, opts: KnnlmOptions, log: Callable[[str], None] = print,
            boot: BootstrapSpec | None = None) -> Measured:
    """Table 1, the per-chunk rows, and every candidate's kNN-LM scores of one model@revision."""
    from dispersion.measure import knn_index as ki
    from dispersion.measure import knnlm as kn
    from dispersion.measure.metrics import cosine_dispersion

    mr = p.mr
    base = {"model": mr.model, "revision": mr.revision}
    out = Measured()
    wins = kn.read_table(store, p.eval_units, "windows")
    pool = wins.num_rows
    skipped = [n for n in opts.chunks if n > pool]
    if skipped:
        log(f"knnlm: {mr.model}: the pool holds {pool} windows; Table 1 leaves out N = {skipped}")
    draws = table1_draws(pool, opts.chunks, opts.seeds, opts.seed)
    ppl = np.asarray(wins.column("ppl").to_numpy(), np.float64)
    disp: dict[Target, float] = {}
    within_mean: dict[Target, float] = {}
    n_max = max((n for n in opts.chunks if n <= pool), default=None)
    for t in p.spec.table1:
        V = kn.vectors_of(wins, kn.last_column(t))
        w = np.asarray(wins.column(kn.within_column(t)).to_numpy(), np.float64)
        within_mean[t] = float(np.nanmean(w))
        for n in opts.chunks:
            if n > pool:
                continue
            vals = np.array([cosine_dispersion(V[draws[(n, s)]]) for s in range(opts.seeds)])
            out.table1.append({**base, "layer": t[0], "site": t[1], "n_chunks": n, "seeds": opts.seeds,
                               "mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                               "chunk_length": p.length, "pool": pool})
            if n == n_max:
                disp[t] = float(vals.mean())
        out.chunks += [{**base, "window": int(i), "layer": t[0], "site": t[1], "ppl": float(ppl[i]),
                        "within": float(w[i])} for i in range(pool)]
    values = np.asarray(kn.read_table(store, p.store_units, "values", columns=["value"]).column("value").to_numpy(),
                        np.int64)
    evals = {sample: evaluated_tokens(store, units) for sample, units in p.evals.items()}
    final = str(p.n_layers)
    pair_sites = [t for t in p.spec.candidates if t[0] == final and t[1] in PAIR]
    test_lp: dict[int | None, dict[str, np.ndarray]] = {sample: {} for sample in evals}  # the pair's tuned log-probs
    tuned: dict[int | None, dict[str, ki.Scores]] = {sample: {} for sample in evals}
    for t in p.spec.candidates:
        index, kind = ki.candidate_index(store, p.store_units, t, opts.index, log)
        for sample, ev in evals.items():
            if sample is not None and t not in pair_sites:
                continue  # a further evaluation sample scores the pair only
            queries = kn.vectors_of(kn.read_table(store, p.evals[sample], kn.query_table(t)), "query")
            s = ki.score(index, values, queries, ev.targets, ev.lm_logprob, ev.tune, k=opts.k, lam=opts.lam,
                         temperature=opts.temperature, lambdas=opts.lambdas,
                         temperature_scales=opts.temperature_scales, index_kind=kind)
            del queries
            if t in pair_sites and s.test_logprob is not None:
                test_lp[sample][t[1]], tuned[sample][t[1]] = s.test_logprob, s
            if sample is not None:
                log(f"knnlm: {mr.model} {t[1]}@{t[0]}, evaluation sample {sample}: ppl {s.base_ppl:.2f} -> tuned "
                    f"{s.tuned_ppl:.2f}")
                continue
            out.candidates.append({
                **base, "layer": t[0], "site": t[1], "key": f"{t[1]}@{t[0]}", "final_block": t[0] == final,
                "dispersion": disp.get(t), "within": within_mean.get(t), "n_chunks": n_max,
                "datastore": s.n_store, "index": s.index, "k": s.k, "tune_tokens": s.n_tune,
                "test_tokens": s.n_test, "base_ppl": s.base_ppl, "knn_ppl": s.knn_ppl,
                "improvement": s.base_ppl - s.knn_ppl, "improvement_pct": 100.0 * (1.0 - s.knn_ppl / s.base_ppl),
                "tuned_lambda": s.tuned_lambda, "tuned_temperature": s.tuned_temperature, "tuned_ppl": s.tuned_ppl,
                "tuned_improvement": s.base_ppl - s.tuned_ppl,
                "tuned_improvement_pct": 100.0 * (1.0 - s.tuned_ppl / s.base_ppl),
                "nn_distance": s.nn_distance, "seconds": s.seconds})
            log(f"knnlm: {mr.model} {t[1]}@{t[0]}: ppl {s.base_ppl:.2f} -> {s.knn_ppl:.2f} "
                f"(tuned {s.tuned_ppl:.2f}, lambda {s.tuned_lambda:g}) over {s.n_store} keys in {s.seconds:.1f}s")
        del index
    out.verdict = verdict(base, out.candidates, final)
    boot = boot or BootstrapSpec()
    seeds = opts.evaluation_seeds
    for sample in evals:
        if len(tuned[sample]) == len(PAIR):
            att, ffn = (tuned[sample][site] for site in PAIR)
            out.pairs.append({**base, "eval_seed": seeds[0] if sample is None else sample, "primary": sample is None,
                              "base_ppl": att.base_ppl, "att_tuned_ppl": att.tuned_ppl,
                              "ffn_tuned_ppl": ffn.tuned_ppl, "att_lambda": att.tuned_lambda,
                              "att_temperature": att.tuned_temperature, "ffn_lambda": ffn.tuned_lambda,
                              "ffn_temperature": ffn.tuned_temperature,
                              **pair_interval(test_lp[sample], evals[sample].test_windows, boot)})
    # pooled over the samples: each sample's test tokens at its own tuned (λ, T), its windows kept apart
    offset = 1 + max((int(ev.test_windows.max(initial=0)) for ev in evals.values()), default=0)
    pooled = {site: np.concatenate([test_lp[sample][site] for sample in evals]) for site in PAIR
              if all(site in test_lp[sample] for sample in evals)}
    groups = np.concatenate([ev.test_windows + i * offset for i, ev in enumerate(evals.values())])
    out.verdict.update(pair_interval(pooled, groups, boot), pair_samples=len(evals) if len(pooled) == 2 else None)
    return out


PAIR = ("resid_mid", "block")  # the paper's pair of the final block: h_att, h_ffn


@dataclass
class EvalTokens:
    """The kNN-LM's evaluated tokens of one evaluation sample (T tokens)."""

    targets: np.ndarray       # int64 (T,) x_{t+1}
    lm_logprob: np.ndarray    # float64 (T,) log p_LM(x_{t+1} | x_<=t)
    tune: np.ndarray          # bool (T,): the tune half (else test)
    test_windows: np.ndarray  # int64 (test tokens,): the window of each test token


def evaluated_tokens(store: Store, units: Sequence[KnnUnit]) -> EvalTokens:
    from dispersion.measure import knnlm as kn

    toks = kn.read_table(store, units, "tokens")
    tune = np.asarray([h == "tune" for h in toks.column("half").to_pylist()])
    return EvalTokens(np.asarray(toks.column("target").to_numpy(), np.int64),
                      np.asarray(toks.column("lm_logprob").to_numpy(), np.float64), tune,
                      np.asarray(toks.column("window").to_numpy(), np.int64)[~tune])


def pair_interval(test_lp: dict[str, np.ndarray], windows: np.ndarray, boot: BootstrapSpec) -> dict:
    """The paper's pair on the test tokens at each key's tuned (λ, T): perplexity with the
    ``block`` key minus with the ``resid_mid`` key (> 0: ``resid_mid`` is better), its
    bootstrap interval over the evaluation windows and the bootstrap p of a zero difference."""
    none = {"pair_ppl_diff": None, "pair_ci_low": None, "pair_ci_high": None, "pair_p": None,
            "pair_windows": None, "pair_tokens": None, "pair_n_boot": None}
    if len(test_lp) < 2 or not boot.n:
        return none
    diff, resampled = bootstrap_ppl_difference(test_lp["resid_mid"], test_lp["block"], windows, n_boot=boot.n,
                                               seed=boot.seed)
    ci = interval(resampled, boot.level)
    return {"pair_ppl_diff": diff, "pair_ci_low": ci.low, "pair_ci_high": ci.high, "pair_p": bootstrap_p(resampled),
            "pair_windows": int(np.unique(windows).size), "pair_tokens": int(windows.size), "pair_n_boot": ci.n_boot}


def _rho(x: Sequence[float | None], y: Sequence[float | None]) -> tuple[float | None, float | None]:
    r = spearman([math.nan if v is None else v for v in x], [math.nan if v is None else v for v in y])
    return (None, None) if r is None else (r.rho, r.p)


def verdict(base: dict, cands: list[dict], final: str) -> dict:
    """Spearman of dispersion vs improvement over the candidates, whether the most dispersed
    candidate is the best, and the paper's pair (``resid_mid`` vs ``block``, final block)."""
    rows = [c for c in cands if c["dispersion"] is not None]
    out: dict = {**base, "candidates": len(rows)}
    out["rho"], out["p"] = _rho([c["dispersion"] for c in rows], [c["improvement"] for c in rows])
    out["tuned_rho"], out["tuned_p"] = _rho([c["dispersion"] for c in rows], [c["tuned_improvement"] for c in rows])
    out["within_rho"], out["within_p"] = _rho([c["within"] for c in rows], [c["improvement"] for c in rows])
    if rows:
        top = max(rows, key=lambda c: c["dispersion"])
        best = min(rows, key=lambda c: c["knn_ppl"])
        best_t = min(rows, key=lambda c: c["tuned_ppl"])
        out.update(most_dispersed=top["key"], best=best["key"], best_tuned=best_t["key"],
                   most_dispersed_is_best=top["key"] == best["key"],
                   most_dispersed_is_best_tuned=top["key"] == best_t["key"])
    else:
        out.update(most_dispersed=None, best=None, best_tuned=None, most_dispersed_is_best=None,
                   most_dispersed_is_best_tuned=None)
    pair = {c["site"]: c for c in rows if c["layer"] == final and c["site"] in ("resid_mid", "block")}
    if len(pair) == 2:
        att, ffn = pair["resid_mid"], pair["block"]
        out.update(att_dispersion=att["dispersion"], ffn_dispersion=ffn["dispersion"],
                   att_knn_ppl=att["knn_ppl"], ffn_knn_ppl=ffn["knn_ppl"],
                   att_more_dispersed=att["dispersion"] > ffn["dispersion"],
                   att_better=att["knn_ppl"] < ffn["knn_ppl"],
                   att_better_tuned=att["tuned_ppl"] < ffn["tuned_ppl"])
    else:
        out.update(att_dispersion=None, ffn_dispersion=None, att_knn_ppl=None, ffn_knn_ppl=None,
                   att_more_dispersed=None, att_better=None, att_better_tuned=None)
    return out


VERDICT_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("candidates", pa.int64()),
    ("rho", pa.float64()), ("p", pa.float64()), ("tuned_rho", pa.float64()), ("tuned_p", pa.float64()),
    ("within_rho", pa.float64()), ("within_p", pa.float64()),
    ("most_dispersed", pa.string()), ("best", pa.string()), ("best_tuned", pa.string()),
    ("most_dispersed_is_best", pa.bool_()), ("most_dispersed_is_best_tuned", pa.bool_()),
    ("att_dispersion", pa.float64()), ("ffn_dispersion", pa.float64()),
    ("att_knn_ppl", pa.float64()), ("ffn_knn_ppl", pa.float64()),
    ("att_more_dispersed", pa.bool_()), ("att_better", pa.bool_()), ("att_better_tuned", pa.bool_()),
    # the pair at each key's tuned (λ, T): ppl(block) - ppl(resid_mid), bootstrap over evaluation windows
    ("pair_ppl_diff", pa.float64()), ("pair_ci_low", pa.float64()), ("pair_ci_high", pa.float64()),
    ("pair_p", pa.float64()), ("pair_windows", pa.int64()), ("pair_tokens", pa.int64()), ("pair_n_boot", pa.int64()),
    ("pair_samples", pa.int64()),  # evaluation samples pooled (``eval_seeds``)
])

PAIR_SCHEMA = pa.schema([  # the final-block pair on each evaluation sample, each key at its tuned (λ, T)
    ("model", pa.string()), ("revision", pa.string()), ("eval_seed", pa.int64()), ("primary", pa.bool_()),
    ("base_ppl", pa.float64()), ("att_tuned_ppl", pa.float64()), ("ffn_tuned_ppl", pa.float64()),
    ("att_lambda", pa.float64()), ("att_temperature", pa.float64()), ("ffn_lambda", pa.float64()),
    ("ffn_temperature", pa.float64()),
    ("pair_ppl_diff", pa.float64()), ("pair_ci_low", pa.float64()), ("pair_ci_high", pa.float64()),
    ("pair_p", pa.float64()), ("pair_windows", pa.int64()), ("pair_tokens", pa.int64()), ("pair_n_boot", pa.int64()),
])


def tables_of(results: Sequence[Measured]) -> dict[str, pa.Table]:
    """The step's five tables from the measured model@revisions."""
    def table(rows: list[dict]) -> pa.Table:
        if not rows:
            raise DataError("knnlm: nothing was measured")
        return pa.Table.from_pylist(rows)

    return {"knnlm_table1": table([r for m in results for r in m.table1]),
            "knnlm_candidates": table([r for m in results for r in m.candidates]),
            "knnlm_verdict": pa.Table.from_pylist([m.verdict for m in results], schema=VERDICT_SCHEMA),
            "knnlm_pair": pa.Table.from_pylist([r for m in results for r in m.pairs], schema=PAIR_SCHEMA),
            "knnlm_chunks": table([r for m in results for r in m.chunks])}


# --------------------------------------------------------------------------- #
# figures and markdown
# --------------------------------------------------------------------------- #
def plot_knnlm(candidates: pa.Table) -> bytes:
    """One panel per model@revision: each candidate key's dispersion (Table 1, largest N)
    against its kNN-LM perplexity (filled: lambda = 0.25, T = 1; hollow: tuned), coloured by
    site and labelled by layer; the dashed line is the base model's perplexity; Spearman's rho
    of dispersion and perplexity."""
    rows = candidates.to_pylist()
    groups = list(dict.fromkeys((r["model"], r["revision"]) for r in rows))
    colors = category_colors(dict.fromkeys(r["site"] for r in rows))
    cols = min(3, len(groups))
    fig = Figure(math.ceil(len(groups) / cols), cols, width=3.6, height=2.9)
    for i, (model, rev) in enumerate(groups):
        ax = fig.ax(i // cols, i % cols)
        rs = [r for r in rows if (r["model"], r["revision"]) == (model, rev) and r["dispersion"] is not None]
        for site, color in colors.items():
            pts = [r for r in rs if r["site"] == site]
            if not pts:
                continue
            ax.scatter([r["dispersion"] for r in pts], [r["knn_ppl"] for r in pts], color=color, s=22,
                       label=f"{site} (λ = 0.25)", zorder=3)
            ax.scatter([r["dispersion"] for r in pts], [r["tuned_ppl"] for r in pts], facecolors="none",
                       edgecolors=color, s=22, linewidths=0.8, label=f"{site} (tuned λ, T)", zorder=3)
            for r in pts:
                ax.annotate(r["layer"], (r["dispersion"], r["knn_ppl"]), textcoords="offset points", xytext=(3, 2),
                            fontsize=6, color=color)
        if rs:
            ax.axhline(rs[0]["base_ppl"], color="#777777", linestyle="--", linewidth=0.8, label="base model")
        fig.style(ax, f"{model}@{rev}", "dispersion (last token, Table 1)", "kNN-LM perplexity (test half)")
        fig.annotate(ax, [(None, "black", spearman([r["dispersion"] for r in rs], [r["knn_ppl"] for r in rs]))])
    for j in range(len(groups), fig.axes.size):
        fig.off(fig.ax(j // cols, j % cols))
    fig.legend()
    return fig.render("kNN-LM perplexity vs dispersion of each candidate key (paper 001 Sec. 3.3)")


def plot_chunks(chunks: pa.Table, finals: dict[tuple[str, str], str]) -> bytes:
    """Fig. 34: per chunk, the base model's perplexity against the within-chunk dispersion of
    the final block's ``resid_mid`` (h_att) and ``block`` (h_ffn), one panel per model@revision."""
    rows = chunks.to_pylist()
    groups = list(finals)
    colors = {"resid_mid": category_colors(["a"])["a"], "block": category_colors(["a", "b", "c", "d"])["d"]}
    cols = min(3, max(1, len(groups)))
    fig = Figure(math.ceil(max(1, len(groups)) / cols), cols, width=3.4, height=2.7)
    for i, g in enumerate(groups):
        ax = fig.ax(i // cols, i % cols)
        notes = []
        for site, label in (("resid_mid", "h_att (resid_mid)"), ("block", "h_ffn (block)")):
            pts = [r for r in rows
                   if (r["model"], r["revision"]) == g and r["layer"] == finals[g] and r["site"] == site]
            if not pts:
                continue
            ax.scatter([r["within"] for r in pts], [r["ppl"] for r in pts], color=colors[site], s=8, alpha=0.7,
                       label=label)
            notes.append((label, colors[site], spearman([r["within"] for r in pts], [r["ppl"] for r in pts])))
        fig.style(ax, f"{g[0]}@{g[1]}, block {finals[g]}", "within-chunk dispersion", "chunk perplexity", logy=True)
        fig.annotate(ax, notes)
    for j in range(len(groups), fig.axes.size):
        fig.off(fig.ax(j // cols, j % cols))
    fig.legend()
    return fig.render("Perplexity vs sub-layer dispersion per chunk (paper 001 Fig. 34)")


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def summary_markdown(tables: dict[str, pa.Table], finals: dict[tuple[str, str], str]) -> str:
    v = tables["knnlm_verdict"]
    c = tables["knnlm_candidates"]
    t1 = tables["knnlm_table1"].to_pylist()
    out = ["**Verdict** (perplexities on the test half; rho: Spearman of dispersion vs improvement over "
           "the candidates; att = `resid_mid`, ffn = `block` of the final block):", "",
           md_table(v, ["model", "revision", "candidates", "rho", "p", "tuned_rho", "most_dispersed", "best",
                        "best_tuned", "most_dispersed_is_best", "att_more_dispersed", "att_better"]),
           "**The final-block pair** (`resid_mid` vs `block`, each at its tuned λ and T; diff = perplexity with "
           "`block` minus with `resid_mid`, > 0: `resid_mid` is the better key; interval: bootstrap over the test "
           "windows), on each evaluation sample:", "",
           md_table(tables["knnlm_pair"], ["model", "revision", "eval_seed", "base_ppl", "att_tuned_ppl",
                                           "ffn_tuned_ppl", "pair_ppl_diff", "pair_ci_low", "pair_ci_high",
                                           "pair_p", "pair_windows", "pair_tokens"]),
           "and pooled over the samples:", "",
           md_table(v, ["model", "revision", "pair_samples", "pair_ppl_diff", "pair_ci_low", "pair_ci_high",
                        "pair_p", "pair_windows", "pair_tokens"]),
           "**Candidates** (the first evaluation sample):", "",
           md_table(c, ["model", "key", "dispersion", "within", "base_ppl", "knn_ppl", "improvement_pct",
                        "tuned_lambda", "tuned_ppl", "tuned_improvement_pct"], limit=200)]
    ns = sorted({r["n_chunks"] for r in t1})
    lines = ["| model | site | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
    for g, layer in finals.items():
        for site in dict.fromkeys(r["site"] for r in t1):
            cells = {r["n_chunks"]: _pm(r["mean"], r["std"]) for r in t1
                     if (r["model"], r["revision"]) == g and r["layer"] == layer and r["site"] == site}
            if cells:
                lines.append(f"| {g[0]} | {site} | " + " | ".join(cells.get(n, "") for n in ns) + " |")
    out += ["**Table 1** (final block, last-token dispersion, mean ± std over seeds; every layer in "
            "`knnlm_table1`):", "", "\n".join(lines), ""]
    return "\n".join(out)


# -- the step ------------------------------------------------------

def run(ctx: StepContext) -> Section:
    """From the published shards of :func:`plan_step`: Table 1 and every candidate's kNN-LM
    (FAISS search and scoring), and the verdict."""
    opts: KnnlmOptions = ctx.options("knnlm")
    plans: list[ModelPlan] = ctx.planned["knnlm"].detail
    results = [measure(ctx.store, p, opts, log=ctx.log, boot=ctx.analysis.bootstrap) for p in plans]
    tables = tables_of(results)
    finals = {(p.mr.model, p.mr.revision): str(p.n_layers) for p in plans}
    figures = {"knnlm": plot_knnlm(tables["knnlm_candidates"]),
               "knnlm_chunks": plot_chunks(tables["knnlm_chunks"], finals)}
    return STEP.section(tables=tables, figures=figures, markdown=summary_markdown(tables, finals))


STEP = Step(name="knnlm", title="Layer selection for kNN-LM: dispersion vs a real kNN-LM",
            paper="001 Sec. 3.3, Table 1, B.3, Fig. 34",
            tables=("knnlm_table1", "knnlm_candidates", "knnlm_verdict", "knnlm_pair", "knnlm_chunks"),
            run=run, options=KnnlmOptions, default=KnnlmOptions, plan=plan_step, unit_name="windows")
