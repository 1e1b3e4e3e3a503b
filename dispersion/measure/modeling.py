"""Loading models and tokenizers: a local folder, a local checkpoint sub-folder, or a hub id
at a revision. Weights only through safetensors; ``trust_remote_code`` only when asked.

Resolution of (``id``, ``revision``):

* ``id`` is an existing local folder: ``revision`` ``main`` (or ``None``) loads the folder
  itself; any other revision loads ``id/revision`` (the OLMo-style ``stepN`` layout the
  zoo writes), and a missing sub-folder is an error listing the ones present;
* otherwise ``id`` is a hub model id and ``revision`` a branch, tag or commit
  (``stepN`` for OLMo's intermediate checkpoints), passed to ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from dispersion.core.errors import ModelError
from dispersion.core.ids import digest

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model@revision is loaded from: a local folder or (hub id, revision)."""

    location: str
    revision: str | None
    local: bool
    trust_remote_code: bool = False

    def describe(self) -> str:
        return self.location if self.local else f"{self.location}@{self.revision}"


def _looks_local(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or os.path.isdir(os.path.expanduser(model_id))


def resolve_source(model_id: str, revision: str | None, *, field: str = "id",
                   trust_remote_code: bool = False) -> ModelSource:
    """Resolve a configured model id and revision to a loadable source (see module doc)."""
    if _looks_local(model_id):
        root = Path(os.path.expanduser(model_id))
        if not root.is_dir():
            raise ModelError(f"{field}: no such model folder {model_id!r}")
        if revision in (None, "main"):
            path = root
        else:
            path = root / revision
            if not path.is_dir():
                present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
                raise ModelError(f"{field}: revision {revision!r} not found under {model_id!r} "
                                 f"(present: {', '.join(present) or 'none'})")
        if not (path / "config.json").is_file():
            raise ModelError(f"{field}: {str(path)!r} has no config.json (not a model folder)")
        return ModelSource(str(path), None, True, trust_remote_code)
    return ModelSource(model_id, revision or "main", False, trust_remote_code)


def source_fingerprint(source: ModelSource) -> str:
    """What identifies the weights, for work-unit keys.

    Local folder: a hash of ``config.json`` and the name, size and mtime of every weight
    file, so re-trained or copied-over weights are extracted again. Hub id: the commit sha
    the revision resolves to (a moving ``main`` gives a new key); when the hub cannot be
    asked (offline), the revision name.
    """
    if source.local:
        root = Path(source.location)
        files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(root.iterdir())
                 if f.suffix in (".safetensors", ".bin") and f.is_file()]
        return digest({"config": (root / "config.json").read_text(), "weights": files}, chars=20)
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(source.location, revision=source.revision).sha
    except Exception:  # offline, gated, or unknown: the revision name is all there is
        sha = None
    return f"{source.revision}@{sha}" if sha else str(source.revision)


def _from_pretrained(factory, source: ModelSource, field: str, **kwargs):
    try:
        return factory.from_pretrained(source.location, revision=source.revision,
                                       trust_remote_code=source.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{field}: cannot load {source.describe()!r}: {first}") from None


def load_tokenizer(source: ModelSource, field: str = "id"):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, source, field)


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device) -> str:
    """``auto``: bfloat16 on CUDA (if supported), float32 on CPU."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    return _DTYPES[dtype]


def load_model(source: ModelSource, *, dtype: str = "float32", device=None, field: str = "id"):
    """A causal LM in eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint load is noise in a scan
    # transformers picks SDPA attention where the architecture supports it (not Gemma-2)
    model = _from_pretrained(AutoModelForCausalLM, source, field, dtype=getattr(torch, dtype),
                             use_safetensors=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    """The context length a model config declares (None if it declares none)."""
    cfg = text_config(config)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def num_layers(config) -> int:
    return int(text_config(config).num_hidden_layers)


@contextlib.contextmanager
def quiet_transformers():
    """No "Writing model shards" bars from ``save_pretrained`` and no warning about attention
    masks (training windows contain eos = pad but are never padded); restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
