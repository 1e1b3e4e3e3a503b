"""The options of the ``hardness`` step (``analysis.hardness``): query sets, slices, calibration,
ranking.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from dispersion.core.config import LayerRef, Pool, Site, Strict

FIELD = "analysis.hardness"
Regressor = Literal["linear", "poly2", "poly3", "isotonic", "forest"]
REGRESSORS: tuple[Regressor, ...] = ("linear", "poly2", "poly3", "isotonic", "forest")


# --------------------------------------------------------------------------- #
# options
# --------------------------------------------------------------------------- #
class ClozeSet(Strict):
    """The embedded multiple-choice cloze (:func:`dispersion.measure.cloze.build_cloze`):
    ``n`` queries from one domain's ``split`` (held-out by default), a context of ``context``
    tokens (T), the true continuation of ``continuation`` tokens (K) among ``choices`` (C)
    options, the others ``distractors``: the nearest spans of the same document (default) or
    continuations of other documents. Every model answers it itself; ``name`` defaults to
    ``cloze-{domain}``.

    The defaults (same-document distractors, T = 16, K = 4, C = 10) were chosen by the
    accuracy they give, never by a correlation: SmolLM2-135M answers 58% (prose) and 57% (code)
    of 200 validation queries right, where the easy variant (other documents, T = 64, K = 8,
    C = 4) is answered 93-97% right and leaves too few wrong answers to slice."""

    kind: Literal["embedded_cloze"]
    domain: Literal["prose", "code"]
    split: Literal["train", "validation", "test"] = "validation"
    context: Annotated[int, Field(ge=1)] = 16
    continuation: Annotated[int, Field(ge=1)] = 4
    choices: Annotated[int, Field(ge=2)] = 10
    distractors: Literal["same_document", "other_documents"] = "same_document"
    n: Annotated[int, Field(ge=4)] = 1000
    seed: int = 0
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None

    @property
    def set_name(self) -> str:
        return self.name or f"cloze-{self.domain}"


class LmEvalSet(Strict):
    """lm-evaluation-harness sample logs (``samples_<task>_<date>.jsonl``, written by
    ``lm_eval ... --log_samples --output_path P``) of the configured model ``model`` (at
    ``revision``, default its last): ``paths`` are files, folders (searched recursively) or
    globs. ``metric`` is the per-document 0/1 metric read as the label (``acc``, ``acc_norm``,
    ``exact_match``...), ``filter`` the lm-eval filter for tasks logged under several. One query
    set per task, or one set ``name`` over all files (e.g. MMLU's 57 subtasks)."""

    kind: Literal["lm_eval"]
    paths: Annotated[list[str], Field(min_length=1)]
    model: str
    revision: str | None = None
    metric: str = "acc"
    filter: str | None = None
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None


class TableSet(Strict):
    """A CSV/Parquet table (``query_id``, ``text``, ``correct``; optional ``task``,
    ``slice``) of answers by the configured model ``model`` (at ``revision``, default its
    last); ``name`` defaults to the file's stem."""

    kind: Literal["table"]
    path: str
    model: str
    revision: str | None = None
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None


QuerySetOption = Annotated[ClozeSet | LmEvalSet | TableSet, Field(discriminator="kind")]


def _default_sets() -> list:
    return [ClozeSet(kind="embedded_cloze", domain="prose"), ClozeSet(kind="embedded_cloze", domain="code")]


class HardnessOptions(Strict):
    """Options of the ``hardness`` step (``analysis.hardness``); paper values are the defaults.

    Attributes:
        query_sets: what is sliced (``kind: embedded_cloze | lm_eval | table``); default the
            cloze on both embedded domains.
        revisions: which revisions of each configured model answer the cloze: ``last``
            (default), ``all`` or a list. lm-eval and table sets belong to the model they name.
        slice_size: S, queries per slice (paper: 100); capped per query set to what fits.
        seeds: R, slices drawn per fraction (paper: 10).
        fraction_step: step of the target fractions, in percent (paper: 10).
        layers, site, pools: which states embed a query (paper: final layer, last token).
        scopes: ``across`` (Eq. 1 over the slice's query vectors, the paper) and/or ``within``
            (mean within-query token dispersion).
        prepend_bos: feed a BOS before each query (default: ``extraction.prepend_bos``).
        max_tokens: longer query texts keep their last ``max_tokens`` tokens.
        calibration: run the calibration (B.1.3) and distribution-shift (B.1.4) parts.
        calibration_seeds: splits of the pool (paper: 10).
        calibration_step: step of the dense calibration fractions, in percent (paper: 2).
        calibration_split: calibration / validation / test shares (paper: 0.2 / 0.1 / 0.7).
        regressors: the candidates (paper: linear, polynomial, isotonic, random forest).
        tail: share of queries flagged by each per-example score (default 10%).
        shard_size: queries per stored measurement shard (a rerun resumes per shard).
        seed: seeds every draw of slices and splits.
        permutations: P, relabellings of the pool for the permutation p-value of each Spearman
            rho (``perm_p``): the correctness labels are permuted among the queries and the
            slices drawn again, P times (0: none). Slices of one fraction share queries, so the
            asymptotic p-values over slices or fractions are too small; this one is not.
    """

    query_sets: Annotated[list[QuerySetOption], Field(min_length=1)] = Field(default_factory=_default_sets)
    revisions: Literal["last", "all"] | Annotated[list[str], Field(min_length=1)] = "last"
    slice_size: Annotated[int, Field(ge=2)] = 100
    seeds: Annotated[int, Field(ge=1)] = 10
    fraction_step: Annotated[int, Field(ge=1, le=50)] = 10
    layers: Annotated[list[LayerRef], Field(min_length=1)] = ["final"]
    site: Site = "block"
    pools: Annotated[list[Pool], Field(min_length=1)] = ["last"]
    scopes: Annotated[list[Literal["across", "within"]], Field(min_length=1)] = ["across"]
    prepend_bos: bool | None = None
    max_tokens: Annotated[int, Field(ge=2)] = 512
    calibration: bool = True
    calibration_seeds: Annotated[int, Field(ge=1)] = 10
    calibration_step: Annotated[int, Field(ge=1, le=50)] = 2
    calibration_split: tuple[float, float, float] = (0.2, 0.1, 0.7)
    regressors: Annotated[list[Regressor], Field(min_length=1)] = list(REGRESSORS)
    tail: Annotated[float, Field(gt=0, lt=1)] = 0.1
    shard_size: Annotated[int, Field(ge=1)] = 256
    seed: int = 0
    permutations: Annotated[int, Field(ge=0)] = 200

    @field_validator("fraction_step", "calibration_step")
    @classmethod
    def _divides_100(cls, v: int) -> int:
        if 100 % v:
            raise ValueError(f"must divide 100 (a grid from 0% to 100%), got {v}")
        return v

    @field_validator("calibration_split")
    @classmethod
    def _split(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0 or abs(sum(v) - 1) > 1e-6:
            raise ValueError(f"three positive shares summing to 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> HardnessOptions:
        names = [s.set_name for s in self.query_sets if isinstance(s, ClozeSet)]
        names += [s.name for s in self.query_sets if not isinstance(s, ClozeSet) and s.name]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"query_sets: two query sets named {dup!r} (give each a name)")
        return self
