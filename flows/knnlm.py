"""The ``knnlm`` flow: paper 001 Sec. 3.3 measured with a real kNN-LM."""

from __future__ import annotations

from prefect import flow

from flows.scan_models import run_pipeline


@flow(name="knnlm", log_prints=True)
def knnlm(config: str = "configs/knnlm.yaml", root: str | None = None, trust_remote_code: bool = False,
          overrides: list[str] | None = None) -> dict:
    """The scan-models body for a config whose analysis steps include ``knnlm``: its datastore
    and evaluation shards are planned with the scan and computed by the same Ray actors
    (published ones skipped), then the step searches, scores and reports (tables, figures,
    catalog views). Arguments as for ``scan-models``."""
    return run_pipeline(config, root, trust_remote_code, overrides=overrides, needs="knnlm")[0]
