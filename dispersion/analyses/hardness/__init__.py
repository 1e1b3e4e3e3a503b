r"""Ranking example hardness without labels, and calibration by dispersion (paper 001
Sec. 3.1, Fig. 8; B.1.2-B.1.4, Tables 3-8).

For one model and one query set with correctness labels (:mod:`dispersion.measure.queries`:
lm-eval sample logs, a table, or the embedded multiple-choice cloze the model answers itself),
every query i has an embedding E_i (default: the final layer's state at the query's last
token, the paper's choice), a perplexity ppl_i of its text, and a label.

**Controlled slicing (Sec. 3.1, B.1.2).** For each target fraction f = 0, 0.1, ..., 1, a slice
of S queries holds exactly round(f S) correct and S - round(f S) incorrect queries, drawn
without replacement, R times (seeds). Per slice

.. math::
    \bar D = \binom{S}{2}^{-1}\sum_{i<j}\Big[1 - \frac{E_i\cdot E_j}{\|E_i\|\|E_j\|}\Big]
    \quad\text{(Eq. 1)}, \qquad \overline{\mathrm{ppl}} = \frac1S \sum_i \mathrm{ppl}_i,

reported as mean +- standard error (std / sqrt(R)) over the seeds; Spearman's rho of f against
each (over the per-fraction means, and over every slice) says which signal is monotone in
correctness. With ``scope: within`` the slice's value is the mean within-query token dispersion
instead. When the pool holds fewer than S correct or incorrect queries, S becomes the largest
size every fraction can be drawn at, min(S, #correct, #incorrect), recorded in ``slice_size``
and logged: never sampled with replacement.

**Calibration by dispersion (B.1.3).** Per seed the pool is split 20/10/70 into calibration,
validation and test parts. Dense slices (f = 0, 0.02, ..., 1) of the calibration part train
regressors accuracy = g(dispersion): linear, polynomial (degree 2 and 3), isotonic (direction
from the data) and random forest (scikit-learn); the one with the least mean absolute error on
the validation part's slices (f = 0, 0.1, ..., 1) predicts the accuracy of the test part's
slices from their dispersion alone. MAE in percentage points, over ``calibration_seeds`` seeds;
beside it the MAE of the constant predictor (the calibration slices' mean accuracy) and the
prediction for the whole test part (its natural accuracy).

**Distribution shift (B.1.4).** The slicing runs on every query set; the calibration fitted on
query set A (per seed: its chosen regressor) is applied to the test slices of query set B of
the same model, with its MAE.

**Per-example ranking (beyond the paper).** Dispersion is a property of a set; a single query
is scored by its mean cosine distance to the rest of the set,
m_i = 1 - (u_i . s - 1) / (N - 1) with unit rows u and s = sum_j u_j (O(N d),
:func:`dispersion.measure.metrics.mean_cosine_distance_to_rest`), and by its perplexity. Per
score: the AUROC for predicting a **wrong** answer in the paper's direction (low m_i flags a
wrong answer; high perplexity flags a wrong answer: an AUROC above 0.5 supports that direction,
below 0.5 the opposite), and the error rate of the flagged ``tail`` (default 10%) against the
pool's error rate.

The package, one job a module: ``options`` (``analysis.hardness``), ``slices``, ``calibration``,
``ranking``, ``tables`` (one query set's analysis, the distribution shift, the schemas),
``figures`` (and the report section), ``step`` (plan and run).

Differences from the paper: see docs/ANALYSES.md (the embedded cloze instead of MMLU/ARC on
models without a hub; the S cap; the test-part slices and natural accuracy; the constant
baseline; the per-example scores).
"""

from dispersion.analyses.hardness.calibration import Calibration, calibrate, make_regressor
from dispersion.analyses.hardness.options import FIELD, REGRESSORS, ClozeSet, HardnessOptions, LmEvalSet, TableSet
from dispersion.analyses.hardness.ranking import rank_scores
from dispersion.analyses.hardness.slices import (
           Signal,
           Slices,
           controlled_slices,
           fitting_size,
           fraction_grid,
           mixed_slice,
)
from dispersion.analyses.hardness.step import STEP, QueryJob, plan_jobs, plan_step, read_job, run
from dispersion.analyses.hardness.tables import SetResult, Variant, analyse_set, hardness_tables, variants

__all__ = ["FIELD", "REGRESSORS", "STEP", "Calibration", "ClozeSet", "HardnessOptions", "LmEvalSet", "QueryJob",
           "SetResult", "Signal", "Slices", "TableSet", "Variant", "analyse_set", "calibrate", "controlled_slices",
           "fitting_size", "fraction_grid", "hardness_tables", "make_regressor", "mixed_slice", "plan_jobs",
           "plan_step", "rank_scores", "read_job", "run", "variants"]
