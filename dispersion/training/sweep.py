"""Training sweeps with dispersion losses (paper 001 Sec. 3.4, B.4, Tables 2 and 13; papers
002/003, Tables 2 and 4).

A sweep config names a zoo architecture trained from scratch (or a checkpoint to continue
from), the embedded domains, one :class:`dispersion.training.train.TrainSpec`, the loss options and a
grid (loss x lambda x learning rate x seed). Every arm is one run of ``train.train`` with the
auxiliary loss of ``dispersion.training.losses``; the baseline (``none``) runs once per (lr, seed).

Each arm is keyed by all its inputs; its per-(domain, split, step) perplexities are
published as ``train_runs/{sweep}/arm={key}.parquet`` (a rerun skips finished arms). Each
arm trains in a local work folder mirrored to ``checkpoints/{sweep}/arm={key}/`` in the
store (``dispersion.training.checkpoints.Mirror``: checkpoints at ``train.save_at`` and the last step,
and ``metrics.jsonl``, uploaded as they are written); an interrupted arm resumes from its
newest checkpoint, local or stored, so a Ray task retried on another node does not start over.
The table:

* ``sweep``: per (loss, lambda, lr, domain, split, step) the mean and std over seeds of the
  perplexity, and its difference to the baseline of the same lr (absolute and %);
* ``sweep_selected``: per loss, the (lambda, lr) with the lowest mean validation perplexity
  over domains at the last step, reported on test beside the baseline, as the papers choose
  lambda on validation and report test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, ValidationError, model_validator

from dispersion.core.config import RaySpec, Root, Strict, ZooSpec, read_yaml, validate
from dispersion.core.errors import ConfigError, DataError
from dispersion.core.ids import digest, step_of
from dispersion.core.layout import checkpoint_prefix, figure_path, report_path, result_path, train_arm_path
from dispersion.core.storage import Store
from dispersion.training.checkpoints import Mirror
from dispersion.training.losses import LOSSES, LossName, LossOptions, LossSpec
from dispersion.training.train import TrainSpec


class Grid(Strict):
    """The arms: every loss (``none`` or a registered loss, :data:`dispersion.training.losses.LOSSES`)
    x lambda x learning rate x seed."""

    losses: list[LossName] = ["none", "squeeze", "push_away", "dispersion"]
    lambdas: list[Annotated[float, Field(gt=0)]] = [0.1]
    lrs: list[Annotated[float, Field(gt=0)]] = [5e-3]
    seeds: list[int] = [0, 1]

    @model_validator(mode="after")
    def _non_empty(self) -> Grid:
        for name in ("losses", "lambdas", "lrs", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        return self


class SweepConfig(Strict):
    """A training sweep (see the module doc); ``loss`` holds the options shared by every arm
    (``tau``, ``scope``, ``max_tokens``, ``where``); ``name`` and ``lam`` come from the grid.
    Every loss of ``grid.losses`` must accept those options (``max_tokens`` is dropped for the
    cosine family, see :func:`arm_loss`) and, if it pairs domains, find at least two in ``domains``."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] = "train-sweep"
    root: Root = "runs/train-sweep"
    workdir: str = ".cache/train-sweep"       # local checkpoints of every arm
    model: str = "gpt2-tiny"                   # zoo recipe trained from scratch
    init_revision: str | None = None           # or continue from this zoo checkpoint
    domains: list[Literal["prose", "code"]] = ["prose", "code"]
    eval_splits: list[Literal["validation", "test"]] = ["validation", "test"]
    train: TrainSpec = TrainSpec(steps=200, batch_size=16, seq_len=128, lr=5e-3, warmup_steps=20,
                                 eval_every=50, eval_batches=4)
    loss: LossOptions = LossOptions()
    grid: Grid = Grid()
    zoo: ZooSpec = ZooSpec()
    ray: RaySpec = RaySpec(num_cpus=1)
    condensation_sequences: Annotated[int, Field(ge=0)] = 100

    @model_validator(mode="after")
    def _check_losses(self) -> SweepConfig:
        """Every loss of the grid accepts the shared ``loss`` options and the ``domains``."""
        for name in self.grid.losses:
            try:
                arm_loss(self, name, self.grid.lambdas[0])
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                msg = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"grid.losses: {name} with the sweep's loss options: "
                                 f"{where + ': ' if where else ''}{msg}") from None
            loss = LOSSES.get(name)
            if loss is not None and loss.needs_domain and len(set(self.domains)) < 2:
                raise ValueError(f"grid.losses: {name} pairs states of different domains; domains must "
                                 f"name at least 2, got {self.domains}")
        return self


