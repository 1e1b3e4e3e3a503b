"""The ``knnlm`` flow: paper 001 Sec. 3.3 measured with a real kNN-LM.

The scan-models body (:func:`flows.scan_models.run_pipeline`) for a config whose analysis
steps include ``knnlm``: its datastore and evaluation shards are planned with the scan and
computed by the same Ray actors (published ones skipped), then the step searches, scores and
reports (tables, figures, catalog views).
"""

from __future__ import annotations

from prefect import flow

from flows.scan_models import run_pipeline
from tasks.steps import load_config_task


@flow(name="knnlm", log_prints=True)
def knnlm(config: str = "configs/knnlm.yaml", root: str | None = None, trust_remote_code: bool = False,
          overrides: list[str] | None = None) -> dict:
    """Scan ``config`` and run its analysis steps (which must include ``knnlm``) into ``root``
    (default: the config's root), every kNN-LM shard computed on Ray. ``overrides``:
    ``key.path=value`` changes to the config, as ``-o`` on the command line."""
    return run_pipeline(load_config_task(config, overrides=overrides), root, trust_remote_code, needs="knnlm")[0]
