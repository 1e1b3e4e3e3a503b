"""The ``hardness`` flow: paper 001 Sec. 3.1 / B.1 (hardness ranking and calibration by dispersion)."""

from __future__ import annotations

from prefect import flow

from flows.scan_models import run_pipeline


@flow(name="hardness", log_prints=True)
def hardness(config: str = "configs/analyses.yaml", root: str | None = None, trust_remote_code: bool = False,
             overrides: list[str] | None = None) -> dict:
    """The scan-models body for a config whose analysis steps include ``hardness``: its
    query-set shards (answers to the embedded cloze, query embeddings and perplexities) are
    planned with the scan and computed by the same Ray actors (published ones read back), then
    the step slices, calibrates, ranks and reports. Arguments as for ``scan-models``."""
    return run_pipeline(config, root, trust_remote_code, overrides=overrides, needs="hardness")[0]