def arm_loss(cfg: SweepConfig, loss: str, lam: float) -> LossSpec:
    """The :class:`LossSpec` of an arm: the sweep's shared ``loss`` options with the arm's loss
    and lambda; ``max_tokens`` is dropped for a loss it does not apply to (the cosine family)."""
    opts = {**cfg.loss.model_dump(), "name": loss, "lam": lam}
    entry = LOSSES.get(loss)
    if entry is None or not entry.takes_max_tokens:
        opts["max_tokens"] = None
    return LossSpec.model_validate(opts)


def load_sweep_config(path: str) -> SweepConfig:
    """Read and validate a sweep config (local path or fsspec URL); one-line ConfigError."""
    return validate(SweepConfig, read_yaml(path), str(path))


@dataclass(frozen=True)
class Arm:
    loss: str
    lam: float
    lr: float
    seed: int

    def key(self, cfg: SweepConfig) -> str:
        return digest({"arm": [self.loss, self.lam, self.lr, self.seed], "model": cfg.model,
                        "init": cfg.init_revision, "domains": cfg.domains, "train": cfg.train.model_dump(),
                        "loss": cfg.loss.model_dump(), "zoo": cfg.zoo.model_dump(
                            exclude={"cache", "checkpoints"})})

    def describe(self) -> str:
        return f"{self.loss} λ={self.lam:g} lr={self.lr:g} seed={self.seed}"


def arms(cfg: SweepConfig) -> list[Arm]:
    """The grid: every (loss, lambda, lr, seed), the baseline once per (lr, seed) with lambda 0."""
    g = cfg.grid
    out = [Arm("none", 0.0, lr, s) for lr in g.lrs for s in g.seeds]
    out += [Arm(loss, lam, lr, s) for loss in g.losses if loss != "none" for lam in g.lambdas
            for lr in g.lrs for s in g.seeds]
    return out


def arm_rel(cfg: SweepConfig, arm: Arm) -> str:
    return train_arm_path(cfg.name, arm.key(cfg))


ARM_SCHEMA = pa.schema([
    ("sweep", pa.string()), ("arm", pa.string()), ("loss", pa.string()), ("lam", pa.float64()),
    ("lr", pa.float64()), ("seed", pa.int64()), ("domain", pa.string()), ("split", pa.string()),
    ("step", pa.int64()), ("ppl", pa.float64()), ("train_loss", pa.float64()), ("seconds", pa.float64()),
    ("checkpoint", pa.string()), ("checkpoint_url", pa.string()),
])


def _tokens(cfg: SweepConfig):
    from dispersion.training.zoo import token_splits

    splits = token_splits(cfg.zoo.cache, cfg.zoo.vocab_size)

    def ids(split: str, dom: str) -> np.ndarray:
        a, b = splits[split].domains[dom]
        return splits[split].ids[a:b]
    return ({d: ids("train", d) for d in cfg.domains},
            {(d, s): ids(s, d) for d in cfg.domains for s in cfg.eval_splits})


