"""The ``hardness`` flow: paper 001 Sec. 3.1 / B.1 (hardness ranking and calibration by dispersion).

The scan-models body (:func:`flows.scan_models.run_pipeline`) for a config whose analysis
steps include ``hardness``: its query-set shards (answers to the embedded cloze, query
embeddings and perplexities) are planned with the scan and computed by the same Ray actors
(published ones read back), then the step slices, calibrates, ranks and reports.
"""

from __future__ import annotations

from flows.scan_models import step_flow

hardness = step_flow("hardness", "configs/analyses.yaml", __doc__ or "")
