"""Prefect tasks (``tasks.steps``) and Ray remote work (``tasks.ray_extract``) wrapping the
dispersion library. The unit of work stays the library's plain function
``dispersion.measure.scan.run_unit``; Ray actors hold a model@revision and call it per shard.

Without ``PREFECT_API_URL`` a flow run starts a temporary Prefect API server, which Prefect
waits for ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (its default, 20 s, is too
short on a loaded machine: the first run failed with "Timed out while attempting to connect
to ephemeral Prefect API server"). Importing this package raises the default to
``STARTUP_TIMEOUT_S``; an explicit setting in the environment wins. Prefect reads its
settings once, when it is first imported, so this package is imported before Prefect.
"""

import os

STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 120

os.environ.setdefault(STARTUP_SETTING, str(STARTUP_TIMEOUT_S))
