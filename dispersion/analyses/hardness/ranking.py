"""Per-example ranking (beyond the paper): AUROC of a per-query score for flagging a wrong answer,
and the error rate of the flagged tail.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np


# --------------------------------------------------------------------------- #
# per-example ranking
# --------------------------------------------------------------------------- #
def rank_scores(score: np.ndarray, correct: np.ndarray, *, flag: Literal["low", "high"], tail: float = 0.1
                ) -> dict[str, float | int | None]:
    """How well one per-example score flags wrong answers.

    ``flag = "low"``: low scores are predicted wrong (mean cosine distance, within-query
    dispersion); ``"high"``: high scores are (perplexity). Returns ``auroc`` (scikit-learn's
    ``roc_auc_score`` of *wrong* against the score oriented that way: > 0.5 supports the
    direction; None with one class only), ``tail_n`` = ceil(tail N) flagged queries (the lowest
    or highest, stable order) and their ``tail_error_rate``, and the pool's ``error_rate``.
    """
    from sklearn.metrics import roc_auc_score

    s = np.asarray(score, np.float64)
    wrong = ~np.asarray(correct, bool)
    oriented = -s if flag == "low" else s
    auroc = float(roc_auc_score(wrong, oriented)) if 0 < wrong.sum() < wrong.size else None
    k = max(1, int(math.ceil(tail * s.size - 1e-9)))
    flagged = np.argsort(-oriented, kind="stable")[:k]
    return {"auroc": auroc, "tail_n": k, "tail_error_rate": float(wrong[flagged].mean()),
            "error_rate": float(wrong.mean()), "n": int(s.size)}