def _model(cfg: SweepConfig, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    from dispersion.training.zoo import SPECIAL_TOKEN, ZOO_MODELS, build_tokenizer, load_raw_tokenizer, zoo_model_dir

    tok_dir = build_tokenizer(cfg.zoo.cache, cfg.zoo.vocab_size)
    if cfg.init_revision is not None:
        from dispersion.measure.modeling import load_model, resolve_source

        src = resolve_source(str(zoo_model_dir(cfg.zoo.cache, cfg.model)), cfg.init_revision, field="init_revision")
        return load_model(src, dtype="float32"), tok_dir
    if cfg.model not in ZOO_MODELS:
        raise ConfigError(f"model: unknown zoo recipe {cfg.model!r} (known: {sorted(ZOO_MODELS)})")
    special = load_raw_tokenizer(tok_dir).token_to_id(SPECIAL_TOKEN)
    config = ZOO_MODELS[cfg.model].config(cfg.zoo.vocab_size, special, special, special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config), tok_dir


def run_arm(cfg: SweepConfig, arm: Arm, store: Store, log: Callable[[str], None] = print) -> str:
    """Train one arm (resuming its checkpoints) and publish its perplexity table; a published
    arm is skipped. Returns the table's path relative to the store."""
    from dispersion.training.losses import make_aux_loss
    from dispersion.training.train import train

    rel = arm_rel(cfg, arm)
    if store.exists(rel):
        return rel
    tokens, evals = _tokens(cfg)
    model, tok_dir = _model(cfg, arm.seed)
    spec = cfg.train.model_copy(update={"lr": arm.lr, "seed": arm.seed, "aux_lambda": arm.lam})
    aux = make_aux_loss(arm_loss(cfg, arm.loss, arm.lam))
    out = Path(cfg.workdir) / cfg.name / arm.key(cfg)
    mirror = Mirror(store, checkpoint_prefix(cfg.name, arm.key(cfg)))
    result = train(model, tokens, spec, out_dir=out, eval_tokens=evals, aux_loss=aux, tokenizer=str(tok_dir),
                   run_key={"arm": arm.key(cfg)}, mirror=mirror)
    train_loss = {r["step"]: r["loss"] for r in result.history if r["kind"] == "train"}
    last = max(result.checkpoints)
    url = result.urls[last]
    rows = [{"sweep": cfg.name, "arm": arm.key(cfg), "loss": arm.loss, "lam": arm.lam, "lr": arm.lr,
             "seed": arm.seed, "domain": r["domain"], "split": r["split"], "step": r["step"], "ppl": r["ppl"],
             "train_loss": train_loss.get(r["step"]), "seconds": result.seconds,
             "checkpoint": str(result.checkpoints[last]), "checkpoint_url": url}
            for r in result.history if r["kind"] == "eval"]
    if not rows or not all(np.isfinite(r["ppl"]) for r in rows):
        raise DataError(f"train sweep arm {arm.describe()}: non-finite or missing evaluation perplexity")
    store.write_table(rel, pa.Table.from_pylist(rows, schema=ARM_SCHEMA))
    log(f"train sweep: {arm.describe()} done in {result.seconds:.1f} s")
    return rel


SWEEP_SCHEMA = pa.schema([
    ("loss", pa.string()), ("lam", pa.float64()), ("lr", pa.float64()), ("domain", pa.string()),
    ("split", pa.string()), ("step", pa.int64()), ("n_seeds", pa.int64()), ("ppl", pa.float64()),
    ("ppl_std", pa.float64()), ("baseline_ppl", pa.float64()), ("diff", pa.float64()), ("diff_pct", pa.float64()),
])
SELECTED_SCHEMA = pa.schema([
    ("loss", pa.string()), ("lam", pa.float64()), ("lr", pa.float64()), ("domain", pa.string()),
    ("step", pa.int64()), ("val_ppl", pa.float64()), ("test_ppl", pa.float64()), ("test_ppl_std", pa.float64()),
    ("baseline_test_ppl", pa.float64()), ("diff", pa.float64()), ("diff_pct", pa.float64()), ("n_seeds", pa.int64()),
])


def sweep_tables(runs: pa.Table) -> dict[str, pa.Table]:
    """``sweep`` and ``sweep_selected`` (see the module doc) from the arms' rows."""
    groups: dict[tuple, list[float]] = {}
    for r in runs.to_pylist():
        groups.setdefault((r["loss"], r["lam"], r["lr"], r["domain"], r["split"], r["step"]), []).append(r["ppl"])
    base = {(k[2], k[3], k[4], k[5]): float(np.mean(v)) for k, v in groups.items() if k[0] == "none"}
    rows = []
    for (loss, lam, lr, dom, split, step), v in sorted(groups.items()):
        b = base.get((lr, dom, split, step))
        m = float(np.mean(v))
        rows.append({"loss": loss, "lam": lam, "lr": lr, "domain": dom, "split": split, "step": step,
                     "n_seeds": len(v), "ppl": m, "ppl_std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                     "baseline_ppl": b, "diff": None if b is None else m - b,
                     "diff_pct": None if b is None else 100 * (m - b) / b})
    sweep = pa.Table.from_pylist(rows, schema=SWEEP_SCHEMA)
    last = max(r["step"] for r in rows) if rows else 0
    at_last = [r for r in rows if r["step"] == last]
    selected = []
    for loss in sorted({r["loss"] for r in at_last}):
        cands = {(r["lam"], r["lr"]) for r in at_last if r["loss"] == loss}

        def val_score(c, loss=loss):
            vals = [r["ppl"] for r in at_last if r["loss"] == loss and (r["lam"], r["lr"]) == c
                    and r["split"] == "validation"]
            return float(np.mean(vals)) if vals else float("inf")
        lam, lr = min(sorted(cands), key=val_score)
        for dom in sorted({r["domain"] for r in at_last}):
            get = {r["split"]: r for r in at_last if r["loss"] == loss and r["lam"] == lam and r["lr"] == lr
                   and r["domain"] == dom}
            test, val = get.get("test"), get.get("validation")
            if test is None:
                continue
            selected.append({"loss": loss, "lam": lam, "lr": lr, "domain": dom, "step": last,
                             "val_ppl": val["ppl"] if val else None, "test_ppl": test["ppl"],
                             "test_ppl_std": test["ppl_std"], "baseline_test_ppl": test["baseline_ppl"],
                             "diff": test["diff"], "diff_pct": test["diff_pct"], "n_seeds": test["n_seeds"]})
    return {"sweep": sweep, "sweep_selected": pa.Table.from_pylist(selected, schema=SELECTED_SCHEMA)}


def read_runs(store: Store, cfg: SweepConfig, done: list[Arm]) -> pa.Table:
    return pa.concat_tables([store.read_table(arm_rel(cfg, a)) for a in done])


def plot_sweep(runs: pa.Table) -> bytes:
    """Validation perplexity vs step per domain, one line per (loss, lambda) (mean over seeds).
    PNG with the same figure as SVG (:class:`dispersion.report.figures.FigureBytes`)."""
    from dispersion.report.figures import Figure, category_colors

    rows = [r for r in runs.to_pylist() if r["split"] == "validation"]
    domains = sorted({r["domain"] for r in rows})
    arms = sorted({(r["loss"], r["lam"], r["lr"]) for r in rows})
    colors = category_colors([a for a in arms if a[0] != "none"])
    fig = Figure(1, len(domains), width=3.8, height=3.0)
    for j, dom in enumerate(domains):
        ax = fig.ax(0, j)
        for loss, lam, lr in arms:
            pts: dict[int, list[float]] = {}
            for r in rows:
                if (r["loss"], r["lam"], r["lr"], r["domain"]) == (loss, lam, lr, dom):
                    pts.setdefault(r["step"], []).append(r["ppl"])
            steps = sorted(pts)
            baseline = loss == "none"
            ax.plot(steps, [np.mean(pts[s]) for s in steps], "o-" if baseline else ".-", ms=3,
                    lw=1.6 if baseline else 1, color="black" if baseline else colors[(loss, lam, lr)],
                    label=f"{loss} λ={lam:g} lr={lr:g}", zorder=3 if baseline else 2)
        fig.style(ax, f"{dom} · validation", "step", "perplexity (mean over seeds)", logy=True)
    fig.legend("loss (black: no auxiliary loss)")
    return fig.render("Training with dispersion losses")


def _local_checkpoint(cfg: SweepConfig, store: Store, row: dict) -> str:
    """The arm's final checkpoint on this machine: its work folder, else pulled from the store
    (the arm may have trained on another node)."""
    trained = Path(row["checkpoint"])
    here = Path(cfg.workdir) / cfg.name / row["arm"] / trained.name
    for folder in (trained, here):
        if (folder / "config.json").is_file():
            return str(folder)
    mirror = Mirror(store, checkpoint_prefix(cfg.name, row['arm']))
    step = step_of(trained.name)
    if step is None:
        raise DataError(f"{row['arm']}: checkpoint {str(trained)!r} is not a step folder")
    return str(mirror.pull(step, here.parent))


def condensation_maps(cfg: SweepConfig, runs: pa.Table, store: Store) -> bytes | None:
    """Condensation maps (papers 002/003) of the final checkpoint of seed ``min(seeds)`` of the
    baseline and of every (loss, lambda, lr) arm, on validation segments of the first domain."""
    if cfg.condensation_sequences == 0:
        return None
    from dispersion.measure import condensation as cd
    from dispersion.report.condensation import plot_condensation

    rows = runs.to_pylist()
    seed = min(cfg.grid.seeds)
    picked: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: (r["loss"] != "none", r["loss"], r["lam"], r["lr"])):
        label = f"{r['loss']} λ={r['lam']:g} lr={r['lr']:g}"
        if r["seed"] == seed and label not in picked:
            picked[label] = _local_checkpoint(cfg, store, r)
    _, evals = _tokens(cfg)
    ids = evals[(cfg.domains[0], "validation")]
    L = min(cfg.train.seq_len, 128)
    n = min(cfg.condensation_sequences, ids.size // L)
    seqs = [np.asarray(ids[i * L:(i + 1) * L]) for i in range(n)]
    spec = cd.CondensationSpec(num_sequences=n)
    models = [(cfg.model, ckpt, None, label) for label, ckpt in picked.items()]
    maps = cd.condensation_maps(models, seqs, spec, device=cfg.train.device)
    store.write_table(result_path("condensation", cfg.name), pa.concat_tables([m.to_table() for m in maps]))
    store.write_table(result_path("condensation_depth", cfg.name), cd.depth_table(maps))
    return plot_condensation(maps)


def publish(cfg: SweepConfig, store: Store, done: list[Arm], log: Callable[[str], None] = print) -> dict[str, str]:
    """Tables, figures and a markdown report of a finished sweep; returns their URLs."""
    from dispersion.core.catalog import build_catalog
    from dispersion.report.markdown import md_table

    runs = read_runs(store, cfg, done)
    tables = sweep_tables(runs)
    store.write_table(result_path("train_runs", cfg.name), runs)
    for name, t in tables.items():
        store.write_table(result_path(name, cfg.name), t)
    from dispersion.report.figures import figure_files

    for ext, data in figure_files(plot_sweep(runs)).items():
        store.write_bytes(figure_path(cfg.name, "sweep", ext), data)
    cmap = condensation_maps(cfg, runs, store)
    if cmap is not None:
        for ext, data in figure_files(cmap).items():
            store.write_bytes(figure_path(cfg.name, "condensation", ext), data)
    md = [f"# Training sweep `{cfg.name}`", "",
          f"{len(done)} runs of `{cfg.model}` ({cfg.train.steps} steps of {cfg.train.batch_size} x "
          f"{cfg.train.seq_len} tokens on {', '.join(cfg.domains)}); lambda chosen on validation, reported on test.",
          "", f"![sweep]({cfg.name}/sweep.png)", "", "## Selected (test)", "",
          md_table(tables["sweep_selected"], ["loss", "lam", "lr", "domain", "val_ppl", "test_ppl", "test_ppl_std",
                                               "baseline_test_ppl", "diff", "diff_pct", "n_seeds"]), ""]
    if cmap is not None:
        md += ["## Condensation maps", "", f"![condensation]({cfg.name}/condensation.png)", ""]
    last = max(tables["sweep"]["step"].to_pylist())
    md += ["## Every arm at the last step", "",
           md_table(tables["sweep"].filter(pc.equal(tables["sweep"]["step"], last)),
                     ["loss", "lam", "lr", "domain", "split", "ppl", "ppl_std", "diff", "diff_pct"], 200)]
    store.write_text(report_path(cfg.name), "\n".join(md))
    catalog = build_catalog(store)
    log(f"train sweep report: {store.url(report_path(cfg.name))}")
    return {"report": store.url(report_path(cfg.name)), "catalog": catalog}


def run_sweep(cfg: SweepConfig, log: Callable[[str], None] = print) -> dict[str, str]:
    """In-process sweep (the ``train-sweep`` flow runs the arms as Ray tasks instead)."""
    store = Store(cfg.root)
    todo = arms(cfg)
    for arm in todo:
        run_arm(cfg, arm, store, log)
    return publish(cfg, store, todo, log)

