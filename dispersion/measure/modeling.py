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


_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def check_weights(source: ModelSource, field: str = "id") -> None:
    """Fail, naming ``field``, when the weights are not there in the one format
    :func:`load_model` reads (safetensors): before a scan samples or publishes anything.

    A local folder must hold a ``*.safetensors`` file (one file or the shards of an index);
    a hub repository is asked for its file list, and the check is skipped when the hub
    cannot be asked (offline): loading then gives its own error."""
    if source.local:
        root = Path(source.location)
        if any(root.glob("*.safetensors")):
            return
        others = sorted(f.name for f in root.iterdir() if f.is_file() and f.suffix in _OTHER_WEIGHTS)
        found = f" (found {', '.join(others)})" if others else ""
        raise ModelError(f"{field}: {source.location!r} has no .safetensors weights{found}; weights load only "
                         f"from safetensors (convert with save_pretrained(..., safe_serialization=True))")
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(source.location, revision=source.revision)
        names = [s.rfilename for s in (info.siblings or [])]
    except Exception:  # noqa: BLE001 - offline, gated or unknown: loading reports it
        return
    if names and not any(n.endswith(".safetensors") for n in names):
        raise ModelError(f"{field}: {source.describe()!r} has no .safetensors weights on the hub; "
                         f"weights load only from safetensors")


# Model types whose causal-LM class is a decoder only when the config says ``is_decoder: true``
# (BERT and its relatives load as ``BertLMHeadModel`` with bidirectional attention otherwise):
# every type that transformers also maps to a masked-LM class.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "WithLMHead", "ForConditionalGeneration")


def causal_lm_problem(config) -> str | None:
    """Why a model config is not a causal language model (``None`` when it is one).

    The rule, in order: an encoder-decoder is refused (``is_encoder_decoder``); a model
    type that has a masked-LM class in transformers (BERT, RoBERTa, ELECTRA, ...) is a
    bidirectional encoder unless its config sets ``is_decoder: true``; declared
    ``architectures`` must include a language-model head (a class name ending in
    ``ForCausalLM``, ``LMHeadModel``, ``WithLMHead`` or ``ForConditionalGeneration``), so a
    ``BertModel`` or a ``...ForSequenceClassification`` checkpoint, whose LM head would be
    random, is refused; and the model type must have a causal-LM class (in transformers,
    or in the repository's ``auto_map`` with ``trust_remote_code``)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None) or "?"
    if getattr(config, "is_encoder_decoder", False):
        return f"an encoder-decoder model (model_type {kind!r})"
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
            and not getattr(config, "is_decoder", False) and not getattr(config, "causal", False):
        return f"a bidirectional encoder (model_type {kind!r} without is_decoder: true)"
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return f"not a language model (architectures {', '.join(archs)} have no causal LM head)"
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        return f"not a causal language model (transformers has no causal-LM class for model_type {kind!r})"
    return None


def load_tokenizer(source: ModelSource, field: str = "id"):
    """The model's tokenizer. Documents are tokenized whole and cut into segments later, so
    transformers' "Token indices sequence length is longer than the specified maximum" warning
    is noise here and is switched off for this tokenizer."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, source, field)
    warned = getattr(tok, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


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
