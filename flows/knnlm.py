"""The ``knnlm`` flow: paper 001 Sec. 3.3 measured with a real kNN-LM.

The scan-models body (:func:`flows.scan_models.run_pipeline`) for a config whose analysis
steps include ``knnlm``: its datastore and evaluation shards are planned with the scan and
computed by the same Ray actors (published ones skipped), then the step searches, scores and
reports (tables, figures, catalog views).
"""

from __future__ import annotations

from flows.scan_models import step_flow

knnlm = step_flow("knnlm", "configs/knnlm.yaml", __doc__ or "")
