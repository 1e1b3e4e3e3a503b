"""Prefect tasks (``tasks.steps``) and Ray remote work (``tasks.ray_extract``) wrapping the
dispersion library. The unit of work stays the library's plain function
``dispersion.measure.scan.run_unit``; Ray actors hold a model@revision and call it per shard."""
