"""Where the embedded zoo's models live on disk, as the scan reads them.

``{cache}/{name}/`` holds one sub-folder per checkpoint (``step0``, ``step30``, ...) and a
``_SUCCESS`` marker whose text is the build key; ``dispersion.training.zoo`` builds them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dispersion.core.errors import ModelError
from dispersion.core.folders import cache_root, read_marker
from dispersion.core.ids import step_folder


def zoo_model_dir(cache: str | os.PathLike, name: str) -> Path:
    """``{cache}/{name}``: the model's root folder (holding ``step{N}/`` sub-folders)."""
    return cache_root(cache) / name


def zoo_revisions(cache: str | os.PathLike, name: str) -> list[str]:
    """The checkpoints present, ``['step0', 'step30', ...]``, sorted numerically."""
    root = zoo_model_dir(cache, name)
    if read_marker(root) is None:
        raise ModelError(f"zoo: model {name!r} is not built in {root.parent} (run `dispersion zoo build`)")
    steps = []
    for p in root.iterdir():
        step = step_folder(p.name)
        if step is not None and p.is_dir() and (p / "config.json").exists():
            steps.append(step)
    return [f"step{n}" for n in sorted(steps)]


def zoo_train_log(cache: str | os.PathLike, name: str) -> dict[str, Any]:
    """The model's ``train_log.json``."""
    path = zoo_model_dir(cache, name) / "train_log.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise ModelError(f"zoo: no train log for {name!r} at {path}") from None
