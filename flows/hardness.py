"""The ``hardness`` flow: paper 001 Sec. 3.1 / B.1 (hardness ranking and calibration by dispersion).

The scan-models body (:func:`flows.scan_models.run_pipeline`) for a config whose analysis
steps include ``hardness``: its query-set shards (answers to the embedded cloze, query
embeddings and perplexities) are planned with the scan and computed by the same Ray actors
(published ones read back), then the step slices, calibrates, ranks and reports.
"""

from __future__ import annotations

from prefect import flow

from flows.scan_models import run_pipeline
from tasks.steps import load_config_task


@flow(name="hardness", log_prints=True)
def hardness(config: str = "configs/analyses.yaml", root: str | None = None, trust_remote_code: bool = False,
             overrides: list[str] | None = None) -> dict:
    """Scan ``config`` and run its analysis steps (which must include ``hardness``) into ``root``
    (default: the config's root), every query-set shard computed on Ray. ``overrides``:
    ``key.path=value`` changes to the config, as ``-o`` on the command line."""
    return run_pipeline(load_config_task(config, overrides=overrides), root, trust_remote_code, needs="hardness")[0]
