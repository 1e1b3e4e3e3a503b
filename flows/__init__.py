"""Prefect flows: ``scan-models`` (flows/scan_models.py) and ``checkpoint-sweep``
(flows/checkpoint_sweep.py), thin DAGs over tasks/ and the library."""

import tasks  # noqa: F401 - sets the Prefect server's startup timeout before Prefect is imported
